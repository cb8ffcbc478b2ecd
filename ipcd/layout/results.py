"""The result segment: a ring of fixed-size result records in SysV shared memory.

Layout (all integers little-endian; documented for other languages in docs/protocol.md)::

    header, 64 bytes at offset 0
      magic        8s   b"IPCDRES\\0"
      version      u32  1
      header_size  u32  64
      slot_count   u32
      slot_size    u32
      next_seq     u64  sequence number the next result gets; its slot is seq % slot_count
      daemon_pid   u32  0 while no daemon serves the segment
      waiting_until u32 until when (Unix time in ms, modulo 2**32; 0: never) some client
                        waits on the result gate: the daemon pulses it only then
      started      f64  when that daemon started (Unix time)
      ok_count     u64  results written with status ok since the segment was made
      error_count  u64  results written with status error

    slot i at offset 64 + i * slot_size: a 64-byte record header, then the data
      state        u32  0 empty, 1 being written, 2 valid
      crc          u32  CRC-32 of the record header from ``seq`` on, then the data
      seq          u64
      job_id       16s  ASCII
      type         i64  the job's message type
      status       u8   0 ok, 1 error
      kind         u8   how to read data: 0 bytes, 1 UTF-8 text, 2 JSON (an error result's
                        data is its message, kind 1); plus 0x80 when the result is
                        *spilled*: too large for a slot, it is in a segment of its own
                        and the record's data is a descriptor (SPILLED below)
      attempt      u16
      length       u32  bytes of data
      submitted    f64
      finished     f64

Waiters say so in the header, not to the kernel: a writer that asked the gate how many
wait (``semctl(GETZCNT)``) spent a system call per result, nearly always to hear "none".
A waiter instead writes the time its wait ends into ``waiting_until`` before it looks
for its result (:func:`mark_waiting`), and the daemon pulses the gate after a result
only while that time lies ahead (:func:`someone_waits`).  A stamp, not a count, so that
nothing needs undoing: a waiter killed while it waits leaves a time that passes by
itself (ipcd's waits last at most a quarter of a second, and no stamp counts further
ahead than WAIT_HORIZON_MS), after which the daemon saves its pulses again.  Two
waiters writing at once can leave the earlier end; the other then sleeps out its own
short wait, as one does whose pulse fell between its look and its wait.

Why this shape: fixed slots make eviction trivial (the ring overwrites the oldest record)
and let a reader find a job by comparing 16 bytes per slot.  Every write and read holds
the semaphore (SEM_UNDO, with a timeout); a writer killed mid-record leaves ``state`` at
1 or a CRC that does not match, so a torn record is never read back as a result.

A spilled record's data is 16 bytes: shmid i32, spill-table entry u32, size u64 (see
ipcd.tables.spill for the segment, which ipcd.tables.results reads and removes under the lock).
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import Any, NamedTuple

from ipcd.errors import NoResultError

MAGIC = b"IPCDRES\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQII d QQ".replace(" ", ""))
RECORD = struct.Struct("<IIQ16sqBBHIdd")
HEADER_SIZE = 64
RECORD_SIZE = 64
_NEXT_SEQ_OFFSET = 24
_COUNTS_OFFSET = 48
_PID_OFFSET = 32
_LENGTH_OFFSET = 44  # of a record's ``length``
_WAITING_OFFSET = 36
_STARTED_OFFSET = 40
#: The furthest ahead (ms) a waiter's stamp is believed: a later one is no ipcd
#: client's (garbage, or a clock stepped back) and counts as nobody waiting.
WAIT_HORIZON_MS = 60_000
_MS_MASK = 0xFFFFFFFF
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CRC_FROM = 8  # the CRC covers the record header from ``seq`` on, then the data
#: The kind byte's flag for a result kept in a segment of its own.
SPILLED_FLAG = 0x80
SPILLED = struct.Struct("<iIQ")

assert HEADER.size == HEADER_SIZE and RECORD.size == RECORD_SIZE


class SlotState(enum.IntEnum):
    EMPTY = 0
    WRITING = 1
    VALID = 2


#: A record's ``state`` word as write_result stores it: one 4-byte store each.
_WRITING_STATE = SlotState.WRITING
_WRITING = _WRITING_STATE.to_bytes(4, "little")
_VALID = SlotState.VALID.to_bytes(4, "little")


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1


#: The members read for every result, bound once: EnumType defines ``__getattr__``, which
#: puts every attribute read on an enum class on a slower path (some 90 ns, a global 7).
_OK, _ERROR = Status.OK, Status.ERROR


class Kind(enum.IntEnum):
    """How a result's data is to be read."""

    BYTES = 0
    TEXT = 1
    JSON = 2


