<?php
/**
 * A PHP client for ipcd: submit jobs, wait for them and read their results.
 *
 * Plain PHP 8.0+ on Linux with the extensions Debian's php-cli ships: sysvmsg (the
 * queues), shmop (the result segment) and, when loaded, pcntl (a SIGALRM to bound a
 * blocking wait). It follows docs/protocol.md, the wire contract, and nothing else of
 * ipcd: no configuration file is read, so handlers are named by message type number.
 *
 *     require '/path/to/clients/php/ipcd.php';
 *     $ipcd = Ipcd\Client::fromKeyFile('/var/lib/ipcd/ipcd.key');
 *     $result = $ipcd->call(2, ['to' => 'ops']);           // submit, wait 30 s, read
 *     echo $result->ok ? $result->data : $result->error(), "\n";
 *
 * Every failure is an Ipcd\IpcdException whose code is ipcctl's exit status for it
 * (docs/exit-status.md): 65 bad payload, 69 no queue or segment, 75 queue full, 77
 * permission denied, 78 unreadable key file, 124 timed out. A job that ran and failed is
 * not an exception: its Result has ok = false (call Result::check() to make it one).
 *
 * How waiting works, and its limits, is in clients/php/README.md.
 */

declare(strict_types=1);

namespace Ipcd;

/** Any failure of this client; getCode() is ipcctl's exit status for it. */
class IpcdException extends \RuntimeException
{
}

/** The job ran and failed (status 1): only from Result::check(). */
final class JobFailedException extends IpcdException
{
}

/** The payload cannot be sent: not JSON, nested too deeply, or larger than msgmax (65). */
final class PayloadException extends IpcdException
{
}

/** The key file, a queue or the result segment does not exist (69). */
final class NotRunningException extends IpcdException
{
}

/** The job queue stayed full for the whole send timeout: the job was not accepted (75). */
final class QueueFullException extends IpcdException
{
}

/** The kernel refused access to a queue or the segment (77). */
final class PermissionException extends IpcdException
{
}

/** The key file cannot be read (78, as for ipcctl, whose key file comes from its config). */
final class ConfigException extends IpcdException
{
}

/** No result within the wait; the job may still run later (124). */
final class TimeoutException extends IpcdException
{
}

/** One job's outcome as stored in the result segment. */
final class Result
{
    public const BYTES = 0;
    public const TEXT = 1;
    public const JSON = 2;

    public function __construct(
        public string $jobId,
        public int $type,
        public bool $ok,
        /** self::BYTES, self::TEXT or self::JSON; an error is TEXT, its message */
        public int $kind,
        /** the output exactly as stored: raw bytes, UTF-8 text or JSON text */
        public string $data,
        public int $attempt,
        public float $submitted,
        public float $finished,
    ) {
    }

    /** The handler's return value: a string, or the decoded JSON (objects as arrays). */
    public function value(): mixed
    {
        return $this->kind === self::JSON ? json_decode($this->data, true) : $this->data;
    }

    /** The error message of a failed job, null for a successful one. */
    public function error(): ?string
    {
        return $this->ok ? null : $this->data;
    }

    /** This result, or a JobFailedException (status 1) when the job failed. */
    public function check(): self
    {
        if (!$this->ok) {
            throw new JobFailedException("job {$this->jobId} failed: {$this->data}", 1);
        }
        return $this;
    }
}

final class Client
{
    public const DEFAULT_KEY_FILE = '/var/lib/ipcd/ipcd.key';
    public const DEFAULT_PROJ_ID = 0x49;           // 'I'
    public const REPLY_KEY_OFFSET = 0x01000000;    // ftok(key_file, proj_id + 1)
    public const GATE_KEY_OFFSET = 0x02000000;     // ftok(key_file, proj_id + 2)
    public const MAX_DEPTH = 32;                    // payload nesting the daemon accepts

    // Linux errno values; PHP's sysvmsg reports errno numbers but defines no names.
    private const EINTR = 4;
    private const EACCES = 13;
    private const EINVAL = 22;
    private const EAGAIN = 11;
    private const ENOMSG = 42;
    private const EIDRM = 43;

    private const HEADER_SIZE = 64;
    private const RECORD_SIZE = 64;

