"""The in-flight table's layout, as pure functions of a buffer: header, slots, and what
each step of a job writes into its slot.

:mod:`ipcd.tables.inflight` pairs this with the kernel objects (the segment a worker's
``msgrcv`` writes into, the semaphore around parking); this module only says where things
are and in what order they are written, so it needs no kernel object.

Layout (little-endian)::

    header, 64 bytes: magic 8s b"IPCDINF\\0", version u32, header_size u32,
                      worker_slots u32, parked_slots u32, slot_size u32, text_size u32,
                      master_pid u32, then zeros
    slot: state u32, pid u32, attempt u32, length u32, started f64, deadline f64,
          job_id 16s, jobs_done u64, reserved u64,
          then a ``struct msgbuf`` for msgrcv: mtype i64 (written by the kernel),
          text[text_size]

A worker slot's ``mtype`` is zero while it holds no job; the kernel makes it non-zero as
it delivers a message, before the worker's ``msgrcv`` even returns.  ``state`` tells how
far the worker got: RECEIVING (in msgrcv; if ``mtype`` is set the length is unknown and
the text is read up to its trailing NULs, the buffer having been zeroed), RUNNING.
For a parked slot, ``deadline`` is when the job is due back on the queue.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

MAGIC = b"IPCDINF\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIIIII28x")
SLOT = struct.Struct("<IIIIdd16sQQ")
#: The part of SLOT a worker writes when a job starts: attempt, length, started, deadline, id.
_RECEIVED = struct.Struct("<IIdd16s")
#: The part of SLOT a parked job writes: state, pid, attempt, length, parked at, due, id.
_PARKED = struct.Struct("<IIIIdd16s")
_STATE_PID = struct.Struct("<II")
_ATTEMPT_LENGTH = struct.Struct("<II")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MTYPE = struct.Struct("<q")
HEADER_SIZE = 64
SLOT_HEADER = 64
MSGBUF_TYPE = SLOT_HEADER  # offset of the C long mtype within a slot
TEXT = SLOT_HEADER + 8  # offset of the message text within a slot
_MASTER_PID = 32  # offset of the header's master_pid
_ATTEMPT = 8  # offset of a slot's attempt (then length)
_JOBS_DONE = 48  # offset of a slot's jobs_done

assert HEADER.size == HEADER_SIZE and SLOT.size == SLOT_HEADER


class State(enum.IntEnum):
    FREE = 0
    RECEIVING = 1
    RUNNING = 2
    PARKED = 3


#: The states a worker writes for every job, bound once (ipcd.layout.results says why:
#: an enum member read from its class is slow).
_RECEIVING, _RUNNING = State.RECEIVING, State.RUNNING


class Held(NamedTuple):
    """A job found in a slot: what the kernel delivered and what the worker knew of it."""

    slot: int
    state: State
    pid: int
    type: int
    body: bytes
    attempt: int
    job_id: str
    started: float
    deadline: float


class Peek(NamedTuple):
    """A slot's bookkeeping without its message: cheap enough for every master wake-up."""

    state: State
    type: int
    started: float
    deadline: float
    job_id: str

    @property
    def holds_job(self) -> bool:
        return self.type != 0 and self.state is not State.FREE


class WorkerView(NamedTuple):
    """A worker slot as ``ipcctl status`` shows it."""

    slot: int
    pid: int
    state: State
    job_id: str
    started: float
    jobs_done: int


class Shape(NamedTuple):
    """How many slots of which size: what the header says."""

    workers: int
    parked: int
    slot_size: int
    text_size: int

    def offset(self, index: int) -> int:
        """Where slot ``index`` starts: worker slots first, then parked slots."""
        return HEADER_SIZE + index * self.slot_size

    @property
    def size(self) -> int:
        """The bytes the header and slots take."""
        return HEADER_SIZE + (self.workers + self.parked) * self.slot_size


def slot_size_for(text_size: int) -> int:
    return (TEXT + text_size + 7) // 8 * 8


def segment_size(workers: int, parked: int, text_size: int) -> int:
    return HEADER_SIZE + (workers + parked) * slot_size_for(text_size)


