"""The hand-off message: how the master gives a worker one job from the job store.

The public job queue carries what clients send; the daemon vets each message once, at
intake, and commits it to the job store (ipcd.daemon.intake).  The master then hands jobs
to its workers on a queue of its own (mode 0600: no client can write to it), one message
per job, in the order the store decides.  The message is a short header naming the job
(its id in the store, which a bare message does not carry, and the attempt the store
counted) and then the message exactly as the client sent it, so a worker decodes it with
:func:`ipcd.wire.protocol.decode` as before.  A message too large to carry the header too
is handed over by reference: the worker reads its body from the store.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from ipcd.errors import MessageError
from ipcd.wire.protocol import is_job_id

MAGIC = b"H1 "


class Handoff(NamedTuple):
    job_id: str
    attempt: int
    #: The client's message; None when the worker must read it from the store.
    body: bytes | None


def encode(job_id: str, attempt: int, body: bytes, limit: int) -> bytes:
    """The hand-off message, by reference when ``body`` and the header exceed ``limit``."""
    head = MAGIC + json.dumps({"id": job_id, "attempt": attempt}, separators=(",", ":")).encode()
    if len(head) + 1 + len(body) <= limit:
        return head + b"\n" + body
    return MAGIC + json.dumps(
        {"id": job_id, "attempt": attempt, "in_store": True}, separators=(",", ":")
    ).encode() + b"\n"  # fmt: skip


def decode(message: bytes) -> Handoff:
    """The job a hand-off message names; MessageError when it is not one (only the master
    writes the queue, so that is a bug or a stale message of another version)."""
    head, sep, body = message.partition(b"\n")
    if not head.startswith(MAGIC) or not sep:
        raise MessageError("not a hand-off message")
    try:
        doc = json.loads(head[len(MAGIC) :])
    except ValueError:
        raise MessageError("hand-off header is not JSON") from None
    job_id, attempt = doc.get("id") if isinstance(doc, dict) else None, None
    if isinstance(doc, dict):
        attempt = doc.get("attempt")
    if not isinstance(job_id, str) or not is_job_id(job_id) or type(attempt) is not int:
        raise MessageError("hand-off header lacks a job id or attempt")
    if doc.get("in_store"):
        return Handoff(job_id, attempt, None)
    return Handoff(job_id, attempt, body)
