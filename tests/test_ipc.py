"""The kernel border: bounded waits, the msgmax-sized buffer, and the squatting check."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sysv_ipc
from conftest import TEST_KEYS, Instance

from ipcd.errors import (
    ExitCode,
    NotRunningError,
    PayloadError,
    QueueFullError,
    UnsafeObjectError,
    WaitTimeoutError,
)
from ipcd.kernel import keys, waits
from ipcd.kernel import queues as ipc
from ipcd.kernel.queues import Queue
from ipcd.tables import purge


@pytest.fixture
def key(tmp_path: Path) -> Iterator[int]:
    """A fresh key from a private file; everything at it is removed afterwards."""
    path = tmp_path / "k"
    path.touch()
    k = keys.ftok(path, 0x42)
    TEST_KEYS.add(k)
    yield k
    purge.remove_all((k,))


def test_receive_times_out(key: int) -> None:
    """A bounded receive on an empty queue raises WaitTimeoutError after about its timeout."""
    queue = Queue.create(key, 0o600)
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        queue.receive(0, timeout=0.2)
    assert time.monotonic() - started >= 0.19


def test_full_queue_send_times_out(key: int) -> None:
    """A send to a full queue waits its timeout, then raises QueueFullError; none half-sent."""
    queue = Queue.create(key, 0o600)
    body = b"f" * 4096
    sent = 0
    while queue.send_nowait(body, 2):
        sent += 1
    with pytest.raises(QueueFullError, match=r"stayed full for 0\.1s"):
        queue.send(body, 2, timeout=0.1)
    assert queue.stats().messages == sent
    assert queue.stats().bytes == sent * len(body)


def test_messages_up_to_msgmax_are_received(key: int) -> None:
    """The receive buffer is the kernel's msgmax, not sysv_ipc's 2048-byte default."""
    queue = Queue.create(key, 0o600)
    queue.send(b"m" * ipc.msgmax(), 5, timeout=1)
    assert queue.receive(0, timeout=1) == (b"m" * ipc.msgmax(), 5)


def test_raised_msgmax_does_not_jam_the_queue(key: int) -> None:
    """A message above the msgmax seen at open (the admin raised it since) is still taken."""
    path = Path(ipc.MSGMAX_PATH)
    if not os.access(path, os.W_OK):
        pytest.skip("needs write access to /proc/sys/kernel/msgmax to raise it")
    original = path.read_text()
    queue = Queue.create(key, 0o600)  # buffer sized to the current msgmax
    try:
        path.write_text(str(int(original) * 2))
        big = b"B" * (int(original) + 100)
        sysv_ipc.MessageQueue(key, max_message_size=len(big)).send(big, type=3)
        assert queue.receive(0, timeout=1) == (big, 3)
    finally:
        path.write_text(original)


def test_message_above_msgmax_is_a_payload_error(key: int) -> None:
    """A message larger than the kernel accepts is refused as bad data, not as a full queue."""
    queue = Queue.create(key, 0o600)
    with pytest.raises(PayloadError, match=f"exceeds the kernel's msgmax of {ipc.msgmax()}"):
        queue.send(b"x" * (ipc.msgmax() + 1), 2, timeout=1)


def test_interrupting_signal_raises_interrupted(key: int) -> None:
    """A signal during an unbounded receive surfaces as waits.Interrupted, not a raw error."""
    import signal

    queue = Queue.create(key, 0o600)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            time.sleep(0.2)
            os.kill(os.getppid(), signal.SIGUSR1)
            os._exit(0)
        with pytest.raises(waits.Interrupted):
            queue.receive(0)
        os.waitpid(pid, 0)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_world_writable_squatter_queue_is_refused(instance: Instance) -> None:
    """A queue pre-created at ipcd's key with mode 0666 makes start fail, naming it."""
    (instance.dir / "ipcd.key").touch()
    squatter = sysv_ipc.MessageQueue(instance.keys.jobs, sysv_ipc.IPC_CREX, 0o666)
    try:
        failed = instance.ipcd("start")
        assert failed.returncode == ExitCode.NO_PERMISSION
        assert f"the job queue at key {instance.keys.jobs:#010x} has mode 0o666" in failed.stderr
        assert not instance.pid_file.exists()
    finally:
        squatter.remove()


