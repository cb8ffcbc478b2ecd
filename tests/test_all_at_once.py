"""Issue 10's closing promise: a daemon facing every fault at once still serves.

A full log disk for the whole run, ``ipcrm`` of its job queue, another program's header
over its result segment (PHP's ``shm_attach()``), a held in-flight lock for 10 s while a
flood of poison envelopes and type-1 messages arrives and a delayed job falls due: after
each fault a legitimate ``submit --wait`` is answered within seconds, and every job that
was accepted is accounted for (a result for each, the rejections counted).
"""

from __future__ import annotations

import json
import os
import threading
import time

import sysv_ipc
from conftest import Instance, _running

from ipcd.errors import ExitCode
from ipcd.kernel.keys import as_key_t

#: Poison envelopes sent while the lock is held (each once crashed a worker).
POISON = [
    b'{"ipcd":1,"id":"big-%d","submitted":1' + b"0" * 400 + b"}",
    b'{"ipcd":1,"id":"sur-%d","payload":"\\ud800"}',
    b'{"ipcd":1,"id":"shm-%d","spill":{"shmid":2147483648,"size":10,"slot":0,"kind":"text"}}',
]
EACH = 5


def _serves(instance: Instance, text: str) -> None:
    """A legitimate submitter is answered within seconds."""
    done = instance.ipcctl("submit", "echo", text, "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, f"{text}\n"), done.stderr


def _stats(instance: Instance) -> dict[str, object]:
    shown = instance.ipcctl("stats", "--json")
    assert shown.returncode == 0, shown.stderr
    doc: dict[str, object] = json.loads(shown.stdout)
    return doc


def test_every_fault_at_once(instance: Instance) -> None:
    """Each fault in turn, overlapping where they can: the daemon serves after each,
    never restarts, and every accepted job has its outcome."""
    text = instance.config_path.read_text()
    instance.config_path.write_text(text.replace('file = "ipcd.log"', 'file = "/dev/full"'))
    started = instance.ipcd("start")  # a full log disk from the start
    assert started.returncode == 0, started.stderr
    master = instance.pid()
    _serves(instance, "first")

    sysv_ipc.MessageQueue(as_key_t(instance.keys.jobs)).remove()
    deadline = time.monotonic() + 10
    while instance.ipcd("status").returncode != 0:
        assert time.monotonic() < deadline, "the job queue was not made anew"
        time.sleep(0.1)
    _serves(instance, "after ipcrm")

    results = sysv_ipc.SharedMemory(as_key_t(instance.keys.results))
    results.write(b"PHP_SM" + b"\0" * 34, 0)  # what PHP's shm_attach() writes there
    results.detach()
    _serves(instance, "after shm_attach")

    delayed = instance.ipcctl("submit", "echo", "delayed", "--delay", "1")
    assert delayed.returncode == 0, delayed.stderr
    queue = sysv_ipc.MessageQueue(as_key_t(instance.keys.jobs), max_message_size=8192)
    me = os.getpid()
    sent: list[str] = []

    def flood() -> None:  # blocks while the queue is full: the lock holds the workers
        for i in range(EACH):
            for template in POISON:
                body = template % i
                queue.send(body, True, 2)
                sent.append(json.loads(body.replace(b"\\ud800", b""))["id"])
            queue.send(b'{"ipcd":1,"id":"one-%d","reply":%d}' % (i, me), True, 1)
            queue.send(b's:5:"hello";', True, 1)  # the article's msg_send(.., 1, ..)

    lock = sysv_ipc.Semaphore(as_key_t(instance.keys.inflight))
    lock.value = 0  # one semctl by a group member: the in-flight lock is held
    sender = threading.Thread(target=flood)
    try:
        sender.start()
        time.sleep(10)
        assert _running(master)
    finally:
        lock.value = 1
        sender.join(timeout=60)
    _serves(instance, "after the lock")

    assert instance.pid() == master and _running(master)
    shown = instance.ipcctl("result", delayed.stdout.strip(), "--wait", "--timeout", "10")
    assert (shown.returncode, shown.stdout) == (0, "delayed\n"), shown.stderr
    for job_id in [*sent, *(f"one-{i}" for i in range(EACH))]:
        got = instance.ipcctl("result", job_id, "--wait", "--timeout", "10")
        assert got.returncode == ExitCode.JOB_FAILED, (job_id, got.stderr)
    stats = _stats(instance)
    jobs = stats["jobs"]
    assert isinstance(jobs, dict)
    assert jobs["(none)"]["rejected"] == len(sent)
    assert jobs["(none)"]["error"] == 2 * EACH  # type 1: no handler, each one result
    assert jobs["echo"]["ok"] == 5
    master_counts = stats["master"]
    assert isinstance(master_counts, dict)
    assert master_counts["worker_restarts"] == 0
    assert master_counts["log_dropped"] > 0
    assert instance.ipcd("stop").returncode == 0
