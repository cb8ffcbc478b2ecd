"""Every documented exit status of ``ipcctl``, produced the way a cron script would meet it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IPCCTL, IPCD, Instance, run

from ipcd.errors import ExitCode
from ipcd.kernel.procs import alive


@pytest.fixture
def stopped(instance: Instance) -> Instance:
    """A configuration whose daemon ran once and was stopped: the queue exists, unserved."""
    assert instance.ipcd("start").returncode == 0
    assert instance.ipcd("stop").returncode == 0
    return instance


def test_success_is_quiet_apart_from_output(daemon: Instance) -> None:
    """Status 0: the output on stdout and nothing on stderr."""
    done = daemon.ipcctl("submit", "echo", "quiet", "--wait")
    assert (done.returncode, done.stdout, done.stderr) == (0, "quiet\n", "")


def test_job_failed_is_1(daemon: Instance) -> None:
    """Status 1 when the handler failed, with one line on stderr naming the job."""
    failed = daemon.ipcctl("submit", "fail", "disk full", "--wait")
    assert failed.returncode == ExitCode.JOB_FAILED
    assert failed.stderr.startswith("ipcctl: job ") and failed.stderr.endswith(
        " failed: disk full\n"
    )
    assert failed.stderr.count("\n") == 1


def test_usage_error_is_64(instance: Instance) -> None:
    """Status 64 for a command line that does not parse."""
    assert instance.ipcctl("submit").returncode == ExitCode.USAGE
    assert instance.ipcctl("frobnicate").returncode == ExitCode.USAGE
    assert instance.ipcctl("submit", "echo", "--timeout", "soon").returncode == ExitCode.USAGE


def test_options_that_need_another_are_64(instance: Instance) -> None:
    """--timeout without --wait and -q without --unique are usage errors that say why,
    not options silently ignored."""
    for args, message in (
        (["submit", "echo", "x", "--timeout", "5"], "--timeout S only applies with --wait"),
        (["result", "0123456789abcdef", "--timeout", "5"], "--timeout S only applies with --wait"),
        (["submit", "echo", "x", "-q"], "-q/--quiet only applies with --unique KEY"),
    ):
        done = instance.ipcctl(*args)
        assert done.returncode == ExitCode.USAGE, (args, done.stderr)
        assert message in done.stderr, args


def test_config_after_the_command(daemon: Instance) -> None:
    """-c/--config works after the subcommand too, for ipcctl and ipcd alike."""
    config = str(daemon.config_path)
    for argv in (
        [IPCCTL, "status", "-c", config],
        [IPCCTL, "submit", "echo", "hi", "--wait", f"--config={config}"],
        [IPCD, "status", "--config", config],
    ):
        done = run(argv)
        assert done.returncode == 0, (argv, done.stderr)
    # Given before and after, the one after the command wins, as argparse's last value does.
    both = run([IPCCTL, "-c", "/nonexistent.toml", "status", "-c", config])
    assert both.returncode == 0, both.stderr


def test_version() -> None:
    """--version prints the installed package's version, for both tools."""
    from importlib import metadata

    for prog in (IPCCTL, IPCD):
        done = run([prog, "--version"])
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{Path(prog).name} {metadata.version('ipcd')}\n"


def test_every_argument_and_command_has_help() -> None:
    """Every positional argument, option and subcommand of both tools has a help text."""
    from cli_surface import PARSERS, subcommands

    for prog, parser in PARSERS.items():
        for name, sub in subcommands(parser).items():
            assert sub.description, f"{prog} {name} has no description"
            for action in sub._actions:
                assert action.help, f"{prog} {name} {action.dest} has no help"


def test_bad_payload_is_65(daemon: Instance) -> None:
    """Status 65 for a payload that is not what --json promises."""
    bad = daemon.ipcctl("submit", "echo", "{not json", "--json")
    assert bad.returncode == ExitCode.DATA and "payload is not valid JSON" in bad.stderr