# --- header ---------------------------------------------------------------------------


def format_segment(buf: memoryview | bytearray, workers: int, parked: int, text_size: int) -> None:
    """Zero the buffer and write a header: every slot FREE, no master yet."""
    buf[:] = bytes(len(buf))
    shape = Shape(workers, parked, slot_size_for(text_size), text_size)
    write_header(buf, shape, 0)


def write_header(buf: memoryview | bytearray, shape: Shape, master_pid: int) -> None:
    """Write the header for ``shape``; the slots after it are left as they are."""
    HEADER.pack_into(
        buf, 0, MAGIC, VERSION, HEADER_SIZE, shape.workers, shape.parked, shape.slot_size,
        shape.text_size, master_pid,
    )  # fmt: skip


def readable(buf: memoryview | bytearray | bytes) -> bool:
    """Whether the buffer holds an in-flight table of this version whose slots fit."""
    if len(buf) < HEADER_SIZE:
        return False
    magic, version, hsize, workers, parked, ssize, tsize, _ = HEADER.unpack_from(buf, 0)
    return bool(
        magic == MAGIC
        and version == VERSION
        and hsize == HEADER_SIZE
        and ssize == slot_size_for(tsize)
        and HEADER_SIZE + (workers + parked) * ssize <= len(buf)
    )


def read_shape(buf: memoryview | bytearray | bytes) -> Shape:
    """The header's shape; ValueError when the buffer is not an in-flight table or its
    slots do not fit."""
    fields = HEADER.unpack_from(buf, 0)
    if fields[0] != MAGIC or fields[1] != VERSION:
        raise ValueError("not an in-flight table")
    shape = Shape(fields[3], fields[4], fields[5], fields[6])
    if shape.size > len(buf):
        raise ValueError("in-flight table larger than its segment")
    return shape


def set_master(buf: memoryview | bytearray, pid: int) -> None:
    _U32.pack_into(buf, _MASTER_PID, pid)


def master_pid(buf: memoryview | bytearray | bytes) -> int:
    pid: int = _U32.unpack_from(buf, _MASTER_PID)[0]
    return pid


# --- a worker's slot, in the order a job passes through it ----------------------------


def reset_worker(buf: memoryview | bytearray, off: int, slot_size: int, pid: int) -> None:
    """A new worker takes the slot: counters start again."""
    buf[off : off + slot_size] = bytes(slot_size)
    _STATE_PID.pack_into(buf, off, State.RECEIVING, pid)


def begin_receive(
    buf: memoryview | bytearray, off: int, pid: int, previous_length: int, text_size: int
) -> None:
    """Mark the slot empty and receiving; zero what the last message left in it."""
    if previous_length:
        end = off + TEXT + min(previous_length, text_size)
        buf[off + TEXT : end] = bytes(end - off - TEXT)
    _MTYPE.pack_into(buf, off + MSGBUF_TYPE, 0)
    _STATE_PID.pack_into(buf, off, _RECEIVING, pid)


def received(
    buf: memoryview | bytearray,
    off: int,
    *,
    length: int,
    attempt: int,
    job_id: str,
    started: float,
    deadline: float,
) -> None:
    """Record what the kernel delivered and whose it is, then (last) that the slot runs it."""
    _RECEIVED.pack_into(
        buf, off + _ATTEMPT, attempt, length, started, deadline,
        job_id.encode("ascii", "replace")[:16],
    )  # fmt: skip
    _U32.pack_into(buf, off, _RUNNING)


def deliver(buf: memoryview | bytearray, off: int, type_: int, body: bytes) -> None:
    """Write a message into a receiving slot as ``msgrcv`` would (text, then type): a
    worker that takes its job from the job store rather than from a queue."""
    buf[off + TEXT : off + TEXT + len(body)] = body
    _MTYPE.pack_into(buf, off + MSGBUF_TYPE, type_)


def message_type(buf: memoryview | bytearray | bytes, off: int) -> int:
    """The message type the kernel wrote into the slot (0: none yet)."""
    return int(_MTYPE.unpack_from(buf, off + MSGBUF_TYPE)[0])


