"""Spilling: payloads and results too large for a message or a result slot.

Each large payload or result lives in a SysV segment of its own, made with IPC_PRIVATE
(key 0) by its producer: the client for a payload, the worker for a result.  The queue
carries only a small envelope naming the segment (``"spill"``, see docs/protocol.md) and
the result ring only a 16-byte descriptor (ipcd.layout.results), so neither fills with data.
This module encodes and decodes what goes into those segments and follows a payload or
result through its life; ipcd.tables.spill.table records the segments and removes them.
Each side keeps its own half: a client spills a payload in ipcd.client.api.outgoing, the
daemon logs the results it evicts in ipcd.daemon.outcomes.

Data is copied once in (the producer writes straight into the segment) and once out (the
reader copies it into a bytes object): no base64, no JSON, no CRC over the data.
"""

from __future__ import annotations

from ipcd.errors import IpcdError, MessageError, PayloadError, QueueFullError
from ipcd.kernel.segments import Segment
from ipcd.layout.results import Kind, Result, Spilled, Status
from ipcd.tables.spill.segment import (
    ANOTHER_JOB,
    DATA,
    NOT_SPILL,
    SPARE,
    Role,
    exists,
    mismatch,
)
from ipcd.tables.spill.table import Entry, SpillTable, State, result_mode
from ipcd.wire import protocol, split
from ipcd.wire.protocol import Job, Payload

#: The kind of a spilled payload, by the name the envelope gives it (``SpillRef.kind``).
KINDS = {"bytes": Kind.BYTES, "text": Kind.TEXT, "json": Kind.JSON}
_NAMES = {v: k for k, v in KINDS.items()}

# --- payloads -----------------------------------------------------------------------------


def within_max_payload(payload: Payload, limit: int) -> tuple[str, bytes]:
    """The payload's kind and bytes; PayloadError (exit 65) when it is over ``limit``."""
    kind, raw = _as_data(payload)
    if len(raw) > limit:
        raise PayloadError(
            f"payload of {len(raw)} bytes exceeds [jobs] max_payload ({limit} bytes)"
        )
    return kind, raw


def _as_data(payload: Payload) -> tuple[str, bytes]:
    if isinstance(payload, bytes):
        return "bytes", payload
    if isinstance(payload, bytearray | memoryview):
        return "bytes", bytes(payload)
    if isinstance(payload, str):
        try:
            return "text", payload.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError(f"payload text is not valid Unicode: {exc}") from None
    return "json", protocol.payload_json(payload)


def load(job: Job, table: SpillTable | None, max_payload: int) -> Job:
    """The job with its payload read from its segment (:func:`attach`, then one copy).

    MessageError when the payload is too large, the segment is gone or not this job's,
    or its text or JSON is not valid: the job fails for good (a retry would find the
    same), so its entry goes at once.
    """
    ref = job.spill
    segment = attach(job, table, max_payload)
    if ref is None or segment is None:
        return job
    try:
        raw = bytes(segment.buf[DATA : DATA + ref.size])
    finally:
        segment.close()
    try:
        return job._replace(payload=split.payload(raw, ref.kind, job.id))
    except MessageError:
        settle(table, job)
        raise


def attach(job: Job, table: SpillTable | None, max_payload: int) -> Segment | None:
    """The verified segment of a spilled payload, attached read-only (its data at
    ``DATA``), for the caller to write to the job store without copying it first (the
    intake, ipcd.wire.split); None when the job has no spilled payload.  MessageError as
    :func:`load` says, the entry then gone."""
    ref = job.spill
    if ref is None:
        return None
    try:
        if ref.size > max_payload:
            raise _bad(job, f"spilled payload of {ref.size} bytes exceeds [jobs] max_payload")
        segment = _attached(ref.shmid, job.id, ref.size, Role.PAYLOAD, KINDS[ref.kind])
        if isinstance(segment, str):
            raise _bad(job, segment)
        return segment
    except MessageError:
        settle(table, job)
        raise


def _bad(job: Job, reason: str) -> MessageError:
    exc = MessageError(f"spilled payload of job {job.id}: {reason}")
    exc.job_id = job.id
    exc.reply_to = job.reply_to
    exc.unique = job.unique  # the rejection is final: its key must be released
    return exc


def settle(table: SpillTable | None, job: Job) -> None:
    """The job's outcome is final: its payload's segment and entry go."""
    if table is not None and job.spill is not None:
        table.release(job.spill.shmid, job.id, job.spill.slot)


# --- results ------------------------------------------------------------------------------


