"""Poison messages: what any group member can put on the queue never stalls the daemon.

Each kind of envelope here once crashed a worker, and every crash doubled the respawn
back-off, so a few hundred bytes held legitimate jobs back for minutes.  Now each is
rejected where it is decoded, accounted for (a ``job.rejected`` event, the ``rejected``
counter, an error result and a reply-queue wake-up when its id and reply type can be
read), and the next legitimate job is served at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import time
from collections.abc import Callable

import pytest
import sysv_ipc
from conftest import Instance

from ipcd.errors import ExitCode
from ipcd.tables.inflight import InflightTable

#: How many messages of each kind are sent.
EACH = 20
BIG = 10**400  # "integers of hundreds of digits"


def _envelope(job_id: str, wake: int | None, **fields: object) -> bytes:
    """An envelope asking for a wake-up of ``wake`` (unless ``fields`` say otherwise)."""
    doc: dict[str, object] = {"ipcd": 1, "id": job_id, "payload": "x"}
    if wake is not None:
        doc["reply"] = wake
    doc.update(fields)
    return json.dumps(doc).encode()


def _raw(job_id: str, reply: int | None, fragment: str) -> bytes:
    """An envelope with ``fragment`` spliced in as JSON text (what json.dumps cannot write)."""
    tail = f',"reply":{reply}' if reply is not None else ""
    return f'{{"ipcd":1,"id":"{job_id}"{tail},{fragment}}}'.encode()


#: Kind -> (message for the i-th job id and reply type, its message type, whether its id
#: can be read).
POISON: dict[str, tuple[Callable[[str, int], bytes], int, bool]] = {
    "submitted": (lambda j, r: _envelope(j, r, submitted=BIG), 2, True),
    "timeout": (lambda j, r: _envelope(j, r, timeout=BIG), 2, True),
    "pid": (lambda j, r: _envelope(j, r, pid=BIG), 2, True),
    "attempt": (lambda j, r: _envelope(j, r, attempt=BIG), 2, True),
    "reply": (lambda j, r: _envelope(j, None, reply=BIG), 2, True),
    "version": (lambda j, r: _envelope(j, r, ipcd=BIG), 2, True),
    "negative": (lambda j, r: _envelope(j, r, submitted=-1.5), 2, True),
    "bool": (lambda j, r: _envelope(j, r, attempt=True), 2, True),
    "shmid": (
        lambda j, r: _envelope(
            j, r, payload=None, spill={"shmid": 2**31, "size": 10, "slot": 0, "kind": "text"}
        ),
        2,
        True,
    ),
    "surrogate": (lambda j, r: _raw(j, r, '"payload":"\\ud800"'), 2, True),
    "infinity": (lambda j, r: _raw(j, r, '"submitted":1e999'), 2, True),
    "nested": (lambda j, r: _raw(j, r, '"payload":' + "[" * 3000 + "]" * 3000), 2, True),
    "unique": (lambda j, r: _raw(j, r, '"unique":"\\udfff"'), 2, True),
    "php_inf": (lambda j, r: b"d:INF;", 2, False),
    "php_nan": (lambda j, r: b"a:1:{i:0;d:NAN;}", 2, False),
    "php_object": (lambda j, r: b'O:8:"stdClass":0:{}', 2, False),
}


def _msgsnd(queue: sysv_ipc.MessageQueue, body: bytes, type_: int) -> None:
    """msgsnd with a C long type, as PHP's msg_send can send (sysv_ipc takes a C int)."""
    raw = struct.pack("@l", type_) + body  # struct msgbuf: a C long, then the text
    buf = ctypes.create_string_buffer(raw, len(raw))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.msgsnd(queue.id, buf, len(body), 0) == 0, os.strerror(ctypes.get_errno())


