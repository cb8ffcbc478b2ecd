"""The C and PHP clients in clients/ against a running daemon: output and exit statuses.

Each test runs both clients: ``clients/c/ipcd-submit.c`` built with ``cc`` and
``clients/php/ipcctl.php`` run with ``php``. They take the key file with ``--key-file``,
name handlers by number (the ``daemon`` fixture's echo=2, sleep=3, fail=4) and exit
with ipcctl's statuses.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Instance, remove_objects

from ipcd.errors import ExitCode
from ipcd.kernel import keys
from ipcd.kernel.queues import Queue

CLIENTS = Path(__file__).resolve().parent.parent / "clients"
C_SOURCE = CLIENTS / "c" / "ipcd-submit.c"
PHP_CLI = CLIENTS / "php" / "ipcctl.php"
ECHO, SLEEP, FAIL = "2", "3", "4"
JOB_ID = "[0-9a-f]{16}"
#: php with every notice, warning and deprecation shown on stderr, where tests see them
PHP = ("php", "-d", "error_reporting=-1", "-d", "display_errors=stderr")


@dataclass(frozen=True)
class Client:
    """One client program: how to start its ``submit`` and what it calls itself."""

    prog: str
    submit_argv: tuple[str, ...]

    def submit(
        self, key_file: Path, *args: str, stdin: bytes = b"", user: int | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``submit ARGS --key-file KEY_FILE``."""
        return subprocess.run(
            [*self.submit_argv, *args, "--key-file", str(key_file)],
            input=stdin,
            capture_output=True,
            timeout=60,
            check=False,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )


@dataclass(frozen=True)
class CBuild:
    """The C client built into a temporary directory, and what the compiler said."""

    exe: Path
    compiler_output: str


