"""A client SIGKILLed while it holds the result-segment semaphore wedges no one (SEM_UNDO)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import sysv_ipc
from conftest import Instance

from ipcd.client import Client
from ipcd.errors import WaitTimeoutError
from ipcd.kernel.keys import as_key_t
from ipcd.tables.results import LOCK_TIMEOUT, ResultStore

from .processes import configure, start
from .tally import settled_events

HANDLERS = """
[handlers.echo]
type = 2
"""
#: How long the doomed client holds the semaphore before it SIGKILLs itself.
HOLD = 1.5


def _hold_then_die(key: int, ready_fd: int) -> None:  # pragma: no cover - the forked child
    """Take the result semaphore, say so, keep it HOLD seconds, then SIGKILL ourselves."""
    try:
        store = ResultStore.open(key)
        held = store.lock.held(5)  # kept referenced: the release must never run
        held.__enter__()
        os.write(ready_fd, b"held")
        time.sleep(HOLD)
        os.kill(os.getpid(), signal.SIGKILL)
    finally:
        os._exit(1)


def test_client_killed_holding_result_semaphore(instance: Instance) -> None:
    """While a client holds the semaphore, the daemon's result write waits; the moment the
    client is SIGKILLed the kernel undoes its hold, and submit+wait works at once."""
    configure(instance, HANDLERS)
    start(instance)
    key = instance.keys.results
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the forked child
        os.close(read_fd)
        _hold_then_die(key, write_fd)
    os.close(write_fd)
    began = time.monotonic()
    try:
        assert os.read(read_fd, 4) == b"held"
    finally:
        os.close(read_fd)
    client = Client(instance.config)
    with pytest.raises(WaitTimeoutError), client.store.lock.held(0.2):
        pass  # the child holds it: this acquire must time out

    blocked = client.submit("echo", "while held", notify=True)
    first = client.wait_submitted(blocked, timeout=10)
    waited = time.monotonic() - began
    _, status = os.waitpid(child, 0)

    right_after = time.monotonic()
    second = client.call("echo", "right after", timeout=5)
    second_s = time.monotonic() - right_after
    other = instance.ipcctl("submit", "echo", "another client", "--wait", "--timeout", "5")
    events = settled_events(instance, {blocked, second.job_id})
    print(
        f"\n[client killed holding the semaphore] submitted 3, completed ok "
        f"{first.ok + second.ok + (other.returncode == 0)}, failed 0, missing 0; "
        f"first job waited {waited:.2f}s for the dead holder (held {HOLD}s, lock timeout "
        f"{LOCK_TIMEOUT:g}s), next submit+wait {second_s * 1000:.0f}ms"
    )
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert (first.ok, first.value()) == (True, "while held")
    assert HOLD * 0.9 < waited < LOCK_TIMEOUT - 1, "not released by the holder's death"
    assert (second.ok, second.value()) == (True, "right after") and second_s < 1.0
    assert (other.returncode, other.stdout) == (0, "another client\n")
    assert sysv_ipc.Semaphore(as_key_t(key)).value == 1
    assert not [e for e in events if e["event"] == "result.store_failed"]
    assert sum(e["event"] == "job.done" for e in events) == 3