def test_foreign_owned_segment_is_refused(instance: Instance) -> None:
    """A result segment created by another user at ipcd's key makes start fail, naming it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create an object as another user")
    (instance.dir / "ipcd.key").touch()
    key = instance.keys.results
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.setgid(65534)
        os.setuid(65534)
        sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, 0o600, 4096).detach()
        os._exit(0)
    os.waitpid(pid, 0)
    failed = instance.ipcd("start")
    assert failed.returncode == ExitCode.NO_PERMISSION
    assert f"the result segment at key {key:#010x} is owned by uid 65534" in failed.stderr


def test_objects_of_a_trusted_uid_are_accepted_only_when_it_is_passed_in(
    instance: Instance,
) -> None:
    """A queue made and owned by another uid is refused unless the caller names that uid
    as trusted (a root-started daemon's user), and naming it once leaves no state behind."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create an object as another user")
    key = instance.keys.jobs
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, 0o600)
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(UnsafeObjectError, match="owned by uid 65534"):
        Queue.create(key, 0o600, what="job queue")
    assert Queue.create(key, 0o600, what="job queue", trusted=(65534,)).info().uid == 65534
    with pytest.raises(UnsafeObjectError, match="owned by uid 65534"):
        Queue.create(key, 0o600, what="job queue")


#: An unprivileged uid and gid for the squatter (nobody).
SQUATTER = 65534

_KINDS: dict[str, Callable[[int, int], object]] = {
    "queue": lambda key, mode: sysv_ipc.MessageQueue(key, sysv_ipc.IPC_CREX, mode),
    "segment": lambda key, mode: sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode, 4096),
    "semaphore": lambda key, mode: sysv_ipc.Semaphore(key, sysv_ipc.IPC_CREX, mode, 1),
}


def _plant_given_away(kind: str, key: int, *, to_uid: int, to_gid: int) -> None:
    """As the squatter (a forked child that dropped root), create an object at ``key``
    with mode 0660 and give it to ``to_uid``/``to_gid`` (IPC_SET, allowed to its creator)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(SQUATTER)
            os.setuid(SQUATTER)
            obj = _KINDS[kind](key, 0o660)
            obj.gid = to_gid  # type: ignore[attr-defined]
            obj.uid = to_uid  # type: ignore[attr-defined]
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the squatter could not plant the object"


def _given_away(what: str, key: int) -> str:
    return (
        f"the {what} at key {key:#010x} is created by uid {SQUATTER} (gid {SQUATTER}), "
        f"owned by uid {os.geteuid()} (gid {os.getegid()})"
    )


@pytest.mark.parametrize(
    ("kind", "what", "key_name"),
    [
        ("queue", "job queue", "jobs"),
        ("segment", "result segment", "results"),
        ("semaphore", "result gate", "gate"),
    ],
)
def test_daemon_refuses_an_object_its_creator_gave_away(
    instance: Instance, kind: str, what: str, key_name: str
) -> None:
    """An object another user created at ipcd's key and gave to ipcd's uid (so that it
    looks like the daemon's, mode 0660 and all) makes start fail with 77, naming the
    object, its key, its creator and its owner: the creator could take it back."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create an object as another user")
    (instance.dir / "ipcd.key").touch()
    key = getattr(instance.keys, key_name)
    _plant_given_away(kind, key, to_uid=os.geteuid(), to_gid=os.getegid())
    failed = instance.ipcd("start")
    assert failed.returncode == ExitCode.NO_PERMISSION, failed.stderr
    assert _given_away(what, key) in failed.stderr
    assert not instance.pid_file.exists()


