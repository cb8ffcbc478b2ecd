"""A lock semaphore another process holds too long delays jobs; it never stops the daemon."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import sysv_ipc
from conftest import Instance, _running

from ipcd.kernel.keys import as_key_t

#: Longer than two of the daemon's 5 s lock waits.
HOLD = 10.0


@contextmanager
def held(key: int) -> Iterator[None]:
    """Hold a lock semaphore the way a group member can: one semctl setting it to 0."""
    sem = sysv_ipc.Semaphore(as_key_t(key))
    sem.value = 0
    try:
        yield
    finally:
        sem.value = 1


def _delayed(instance: Instance, text: str) -> str:
    submitted = instance.ipcctl("submit", "echo", text, "--delay", "1")
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip()


def test_a_held_result_lock_when_a_delayed_job_falls_due(daemon: Instance) -> None:
    """A delayed job falls due in the store, with no lock of the in-flight table on its
    way: it runs while that lock is held.  With the result segment's lock held for 10 s
    instead, the worker that runs the next one logs ``lock.timeout`` naming the lock,
    waits, and stores the result once the lock is free; the master stays up and serves."""
    master = daemon.pid()
    early = _delayed(daemon, "early")
    with held(daemon.keys.inflight):
        result = daemon.ipcctl("result", early, "--wait", "--timeout", "20")
        assert (result.returncode, result.stdout) == (0, "early\n"), result.stderr
    job_id = _delayed(daemon, "later")
    with held(daemon.keys.results):
        timeouts = daemon.wait_events(lambda e: e["event"] == "lock.timeout", 1, timeout=HOLD)
        time.sleep(max(0.0, HOLD - 5.0))  # the lock stays taken: 10 s in all
        assert _running(master)
    assert [(e["lock"], e["role"], e["then"]) for e in timeouts[:1]] == [
        ("result segment", "worker", "wait again")
    ]
    assert float(timeouts[0]["waited_s"]) >= 5.0  # type: ignore[arg-type]
    result = daemon.ipcctl("result", job_id, "--wait", "--timeout", "20")
    assert (result.returncode, result.stdout) == (0, "later\n"), result.stderr
    done = daemon.ipcctl("submit", "echo", "after", "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "after\n"), done.stderr
    assert daemon.pid() == master and _running(master)
    ran = daemon.log_events()
    assert [e["job_id"] for e in ran if e["event"] == "job.done"].count(job_id) == 1
    assert not [e for e in ran if e["event"] in ("daemon.crashed", "worker.crashed")]


def test_stop_and_start_while_the_lock_is_held(daemon: Instance) -> None:
    """A stop while the master waits for a held lock stops it cleanly; a start with the
    lock still held starts and waits for it; the delayed job runs once, after."""
    job_id = _delayed(daemon, "kept")
    with held(daemon.keys.inflight):
        daemon.wait_events(lambda e: e["event"] == "lock.timeout", 1, timeout=HOLD)
        stopped = daemon.ipcd("stop")
        assert stopped.returncode == 0, stopped.stderr
        started = daemon.ipcd("start")
        assert started.returncode == 0, started.stderr
        assert daemon.ipcd("status").returncode == 0
    result = daemon.ipcctl("result", job_id, "--wait", "--timeout", "20")
    assert (result.returncode, result.stdout) == (0, "kept\n"), result.stderr
    events = daemon.log_events()
    assert [e["job_id"] for e in events if e["event"] == "job.done"].count(job_id) == 1
    assert not [e for e in events if e["event"] == "daemon.crashed"]