class Spilled(NamedTuple):
    """Where a result too large for a slot is: its own segment (ipcd.tables.spill)."""

    shmid: int
    #: The spill-table entry that records the segment.
    entry: int
    size: int


class Result(NamedTuple):
    """One job's outcome as stored in (and read back from) the segment."""

    job_id: str
    type: int
    status: Status
    kind: Kind
    data: bytes
    attempt: int = 1
    submitted: float = 0.0
    finished: float = 0.0
    #: Set while the data is still in its own segment (``data`` is then empty).
    spill: Spilled | None = None

    @property
    def ok(self) -> bool:
        return self.status is _OK

    @property
    def error(self) -> str:
        """The error message of a failed job ("" for a successful one)."""
        return "" if self.ok else self.data.decode("utf-8", "replace")

    def value(self) -> object:
        """The handler's return value: bytes, str, or the decoded JSON value."""
        if self.kind is Kind.JSON:
            import json  # here: reading a result's bytes or text needs no JSON parser

            return json.loads(self.data)
        if self.kind is Kind.TEXT:
            return self.data.decode("utf-8", "replace")
        return self.data

    def as_json(self) -> dict[str, object]:
        """A JSON-able view for ``--json`` output."""
        out: dict[str, object] = {
            "id": self.job_id,
            "type": self.type,
            "status": self.status.name.lower(),
            "attempt": self.attempt,
            "submitted": self.submitted,
            "finished": self.finished,
        }
        if self.ok:
            value = self.value()
            if isinstance(value, bytes):
                out["output_hex"] = value.hex()
            else:
                out["output"] = value
        else:
            out["error"] = self.error
        return out


class Header(NamedTuple):
    slot_count: int
    slot_size: int
    next_seq: int
    daemon_pid: int
    started: float
    ok_count: int
    error_count: int


def capacity(slot_size: int) -> int:
    """Bytes of data one slot holds."""
    return slot_size - RECORD_SIZE


def layout_for(size: int, slot_size: int) -> tuple[int, int]:
    """(slot_count, slot_size) that fit a segment of ``size`` bytes."""
    return (size - HEADER_SIZE) // slot_size, slot_size


# --- pure functions of a buffer ------------------------------------------------------------


def format_segment(buf: memoryview, slot_size: int) -> None:
    """Write an empty ring into ``buf``: header first, every slot marked empty."""
    slot_count, _ = layout_for(len(buf), slot_size)
    buf[HEADER_SIZE:] = bytes(len(buf) - HEADER_SIZE)
    HEADER.pack_into(buf, 0, MAGIC, VERSION, HEADER_SIZE, slot_count, slot_size, 0, 0, 0, 0.0, 0, 0)


def repair_header(
    buf: memoryview, slot_size: int, daemon: tuple[int, float] | None = None
) -> tuple[int, int]:
    """Write the header anew over a ring whose header another program overwrote (PHP's
    ``shm_attach()`` writes its own 40 bytes at offset 0), keeping every record that
    still reads back whole; returns (records kept, records lost).

    The slot layout follows from the segment's size and ``slot_size``, which the daemon
    knows; ``next_seq`` from the newest record kept; the serving daemon is ``daemon``
    (pid, started) when given, and the counts are left as the bytes say.  A record
    that is neither empty nor valid (a CRC that no longer matches: the other program
    wrote further) is lost, and its slot emptied.  The caller holds the lock.
    """
    slot_count, _ = layout_for(len(buf), slot_size)
    newest, kept, lost = -1, 0, 0
    for index in range(slot_count):
        offset = HEADER_SIZE + index * slot_size
        state, _, seq = struct.unpack_from("<IIQ", buf, offset)
        if state == SlotState.EMPTY:
            continue
        if read_slot(buf, offset, slot_size) is None:
            buf[offset : offset + RECORD_SIZE] = bytes(RECORD_SIZE)
            lost += 1
            continue
        kept += 1
        newest = max(newest, seq)
    pid, _, started, ok, err = struct.unpack_from("<IIdQQ", buf, _PID_OFFSET)
    if daemon is not None:
        pid, started = daemon
    HEADER.pack_into(
        buf, 0, MAGIC, VERSION, HEADER_SIZE, slot_count, slot_size, newest + 1, pid, 0,
        started, ok, err,
    )  # fmt: skip
    return kept, lost


