"""systemd's watchdog (ipcd.daemon.sdnotify): the master's keep-alives on a real NOTIFY_SOCKET."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sysv_ipc
from conftest import IPCD, TESTS, Instance, _running

from ipcd.daemon.sdnotify import Watchdog
from ipcd.kernel.keys import as_key_t

#: WATCHDOG_USEC for the tests: keep-alives every 0.1 s.
USEC = 200_000
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket that learns each sender's
    PID from the kernel (SO_PASSCRED), as systemd does for NotifyAccess=main."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))

    def receive(self, within: float) -> list[tuple[bytes, int]]:
        """(datagram, sender PID) for each that arrives within ``within`` seconds."""
        got = []
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                break
            data, ancillary, _, _ = self.sock.recvmsg(256, socket.CMSG_SPACE(_UCRED.size))
            pid = next(
                _UCRED.unpack(cmsg[2][: _UCRED.size])[0]
                for cmsg in ancillary
                if cmsg[:2] == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
            )
            got.append((data, pid))
        return got


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.sock.close()


def _start(instance: Instance, notify: NotifySocket, *, watchdog_pid: str | None) -> int:
    """`ipcd start` with the watchdog's variables; WATCHDOG_PID "$$" names the starting
    process itself, as systemd does for the process it starts."""
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTS / "plugins"),
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": str(USEC),
    }
    command = f'exec {IPCD} -c "{instance.config_path}" start'
    if watchdog_pid is not None:
        command = f"WATCHDOG_PID={watchdog_pid} {command}"
    started = subprocess.run(
        ["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60
    )
    assert started.returncode == 0, started.stderr
    return instance.pid()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("watchdog_pid", [None, "$$"])
def test_master_sends_keepalives_until_it_stops_turning(
    instance: Instance, notify: NotifySocket, watchdog_pid: str | None
) -> None:
    """Under a watchdog, the master (and no other process) sends WATCHDOG=1 at about
    half WATCHDOG_USEC; a SIGSTOPped master sends none, and it resumes on SIGCONT."""
    master = _start(instance, notify, watchdog_pid=watchdog_pid)
    try:
        turning = notify.receive(within=1.0)
        assert len(turning) >= 3, turning  # every 0.1 s: 10 expected, 3 on a slow host
        assert {data for data, _ in turning} == {b"WATCHDOG=1"}
        assert {pid for _, pid in turning} == {master}
        os.kill(master, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _state(master) != "T":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        notify.receive(within=0.05)  # one sent just before the stop
        assert notify.receive(within=1.0) == []  # ten intervals: the workers send none
        os.kill(master, signal.SIGCONT)
        assert notify.receive(within=2.0)
    finally:
        os.kill(master, signal.SIGCONT)
        assert instance.ipcd("stop").returncode == 0


def test_a_watchdog_meant_for_another_process_is_not_answered(
    instance: Instance, notify: NotifySocket
) -> None:
    """WATCHDOG_PID naming another process (variables inherited from some other watched
    service) means no keep-alives: they are not ipcd's to send."""
    _start(instance, notify, watchdog_pid="1")
    try:
        assert notify.receive(within=1.0) == []
        assert instance.ipcctl("submit", "echo", "serving", "--wait").stdout == "serving\n"
    finally:
        assert instance.ipcd("stop").returncode == 0


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify"}, None),
        ({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "0"}, None),
        ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}, None),
        ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}, ("/x", 15.0)),
        ({"NOTIFY_SOCKET": "@abs", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "42"},
         ("\0abs", 1.0)),
        ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "43"}, None),
    ],
)  # fmt: skip
def test_watchdog_from_environment(
    environ: dict[str, str], expected: tuple[str, float] | None
) -> None:
    """The watchdog is on with a socket and a positive WATCHDOG_USEC, for the process
    WATCHDOG_PID names (pid 42 here) or any when it is unset; "@" is an abstract socket."""
    watchdog = Watchdog.from_environment(environ, 42)
    got = None if watchdog is None else (watchdog.address, watchdog.interval)
    assert got == expected


def test_keepalives_go_on_while_the_master_waits_for_a_held_lock(
    instance: Instance, notify: NotifySocket
) -> None:
    """A master waiting out a lock another process holds (ipcd.lockwaits: logged and
    waited again, never an exit) still sends WATCHDOG=1 between its waits, so that
    systemd does not kill, as hung, a master that item 8 keeps waiting on purpose."""
    master = _start(instance, notify, watchdog_pid="$$")
    try:
        submitted = instance.ipcctl("submit", "echo", "later", "--delay", "1")
        assert submitted.returncode == 0, submitted.stderr
        sem = sysv_ipc.Semaphore(as_key_t(instance.keys.inflight))
        sem.value = 0  # one semctl by a group member: the in-flight lock is held
        try:
            instance.wait_events(lambda e: e["event"] == "lock.timeout", 1, timeout=10)
            notify.receive(within=0.05)
            # Two more of the master's 5 s waits: a keep-alive after each.
            during = notify.receive(within=11.0)
            assert _running(master)
        finally:
            sem.value = 1
        assert {pid for _, pid in during} == {master}, during
        result = instance.ipcctl("result", submitted.stdout.strip(), "--wait", "--timeout", "20")
        assert (result.returncode, result.stdout) == (0, "later\n"), result.stderr
    finally:
        assert instance.ipcd("stop").returncode == 0
