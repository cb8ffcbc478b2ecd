"""One master per configuration (ipcd.daemon.pidlock): racing starts, hand-edited PID files."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IPCD, TESTS, Instance

from ipcd.daemon import pidlock
from ipcd.errors import ExitCode

#: Racing `ipcd start` processes, launched this many at a time.
STARTS, BATCH = 200, 50


def _running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here reaps slowly)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _masters(config: Path) -> list[int]:
    """Live processes started for this configuration whose parent is not one of them:
    the masters (each master's workers are its children)."""
    ours: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if str(config).encode() in cmdline and _running(int(entry.name)):
            ours[int(entry.name)] = ppid
    return sorted(pid for pid, ppid in ours.items() if ppid not in ours)


@pytest.mark.timeout(600)
def test_racing_starts_make_exactly_one_master(instance: Instance) -> None:
    """Of 200 `ipcd start`s launched at once against one configuration, exactly one
    starts a master; every other one exits 73 saying that one runs or is starting."""
    env = {**os.environ, "PYTHONPATH": str(TESTS / "plugins")}
    argv = [IPCD, "-c", str(instance.config_path), "start"]
    outcomes: list[tuple[int, str]] = []
    for _ in range(STARTS // BATCH):
        procs = [
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=env)
            for _ in range(BATCH)
        ]  # fmt: skip
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            outcomes.append((proc.returncode, err))
    started = [err for code, err in outcomes if code == 0]
    refused = [err for code, err in outcomes if code == ExitCode.ALREADY_RUNNING]
    others = [(code, err) for code, err in outcomes if code not in (0, ExitCode.ALREADY_RUNNING)]
    assert (len(started), len(refused), others) == (1, STARTS - 1, [])
    assert all(
        "ipcd is already running (pid " in err or "another ipcd is starting" in err
        for err in refused
    )
    assert _masters(instance.config_path) == [instance.pid()]
    assert instance.ipcctl("submit", "echo", "one", "--wait").stdout == "one\n"
    assert instance.ipcd("stop").returncode == 0
    assert _masters(instance.config_path) == []


@pytest.mark.parametrize("edit", ["", "garbage\n", "12", "self", "removed"])
def test_hand_edited_pid_file_does_not_let_a_second_master_in(daemon: Instance, edit: str) -> None:
    """With the PID file emptied, garbled, pointed at another live process or removed
    while the daemon runs, a second start still exits 73 naming the running PID, and
    status, reload and stop still find the daemon."""
    master = daemon.pid()
    if edit == "removed":
        daemon.pid_file.unlink()
    else:
        daemon.pid_file.write_text(str(os.getpid()) if edit == "self" else edit)
    second = daemon.ipcd("start")
    assert second.returncode == ExitCode.ALREADY_RUNNING, second.stderr
    assert f"ipcd is already running (pid {master}," in second.stderr
    assert _masters(daemon.config_path) == [master]
    assert f"(pid {master}," in daemon.ipcd("status").stdout
    assert daemon.ipcd("stop").returncode == 0
    assert not _running(master)
    assert not daemon.pid_file.exists()


def test_start_in_progress_is_not_stale(instance: Instance) -> None:
    """While another process holds the lock with no PID recorded yet (a start in
    progress, its PID file still empty), `ipcd start` exits 73 and starts nothing."""
    lock = pidlock.PidLock.acquire(instance.pid_file)
    try:
        instance.pid_file.write_text("")
        refused = instance.ipcd("start")
        assert refused.returncode == ExitCode.ALREADY_RUNNING, refused.stderr
        assert "another ipcd is starting with this configuration" in refused.stderr
        assert instance.ipcd("status").returncode == ExitCode.NOT_RUNNING
        assert _masters(instance.config_path) == []
    finally:
        lock.release()


def test_killed_daemon_leaves_a_stale_pid_file_that_does_not_count(instance: Instance) -> None:
    """A SIGKILLed master's PID file and lock file name it, but nothing holds the lock:
    status says not running, and the next start takes over."""
    assert instance.ipcd("start").returncode == 0
    master = instance.pid()
    os.kill(master, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _running(master) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pidlock.recorded_pid(instance.pid_file) == master
    assert instance.ipcd("status").returncode == ExitCode.NOT_RUNNING
    again = instance.ipcd("start")
    assert again.returncode == 0, again.stderr
    assert instance.pid() != master
    assert instance.ipcd("stop").returncode == 0
