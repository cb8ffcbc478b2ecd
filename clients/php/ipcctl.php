<?php
/**
 * ipcctl.php: ipcctl's submit, result and key commands in PHP, with ipcctl's exit
 * statuses, for hosts and scripts that have PHP but should not depend on Python.
 *
 *     php ipcctl.php submit 2 hello --wait --key-file /var/lib/ipcd/ipcd.key
 *
 * No configuration file is read: TYPE is the handler's message type number, and the key
 * comes from --key-file/--proj-id (the config's [ipc] key_path and proj_id) or --key.
 */

declare(strict_types=1);

require __DIR__ . '/ipcd.php';

const PROG = 'ipcctl.php';
const USAGE = <<<'TXT'
usage: ipcctl.php submit TYPE [PAYLOAD | -] [--json] [--wait] [--timeout S]
                  [--timeout-job S] [--send-timeout S] [KEY OPTIONS]
       ipcctl.php result JOB_ID [KEY OPTIONS]
       ipcctl.php key [KEY OPTIONS]
key options: --key-file PATH (default /var/lib/ipcd/ipcd.key) and --proj-id N (default 0x49),
             or --key K for a daemon configured with an explicit [ipc] key

TXT;
const HELP = <<<'TXT'
submit: queue a job of message type TYPE; print its id, or with --wait its output
        (PAYLOAD text, - reads stdin, --json: the payload is JSON; --timeout S: how long
        --wait waits, default 30; --timeout-job S: kill the job after S seconds;
        --send-timeout S: how long to wait while the queue is full, default 5)
result: print a stored result
key:    print the IPC keys and how they are derived (as ipcctl key does)
exit status: 0 ok, 1 job failed, 64 usage, 65 bad payload, 66 no such result,
  69 daemon or queue not there, 75 queue full (job not accepted), 77 permission denied,
  78 unreadable key file, 124 timed out waiting

TXT;

final class UsageError extends Exception
{
}

/** @param list<string> $args the command line without the script name */
function main(array $args): int
{
    $flags = ['json' => false, 'wait' => false];
    $values = [
        'timeout' => '30', 'timeout-job' => null, 'send-timeout' => '5',
        'key-file' => Ipcd\Client::DEFAULT_KEY_FILE, 'proj-id' => null, 'key' => null,
    ];
    $positional = [];
    for ($i = 0, $n = count($args); $i < $n; $i++) {
        $arg = $args[$i];
        if ($arg === '--') {
            array_push($positional, ...array_slice($args, $i + 1));
            break;
        }
        if ($arg === '-h' || $arg === '--help') {
            fwrite(STDOUT, USAGE . HELP);
            return 0;
        }
        if ($arg === '-' || !str_starts_with($arg, '-')) {
            $positional[] = $arg;
            continue;
        }
        [$name, $value] = str_contains($arg, '=') ? explode('=', substr($arg, 2), 2) : [substr($arg, 2), null];
        if (array_key_exists($name, $flags) && $value === null) {
            $flags[$name] = true;
        } elseif (array_key_exists($name, $values)) {
            $value ??= $args[++$i] ?? throw new UsageError("--$name needs a value");
            $values[$name] = $value;
        } else {
            throw new UsageError("unknown option $arg");
        }
    }
    $command = array_shift($positional) ?? throw new UsageError('a command is required');
    $want = ['submit' => [1, 2], 'result' => [1, 1], 'key' => [0, 0]][$command]
        ?? throw new UsageError("unknown command '$command'");
    if (count($positional) < $want[0] || count($positional) > $want[1]) {
        throw new UsageError(count($positional) < $want[0] ? 'an argument is missing' : 'too many arguments');
    }

    if ($command === 'submit') { // the whole command line is checked before anything else
        // No configuration, so no handler names: a message type number only.
        $type = integer('TYPE', $positional[0], 1, 0x7FFFFFFF, false);
        $timeout = seconds('--timeout', $values['timeout']);
        $jobTimeout = $values['timeout-job'] === null ? null : seconds('--timeout-job', $values['timeout-job'], true);
        $sendTimeout = seconds('--send-timeout', $values['send-timeout']);
    }
    $client = $values['key'] !== null
        ? Ipcd\Client::fromKey(integer('--key', $values['key'], 1, 0xFFFFFFFF))
        : Ipcd\Client::fromKeyFile(
            $values['key-file'],
            $values['proj-id'] === null ? Ipcd\Client::DEFAULT_PROJ_ID : integer('--proj-id', $values['proj-id'], 1, 255),
        );

    if ($command === 'key') {
        printf("job queue, result segment, result semaphore: 0x%08x\n", $client->key);
        printf("reply queue:                   0x%08x\n", $client->replyKey());
        printf("result gate (semaphore):       0x%08x\n", $client->gateKey());
        printf("in-flight table and semaphore: 0x%08x\n", ($client->key + 0x03000000) & 0xFFFFFFFF);
        printf("failed list and semaphore:     0x%08x\n", ($client->key + 0x04000000) & 0xFFFFFFFF);
        printf("stats segment:                 0x%08x\n", ($client->key + 0x05000000) & 0xFFFFFFFF);
        printf("unique keys and semaphore:     0x%08x\n", ($client->key + 0x06000000) & 0xFFFFFFFF);
        printf("spill table and semaphore:     0x%08x\n", ($client->key + 0x07000000) & 0xFFFFFFFF);
        printf("derived from: %s\n", $client->how);
        return 0;
    }
    if ($command === 'result') {
        $result = $client->result($positional[0]);
        if ($result === null) {
            throw new Ipcd\IpcdException(
                "no result for job {$positional[0]} (still queued or running, evicted, or never submitted)",
                66,
            );
        }
        return show($result);
    }

    $payload = $positional[1] ?? null;
    if ($payload === '-') {
        $payload = stream_get_contents(STDIN);
        if ($payload === false) {
            throw new Ipcd\PayloadException('cannot read the payload from stdin', 65);
        }
    }
    $rawJson = $flags['json'] && $payload !== null; // --json without a payload: null, as ipcctl
    $jobId = $client->submit($type, $payload, $flags['wait'], $jobTimeout, $sendTimeout, $rawJson);
    if (!$flags['wait']) {
        fwrite(STDOUT, "$jobId\n");
        return 0;
    }
    return show($client->waitSubmitted($jobId, $timeout));
}

