"""How the job store holds a job whose payload came in a segment of its own: split.

A payload too large for a message comes in a spill segment (ipcd.tables.spill), and the
job store must hold it whole (a segment does not survive a reboot).  Put back inline into
the envelope, a 16 MiB bytes payload became 22 MiB of base64 in JSON: the intake spent
some 60 ms encoding it, the worker some 150 ms parsing and decoding it again.  Held
*split*, the stored body is a short head and then the payload's raw bytes::

    b"\\0ipcd-split 1 "  the envelope's length  b"\\n"
    the client's envelope (with its "spill" member)  b"\\n"  the bytes

The intake writes the head and the bytes straight from the attached segment into the
store's file in one ``writev`` (ipcd.store.blobs), and the worker slices the payload out
of what it reads.  The envelope is the client's, so every member it carries (reply,
unique key, timeout, ...) reads as it did; its ``spill`` member says the payload's size
and kind, and its ``shmid`` and ``slot`` no longer mean anything (the decoded job has no
``spill``).  The head says the envelope's length: an envelope is any JSON object
(docs/protocol.md), and one a client sends pretty-printed holds newlines of its own.

Only the job store holds split bodies, and only the intake writes them.  A bare message
that happens to begin with the same bytes reads as the envelope it contains: what its
sender could have sent as an envelope anyway.
"""

from __future__ import annotations

from ipcd.errors import MessageError
from ipcd.wire import protocol
from ipcd.wire.protocol import Job, Payload

MAGIC = b"\0ipcd-split 1 "

#: Digits the envelope's length may have (an envelope is a message: far fewer).
_LENGTH_DIGITS = 12


def head(envelope: bytes) -> bytes:
    """What comes before the payload's bytes in a split body of ``envelope``."""
    return b"".join((MAGIC, str(len(envelope)).encode("ascii"), b"\n", envelope, b"\n"))


def parts(body: bytes) -> tuple[bytes, bytes] | None:
    """The envelope and the payload's bytes of a split body, as stored; None when
    ``body`` is not split.  MessageError when its head is damaged."""
    if not body.startswith(MAGIC):
        return None
    start = body.find(b"\n", len(MAGIC), len(MAGIC) + _LENGTH_DIGITS + 1) + 1
    digits = body[len(MAGIC) : start - 1]
    if not start or not digits.isdigit():
        raise MessageError("split body without the length of its envelope")
    end = start + int(digits)
    if body[end : end + 1] != b"\n":
        raise MessageError("split body without the end of its envelope")
    return body[start:end], body[end + 1 :]


def envelope(body: bytes) -> bytes:
    """The client's envelope a stored body holds: a split body's, or ``body`` itself (a
    reader that needs only its members: a head without its payload is enough)."""
    try:
        found = parts(body)
    except MessageError:
        return body
    return body if found is None else found[0]


def decode(body: bytes, type_: int, *, received: float | None = None) -> Job:
    """protocol.decode, for a stored body that may be split: the job with its payload
    read from the body's tail.  MessageError (with the job id) when it cannot be one."""
    found = parts(body)
    if found is None:
        return protocol.decode(body, type_, received=received)
    given, data = found
    job = protocol.decode(given, type_, received=received)
    ref = job.spill
    if ref is None or job.bare:
        exc = MessageError(f"split body of job {job.id} names no payload size and kind")
        exc.job_id = None if job.bare else job.id
        raise exc
    if len(data) != ref.size:
        exc = MessageError(f"split body of job {job.id}: {len(data)} bytes, not {ref.size}")
        exc.job_id = job.id
        raise exc
    return job._replace(payload=payload(data, ref.kind, job.id), spill=None)


def payload(data: bytes | memoryview, kind: str, job_id: str) -> Payload:
    """The payload ``data`` holds as ``kind`` (protocol.SPILL_KINDS); MessageError (with
    the job id) when it is not valid text or JSON."""
    try:
        if kind == "text":
            return str(data, "utf-8")
        if kind == "json":
            return protocol.payload_from_json(str(data, "utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, MessageError):
            exc.job_id = job_id
            raise
        error = MessageError(f"spilled payload of job {job_id}: not valid {kind}")
        error.job_id = job_id
        raise error from None
    return data if isinstance(data, bytes) else bytes(data)