@pytest.mark.parametrize(
    ("kind", "what", "key_name", "command"),
    [
        ("queue", "job queue", "jobs", ["submit", "echo", "secret"]),
        ("queue", "reply queue", "replies", ["submit", "echo", "secret", "--wait"]),
        ("segment", "result segment", "results", ["result", "0123456789abcdef"]),
        ("semaphore", "result gate", "gate", ["result", "0123456789abcdef", "--wait"]),
    ],
)
def test_client_refuses_an_object_its_creator_gave_away(
    instance: Instance, kind: str, what: str, key_name: str, command: list[str]
) -> None:
    """A client refuses (77) an object at ipcd's key whose creator is neither root nor its
    owner, before it sends or reads anything: a squatter made it and can take it back."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create an object as another user")
    assert instance.ipcd("start").returncode == 0
    assert instance.ipcd("stop").returncode == 0  # the daemon's own objects stay
    key = getattr(instance.keys, key_name)
    jobs = sysv_ipc.MessageQueue(instance.keys.jobs)
    if kind == "queue":
        sysv_ipc.MessageQueue(key).remove()
    elif kind == "segment":
        sysv_ipc.SharedMemory(key).remove()
    else:
        sysv_ipc.Semaphore(key).remove()
    _plant_given_away(kind, key, to_uid=os.geteuid(), to_gid=os.getegid())
    if kind == "queue" and key_name == "jobs":
        jobs = sysv_ipc.MessageQueue(key)
    refused = instance.ipcctl(*command)
    assert refused.returncode == ExitCode.NO_PERMISSION, refused.stderr
    assert _given_away(what, key) in refused.stderr
    assert jobs.current_messages == 0


def test_client_refuses_a_world_writable_queue(instance: Instance) -> None:
    """ipcctl refuses to submit to a world-writable queue at ipcd's key (77): a squatter's."""
    (instance.dir / "ipcd.key").touch()
    squatter = sysv_ipc.MessageQueue(instance.keys.jobs, sysv_ipc.IPC_CREX, 0o666)
    try:
        refused = instance.ipcctl("submit", "echo", "secret")
        assert refused.returncode == ExitCode.NO_PERMISSION
        assert "world-writable (mode 0o666)" in refused.stderr
        assert squatter.current_messages == 0
    finally:
        squatter.remove()


def test_spinning_receive_takes_a_message_sent_meanwhile(key: int) -> None:
    """receive_spinning returns a reply another process sends while it polls."""
    queue = Queue.create(key, 0o600)
    child = os.fork()
    if child == 0:  # pragma: no cover - the sender
        time.sleep(0.001)
        Queue.open(key).send(b"reply", 7, timeout=1)
        os._exit(0)
    try:
        got = queue.receive_spinning(7, 5.0)
    finally:
        os.waitpid(child, 0)
    assert got == (b"reply", 7)


def test_spinning_receive_gives_up_and_leaves_other_types(key: int) -> None:
    """Nothing of the type within the spin: None, and a message of another type stays."""
    queue = Queue.create(key, 0o600)
    queue.send(b"someone else's", 8, timeout=1)
    assert queue.receive_spinning(7, 0.01) is None
    assert queue.receive_nowait(8) == (b"someone else's", 8)


def test_spinning_on_a_removed_queue_says_so(key: int) -> None:
    queue = Queue.create(key, 0o600)
    queue.remove()
    with pytest.raises(NotRunningError):
        queue.receive_spinning(7, 0.01)


def test_ipcd_spin_us_sets_or_turns_off_the_reply_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """IPCD_SPIN_US sets how long a waiting client polls; 0 turns it off; junk is ignored."""
    from ipcd.client import api as client

    monkeypatch.delenv("IPCD_SPIN_US", raising=False)
    assert client._spin_seconds() == client.SPIN_SECONDS
    monkeypatch.setenv("IPCD_SPIN_US", "250")
    assert client._spin_seconds() == 0.00025
    monkeypatch.setenv("IPCD_SPIN_US", "0")
    assert client._spin_seconds() == 0
    monkeypatch.setenv("IPCD_SPIN_US", "soon")
    assert client._spin_seconds() == client.SPIN_SECONDS


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process on 2+ CPUs")
def test_a_client_polls_only_while_its_replies_come_quickly(
    daemon: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose last reply took longer than its poll sleeps at once for the next
    (that poll could only burn the CPU); one whose replies come within it polls; the
    poll's length is IPCD_SPIN_US's when set."""
    from ipcd.client import Client, api

    monkeypatch.delenv("IPCD_SPIN_US", raising=False)
    client = Client(daemon.config)
    assert api._spin_seconds(client._last_wait) == api.SPIN_SECONDS  # nothing waited yet
    assert client.call("sleep", "0.05", timeout=10).ok
    assert client._last_wait >= 0.05
    assert api._spin_seconds(client._last_wait) == 0
    assert api._spin_seconds(api.SPIN_SECONDS / 2) == api.SPIN_SECONDS
    monkeypatch.setenv("IPCD_SPIN_US", "250")
    assert api._spin_seconds(client._last_wait) == 0
    assert api._spin_seconds(0.0002) == 0.00025
    assert api._spin_seconds(0.0003) == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a process on 2+ CPUs")
def test_a_client_on_one_cpu_does_not_poll_for_its_reply() -> None:
    """Pinned to one CPU (taskset), a waiting client sleeps at once: its poll would take
    the CPU the daemon's processes need; IPCD_SPIN_US still decides when set."""
    code = "from ipcd.client import api; print(api._spin_seconds())"
    env = {k: v for k, v in os.environ.items() if k != "IPCD_SPIN_US"}

    def spin(*prefix: str, **extra: str) -> float:
        argv = [*prefix, sys.executable, "-c", code]
        done = subprocess.run(argv, capture_output=True, text=True, env={**env, **extra})
        assert done.returncode == 0, done.stderr
        return float(done.stdout)

    first = str(min(os.sched_getaffinity(0)))
    assert spin() > 0
    assert spin("taskset", "-c", first) == 0
    assert spin("taskset", "-c", first, IPCD_SPIN_US="300") == 0.0003