/** Print a result the way ipcctl does; the exit status (1 for a failed job). */
function show(Ipcd\Result $result): int
{
    if (!$result->ok) {
        fwrite(STDERR, PROG . ": job {$result->jobId} failed: {$result->data}\n");
        return 1;
    }
    $out = $result->data; // bytes raw, text with a newline added if it has none
    if ($result->kind === Ipcd\Result::JSON
        || ($result->kind === Ipcd\Result::TEXT && !str_ends_with($out, "\n"))) {
        $out .= "\n"; // JSON as the daemon stored it (compact), on one line
    }
    fwrite(STDOUT, $out);
    return 0;
}

function seconds(string $name, string $text, bool $positive = false): float
{
    if (!is_numeric($text) || $text !== trim($text) || (float) $text < 0
        || ($positive && (float) $text == 0) || is_infinite((float) $text)) {
        throw new UsageError(sprintf('%s: not a %s number of seconds: \'%s\'', $name, $positive ? 'positive' : 'non-negative', $text));
    }
    return (float) $text;
}

function integer(string $name, string $text, int $low, int $high, bool $hex = true): int
{
    $pattern = $hex ? '/^(0[xX][0-9a-fA-F]{1,8}|[0-9]{1,10})$/' : '/^[0-9]{1,10}$/';
    $value = null;
    if (preg_match($pattern, $text) === 1) {
        $value = str_starts_with(strtolower($text), '0x') ? (int) hexdec(substr($text, 2)) : (int) $text;
    }
    if ($value === null || $value < $low || $value > $high) {
        throw new UsageError("$name must be a number from $low to $high, not '$text'");
    }
    return $value;
}

try {
    exit(main(array_slice($argv, 1)));
} catch (UsageError $exc) {
    fwrite(STDERR, USAGE . PROG . ': ' . $exc->getMessage() . "\n");
    exit(64);
} catch (Ipcd\IpcdException $exc) {
    fwrite(STDERR, PROG . ': ' . $exc->getMessage() . "\n");
    exit($exc->getCode());
} catch (Throwable $exc) { // the CLI's top level: a bug, never "the job failed" (1)
    fwrite(STDERR, PROG . ': internal error: ' . get_class($exc) . ': ' . $exc->getMessage() . "\n");
    exit(70);
}