def read_header(buf: memoryview) -> Header | None:
    """The header, or ``None`` when the buffer does not hold a ring of this version."""
    if len(buf) < HEADER_SIZE:
        return None
    magic, version, hsize, count, ssize, seq, pid, _, started, ok, err = HEADER.unpack_from(buf, 0)
    if magic != MAGIC or version != VERSION or hsize != HEADER_SIZE:
        return None
    if ssize < RECORD_SIZE or count < 1 or HEADER_SIZE + count * ssize > len(buf):
        return None
    return Header(count, ssize, seq, pid, started, ok, err)


def set_daemon(buf: memoryview, pid: int, started: float) -> None:
    """Record the serving daemon (its pid and start time), leaving ``waiting_until``."""
    struct.pack_into("<I", buf, _PID_OFFSET, pid)
    struct.pack_into("<d", buf, _STARTED_OFFSET, started)


def _ms(when: float) -> int:
    """Unix time ``when`` as waiting_until counts it: milliseconds modulo 2**32, never 0."""
    return (int(when * 1000) & _MS_MASK) or 1


def _ahead(stamp: int, now_ms: int) -> int:
    """How many ms ``stamp`` lies after ``now_ms``, modulo 2**32 (a past one: huge)."""
    return (stamp - now_ms) & _MS_MASK


def mark_waiting(buf: memoryview, until: float, now: float) -> None:
    """Say that this client waits on the result gate until Unix time ``until`` (at most
    WAIT_HORIZON_MS after ``now``): written before it looks for its result, so that a
    result stored after that look finds the stamp and is pulsed.  An end already
    stamped further ahead (another waiter's) is kept.  One aligned 4-byte store, no
    lock: see the module docstring for what a race costs."""
    stamp = _ms(min(until, now + WAIT_HORIZON_MS / 1000))
    now_ms = _ms(now)
    current = int.from_bytes(buf[_WAITING_OFFSET : _WAITING_OFFSET + 4], "little")
    if current and _ahead(stamp, now_ms) < _ahead(current, now_ms) <= WAIT_HORIZON_MS:
        return
    buf[_WAITING_OFFSET : _WAITING_OFFSET + 4] = stamp.to_bytes(4, "little")


def someone_waits(buf: memoryview, now: float) -> bool:
    """Whether a client said it waits on the gate at Unix time ``now`` (:func:`mark_waiting`).

    Asked after every result, so written out flat (as _ahead(stamp, _ms(now)); a ``now``
    whose ms count is 0 reads as 0, not 1: a stamp of 1 then lies 1 ms ahead, no harm).
    """
    stamp: int = _U32.unpack_from(buf, _WAITING_OFFSET)[0]
    return stamp != 0 and (stamp - int(now * 1000)) & _MS_MASK <= WAIT_HORIZON_MS