    /** @var \SysvMessageQueue|null */
    private $jobs = null;
    /** @var \SysvMessageQueue|null */
    private $replies = null;

    /** @param int $key the job queue's key K, an unsigned 32-bit number */
    private function __construct(public int $key, public string $how)
    {
    }

    /**
     * The client for an ipcd whose [ipc] key_path is $keyFile: K = ftok($keyFile, $projId).
     * PHP's ftok() is the C library's, so it agrees with the daemon's key.
     */
    public static function fromKeyFile(
        string $keyFile = self::DEFAULT_KEY_FILE,
        int $projId = self::DEFAULT_PROJ_ID,
    ): self {
        if ($projId < 1 || $projId > 255) {
            throw new \InvalidArgumentException("proj_id must be 1 to 255, not $projId");
        }
        if (!file_exists($keyFile)) {
            throw new NotRunningException(
                "key file $keyFile does not exist (the daemon creates it at its first start): "
                . 'is ipcd installed and started?',
                69,
            );
        }
        $key = @ftok($keyFile, chr($projId));
        if ($key === -1) {
            throw new ConfigException("key file $keyFile: cannot stat it (permission denied?)", 78);
        }
        return new self($key & 0xFFFFFFFF, sprintf("ftok('%s', 0x%02x)", $keyFile, $projId));
    }

    /** The client for an ipcd configured with an explicit [ipc] key. */
    public static function fromKey(int $key): self
    {
        if ($key < 1 || $key > 0xFFFFFFFF) {
            throw new \InvalidArgumentException("a key is 1 to 0xffffffff, not $key");
        }
        return new self($key, sprintf('explicit key 0x%08x', $key));
    }

    public function replyKey(): int
    {
        return ($this->key + self::REPLY_KEY_OFFSET) & 0xFFFFFFFF;
    }

    public function gateKey(): int
    {
        return ($this->key + self::GATE_KEY_OFFSET) & 0xFFFFFFFF;
    }

    /**
     * Queue a job of message type $type and return its id.
     *
     * $payload is what the handler gets: null, a UTF-8 string, or any JSON-able value (an
     * empty PHP array is the JSON list []; pass (object) [] for {}). A string that is not
     * UTF-8 is sent as bytes (payload_b64). With $rawJson, $payload is JSON text, checked
     * and sent as it is. $notify asks the daemon to post the job id on the reply queue under
     * this process's PID: waitSubmitted() needs it. $jobTimeout overrides the handler's
     * timeout. A full queue is waited on for at most $sendTimeout seconds.
     */
    public function submit(
        int $type,
        mixed $payload = null,
        bool $notify = false,
        ?float $jobTimeout = null,
        float $sendTimeout = 5.0,
        bool $rawJson = false,
    ): string {
        if ($type < 1 || $type > 0x7FFFFFFF) {
            throw new \InvalidArgumentException("a job's message type is 1 to 2147483647, not $type");
        }
        $jobId = bin2hex(random_bytes(8));
        $pid = getmypid();
        $envelope = ['ipcd' => 1, 'id' => $jobId, 'submitted' => microtime(true), 'pid' => $pid];
        if ($notify) {
            $envelope['reply'] = $pid;
        }
        if ($jobTimeout !== null) {
            if (!($jobTimeout > 0) || is_infinite($jobTimeout)) {
                throw new \InvalidArgumentException('the job timeout must be a positive number');
            }
            $envelope['timeout'] = $jobTimeout;
        }
        $body = substr(self::json($envelope), 0, -1) . self::payloadMember($payload, $rawJson) . '}';
        $limit = self::msgmax();
        if (strlen($body) > $limit) {
            throw new PayloadException(sprintf(
                "message of %d bytes exceeds the kernel's msgmax of %d bytes",
                strlen($body),
                $limit,
            ), 65);
        }
        $jobs = $this->jobQueue();
        if ($notify) {
            $this->replyQueue(); // fail before sending when nobody could wake us
        }
        $err = 0;
        $send = function (bool $block) use ($jobs, $type, $body, &$err): bool {
            if (@msg_send($jobs, $type, $body, false, $block, $err)) {
                return true;
            }
            if ($err === self::EAGAIN || $err === self::EINTR) {
                return false;
            }
            throw self::ipcError($err, 'job queue', $this->key);
        };
        if (!self::bounded($send, $sendTimeout)) {
            throw new QueueFullException(sprintf(
                'queue 0x%08x stayed full for %ss; the job was not accepted',
                $this->key,
                self::seconds($sendTimeout),
            ), 75);
        }
        return $jobId;
    }

