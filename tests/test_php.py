"""A real PHP client (php-cli's sysvmsg) talking to a running daemon."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import Instance

PHP_BARE = r"""
$key = ftok($argv[1], "I");
$q = msg_get_queue($key);
// PHP's defaults: serialize = true, so the body is s:5:"hello";
if (!msg_send($q, 2, "hello", true, true, $err)) { fwrite(STDERR, "send: $err\n"); exit(1); }
if (!msg_send($q, 2, ["a" => 1, "list" => [1, 2]], true, true, $err)) { exit(1); }
printf("%08x\n", $key);
"""

PHP_ENVELOPE = r"""
$key = ftok($argv[1], "I");
$q = msg_get_queue($key);
$replies = msg_get_queue($key + 0x01000000);
$id = bin2hex(random_bytes(8));
$env = json_encode(["ipcd" => 1, "id" => $id, "payload" => ["from" => "php"],
                    "submitted" => microtime(true), "pid" => getmypid(), "reply" => getmypid()]);
if (!msg_send($q, 2, $env, false, true, $err)) { fwrite(STDERR, "send: $err\n"); exit(1); }
// wait for the daemon's notification: type = our pid, body = the job id
if (!msg_receive($replies, getmypid(), $type, 64, $body, false, 0, $err)) { exit(2); }
echo $id, " ", $body, "\n";
"""


PHP_TYPE_ONE = r"""
$q = msg_get_queue(ftok($argv[1], "I"));
// The article's first call: type 1, PHP's default serialization (s:5:"first";).
if (!msg_send($q, 1, "first", true, true, $err)) { fwrite(STDERR, "send: $err\n"); exit(1); }
"""


def _php(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["php", "-r", script, "--", *args], capture_output=True, text=True, timeout=30
    )


@pytest.fixture(autouse=True)
def _need_php() -> None:
    if shutil.which("php") is None:
        pytest.skip("php-cli is not installed (.ci/run installs it): cannot run PHP clients")


def test_php_msg_send_with_defaults_reaches_handler(daemon: Instance) -> None:
    """`msg_send($q, 2, 'hello')` with PHP's default serialization runs the echo handler."""
    sent = _php(PHP_BARE, str(daemon.dir / "ipcd.key"))
    assert sent.returncode == 0, sent.stderr
    assert int(sent.stdout, 16) == daemon.keys.jobs  # PHP's ftok agrees with ipcd's key
    bare = daemon.wait_events(lambda e: e["event"] == "job.done" and bool(e.get("bare")), 2)
    assert [(e["handler"], e["outcome"]) for e in bare] == [("echo", "ok")] * 2
    outputs = sorted(daemon.ipcctl("result", str(e["job_id"])).stdout for e in bare)
    assert outputs[0] == "hello\n"  # two workers: either may finish first
    assert json.loads(outputs[1]) == {"a": 1, "list": [1, 2]}


def test_php_envelope_and_reply_queue(daemon: Instance) -> None:
    """A PHP client sends an envelope, is woken through the reply queue, and finds its result."""
    done = _php(PHP_ENVELOPE, str(daemon.dir / "ipcd.key"))
    assert done.returncode == 0, done.stderr
    job_id, notified = done.stdout.split()
    assert notified == job_id
    shown = daemon.ipcctl("result", job_id)
    assert json.loads(shown.stdout) == {"from": "php"}


GUIDE = Path(__file__).parent.parent / "docs" / "php.md"
CLIENT = Path(__file__).parent.parent / "clients" / "php" / "ipcd.php"


def _guide_snippet(index: int, key_file: Path) -> str:
    """The guide's ``index``-th PHP block, pointed at the test's key file and the
    checkout's client instead of the installed paths."""
    blocks = re.findall(r"^ *```php\n(.*?)^ *```", GUIDE.read_text(), re.S | re.M)
    code = textwrap.dedent(blocks[index])
    code = code.replace("/usr/local/lib/ipcd/ipcd.php", str(CLIENT))
    return code.replace("/var/lib/ipcd/ipcd.key", str(key_file))


def _run_php_file(tmp: Path, code: str) -> subprocess.CompletedProcess[str]:
    script = tmp / "snippet.php"
    script.write_text(code)
    return subprocess.run(["php", str(script)], capture_output=True, text=True, timeout=60)


def test_php_guide_main_snippet_runs(daemon: Instance) -> None:
    """docs/php.md's first snippet (the client: submit, call, a failure, result) prints
    what the guide says it prints."""
    done = _run_php_file(daemon.dir, _guide_snippet(0, daemon.dir / "ipcd.key"))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["hello", "failed: disk full"]
    assert lines[2] in ("not yet", '{"to":"ops","n":3}')
    assert done.stderr == ""


def test_php_guide_ftok_and_sem_get_facts(daemon: Instance) -> None:
    """What the guide says of PHP: ftok of a missing file is -1, and sem_get() of ipcd's
    key fails (PHP wants a set of three, ipcd's lock is a set of one)."""
    ftok = _run_php_file(daemon.dir, _guide_snippet(1, daemon.dir / "ipcd.key"))
    assert ftok.stdout.splitlines()[-1] == "int(-1)", ftok.stdout + ftok.stderr
    sem = _run_php_file(daemon.dir, _guide_snippet(9, daemon.dir / "ipcd.key"))
    assert sem.stdout.splitlines()[-1] == "bool(false)", sem.stdout + sem.stderr
    assert f"sem_get(): Failed for key {daemon.keys.jobs:#010x}: Invalid argument" in (
        sem.stdout + sem.stderr
    )


def test_php_type_one_reaches_its_handler(instance: Instance) -> None:
    """The PHP article's ``msg_send($q, 1, "first")`` runs the handler mapped to type 1."""
    instance.write(handlers='[handlers.first]\ntype = 1\ntarget = "ipcd.handlers.builtin:echo"\n')
    assert instance.ipcd("start").returncode == 0
    sent = _php(PHP_TYPE_ONE, str(instance.dir / "ipcd.key"))
    assert sent.returncode == 0, sent.stderr
    [done] = instance.wait_events(lambda e: e["event"] == "job.done", 1)
    assert (done["handler"], done["type"], done["outcome"]) == ("first", 1, "ok")
    assert instance.ipcctl("result", str(done["job_id"])).stdout == "first\n"
    assert instance.ipcd("stop").returncode == 0
