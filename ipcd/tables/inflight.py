"""The in-flight table: every job a worker holds, in shared memory that outlives it.

A worker receives each message straight into its own slot here (``msgrcv`` into shared
memory, see ipcd.kernel.queues), so a job taken off the queue is recorded before any Python code
runs.  When a worker dies, or the whole daemon is killed, the master finds the job in the
slot and runs it again or records it failed: nothing the queue handed out is lost.  The
same table holds *parked* jobs, waiting for a retry delay to pass.

:mod:`ipcd.layout.inflight` knows the layout as pure functions of a buffer; this module
pairs it with the kernel objects from :mod:`ipcd.kernel.segments` and holds the semaphore
around parking.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection

from ipcd.kernel.segments import Lock, Segment, create_formatted
from ipcd.layout import inflight as layout
from ipcd.layout.inflight import Held, Peek, State, WorkerView, segment_size

LOCK_TIMEOUT = 5.0
#: Where slot 0 starts (layout.Shape.offset).
_HEADER = layout.HEADER_SIZE

# A slot's records are the layout's; the daemon, ipcctl status and the tests import them here.
__all__ = ["LOCK_TIMEOUT", "Held", "InflightTable", "Peek", "State", "WorkerView"]


class InflightTable:
    """The table over a live segment.  Worker slots come first, then parked slots."""

    def __init__(self, segment: Segment, lock: Lock) -> None:
        self.segment = segment
        self.lock = lock
        self.buf = segment.buf
        self.shape = layout.read_shape(self.buf)
        self.workers: int = self.shape.workers
        self.parked: int = self.shape.parked
        self.slot_size: int = self.shape.slot_size
        self.text_size: int = self.shape.text_size

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
            if not layout.readable(segment.buf):
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
            format=lambda new: layout.format_segment(new.buf, workers, parked, text_size),
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

    #: Whether a buffer holds a table of this version (ipcd.daemon.objectwatch asks).
    readable = staticmethod(layout.readable)

    def rewrite_header(self) -> None:
        """Write the header again from what this process knows of the table, over one
        another program overwrote (ipcd.daemon.objectwatch); the slots after it are kept."""
        layout.write_header(self.buf, self.shape, os.getpid())

    def set_master(self, pid: int) -> None:
        layout.set_master(self.buf, pid)

    def master_pid(self) -> int:
        return layout.master_pid(self.buf)

    # --- slots --------------------------------------------------------------------------

    def offset(self, index: int) -> int:
        """Where slot ``index`` starts (Shape.offset's sum, one call fewer: a worker asks
        for its slot's four times a job)."""
        return _HEADER + index * self.slot_size

    def msgbuf_address(self, index: int) -> int:
        """Where a worker's msgrcv writes (the slot's ``struct msgbuf``)."""
        return self.segment.address + self.offset(index) + layout.MSGBUF_TYPE

    def begin_receive(self, index: int, pid: int, previous_length: int) -> None:
        """Mark the slot empty and receiving; zero what the last message left in it."""
        layout.begin_receive(self.buf, self.offset(index), pid, previous_length, self.text_size)

    def received(self, index: int, length: int, attempt: int, job_id: str, deadline: float) -> None:
        """Record what the kernel delivered and whose it is: the slot now runs a job."""
        layout.received(
            self.buf, self.offset(index), length=length, attempt=attempt, job_id=job_id,
            started=time.time(), deadline=deadline,
        )  # fmt: skip

    def deliver(self, index: int, type_: int, body: bytes) -> None:
        """Put a message in a receiving slot as ``msgrcv`` would (see begin_receive)."""
        layout.deliver(self.buf, self.offset(index), type_, body)

    def message_type(self, index: int) -> int:
        """The message type the kernel wrote into the slot (0: none yet)."""
        return layout.message_type(self.buf, self.offset(index))

    def text(self, index: int, length: int) -> memoryview:
        return layout.text(self.buf, self.offset(index), length)

    def finished(self, index: int) -> None:
        """The job's result is stored: the slot no longer holds it."""
        layout.finished(self.buf, self.offset(index))

    def reset_worker(self, index: int, pid: int) -> None:
        """A new worker takes the slot: counters start again."""
        layout.reset_worker(self.buf, self.offset(index), self.slot_size, pid)

    def peek(self, index: int) -> Peek:
        return layout.peek(self.buf, self.offset(index))

    def parked_due(self) -> list[tuple[int, float]]:
        """(slot, due time) of every parked job, without copying the messages; a worker
        slot can hold one too, see park_in."""
        out = []
        for index in range(self.workers + self.parked):
            peek = self.peek(index)
            if peek.state is State.PARKED and peek.type != 0:
                out.append((index, peek.deadline))
        return out

    def held(self, index: int) -> Held | None:
        """The job the slot holds, if any (a worker's delivered job, or a parked one)."""
        return layout.held(self.buf, self.offset(index), index, self.text_size)

    def clear(self, index: int) -> None:
        layout.clear(self.buf, self.offset(index))

    def worker_views(self) -> list[WorkerView]:
        return [
            view
            for index in range(self.workers)
            if (view := layout.worker_view(self.buf, self.offset(index), index)) is not None
        ]

    # --- parking ------------------------------------------------------------------------

    def park(self, type_: int, body: bytes, job_id: str, attempt: int, due: float) -> bool:
        """Keep a job until ``due``; False when every parked slot is taken."""
        if len(body) > self.text_size:
            return False
        with self.lock.held(LOCK_TIMEOUT):
            for index in range(self.workers, self.workers + self.parked):
                if not layout.is_free(self.buf, self.offset(index)):
                    continue
                self.park_in(index, type_, body, job_id, attempt, due)
                return True
        return False

    def park_in(
        self, index: int, type_: int, body: bytes, job_id: str, attempt: int, due: float
    ) -> None:
        """Put a job in this very slot until ``due`` (the master keeps a dead worker's job in
        the worker's slot when no parked slot is free); see layout.park_in for the order."""
        layout.park_in(
            self.buf, self.offset(index), type_=type_, body=body, job_id=job_id,
            attempt=attempt, parked_at=time.time(), due=due,
        )  # fmt: skip

    def parked_jobs(self) -> list[Held]:
        """Every parked job with its message (for listings and tests)."""
        return [h for slot, _ in self.parked_due() if (h := self.held(slot)) is not None]