    /**
     * Wait for a job this process submitted with $notify = true, then read its result.
     *
     * Blocks in msg_receive() on the reply queue for a message of type getmypid() whose
     * body is the job id; a body that is another id is a stale notice for an earlier
     * process with our PID and is skipped. When $timeout runs out, the segment is read
     * once more before TimeoutException (124).
     */
    public function waitSubmitted(string $jobId, float $timeout = 30.0): Result
    {
        $replies = $this->replyQueue();
        $pid = getmypid();
        $replyKey = $this->replyKey();
        $notice = function (bool $block) use ($replies, $pid, $jobId, $replyKey): bool {
            $flags = MSG_NOERROR | ($block ? 0 : MSG_IPC_NOWAIT);
            while (true) {
                $err = 0;
                if (@msg_receive($replies, $pid, $type, 64, $body, false, $flags, $err)) {
                    if ($body === $jobId) {
                        return true;
                    }
                    continue; // a stale notice for an earlier process that had our PID
                }
                if ($err === self::ENOMSG || $err === self::EINTR) {
                    return false;
                }
                throw self::ipcError($err, 'reply queue', $replyKey);
            }
        };
        $deadline = self::now() + $timeout;
        while (true) {
            $notified = self::bounded($notice, $deadline - self::now());
            $result = $this->result($jobId);
            if ($result !== null) {
                return $result;
            }
            if (!$notified) {
                $hint = $this->daemonPid() === 0
                    ? ' (no daemon is serving the queue: the job waits for the next start)'
                    : '';
                throw new TimeoutException(sprintf(
                    'no result for job %s within %ss%s',
                    $jobId,
                    self::seconds($timeout),
                    $hint,
                ), 124);
            }
            // notified, but the record was evicted or torn meanwhile: wait for another
        }
    }

    /** Submit a job and wait for its result (ok or failed). */
    public function call(
        int $type,
        mixed $payload = null,
        float $timeout = 30.0,
        ?float $jobTimeout = null,
        float $sendTimeout = 5.0,
        bool $rawJson = false,
    ): Result {
        $jobId = $this->submit($type, $payload, true, $jobTimeout, $sendTimeout, $rawJson);
        return $this->waitSubmitted($jobId, $timeout);
    }

    /**
     * The newest valid stored result of $jobId, or null while there is none (queued,
     * running, waiting for a retry, evicted, or never submitted).
     *
     * Follows "Finding a job" in docs/protocol.md, re-reading the header each time. PHP
     * cannot take ipcd's lock (sysvsem only opens sets of three semaphores, ipcd's has
     * one), so the record is copied without it and trusted only with state 2 and a
     * matching CRC-32: a slot rewritten while it is read fails the check and is skipped.
     */
    public function result(string $jobId): ?Result
    {
        [$shm, $header] = $this->segment();
        if (strlen($jobId) > 16) {
            return null;
        }
        $want = str_pad($jobId, 16, "\0");
        $next = $header['next'];
        $count = $header['count'];
        $slot = $header['slot'];
        for ($seq = $next - 1; $seq >= max($next - $count, 0); $seq--) {
            $offset = self::HEADER_SIZE + ($seq % $count) * $slot;
            $head = shmop_read($shm, $offset, self::RECORD_SIZE);
            if (substr($head, 16, 16) !== $want) {
                continue;
            }
            $r = unpack(
                'Vstate/Vcrc/Pseq/a16id/Ptype/Cstatus/Ckind/vattempt/Vlength/esubmitted/efinished',
                $head,
            );
            if ($r['state'] !== 2 || $r['length'] > $slot - self::RECORD_SIZE
                || $r['status'] > 1 || $r['kind'] > 2) {
                continue;
            }
            $data = $r['length'] > 0 ? shmop_read($shm, $offset + self::RECORD_SIZE, $r['length']) : '';
            if (crc32(substr($head, 8) . $data) !== $r['crc']) {
                continue; // torn: a writer died, or the slot was rewritten while we read it
            }
            return new Result(
                $jobId,
                $r['type'],
                $r['status'] === 0,
                $r['kind'],
                $data,
                $r['attempt'],
                $r['submitted'],
                $r['finished'],
            );
        }
        return null;
    }

