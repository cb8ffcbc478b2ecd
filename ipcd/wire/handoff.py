"""The hand-off message: how a worker holds the job it claimed from the job store.

The public job queue carries what clients send; the daemon vets each message once, at
intake, and commits it to the job store (ipcd.daemon.intake).  A worker claims its next
job from the store and writes it into its slot of the in-flight table as one message: a
short header naming the job (its id in the store, which a bare message does not carry,
and the attempt the store counted) and then the message exactly as the client sent it,
so that the worker, and the master's recovery should the worker die, decode it with
:func:`ipcd.wire.protocol.decode` as before.  A message too large to carry the header
too is held by reference: it is read from the store.
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


def encode(job_id: str, attempt: int, body: bytes | None, limit: int) -> bytes:
    """The hand-off message, by reference when ``body`` and the header exceed ``limit``
    (or ``body`` is None: it could not be read, and is looked for in the store)."""
    head = _header(job_id, attempt, in_store=False)
    if body is not None and len(head) + 1 + len(body) <= limit:
        return head + b"\n" + body
    return _header(job_id, attempt, in_store=True) + b"\n"


def _header(job_id: str, attempt: int, *, in_store: bool) -> bytes:
    """``MAGIC`` and the header's compact JSON.  Written out by hand for a job id (its
    characters need no escape in JSON) and a plain int: the bytes ``json.dumps`` would
    give, at a sixth of its cost, on every job a worker takes."""
    if type(attempt) is int and is_job_id(job_id):
        flag = b',"in_store":true' if in_store else b""
        return b'%s{"id":"%s","attempt":%d%s}' % (MAGIC, job_id.encode("ascii"), attempt, flag)
    doc: dict[str, object] = {"id": job_id, "attempt": attempt}
    if in_store:
        doc["in_store"] = True
    return MAGIC + json.dumps(doc, separators=(",", ":")).encode()


def decode(message: bytes) -> Handoff:
    """The job a hand-off message names; MessageError when it is not one (only a worker
    writes one, into its own slot: that is a bug, or a slot an older ipcd left)."""
    head, sep, body = message.partition(b"\n")
    if not head.startswith(MAGIC) or not sep:
        raise MessageError("not a hand-off message")
    try:
        doc = json.loads(head[len(MAGIC) :])
    except ValueError:
        raise MessageError("hand-off header is not JSON") from None
    if not isinstance(doc, dict):
        raise MessageError("hand-off header is not an object")
    job_id, attempt = doc.get("id"), doc.get("attempt")
    if not isinstance(job_id, str) or not is_job_id(job_id) or type(attempt) is not int:
        raise MessageError("hand-off header lacks a job id or attempt")
    return Handoff(job_id, attempt, None if doc.get("in_store") else body)