def write_result(buf: memoryview, header: Header, result: Result) -> int:
    """Store ``result`` in the next slot, evicting the oldest; returns its sequence number.

    The caller holds the semaphore.  The order of the writes is what makes a torn record
    detectable: mark the slot as being written, fill it, then publish the CRC and state.
    """
    seq = header.next_seq
    offset = HEADER_SIZE + (seq % header.slot_count) * header.slot_size
    data = result.data
    kind = int(result.kind)
    if result.spill is not None:
        data = SPILLED.pack(*result.spill)
        kind |= SPILLED_FLAG
    length = len(data)
    if length > header.slot_size - RECORD_SIZE:  # capacity()
        raise ValueError(f"{length} bytes do not fit a {header.slot_size}-byte slot")
    raw_id = result.job_id.encode("ascii")[:16].ljust(16, b"\0")  # fails before any write
    # The words a reader without the lock trusts (state, next_seq) change in one store
    # each (a slice copy), never by struct's pack_into, which clears a field before it
    # fills it: a reader would see an empty slot or a count of 0 in between.
    buf[offset : offset + 4] = _WRITING
    buf[_NEXT_SEQ_OFFSET : _NEXT_SEQ_OFFSET + 8] = (seq + 1).to_bytes(8, "little")
    RECORD.pack_into(
        buf,
        offset,
        _WRITING_STATE,
        0,
        seq,
        raw_id,
        result.type,
        result.status,
        kind,
        min(result.attempt, 0xFFFF),
        length,
        result.submitted,
        result.finished,
    )
    start = offset + RECORD_SIZE
    end = start + length
    buf[start:end] = data
    _U32.pack_into(buf, offset + 4, zlib.crc32(buf[offset + _CRC_FROM : end]))
    buf[offset : offset + 4] = _VALID
    counter = _COUNTS_OFFSET + (8 if result.status is _ERROR else 0)
    _U64.pack_into(buf, counter, _U64.unpack_from(buf, counter)[0] + 1)
    return seq


def find_result(buf: memoryview, header: Header, job_id: str) -> Result | None:
    """The newest valid record for ``job_id``, or ``None``; never reads outside a slot."""
    wanted = job_id.encode("ascii", "replace")[:16].ljust(16, b"\0")
    newest = header.next_seq
    for seq in range(newest - 1, max(newest - header.slot_count, 0) - 1, -1):
        offset = HEADER_SIZE + (seq % header.slot_count) * header.slot_size
        if buf[offset + 16 : offset + 32] != wanted:
            continue
        result = read_slot(buf, offset, header.slot_size)
        if result is not None:
            return result
    return None


def find_unlocked(buf: memoryview, job_id: str) -> tuple[bool, Result | None]:
    """:func:`find_result` without the lock, where the bytes prove themselves: (True, the
    result or None), or (False, None) when only a read under the lock can tell.

    Per slot whose id matches, newest first: copy the record (its header and as much
    data as ``length`` said just before), check ``state`` and that ``length`` in the
    copy, check the CRC over the copy, then read ``state``, ``crc`` and ``seq`` again
    and require them unchanged.  A writer that took the slot
    while it was copied has by then set ``state`` to 1 and written a new ``seq`` (one
    no record ever had before), so the second look differs; the CRC also fails for any
    mixture of two records (all but one in 2**32, on a machine that reorders loads
    too).  Not sure, and so left to the locked read: an unreadable header (a restart
    formatting the segment, another program's header), a matching slot that is being
    written or does not check, and a spilled result, whose segment only the lock keeps
    from being removed while it is copied; and no record found while ``next_seq``
    moved (a record that was being written meanwhile may have looked empty or of
    another id).  A result returned is one a writer wrote whole and that was in the
    ring during the read; with ids that are not reused (the client's), it is the one a
    locked read would return.
    """
    header = read_header(buf)
    if header is None or header.next_seq == 0:
        # 0 is also what a writer's pack_into leaves for a moment (it clears a field
        # before it fills it); a ring with no result yet is as well read under the lock.
        return False, None
    wanted = job_id.encode("ascii", "replace")[:16].ljust(16, b"\0")
    newest, count, size = header.next_seq, header.slot_count, header.slot_size
    for seq in range(newest - 1, max(newest - count, 0) - 1, -1):
        offset = HEADER_SIZE + (seq % count) * size
        if buf[offset + 16 : offset + 32] != wanted:
            continue
        (length,) = _U32.unpack_from(buf, offset + _LENGTH_OFFSET)
        if length > size - RECORD_SIZE:
            return False, None
        record = bytes(buf[offset : offset + RECORD_SIZE + length])  # one copy, then checks
        fields = RECORD.unpack_from(record)
        state, crc = fields[0], fields[1]
        if state == SlotState.EMPTY:
            continue
        if state != SlotState.VALID or fields[8] != length or fields[6] & SPILLED_FLAG:
            return False, None
        if zlib.crc32(memoryview(record)[_CRC_FROM:]) != crc:
            return False, None
        if buf[offset : offset + 16] != record[:16] or record[16:32] != wanted:
            return False, None
        data = record[RECORD_SIZE:]
        result = _record(fields, data)
        return (False, None) if result is None else (True, result)
    # No record found: sure only if no write began meanwhile.  A record being written
    # is zeros for a moment (struct's pack_into clears the 64 bytes before it fills
    # them), which reads as an empty slot or another id; a writer counts next_seq up
    # before it touches the record, so the count tells.  (The one moment before that,
    # when it marks the slot it takes, empties the oldest record: gone either way.)
    return struct.unpack_from("<Q", buf, _NEXT_SEQ_OFFSET)[0] == newest, None