def spill_result(table: SpillTable, result: Result) -> tuple[Result, tuple[Entry, ...]]:
    """The result with its data moved to a segment of its own (the ring then stores a
    descriptor), or an error result when it exceeds [results] max_result or
    spill_bytes or cannot be made; and the older results evicted to make room.
    Clients in the daemon's group may read the segment, as they read the ring."""
    size = len(result.data)
    checked = within_max_result(result, table.max_result)
    if checked is not result:
        return checked, ()
    if table.spill_bytes is not None and size > table.spill_bytes:
        message = f"result too large: {size} bytes, more than [results] spill_bytes"
        return _error(result, f"{message} ({table.spill_bytes})"), ()
    try:
        index, shmid, evicted = table.put(
            result.data, job_id=result.job_id, kind=result.kind, role=Role.RESULT,
            mode=result_mode(table.mode), owner=None,
            refused=f"the result of {size} bytes was not stored",
        )  # fmt: skip
    except QueueFullError as exc:
        return _error(result, str(exc)), ()
    except IpcdError as exc:
        return _error(result, f"result of {size} bytes could not be stored: {exc}"), ()
    return result._replace(data=b"", spill=Spilled(shmid, index, size)), evicted


def requeued(key: int, job: Job, state: State = State.QUEUED) -> None:
    """``ipcctl retry`` sends a failed spilled job again: its entry is the queue's again
    (QUEUED), or the failed list's (FAILED) when the send did not happen.

    Marked before the send, not after: a job that fails again at once is marked FAILED
    by its worker, and a later QUEUED would hide it from the failed list's share.
    """
    if job.spill is None:
        return
    try:
        table = SpillTable.open(key)
    except (IpcdError, ValueError):
        return
    try:
        table.mark(job.spill.slot, state, job.spill.shmid)
    except IpcdError:
        pass
    finally:
        table.segment.close()


def keep_failed(table: SpillTable | None, job: Job) -> bool:
    """The failed list takes a spilled job: False when its payload could not be kept
    (the failed list holds half the spill table already), its segment then gone."""
    if table is None or job.spill is None:
        return True
    try:
        return table.hold_failed(job.spill.shmid, job.id, job.spill.slot)
    except IpcdError:
        return True


def within_max_result(result: Result, max_result: int) -> Result:
    """The result, or the error the daemon stores in its place when its data is larger
    than [results] max_result (ipcd.testing's run_handler applies the same check)."""
    size = len(result.data)
    if size <= max_result:
        return result
    return _error(
        result, f"result too large: {size} bytes, more than [results] max_result ({max_result})"
    )


def read_result(result: Result) -> Result | None:
    """A spilled result with its data copied out of its segment (the caller holds the ring
    lock, so the ring's eviction cannot remove the segment meanwhile; a claim's eviction
    may, but a removed segment stays whole while attached).  None when the result was
    evicted from the spill table: its segment is gone (or its id now names another)."""
    spilled = result.spill
    if spilled is None:
        return result
    raw = _read(spilled.shmid, result.job_id, spilled.size, Role.RESULT, result.kind)
    if isinstance(raw, _Gone):
        return None
    if isinstance(raw, str):
        return _error(result, f"the stored result is lost: {raw}")
    return result._replace(data=raw, spill=None)


def _error(result: Result, message: str) -> Result:
    return result._replace(status=Status.ERROR, kind=Kind.TEXT, data=message.encode(), spill=None)


# --- segments ----------------------------------------------------------------------------


class _Gone(str):
    """Why there is no data: the segment is gone, or its id names another's by now."""


def _read(shmid: int, job_id: str, size: int, role: Role, kind: Kind) -> bytes | str:
    """The data of a verified segment, or why there is none (a _Gone when it is gone)."""
    segment = _attached(shmid, job_id, size, role, kind)
    if isinstance(segment, str):
        return segment
    try:
        return bytes(segment.buf[DATA : DATA + size])
    finally:
        segment.close()


def _attached(shmid: int, job_id: str, size: int, role: Role, kind: Kind) -> Segment | str:
    """The verified segment, attached read-only, or why there is none (a _Gone when it
    is gone); the caller closes it."""
    segment = Segment.attach_id(shmid, readonly=True, whole=True)
    if segment is None:
        if not exists(shmid):
            return _Gone(f"segment {shmid} does not exist")
        return f"segment {shmid} does not exist (or may not be read)"
    try:
        why = _refused(segment, shmid, job_id, size, role, kind)
    except BaseException:
        segment.close()
        raise
    if why:
        segment.close()
        return why
    return segment


def _refused(segment: Segment, shmid: int, job_id: str, size: int, role: Role, kind: Kind) -> str:
    info = segment.info()
    if role is Role.RESULT and info.cuid not in (0, info.uid):
        # A worker makes and keeps a result's segment; one given away by its creator
        # was planted (vetting.refuse_untrusted).  A payload's is its client's.
        return f"segment {shmid} is {info.who()}: not ipcd's, refusing to read it"
    why = mismatch(segment, job_id, size, role, kind)
    if why in (NOT_SPILL, ANOTHER_JOB, SPARE):
        return _Gone(f"segment {shmid} {why}{job_id if why == ANOTHER_JOB else ''}")
    if why:
        return f"segment {shmid} {why}"
    return ""