def test_a_flood_of_poison_messages_is_accounted_for_and_stalls_nothing(
    daemon: Instance,
) -> None:
    """20 messages of every poison kind end as rejections (event, counter, error result,
    reply wake-up where they say whom to wake); no worker dies, and a legitimate
    ``submit --wait`` is answered right after."""
    queue = sysv_ipc.MessageQueue(daemon.keys.jobs, max_message_size=8192)
    me = os.getpid()
    with_id: set[str] = set()
    woken: set[str] = set()
    sent = 0
    for kind, (make, type_, has_id) in POISON.items():
        for i in range(EACH):
            job_id = f"{kind[:10]}-{i}"
            queue.send(make(job_id, me), True, type_)
            sent += 1
            if has_id:
                with_id.add(job_id)
                if kind != "reply":
                    woken.add(job_id)
    for i in range(EACH):  # types no handler can have; PHP sends them
        _msgsnd(queue, _envelope(f"bigtype-{i}", me), 2**31 + i)
        _msgsnd(queue, b"bare", 2**62)
        with_id.add(f"bigtype-{i}")
        woken.add(f"bigtype-{i}")
        sent += 2

    done = daemon.ipcctl("submit", "echo", "hi", "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "hi\n")

    rejected = daemon.wait_events(lambda e: e["event"] == "job.rejected", sent)
    assert len(rejected) == sent
    assert {e["job_id"] for e in rejected if e["job_id"] is not None} == with_id
    events = [str(e["event"]) for e in daemon.log_events()]
    assert "worker.exited" not in events and "worker.backoff" not in events
    assert "job.internal_error" not in events and "job.decode_failed" not in events
    stats = json.loads(daemon.ipcctl("stats", "--json").stdout)
    assert stats["jobs"]["(none)"]["rejected"] == sent
    # The ring keeps the newest results only (128 here): look at the last ones sent.
    shown = daemon.ipcctl("result", f"bigtype-{EACH - 1}")
    assert shown.returncode == ExitCode.JOB_FAILED
    assert shown.stderr.endswith(
        f"message type {2**31 + EACH - 1} is outside 1..2147483647: no handler can have it\n"
    )
    replies = sysv_ipc.MessageQueue(daemon.keys.replies)
    notified = set()
    while True:
        try:
            body, _ = replies.receive(False, me)
        except sysv_ipc.BusyError:
            break
        notified.add(body.decode())
    assert notified == woken


@pytest.mark.parametrize("type_", [2**40, -5])
def test_a_parked_job_of_an_impossible_type_is_rejected(daemon: Instance, type_: int) -> None:
    """A parked slot an ipcd older than the job store left (any group member could write
    one, as ``submit --delay`` did) whose type no queue message can have: the next start
    rejects it (event, counter, error result, waiter woken) instead of sending it through
    the intake, frees the slot, and serves."""
    assert daemon.ipcd("stop").returncode == 0
    table = InflightTable.open(daemon.keys.inflight)
    try:
        body = _envelope("parked-bad", os.getpid())
        assert table.park(type_, body, "parked-bad", 1, time.time())
    finally:
        table.segment.close()
    started = daemon.ipcd("start")
    assert started.returncode == 0, started.stderr
    [rejected] = daemon.wait_events(lambda e: e["event"] == "job.rejected", 1)
    assert (rejected["job_id"], rejected["type"], rejected["parked"]) == ("parked-bad", type_, True)
    shown = daemon.ipcctl("result", "parked-bad")
    assert shown.returncode == ExitCode.JOB_FAILED
    assert shown.stderr.endswith(
        f"message type {type_} is outside 1..2147483647: no handler can have it\n"
    )
    notice, _ = sysv_ipc.MessageQueue(daemon.keys.replies).receive(False, os.getpid())
    assert notice == b"parked-bad"
    done = daemon.ipcctl("submit", "echo", "hi", "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "hi\n")
    stats = json.loads(daemon.ipcctl("stats", "--json").stdout)
    assert stats["jobs"]["(none)"]["rejected"] == 1
    table = InflightTable.open(daemon.keys.inflight)
    try:
        assert table.parked_jobs() == []
    finally:
        table.segment.close()
    assert daemon.ipcd("stop").returncode == 0