def text(buf: memoryview, off: int, length: int) -> memoryview:
    return buf[off + TEXT : off + TEXT + length]


def finished(buf: memoryview | bytearray, off: int) -> None:
    """The job's result is stored: the slot no longer holds it, and counts one more."""
    _MTYPE.pack_into(buf, off + MSGBUF_TYPE, 0)
    (done,) = _U64.unpack_from(buf, off + _JOBS_DONE)
    _U64.pack_into(buf, off + _JOBS_DONE, done + 1)
    _U32.pack_into(buf, off, _RECEIVING)


def rewrite(buf: memoryview | bytearray, off: int, body: bytes, attempt: int) -> None:
    """A worker keeps a job to run again itself: the slot holds its new envelope."""
    buf[off + TEXT : off + TEXT + len(body)] = body
    _ATTEMPT_LENGTH.pack_into(buf, off + _ATTEMPT, attempt, len(body))


def clear(buf: memoryview | bytearray, off: int) -> None:
    _MTYPE.pack_into(buf, off + MSGBUF_TYPE, 0)
    _STATE_PID.pack_into(buf, off, State.FREE, 0)


# --- parked jobs ----------------------------------------------------------------------


def is_free(buf: memoryview | bytearray | bytes, off: int) -> bool:
    return bool(_U32.unpack_from(buf, off)[0] == State.FREE)


def park_in(
    buf: memoryview | bytearray,
    off: int,
    *,
    type_: int,
    body: bytes,
    job_id: str,
    attempt: int,
    parked_at: float,
    due: float,
) -> None:
    """Put a job in the slot until ``due``.  The message is written before the state that
    publishes it, so a crash in between leaves the slot as it was."""
    _U32.pack_into(buf, off, State.FREE)
    buf[off + TEXT : off + TEXT + len(body)] = body
    _MTYPE.pack_into(buf, off + MSGBUF_TYPE, type_)
    _PARKED.pack_into(
        buf, off, State.FREE, 0, attempt, len(body), parked_at, due,
        job_id.encode("ascii", "replace")[:16],
    )  # fmt: skip
    _U32.pack_into(buf, off, State.PARKED)


def attempt(buf: memoryview | bytearray | bytes, off: int) -> int:
    value: int = _U32.unpack_from(buf, off + _ATTEMPT)[0]
    return value


# --- reading a slot -------------------------------------------------------------------


def peek(buf: memoryview | bytearray | bytes, off: int) -> Peek:
    state, _, _, _, started, deadline, raw_id, _, _ = SLOT.unpack_from(buf, off)
    return Peek(_state(state), message_type(buf, off), started, deadline, _job_id(raw_id))


def held(buf: memoryview | bytearray | bytes, off: int, index: int, text_size: int) -> Held | None:
    """The job the slot holds, if any (a worker's delivered job, or a parked one)."""
    state, pid, attempt_, length, started, deadline, raw_id, _, _ = SLOT.unpack_from(buf, off)
    mtype = message_type(buf, off)
    if mtype == 0 or state == State.FREE:
        return None
    try:
        st = State(state)
    except ValueError:
        return None
    whole = bytes(buf[off + TEXT : off + TEXT + text_size])
    body = whole[:length] if st in (State.RUNNING, State.PARKED) else whole.rstrip(b"\0")
    return Held(index, st, pid, mtype, body, attempt_, _job_id(raw_id), started, deadline)


def worker_view(buf: memoryview | bytearray | bytes, off: int, index: int) -> WorkerView | None:
    """A worker slot for ``ipcctl status``; None when no worker has it."""
    state, pid, _, _, started, _, raw_id, done, _ = SLOT.unpack_from(buf, off)
    if state == State.FREE:
        return None
    busy = state == State.RUNNING and message_type(buf, off) != 0
    return WorkerView(
        index, pid, _state(state), _job_id(raw_id) if busy else "", started if busy else 0.0, done
    )


def _job_id(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("ascii", "replace")


def _state(raw: int) -> State:
    try:
        return State(raw)
    except ValueError:
        return State.FREE