@pytest.fixture(scope="module")
def c_build(tmp_path_factory: pytest.TempPathFactory) -> CBuild:
    """``clients/c/ipcd-submit.c`` compiled with the flags its README gives."""
    if shutil.which("cc") is None:
        pytest.skip("cc is not installed: cannot build the C client clients/c/ipcd-submit.c")
    exe = tmp_path_factory.mktemp("c-client") / "ipcd-submit"
    built = subprocess.run(
        ["cc", "-Wall", "-Wextra", "-O2", "-o", str(exe), str(C_SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return CBuild(exe, built.stdout + built.stderr)


def _need_php() -> None:
    if shutil.which("php") is None:
        pytest.skip("php is not installed (.ci/run installs php-cli): cannot run clients/php")


@pytest.fixture(params=["c", "php"])
def client(request: pytest.FixtureRequest) -> Client:
    """Each client in turn, skipped (with the reason) when its tool is missing."""
    if request.param == "c":
        build: CBuild = request.getfixturevalue("c_build")
        return Client("ipcd-submit", (str(build.exe),))
    _need_php()
    return Client("ipcctl.php", (*PHP, str(PHP_CLI), "submit"))


def _key_file(inst: Instance) -> Path:
    return inst.dir / "ipcd.key"


def _fill_queue(inst: Instance) -> None:
    """Put messages on the (unserved) job queue until not even one more byte fits."""
    queue = Queue.open(inst.keys.jobs)
    for size in (1000, 30, 1):
        sent = 0
        while queue.send_nowait(b"q" * size, 2):
            sent += 1
            assert sent < 1000, "the job queue never filled up"


def test_c_client_compiles_without_warnings(c_build: CBuild) -> None:
    """The C client compiles with ``cc -Wall -Wextra -O2`` and no diagnostics at all."""
    assert c_build.compiler_output == ""


def test_text_job_prints_its_output(daemon: Instance, client: Client) -> None:
    """A text payload sent to the echo handler with --wait prints the text and a newline."""
    done = client.submit(_key_file(daemon), ECHO, "hello from a client", "--wait")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"hello from a client\n", b"")


def test_json_payload_prints_the_stored_json(daemon: Instance, client: Client) -> None:
    """A --json payload reaches the handler as JSON and prints as the daemon stored it."""
    payload = '{"to": "ops", "n": [1, 2.5, null], "ok": true, "s": "a\\"b\\u00e9"}'
    done = client.submit(_key_file(daemon), ECHO, payload, "--json", "--wait")
    assert done.stderr == b""
    # the daemon stores compact JSON with non-ASCII escaped (Python's json.dumps)
    assert done.stdout == b'{"to":"ops","n":[1,2.5,null],"ok":true,"s":"a\\"b\\u00e9"}\n'
    assert done.returncode == 0


def test_text_with_quotes_and_controls_is_escaped(daemon: Instance, client: Client) -> None:
    """Quotes, backslashes, tabs, control bytes and non-ASCII text survive the envelope."""
    text = 'tab\there "quoted" back\\slash \x01 é ✓'
    done = client.submit(_key_file(daemon), ECHO, text, "--wait")
    assert (done.returncode, done.stdout, done.stderr) == (0, (text + "\n").encode(), b"")


def test_bytes_from_stdin_come_back_raw(daemon: Instance, client: Client) -> None:
    """A payload from stdin that is not UTF-8 travels as bytes and prints raw, unchanged."""
    raw = b"\xff\xfe\x00binary\n\x80"
    done = client.submit(_key_file(daemon), ECHO, "-", "--wait", stdin=raw)
    assert (done.returncode, done.stdout, done.stderr) == (0, raw, b"")


def test_submit_without_wait_prints_an_id_ipcctl_can_read(daemon: Instance, client: Client) -> None:
    """Without --wait the client prints the job id, under which ipcctl finds the result."""
    sent = client.submit(_key_file(daemon), ECHO, "for ipcctl")
    assert sent.returncode == 0 and sent.stderr == b""
    assert re.fullmatch(f"{JOB_ID}\n", sent.stdout.decode())
    shown = daemon.ipcctl("result", sent.stdout.decode().strip(), "--wait", "--timeout", "10")
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, "for ipcctl\n", "")


def test_failing_job_exits_1_with_the_error(daemon: Instance, client: Client) -> None:
    """A job whose handler fails prints nothing, names the job and error on stderr, exits 1."""
    failed = client.submit(_key_file(daemon), FAIL, "disk full", "--wait")
    assert failed.returncode == ExitCode.JOB_FAILED
    assert failed.stdout == b""
    assert re.fullmatch(f"{client.prog}: job {JOB_ID} failed: disk full\n", failed.stderr.decode())


def test_job_killed_at_its_timeout_exits_1(daemon: Instance, client: Client) -> None:
    """--timeout-job is sent in the envelope: the daemon kills the job and the client exits 1."""
    killed = client.submit(_key_file(daemon), SLEEP, "5", "--timeout-job", "0.2", "--wait")
    assert killed.returncode == ExitCode.JOB_FAILED
    assert re.fullmatch(
        rf"{client.prog}: job {JOB_ID} failed: timeout: killed after 0\.[0-9]+s\n",
        killed.stderr.decode(),
    )


def test_wait_timeout_exits_124_and_the_job_goes_on(daemon: Instance, client: Client) -> None:
    """A --wait that runs out exits 124 naming the job, which still finishes afterwards."""
    slow = client.submit(_key_file(daemon), SLEEP, "1", "--wait", "--timeout", "0.3")
    assert (slow.returncode, slow.stdout) == (ExitCode.TIMEOUT, b"")
    found = re.fullmatch(
        f"{client.prog}: no result for job ({JOB_ID}) within 0.3s\n", slow.stderr.decode()
    )
    assert found is not None, slow.stderr
    later = daemon.ipcctl("result", found[1], "--wait", "--timeout", "10")
    assert (later.returncode, later.stdout) == (0, "slept 1s\n")


def test_wait_with_no_daemon_serving_says_so(instance: Instance, client: Client) -> None:
    """With the queue there but no daemon, --wait exits 124 and says the job waits for a start."""
    assert instance.ipcd("start").returncode == 0
    assert instance.ipcd("stop").returncode == 0
    waited = client.submit(_key_file(instance), ECHO, "later", "--wait", "--timeout", "0.2")
    assert waited.returncode == ExitCode.TIMEOUT
    assert re.fullmatch(
        f"{client.prog}: no result for job {JOB_ID} within 0.2s "
        r"\(no daemon is serving the queue: the job waits for the next start\)\n",
        waited.stderr.decode(),
    )


def test_missing_queue_exits_69(tmp_path: Path, client: Client) -> None:
    """A key file whose key has no queue (no daemon ever ran with it) exits 69."""
    key_file = tmp_path / "never-started.key"
    key_file.touch()
    key = keys.ftok(key_file, 0x49)
    missing = client.submit(key_file, ECHO, "anyone?", "--wait")
    assert (missing.returncode, missing.stdout) == (ExitCode.UNAVAILABLE, b"")
    assert missing.stderr.decode() == (
        f"{client.prog}: no job queue at key {key:#010x}: is ipcd running with this key file?\n"
    )


def test_missing_key_file_exits_69(tmp_path: Path, client: Client) -> None:
    """A key file that does not exist exits 69, as ipcctl does before the first start."""
    key_file = tmp_path / "absent.key"
    missing = client.submit(key_file, ECHO, "anyone?")
    assert missing.returncode == ExitCode.UNAVAILABLE
    assert missing.stderr.decode() == (
        f"{client.prog}: key file {key_file} does not exist (the daemon creates it at its "
        "first start): is ipcd installed and started?\n"
    )


def test_full_queue_exits_75(instance: Instance, client: Client) -> None:
    """A queue that stays full for the send timeout exits 75: the job was not accepted."""
    assert instance.ipcd("start").returncode == 0
    assert instance.ipcd("stop").returncode == 0
    _fill_queue(instance)
    full = client.submit(_key_file(instance), ECHO, "one more", "--send-timeout", "0.2")
    assert (full.returncode, full.stdout) == (ExitCode.QUEUE_FULL, b"")
    assert full.stderr.decode() == (
        f"{client.prog}: queue {instance.keys.jobs:#010x} stayed full for 0.2s; "
        "the job was not accepted\n"
    )


def test_invalid_json_payload_exits_65(daemon: Instance, client: Client) -> None:
    """A --json payload that is not JSON, or nested deeper than ipcd allows, is never sent."""
    broken = client.submit(_key_file(daemon), ECHO, '{"a": [1,}', "--json")
    assert broken.returncode == ExitCode.DATA
    assert broken.stderr.decode().startswith(f"{client.prog}: payload is not valid JSON")
    deepest = client.submit(_key_file(daemon), ECHO, "[" * 33 + "]" * 33, "--json", "--wait")
    assert (deepest.returncode, deepest.stdout) == (0, ("[" * 33 + "]" * 33 + "\n").encode())
    deep = client.submit(_key_file(daemon), ECHO, "[" * 34 + "]" * 34, "--json")
    assert (deep.returncode, deep.stderr) == (
        ExitCode.DATA,
        f"{client.prog}: payload nested deeper than 32 levels\n".encode(),
    )


def test_handler_name_is_a_usage_error(tmp_path: Path, client: Client) -> None:
    """A handler name instead of a type number exits 64: the clients read no configuration."""
    named = client.submit(tmp_path / "ipcd.key", "echo", "hello")
    assert named.returncode == ExitCode.USAGE
    assert named.stderr.decode().endswith(
        f"{client.prog}: TYPE must be a number from 1 to 2147483647, not 'echo'\n"
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ipcd-clients-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_permission_denied_exits_77(shared_dir: Path, client: Client) -> None:
    """A user outside the daemon's group gets 77 from the default 0660 queue."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the client as an unprivileged user")
    for program in client.submit_argv:  # nobody must reach the programs: copy them here
        source = Path(program)
        if source.is_file():
            shutil.copy(source, shared_dir / source.name)
    if client.prog == "ipcctl.php":
        shutil.copy(PHP_CLI.parent / "ipcd.php", shared_dir / "ipcd.php")
    argv = tuple(
        str(shared_dir / Path(a).name) if Path(a).is_file() else a for a in client.submit_argv
    )
    inst = Instance(shared_dir, shared_dir / "ipcd.toml")
    inst.write()
    assert inst.ipcd("start").returncode == 0
    try:
        _key_file(inst).chmod(0o644)
        denied = Client(client.prog, argv).submit(_key_file(inst), ECHO, "forged", user=65534)
        assert (denied.returncode, denied.stdout) == (ExitCode.NO_PERMISSION, b"")
        assert denied.stderr.decode() == (
            f"{client.prog}: permission denied on the job queue at key {inst.keys.jobs:#010x} "
            "(are you in the daemon's group?)\n"
        )
    finally:
        inst.ipcd("stop")
        remove_objects(inst)


def test_php_key_agrees_with_ipcctl(daemon: Instance) -> None:
    """``ipcctl.php key`` prints exactly what ``ipcctl key`` prints, through PHP's ftok()."""
    _need_php()
    shown = subprocess.run(
        [*PHP, str(PHP_CLI), "key", "--key-file", str(_key_file(daemon))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    expected = daemon.ipcctl("key")
    assert expected.returncode == 0
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, expected.stdout, "")
    assert f"{daemon.keys.jobs:#010x}" in shown.stdout


def test_php_result_reads_a_job_submitted_by_ipcctl(daemon: Instance) -> None:
    """``ipcctl.php result ID`` reads a result ipcctl's job stored, and exits 66 for none."""
    _need_php()
    job_id = daemon.ipcctl("submit", "echo", "stored").stdout.strip()
    assert daemon.ipcctl("result", job_id, "--wait", "--timeout", "10").returncode == 0
    argv = [*PHP, str(PHP_CLI), "result", "--key-file", str(_key_file(daemon))]
    shown = subprocess.run([*argv, job_id], capture_output=True, timeout=60, check=False)
    assert (shown.returncode, shown.stdout, shown.stderr) == (0, b"stored\n", b"")
    none = subprocess.run([*argv, "0123456789abcdef"], capture_output=True, timeout=60, check=False)
    assert (none.returncode, none.stdout) == (ExitCode.NO_RESULT, b"")
    assert none.stderr == (
        b"ipcctl.php: no result for job 0123456789abcdef "
        b"(still queued or running, evicted, or never submitted)\n"
    )