def test_bad_job_id_is_64(instance: Instance) -> None:
    """A job id no job can have is a typo (64, saying what ids look like), not a job
    whose result is gone (66); the configuration is not even read."""
    for args in (["result", "bad id!"], ["retry", "x" * 17], ["logs", "--job", ""]):
        done = instance.ipcctl(*args)
        assert done.returncode == ExitCode.USAGE, args
        assert "is not a job id (1 to 16 characters of 0-9, A-Z, a-z, _, . and -)" in done.stderr


def test_unserved_type_number_warns_and_queues(stopped: Instance) -> None:
    """A bare type number no configured handler has is queued (exit 0) with a warning;
    a configured one, by name or number, is not warned about."""
    done = stopped.ipcctl("submit", "--no-confirm", "99", "x")
    assert done.returncode == 0 and len(done.stdout.strip()) == 16
    assert done.stderr.splitlines()[0] == (
        f"ipcctl: warning: no handler in {stopped.config_path} has message type 99; "
        "the job fails unless the daemon's configuration has one"
    )
    assert stopped.ipcctl("status", "--json").stdout.count('"messages": 1') == 1
    assert stopped.ipcd("start").returncode == 0
    echo_type = str(next(h.type for h in stopped.config.handlers if h.name == "echo"))
    for handler in ("echo", echo_type):
        quiet = stopped.ipcctl("submit", handler, "x")
        assert (quiet.returncode, quiet.stderr) == (0, "")
    assert stopped.ipcd("stop").returncode == 0