def clear_result(buf: memoryview, header: Header, job_id: str) -> int:
    """Mark every record of ``job_id`` empty (the failed list's retry); returns how many."""
    wanted = job_id.encode("ascii", "replace")[:16].ljust(16, b"\0")
    cleared = 0
    for index in range(header.slot_count):
        offset = HEADER_SIZE + index * header.slot_size
        if buf[offset + 16 : offset + 32] == wanted:
            struct.pack_into("<I", buf, offset, SlotState.EMPTY)
            cleared += 1
    return cleared


def read_slot(buf: memoryview, offset: int, slot_size: int) -> Result | None:
    """Decode the record at ``offset``; ``None`` for empty, torn or corrupt records."""
    fields = RECORD.unpack_from(buf, offset)
    state, crc, length = fields[0], fields[1], fields[8]
    if state != SlotState.VALID or length > slot_size - RECORD_SIZE:
        return None
    start = offset + RECORD_SIZE
    if zlib.crc32(buf[offset + _CRC_FROM : start + length]) != crc:
        return None
    return _record(fields, bytes(buf[start : start + length]))


def _record(fields: tuple[Any, ...], data: bytes) -> Result | None:
    """The Result of a record's unpacked header and its data; None when a field is out
    of range (a record no ipcd wrote)."""
    _, _, _, raw_id, type_, status, kind, attempt, length, submitted, finished = fields
    spill = None
    if kind & SPILLED_FLAG:
        if length != SPILLED.size:
            return None
        spill, data = Spilled(*SPILLED.unpack(data)), b""
    try:
        return Result(
            job_id=raw_id.rstrip(b"\0").decode("ascii"),
            type=type_,
            status=_STATUSES[status],
            kind=_KINDS[kind & ~SPILLED_FLAG],
            data=data,
            attempt=attempt,
            submitted=submitted,
            finished=finished,
            spill=spill,
        )
    except (IndexError, UnicodeDecodeError):
        return None


#: The enums by value: a tuple lookup costs a fortieth of an enum call, on every read.
_STATUSES = tuple(Status)
_KINDS = tuple(Kind)


def spilled_at(buf: memoryview, header: Header, seq: int) -> Result | None:
    """The spilled record in ``seq``'s slot, if that slot holds one: what a write there
    evicts.  Reads only the small record, never a slot's worth of data."""
    offset = HEADER_SIZE + (seq % header.slot_count) * header.slot_size
    if buf[offset + 41] & SPILLED_FLAG == 0:
        return None
    return read_slot(buf, offset, header.slot_size)


def iter_results(buf: memoryview, header: Header) -> list[Result]:
    """Every valid record, oldest first (for listings and tests)."""
    out = []
    newest = header.next_seq
    for seq in range(max(newest - header.slot_count, 0), newest):
        offset = HEADER_SIZE + (seq % header.slot_count) * header.slot_size
        result = read_slot(buf, offset, header.slot_size)
        if result is not None:
            out.append(result)
    return out


def too_large(result: Result, slot_size: int) -> Result:
    """The error result that stands in for a result too large for a slot."""
    message = (
        f"result too large for the result segment: {len(result.data)} bytes, "
        f"a slot holds {capacity(slot_size)} (raise [results] slot_size)"
    )
    return Result(
        job_id=result.job_id,
        type=result.type,
        status=Status.ERROR,
        kind=Kind.TEXT,
        data=message.encode(),
        attempt=result.attempt,
        submitted=result.submitted,
        finished=result.finished,
    )


def require(result: Result | None, job_id: str) -> Result:
    if result is None:
        raise NoResultError(
            f"no result for job {job_id} (still queued or running, evicted, or never submitted)"
        )
    return result
