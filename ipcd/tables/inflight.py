"""The in-flight table: every job a worker holds, in shared memory that outlives it.

A worker receives each message straight into its own slot here (``msgrcv`` into shared
memory, see ipcd.kernel.queues), so a job taken off the queue is recorded before any Python code
runs.  When a worker dies, or the whole daemon is killed, the master finds the job in the
slot and runs it again or records it failed: nothing the queue handed out is lost.  The
same table holds *parked* jobs, waiting for a retry delay to pass.

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
import os
import struct
import time
from collections.abc import Callable, Collection
from typing import NamedTuple

from ipcd.kernel.segments import Lock, Segment, create_formatted

MAGIC = b"IPCDINF\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIIIII28x")
SLOT = struct.Struct("<IIIIdd16sQQ")
#: The part of SLOT a worker writes when a job starts: attempt, length, started, deadline, id.
_RECEIVED = struct.Struct("<IIdd16s")
HEADER_SIZE = 64
SLOT_HEADER = 64
MSGBUF_TYPE = SLOT_HEADER  # offset of the C long mtype within a slot
TEXT = SLOT_HEADER + 8  # offset of the message text within a slot
LOCK_TIMEOUT = 5.0

assert HEADER.size == HEADER_SIZE and SLOT.size == SLOT_HEADER


class State(enum.IntEnum):
    FREE = 0
    RECEIVING = 1
    RUNNING = 2
    PARKED = 3


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


def slot_size_for(text_size: int) -> int:
    return (TEXT + text_size + 7) // 8 * 8


def segment_size(workers: int, parked: int, text_size: int) -> int:
    return HEADER_SIZE + (workers + parked) * slot_size_for(text_size)


class InflightTable:
    """The table over a live segment.  Worker slots come first, then parked slots."""

    def __init__(self, segment: Segment, lock: Lock) -> None:
        self.segment = segment
        self.lock = lock
        self.buf = segment.buf
        fields = HEADER.unpack_from(self.buf, 0)
        if fields[0] != MAGIC or fields[1] != VERSION:
            raise ValueError("not an in-flight table")
        self.workers: int = fields[3]
        self.parked: int = fields[4]
        self.slot_size: int = fields[5]
        self.text_size: int = fields[6]
        if HEADER_SIZE + (self.workers + self.parked) * self.slot_size > segment.size:
            raise ValueError("in-flight table larger than its segment")

    # --- creation ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        key: int,
        mode: int,
        workers: int,
        parked: int,
        text_size: int,
        *,
        trusted: Collection[int] = (),
    ) -> tuple[InflightTable, list[Held]]:
        """Create the table, or reuse the one a previous daemon left (with its jobs).

        Returns the table and, when an old table of another shape had to be replaced,
        the jobs it held (the caller parks them again at once).
        """
        lock = Lock.create(key, mode, trusted=trusted)
        carried: list[Held] = []

        def keep(segment: Segment) -> bool:
            """Same shape: keep it; another: note the jobs it holds, to park again."""
            if not cls.readable(segment.buf):
                return False
            old = cls(segment, lock)
            if (old.workers, old.parked, old.text_size) == (workers, parked, text_size):
                return True
            carried.extend(h for i in range(old.workers + old.parked) if (h := old.held(i)))
            return False

        segment = create_formatted(
            key,
            mode,
            segment_size(workers, parked, text_size),
            keep=keep,
            format=lambda new: cls.format(new.buf, workers, parked, text_size),
            lock=lock,
            lock_timeout=LOCK_TIMEOUT,
            what="in-flight table",
            trusted=trusted,
        )
        return cls(segment, lock), carried

    @classmethod
    def open(cls, key: int) -> InflightTable:
        """Attach the daemon's table read-mostly (``ipcctl status``)."""
        return cls(Segment.open(key, what="in-flight table"), Lock.open(key))

    @staticmethod
    def format(buf: memoryview, workers: int, parked: int, text_size: int) -> None:
        buf[:] = bytes(len(buf))
        HEADER.pack_into(
            buf, 0, MAGIC, VERSION, HEADER_SIZE, workers, parked, slot_size_for(text_size),
            text_size, 0,
        )  # fmt: skip

    @staticmethod
    def readable(buf: memoryview) -> bool:
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

    def rewrite_header(self) -> None:
        """Write the header again from what this process knows of the table, over one
        another program overwrote (ipcd.daemon.objectwatch); the slots after it are kept."""
        HEADER.pack_into(
            self.buf, 0, MAGIC, VERSION, HEADER_SIZE, self.workers, self.parked,
            self.slot_size, self.text_size, os.getpid(),
        )  # fmt: skip

    def set_master(self, pid: int) -> None:
        struct.pack_into("<I", self.buf, 32, pid)

    def master_pid(self) -> int:
        pid: int = struct.unpack_from("<I", self.buf, 32)[0]
        return pid

    # --- slots --------------------------------------------------------------------------

    def offset(self, index: int) -> int:
        return HEADER_SIZE + index * self.slot_size

    def msgbuf_address(self, index: int) -> int:
        """Where a worker's msgrcv writes (the slot's ``struct msgbuf``)."""
        return self.segment.address + self.offset(index) + MSGBUF_TYPE

    def begin_receive(self, index: int, pid: int, previous_length: int) -> None:
        """Mark the slot empty and receiving; zero what the last message left in it."""
        off = self.offset(index)
        if previous_length:
            end = off + TEXT + min(previous_length, self.text_size)
            self.buf[off + TEXT : end] = bytes(end - off - TEXT)
        struct.pack_into("<q", self.buf, off + MSGBUF_TYPE, 0)
        struct.pack_into("<II", self.buf, off, State.RECEIVING, pid)

    def received(self, index: int, length: int, attempt: int, job_id: str, deadline: float) -> None:
        """Record what the kernel delivered and whose it is: the slot now runs a job."""
        off = self.offset(index)
        _RECEIVED.pack_into(self.buf, off + 8, attempt, length, time.time(), deadline,
                            job_id.encode("ascii", "replace")[:16])  # fmt: skip
        struct.pack_into("<I", self.buf, off, State.RUNNING)

    def message_type(self, index: int) -> int:
        """The message type the kernel wrote into the slot (0: none yet)."""
        return int(struct.unpack_from("<q", self.buf, self.offset(index) + MSGBUF_TYPE)[0])

    def text(self, index: int, length: int) -> memoryview:
        off = self.offset(index) + TEXT
        return self.buf[off : off + length]

    def finished(self, index: int) -> None:
        """The job's result is stored: the slot no longer holds it."""
        off = self.offset(index)
        struct.pack_into("<q", self.buf, off + MSGBUF_TYPE, 0)
        (done,) = struct.unpack_from("<Q", self.buf, off + 48)
        struct.pack_into("<Q", self.buf, off + 48, done + 1)
        struct.pack_into("<I", self.buf, off, State.RECEIVING)

    def reset_worker(self, index: int, pid: int) -> None:
        """A new worker takes the slot: counters start again."""
        off = self.offset(index)
        self.buf[off : off + self.slot_size] = bytes(self.slot_size)
        struct.pack_into("<II", self.buf, off, State.RECEIVING, pid)

    def peek(self, index: int) -> Peek:
        off = self.offset(index)
        state, _, _, _, started, deadline, raw_id, _, _ = SLOT.unpack_from(self.buf, off)
        (mtype,) = struct.unpack_from("<q", self.buf, off + MSGBUF_TYPE)
        return Peek(
            _state(state), mtype, started, deadline, raw_id.rstrip(b"\0").decode("ascii", "replace")
        )

    def parked_due(self) -> list[tuple[int, float]]:
        """(slot, due time) of every parked job, without copying the messages; a worker
        slot can hold one too, see park_in."""
        out = []
        for index in range(self.workers + self.parked):
            peek = self.peek(index)
            if peek.state is State.PARKED and peek.type != 0:
                out.append((index, peek.deadline))
        return out

    def parked_attempts(self) -> list[tuple[float, int]]:
        """(due time, attempt) of every parked job: attempt 1 is a job submitted with a
        delay (``ipcctl submit --delay``, which parks it as its first attempt), a later
        attempt a job waiting out its retry delay."""
        attempt = struct.Struct("<I")
        return [
            (due, attempt.unpack_from(self.buf, self.offset(slot) + 8)[0])
            for slot, due in self.parked_due()
        ]

    def held(self, index: int) -> Held | None:
        """The job the slot holds, if any (a worker's delivered job, or a parked one)."""
        off = self.offset(index)
        state, pid, attempt, length, started, deadline, raw_id, _, _ = SLOT.unpack_from(
            self.buf, off
        )
        (mtype,) = struct.unpack_from("<q", self.buf, off + MSGBUF_TYPE)
        if mtype == 0 or state == State.FREE:
            return None
        try:
            st = State(state)
        except ValueError:
            return None
        text = bytes(self.text(index, self.text_size))
        body = text[:length] if st in (State.RUNNING, State.PARKED) else text.rstrip(b"\0")
        return Held(
            index, st, pid, mtype, body, attempt,
            raw_id.rstrip(b"\0").decode("ascii", "replace"), started, deadline,
        )  # fmt: skip

    def clear(self, index: int) -> None:
        off = self.offset(index)
        struct.pack_into("<q", self.buf, off + MSGBUF_TYPE, 0)
        struct.pack_into("<II", self.buf, off, State.FREE, 0)

    def worker_views(self) -> list[WorkerView]:
        views = []
        for index in range(self.workers):
            state, pid, _, _, started, _, raw_id, done, _ = SLOT.unpack_from(
                self.buf, self.offset(index)
            )
            (mtype,) = struct.unpack_from("<q", self.buf, self.offset(index) + MSGBUF_TYPE)
            if state == State.FREE:
                continue
            busy = state == State.RUNNING and mtype != 0
            views.append(
                WorkerView(
                    index,
                    pid,
                    _state(state),
                    raw_id.rstrip(b"\0").decode("ascii", "replace") if busy else "",
                    started if busy else 0.0,
                    done,
                )
            )
        return views

    # --- parking ------------------------------------------------------------------------

    def park(self, type_: int, body: bytes, job_id: str, attempt: int, due: float) -> bool:
        """Keep a job until ``due``; False when every parked slot is taken."""
        if len(body) > self.text_size:
            return False
        with self.lock.held(LOCK_TIMEOUT):
            for index in range(self.workers, self.workers + self.parked):
                off = self.offset(index)
                if struct.unpack_from("<I", self.buf, off)[0] != State.FREE:
                    continue
                self.park_in(index, type_, body, job_id, attempt, due)
                return True
        return False

    def park_in(
        self, index: int, type_: int, body: bytes, job_id: str, attempt: int, due: float
    ) -> None:
        """Put a job in this very slot until ``due`` (the master keeps a dead worker's job in
        the worker's slot when no parked slot is free).  The message is written before the
        state that publishes it, so a crash in between leaves the slot as it was."""
        off = self.offset(index)
        struct.pack_into("<I", self.buf, off, State.FREE)
        self.buf[off + TEXT : off + TEXT + len(body)] = body
        struct.pack_into("<q", self.buf, off + MSGBUF_TYPE, type_)
        struct.pack_into("<IIIIdd16s", self.buf, off, State.FREE, 0, attempt,
                         len(body), time.time(), due,
                         job_id.encode("ascii", "replace")[:16])  # fmt: skip
        struct.pack_into("<I", self.buf, off, State.PARKED)

    def rewrite(self, index: int, body: bytes, attempt: int) -> None:
        """A worker keeps a job to run again itself: the slot holds its new envelope."""
        off = self.offset(index)
        self.buf[off + TEXT : off + TEXT + len(body)] = body
        struct.pack_into("<II", self.buf, off + 8, attempt, len(body))

    def parked_jobs(self) -> list[Held]:
        """Every parked job with its message (for listings and tests)."""
        return [h for slot, _ in self.parked_due() if (h := self.held(slot)) is not None]

    def unpark(self, index: int) -> None:
        """Free a parked slot without sending its job (one that cannot be sent)."""
        with self.lock.held(LOCK_TIMEOUT):
            self.clear(index)

    def dispatch(self, held: Held, send: Callable[[bytes, int], bool]) -> bool:
        """Send a parked job (``send(body, type)``, False when the queue is full) and
        free its slot, both under the lock: a lock that stays taken leaves the job parked
        and unsent, never both sent and still parked (which would run it twice)."""
        with self.lock.held(LOCK_TIMEOUT):
            if not send(held.body, held.type):
                return False
            self.clear(held.slot)
        return True


def _state(raw: int) -> State:
    try:
        return State(raw)
    except ValueError:
        return State.FREE