    /** The PID the serving daemon recorded in the segment; 0 when none serves it. */
    public function daemonPid(): int
    {
        return $this->segment()[1]['pid'];
    }

    /**
     * Run $op(bool $block) until it returns true, for at most $timeout seconds; false when
     * the time ran out. $op(false) must not block, and $op(true) must return false when a
     * signal interrupts it.
     *
     * With pcntl, a blocking call is bounded by pcntl_alarm(): its SIGALRM makes msgrcv()
     * or msgsnd() fail with EINTR, which Linux never restarts (signal(7)). pcntl_alarm()
     * counts whole seconds, so the last fraction of a second, and the whole wait without
     * pcntl (php-fpm, mod_php), is spent polling with IPC_NOWAIT and a back-off from
     * 1 ms to 50 ms.
     */
    private static function bounded(callable $op, float $timeout): bool
    {
        if ($op(false)) {
            return true;
        }
        $deadline = self::now() + $timeout;
        $pause = 0.001;
        while (true) {
            $left = $deadline - self::now();
            if ($left <= 0) {
                return false;
            }
            if ($left >= 1.0 && function_exists('pcntl_alarm')) {
                if (self::underAlarm((int) floor($left), $op)) {
                    return true;
                }
                continue;
            }
            usleep((int) (min($pause, $left) * 1e6));
            $pause = min($pause * 2, 0.05);
            if ($op(false)) {
                return true;
            }
        }
    }

    /**
     * $op(true) with a SIGALRM due in $seconds. The script's own SIGALRM handler, async
     * setting and pending alarm (to the second) are put back afterwards.
     */
    private static function underAlarm(int $seconds, callable $op): bool
    {
        $started = self::now();
        $handler = pcntl_signal_get_handler(SIGALRM);
        $async = pcntl_async_signals(true);
        pcntl_signal(SIGALRM, static function (): void {
        }, false);
        $pending = pcntl_alarm($seconds);
        try {
            return $op(true);
        } finally {
            pcntl_alarm(0);
            pcntl_signal(SIGALRM, $handler);
            pcntl_async_signals($async);
            if ($pending > 0) {
                pcntl_alarm(max(1, $pending - (int) round(self::now() - $started)));
            }
        }
    }

    /** @return \SysvMessageQueue */
    private function jobQueue()
    {
        return $this->jobs ??= self::openQueue($this->key, 'job queue');
    }

    /** @return \SysvMessageQueue */
    private function replyQueue()
    {
        return $this->replies ??= self::openQueue($this->replyKey(), 'reply queue');
    }

    /**
     * An existing queue. msg_get_queue() alone would create a missing one with mode 0666,
     * which the daemon then refuses to use, hence msg_queue_exists() first.
     *
     * @return \SysvMessageQueue
     */
    private static function openQueue(int $key, string $what)
    {
        if (!msg_queue_exists(self::keyT($key))) {
            // msgget() fails the same way for a missing queue and a forbidden one
            throw self::ipcError(self::listed('msg', $key) ? self::EACCES : self::EINVAL, $what, $key);
        }
        $queue = @msg_get_queue(self::keyT($key));
        if ($queue === false) {
            throw self::ipcError(self::EACCES, $what, $key);
        }
        return $queue;
    }

    /**
     * The result segment, attached read-only, and its checked header.
     *
     * @return array{0: \Shmop, 1: array{next: int, count: int, slot: int, pid: int}}
     */
    private function segment(): array
    {
        $shm = @shmop_open(self::keyT($this->key), 'a', 0, 0);
        if ($shm === false) {
            $err = self::listed('shm', $this->key) ? self::EACCES : self::EINVAL;
            throw self::ipcError($err, 'result segment', $this->key);
        }
        $size = shmop_size($shm);
        $h = $size >= self::HEADER_SIZE
            ? unpack('a8magic/Vversion/Vhsize/Vcount/Vslot/Pnext/Vpid', shmop_read($shm, 0, 36))
            : false;
        if ($h === false || $h['magic'] !== "IPCDRES\0" || $h['version'] !== 1
            || $h['hsize'] !== self::HEADER_SIZE || $h['count'] < 1 || $h['slot'] < self::RECORD_SIZE
            || self::HEADER_SIZE + $h['count'] * $h['slot'] > $size) {
            throw new NotRunningException(sprintf(
                'the segment at key 0x%08x is not an ipcd result segment (version 1)',
                $this->key,
            ), 69);
        }
        return [$shm, ['next' => $h['next'], 'count' => $h['count'], 'slot' => $h['slot'], 'pid' => $h['pid']]];
    }