def test_submit_while_no_daemon_serves_warns(stopped: Instance) -> None:
    """A fire-and-forget submit (--no-confirm) with the daemon stopped is accepted (exit 0,
    its id on stdout) with a warning on stderr that names the queue; a confirmed one says
    it is not confirmed (exit 5, its id on stdout); both run after ipcd start."""
    key = stopped.keys.jobs
    unconfirmed = stopped.ipcctl("submit", "echo", "later too")
    assert unconfirmed.returncode == ExitCode.NOT_CONFIRMED, unconfirmed.stderr
    assert "ipcd is not running; it waits in the kernel queue" in unconfirmed.stderr
    done = stopped.ipcctl("submit", "--no-confirm", "echo", "later")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert done.stderr == (
        f"ipcctl: warning: no daemon is serving the queue at key {key:#010x} "
        f"({stopped.config_path}); job {job_id} waits in the queue until ipcd starts\n"
    )
    assert stopped.ipcd("start").returncode == 0
    served = stopped.ipcctl("result", job_id, "--wait", "--timeout", "20")
    assert (served.returncode, served.stdout) == (0, "later\n"), served.stderr
    too = stopped.ipcctl("result", unconfirmed.stdout.strip(), "--wait", "--timeout", "20")
    assert (too.returncode, too.stdout) == (0, "later too\n"), too.stderr
    quiet = stopped.ipcctl("submit", "echo", "now")
    assert (quiet.returncode, quiet.stderr) == (0, "")
    # A master killed without the chance to clear its PID serves no more.
    os.kill(stopped.pid(), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while alive(stopped.pid()) and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = stopped.ipcctl("submit", "--no-confirm", "--unique", "k", "-q", "echo", "after kill")
    assert killed.returncode == 0, killed.stderr
    assert "no daemon is serving the queue" in killed.stderr  # -q does not silence it


def test_stdin_over_max_payload_is_65(stopped: Instance) -> None:
    """submit - reads at most [jobs] max_payload + 1 bytes of stdin: more is refused (65)
    without reading the rest; exactly max_payload is accepted."""
    config = stopped.config_path.read_text()
    stopped.config_path.write_text(config + "\n[jobs]\nmax_payload = 100\n")
    producer = subprocess.Popen(["yes"], stdout=subprocess.PIPE)  # never ends by itself
    try:
        refused = subprocess.run(
            [IPCCTL, "-c", str(stopped.config_path), "submit", "echo", "-"],
            stdin=producer.stdout,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        producer.kill()
        producer.wait()
        assert producer.stdout is not None
        producer.stdout.close()
    assert refused.returncode == ExitCode.DATA
    assert "stdin holds more than [jobs] max_payload (100 bytes); nothing was queued" in (
        refused.stderr
    )
    exact = stopped.ipcctl("submit", "--no-confirm", "echo", "-", input="y" * 100)
    assert exact.returncode == 0, exact.stderr


def test_no_result_is_66(daemon: Instance) -> None:
    """Status 66 for a job id the result segment does not know."""
    missing = daemon.ipcctl("result", "0123456789abcdef")
    assert missing.returncode == ExitCode.NO_RESULT
    assert "no result for job 0123456789abcdef" in missing.stderr


def test_daemon_never_started_is_69(instance: Instance) -> None:
    """Status 69 when there is no key file or no queue: ipcd never ran with this config."""
    no_key = instance.ipcctl("submit", "echo", "x")
    assert no_key.returncode == ExitCode.UNAVAILABLE and "key file" in no_key.stderr
    (instance.dir / "ipcd.key").touch()
    no_queue = instance.ipcctl("submit", "echo", "x")
    assert no_queue.returncode == ExitCode.UNAVAILABLE and "no job queue at key" in no_queue.stderr
    assert instance.ipcctl("status").returncode == ExitCode.UNAVAILABLE


def test_stopped_daemon_queues_and_status_says_so(stopped: Instance) -> None:
    """With the daemon stopped, a submit is still queued, unconfirmed (exit 5); status
    exits 69 and says why."""
    queued = stopped.ipcctl("submit", "echo", "for later")
    assert queued.returncode == ExitCode.NOT_CONFIRMED, queued.stderr
    status = stopped.ipcctl("status")
    assert status.returncode == ExitCode.UNAVAILABLE
    assert ": 1 message, " in status.stdout and "daemon     not running" in status.stdout


def test_queue_full_is_75(stopped: Instance) -> None:
    """Status 75 once the kernel queue is full for the whole send timeout; nothing is lost."""
    payload = "p" * 4000
    accepted = 0
    while True:
        sent = stopped.ipcctl("submit", "--no-confirm", "echo", payload, "--send-timeout", "0.2")
        if sent.returncode != 0:
            break
        accepted += 1
        assert accepted < 100
    assert sent.returncode == ExitCode.QUEUE_FULL
    assert "stayed full for 0.2s; the job was not accepted" in sent.stderr
    assert stopped.ipcd("start").returncode == 0  # every accepted job is then served
    try:
        done = stopped.wait_events(lambda e: e["event"] == "job.done", accepted)
        assert len(done) == accepted
        print(f"queue took {accepted} jobs of 4 KB before reporting full")
    finally:
        stopped.ipcd("stop")


def test_timeout_is_124(daemon: Instance) -> None:
    """Status 124 when --wait runs out of time; the job itself goes on."""
    slow = daemon.ipcctl("submit", "sleep", "1.5", "--wait", "--timeout", "0.3")
    assert slow.returncode == ExitCode.TIMEOUT
    assert "within 0.3s" in slow.stderr


def test_wait_on_stopped_daemon_says_why(stopped: Instance) -> None:
    """A --wait with no daemon serving times out with a hint that no daemon runs."""
    waited = stopped.ipcctl("submit", "echo", "x", "--wait", "--timeout", "0.3")
    assert waited.returncode == ExitCode.TIMEOUT and "no daemon is serving" in waited.stderr


def test_bad_config_is_78(instance: Instance) -> None:
    """Status 78 for a missing or invalid configuration, naming the file."""
    missing = run([IPCCTL, "-c", str(instance.dir / "nope.toml"), "status"])
    assert missing.returncode == ExitCode.CONFIG and "nope.toml" in missing.stderr
    instance.config_path.write_text("[ipc]\nmode = 0o666\nkey_path = 'k'\n")
    bad = instance.ipcctl("status")
    assert bad.returncode == ExitCode.CONFIG and "world-writable" in bad.stderr


def test_unknown_handler_name_is_64(daemon: Instance) -> None:
    """A handler name the config does not define, or type 0, is a usage error (64)."""
    assert daemon.ipcctl("submit", "0", "x").returncode == ExitCode.USAGE
    assert daemon.ipcctl("submit", "--timeout-job", "0", "echo", "x").returncode == ExitCode.USAGE
    unknown = daemon.ipcctl("submit", "nosuch", "x")
    assert unknown.returncode == ExitCode.USAGE
    assert "unknown handler 'nosuch' (configured: echo, sleep, fail)" in unknown.stderr


@pytest.mark.parametrize("seconds", ["1e10", "inf", "nan", "-1"])
def test_job_timeout_out_of_range_is_64(instance: Instance, seconds: str) -> None:
    """``--timeout-job`` must be a finite number of seconds the envelope can carry (at most
    1e9), else a usage error (64) before anything is sent."""
    refused = instance.ipcctl("submit", "echo", "x", f"--timeout-job={seconds}")
    assert refused.returncode == ExitCode.USAGE
    assert "--timeout-job" in refused.stderr


def test_config_from_environment(daemon: Instance) -> None:
    """Without -c, ipcctl reads $IPCD_CONFIG."""
    env = {**os.environ, "IPCD_CONFIG": str(daemon.config_path)}
    done = subprocess.run(
        [IPCCTL, "submit", "echo", "env", "--wait"], capture_output=True, text=True, env=env
    )
    assert (done.returncode, done.stdout) == (0, "env\n")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="ipcd-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _as_nobody(argv: list[str]) -> int:
    """Run ipcctl's main in a forked child that dropped root for uid/gid 65534 (nobody).

    The interpreter lives under /root here, out of nobody's reach, so the child keeps the
    already-imported code and only gives up its identity, as a separate login would have.
    """
    from ipcd.cli import ipcctl
    from ipcd.cli import run as run_cli

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 1)
            code = run_cli("ipcctl", ipcctl.main, argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_permission_denied_is_77(shared_dir: Path) -> None:
    """Status 77 for a user outside the daemon's group: the 0660 queue refuses them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as an unprivileged user")
    inst = Instance(shared_dir, shared_dir / "ipcd.toml")
    inst.write()
    inst.config_path.chmod(0o644)
    assert inst.ipcd("start").returncode == 0
    try:
        (shared_dir / "ipcd.key").chmod(0o644)
        code = _as_nobody(["-c", str(inst.config_path), "submit", "echo", "forged"])
        assert code == ExitCode.NO_PERMISSION
        assert _as_nobody(["-c", str(inst.config_path), "result", "0123456789abcdef"]) == (
            ExitCode.NO_PERMISSION
        )
        status = inst.ipcctl("status", "--json")
        assert '"messages": 0' in status.stdout
    finally:
        inst.ipcd("stop")
        from conftest import remove_objects

        remove_objects(inst)


def test_json_payload_may_have_whitespace_around_it(daemon: Instance) -> None:
    """--json reads what json.loads reads: whitespace before and after the value."""
    done = daemon.ipcctl("submit", "echo", ' \n{"a": [1, 2]}\t ', "--json", "--wait")
    assert (done.returncode, done.stdout) == (0, '{"a": [1, 2]}\n')


def test_waiting_without_the_reply_poll(daemon: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    """With IPCD_SPIN_US=0 a waiting submitter sleeps in msgrcv at once, and still wakes."""
    monkeypatch.setenv("IPCD_SPIN_US", "0")
    done = daemon.ipcctl("submit", "echo", "slept", "--wait")
    assert (done.returncode, done.stdout) == (0, "slept\n")
