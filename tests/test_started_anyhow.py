"""The suite and the commands that run until stopped behave the same however they were
started: in the foreground, as a background job (SIGINT and SIGQUIT ignored), under
``nohup`` (SIGHUP ignored), or by a supervisor that ignores SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from conftest import IPCCTL, TESTS, Instance


def _ignoring(*signums: int) -> Callable[[], None]:
    """A ``preexec_fn`` that starts the child with these signals ignored, as a shell does
    for a background job; ignored dispositions survive exec."""

    def ignore() -> None:
        for signum in signums:
            signal.signal(signum, signal.SIG_IGN)

    return ignore


def _ignored_mask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn line for pid {pid}")


def _bit(signum: int) -> int:
    return 1 << (signum - 1)


def test_children_of_the_suite_start_with_default_dispositions() -> None:
    """However pytest was started, a process a test starts has SIGINT, SIGQUIT, SIGHUP
    and SIGTERM at their default action, so a test can stop it as a person would."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        mask = _ignored_mask(child.pid)
    finally:
        child.kill()
        child.wait()
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        assert not mask & _bit(signum), signal.Signals(signum).name


def test_a_suite_started_in_the_background_stops_what_it_starts(tmp_path: Path) -> None:
    """pytest started with SIGINT, SIGQUIT and SIGHUP ignored (``nohup make test &``) still
    gives its children default dispositions: the check above, run in such a pytest, passes."""
    nested = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{Path(__file__)}::test_children_of_the_suite_start_with_default_dispositions",
        ],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_ignoring(signal.SIGINT, signal.SIGQUIT, signal.SIGHUP),
    )
    assert nested.returncode == 0, nested.stdout + nested.stderr
    assert "1 passed" in nested.stdout


def _started_ignoring_sigterm(instance: Instance, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [IPCCTL, "-c", str(instance.config_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_ignoring(signal.SIGTERM),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # it is running its loop now
    assert first, proc.stderr.read() if proc.stderr else ""
    return proc


def _stopped_by_sigterm(proc: subprocess.Popen[bytes]) -> tuple[int, bytes]:
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None and proc.stdout is not None
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return code, err


def test_logs_follow_ends_on_sigterm_even_if_ignored_at_start(daemon: Instance) -> None:
    """``ipcctl logs -f`` ends on SIGTERM as on Ctrl-C (status 130, no traceback), also
    when it was started with SIGTERM ignored."""
    daemon.wait_events(lambda e: e["event"] == "daemon.started", 1)
    proc = _started_ignoring_sigterm(daemon, "logs", "-f", "-n", "1", "--json")
    code, err = _stopped_by_sigterm(proc)
    assert code == 130
    assert b"Traceback" not in err


def test_status_watch_ends_on_sigterm_even_if_ignored_at_start(daemon: Instance) -> None:
    """``ipcctl status --watch`` ends on SIGTERM as on Ctrl-C (status 0, no traceback),
    also when it was started with SIGTERM ignored."""
    proc = _started_ignoring_sigterm(daemon, "status", "--watch", "0.1")
    time.sleep(0.3)  # a few frames: the signal may arrive during a read or a sleep
    code, err = _stopped_by_sigterm(proc)
    assert code == 0
    assert b"Traceback" not in err