    /** The ",\"payload\":…" member of the envelope (empty for no payload). */
    private static function payloadMember(mixed $payload, bool $rawJson): string
    {
        if ($rawJson) {
            if (!is_string($payload)) {
                throw new \InvalidArgumentException('with rawJson the payload must be a string');
            }
            $json = trim($payload, " \t\n\r");
        } elseif ($payload === null) {
            return '';
        } elseif (is_string($payload) && preg_match('//u', $payload) !== 1) {
            return ',"payload_b64":"' . base64_encode($payload) . '"'; // not UTF-8: bytes
        } else {
            $json = self::json($payload);
        }
        if (preg_match('//u', $json) !== 1) {
            throw new PayloadException('the payload is not UTF-8, so it cannot be JSON', 65);
        }
        try {
            $value = json_decode($json, true, 512, JSON_THROW_ON_ERROR);
        } catch (\JsonException $exc) {
            if ($exc->getCode() === JSON_ERROR_DEPTH) {
                throw new PayloadException(sprintf('payload nested deeper than %d levels', self::MAX_DEPTH), 65);
            }
            throw new PayloadException('payload is not valid JSON: ' . $exc->getMessage(), 65);
        }
        if (self::depth($value) > self::MAX_DEPTH) {
            throw new PayloadException(sprintf('payload nested deeper than %d levels', self::MAX_DEPTH), 65);
        }
        return ',"payload":' . $json;
    }

    /** Nesting depth as ipcd counts it: an empty array or object adds no level. */
    private static function depth(mixed $value): int
    {
        if (!is_array($value) || $value === []) {
            return 0;
        }
        $deepest = 0;
        foreach ($value as $item) {
            $deepest = max($deepest, self::depth($item));
        }
        return $deepest + 1;
    }

    private static function json(mixed $value): string
    {
        try {
            return json_encode(
                $value,
                JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION
                | JSON_THROW_ON_ERROR,
            );
        } catch (\JsonException $exc) {
            throw new PayloadException('payload cannot be encoded as JSON: ' . $exc->getMessage(), 65);
        }
    }

    private static function ipcError(int $err, string $what, int $key): IpcdException
    {
        if ($err === self::EACCES) {
            return new PermissionException(sprintf(
                "permission denied on the %s at key 0x%08x (are you in the daemon's group?)",
                $what,
                $key,
            ), 77);
        }
        if ($err === self::EINVAL || $err === self::EIDRM) {
            return new NotRunningException(sprintf(
                'no %s at key 0x%08x: is ipcd running with this key file?',
                $what,
                $key,
            ), 69);
        }
        return new IpcdException(sprintf('%s at key 0x%08x: errno %d', $what, $key, $err), 70);
    }

    /** Whether /proc/sysvipc lists an object at $key (it lists those we may not open too). */
    private static function listed(string $kind, int $key): bool
    {
        $lines = @file("/proc/sysvipc/$kind", FILE_IGNORE_NEW_LINES) ?: [];
        foreach (array_slice($lines, 1) as $line) {
            if (((int) strtok(trim($line), ' ') & 0xFFFFFFFF) === $key) {
                return true;
            }
        }
        return false;
    }

    /** The signed C key_t for an unsigned key, as the extensions pass it to the kernel. */
    private static function keyT(int $key): int
    {
        return $key >= 0x80000000 ? $key - 0x100000000 : $key;
    }

    private static function msgmax(): int
    {
        $text = @file_get_contents('/proc/sys/kernel/msgmax');
        return $text === false ? 8192 : (int) $text;
    }

    private static function now(): float
    {
        return hrtime(true) / 1e9;
    }

    /** Seconds the way Python's :g prints them in ipcctl's messages (30, 0.5). */
    private static function seconds(float $value): string
    {
        return sprintf('%g', $value);
    }
}
