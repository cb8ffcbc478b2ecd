"""The stats segment: job and worker counters every process of the daemon adds to.

Counters must outlive the process that counts (a worker may die at any moment) and be
readable by ``ipcctl stats`` without asking the daemon anything, so they live in a
shared-memory segment at ``K + 5 * 0x01000000``, next to the daemon's other objects.
Each worker slot of the in-flight table has a record of its own and the master has one:
every record has a single writer, so counting takes no lock, and readers add the
records up.  A record carries a sequence number, odd while its writer updates it
(a seqlock): a reader copies the record and keeps the copy only if the number was the
same even value before and after.  The counts are cumulative since the segment was
formatted, which the daemon does at each start.

The layout itself (header, handler table, records) is in :mod:`ipcd.layout.stats`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Collection, Iterable
from typing import NamedTuple

from ipcd.kernel.segments import Segment, create_formatted
from ipcd.layout.stats import (
    ERROR,
    JOBS_RECOVERED,
    JOBS_REQUEUED,
    LOG_DROPPED,
    MASTER,
    MASTER_COUNTERS,
    MASTER_SLOTS,
    OK,
    OUTCOMES,
    REJECTED,
    RELOADS,
    RESULTS_LOST,
    RETRIED,
    SEQ,
    STORE_ERRORS,
    WORKER_RESTARTS,
    WORKERS_STARTED,
    column_struct,
    columns_for,
    format_segment,
    handler_names,
    read_header,
    register,
    segment_size,
)

__all__ = [
    # Positions in a record (ipcd.layout.stats's), the names callers of a Recorder use.
    "JOBS_RECOVERED",
    "JOBS_REQUEUED",
    "LOG_DROPPED",
    "OUTCOMES",
    "RELOADS",
    "RESULTS_LOST",
    "STORE_ERRORS",
    "WORKERS_STARTED",
    "WORKER_RESTARTS",
    "HandlerTotals",
    "NullRecorder",
    "Recorder",
    "Snapshot",
    "StatsSegment",
    "counter_total",
    "read_record",
    "snapshot",
]


#: Where a column's bucket counts start (after its outcome counts).
_BUCKETS = len(OUTCOMES)


class Recorder:
    """Adds to one record; the only writer of that record.

    The worker slot's record outlives the worker: a new worker in the slot goes on from
    what the last one counted.  Durations are measured from the ``started`` that the
    caller passes (``time.monotonic()``); a recorder with ``timed=False`` (the master's,
    which finishes jobs whose worker died and cannot know how long they ran) counts
    outcomes only.
    """

    def __init__(self, buf: memoryview | bytearray, index: int, *, timed: bool = True) -> None:
        header = read_header(buf)
        if header is None or not 0 <= index < header.records:
            raise ValueError("not a stats segment, or no such record")
        self._buf = buf
        self._header = header
        self._offset = header.record_offset(index)
        self._column = column_struct(len(header.bounds))
        self._bounds = header.bounds
        self._timed = timed
        self._columns: dict[str, int] = {}
        self._values: dict[int, list[float]] = {}
        (self._seq,) = SEQ.unpack_from(buf, self._offset)
        if self._seq & 1:  # its last writer died in the middle of an update
            self._seq += 1
            SEQ.pack_into(buf, self._offset, self._seq)
        self.refresh()

    def refresh(self) -> None:
        """Read the handler table again (the master, after a reload registered more)."""
        names = handler_names(self._buf)
        self._columns = {name: column for column, (name, _) in enumerate(names)}

    def done(self, handler: str, ok: bool, started: float) -> None:
        """A job ended with a final result (the one call on a job's path)."""
        column = self._columns.get(handler, 0)
        values = self._values.get(column) or self._load(column)
        values[OK if ok else ERROR] += 1
        if self._timed:
            seconds = time.monotonic() - started
            values[_BUCKETS + bisect_left(self._bounds, seconds)] += 1  # bucket_index()
            values[-1] += seconds
        self._write(column, values)

    def retried(self, handler: str) -> None:
        column = self._columns.get(handler, 0)
        values = self._values.get(column) or self._load(column)
        values[RETRIED] += 1
        self._write(column, values)

    def rejected(self) -> None:
        values = self._values.get(0) or self._load(0)
        values[REJECTED] += 1
        self._write(0, values)

    def bump(self, counter: int, by: int = 1) -> None:
        """Add ``by`` to a counter of the record (WORKERS_STARTED, LOG_DROPPED, ...)."""
        offset = self._offset + SEQ.size + 8 * counter
        self._seq += 1
        SEQ.pack_into(self._buf, self._offset, self._seq)
        (value,) = SEQ.unpack_from(self._buf, offset)
        SEQ.pack_into(self._buf, offset, value + by)
        self._seq += 1
        SEQ.pack_into(self._buf, self._offset, self._seq)

    def _column_offset(self, column: int) -> int:
        return self._offset + SEQ.size + MASTER.size + column * self._column.size

    def _load(self, column: int) -> list[float]:
        values: list[float] = list(self._column.unpack_from(self._buf, self._column_offset(column)))
        self._values[column] = values
        return values

    def _write(self, column: int, values: list[float]) -> None:
        self._seq += 1
        SEQ.pack_into(self._buf, self._offset, self._seq)
        self._column.pack_into(self._buf, self._column_offset(column), *values)
        self._seq += 1
        SEQ.pack_into(self._buf, self._offset, self._seq)


class NullRecorder(Recorder):
    """Counts nothing: for Outcomes made without a stats segment (tests, tools)."""

    def __init__(self) -> None:
        pass

    def refresh(self) -> None:
        pass

    def done(self, handler: str, ok: bool, started: float) -> None:
        pass

    def retried(self, handler: str) -> None:
        pass

    def rejected(self) -> None:
        pass

    def bump(self, counter: int, by: int = 1) -> None:
        pass


class HandlerTotals(NamedTuple):
    """One handler's counts, summed over every record."""

    name: str
    type: int
    outcomes: dict[str, int]
    #: Per-bucket counts (not cumulative), the last one for +Inf.
    buckets: tuple[int, ...]
    seconds: float

    @property
    def finished(self) -> int:
        return self.outcomes["ok"] + self.outcomes["error"]


class Snapshot(NamedTuple):
    """Everything the segment counted, added up."""

    created: float
    bounds: tuple[float, ...]
    handlers: tuple[HandlerTotals, ...]
    master: dict[str, int]

    @property
    def finished(self) -> int:
        """Jobs that ended with a final result (ok or error)."""
        return sum(h.finished for h in self.handlers)

    def total(self, outcome: str) -> int:
        return sum(h.outcomes[outcome] for h in self.handlers)


#: How often a reader tries again while a record is being written.
READ_TRIES = 1000


def read_record(buf: memoryview | bytearray | bytes, offset: int, size: int) -> bytes:
    """A consistent copy of one record (seqlock read).

    A writer killed in the middle of an update leaves the number odd until the next
    worker in its slot starts; after READ_TRIES the record is taken as it is.
    """
    data = b""
    for _ in range(READ_TRIES):
        (before,) = SEQ.unpack_from(buf, offset)
        if before & 1:
            time.sleep(0)
            continue
        data = bytes(buf[offset : offset + size])
        (after,) = SEQ.unpack_from(buf, offset)
        if before == after:
            return data
    return bytes(buf[offset : offset + size])


def snapshot(buf: memoryview | bytearray | bytes) -> Snapshot | None:
    """Add up every record; None if the buffer holds no stats layout."""
    header = read_header(buf)
    if header is None:
        return None
    names = handler_names(buf)
    column = column_struct(len(header.bounds))
    sums: list[list[float]] = [[0] * (len(OUTCOMES) + len(header.bounds) + 2) for _ in names]
    master = [0] * MASTER_SLOTS
    for index in range(header.records):
        data = read_record(buf, header.record_offset(index), header.record_size)
        for i, value in enumerate(MASTER.unpack_from(data, SEQ.size)):
            master[i] += value
        for c in range(len(names)):
            values = column.unpack_from(data, SEQ.size + MASTER.size + c * column.size)
            row = sums[c]
            for i, value in enumerate(values):
                row[i] += value
    n = len(OUTCOMES)
    handlers = tuple(
        HandlerTotals(
            name,
            type_,
            {outcome: int(row[i]) for i, outcome in enumerate(OUTCOMES)},
            tuple(int(v) for v in row[n:-1]),
            float(row[-1]),
        )
        for (name, type_), row in zip(names, sums, strict=True)
    )
    counters = {name: master[i] for i, name in enumerate(MASTER_COUNTERS)}
    return Snapshot(header.created, header.bounds, handlers, counters)


def counter_total(buf: memoryview | bytearray | bytes, counter: int) -> int:
    """One counter (LOG_DROPPED, ...) added up over every record, without a snapshot's
    cost: the master reads it at every turn of its loop."""
    header = read_header(buf)
    if header is None:
        return 0
    return sum(
        SEQ.unpack_from(buf, header.record_offset(index) + SEQ.size + 8 * counter)[0]
        for index in range(header.records)
    )


class StatsSegment:
    """The stats layout over a live segment (the kernel side of this module)."""

    def __init__(self, segment: Segment) -> None:
        self.segment = segment
        self.buf = segment.buf

    @classmethod
    def create(
        cls,
        key: int,
        mode: int,
        workers: int,
        handlers: Iterable[tuple[str, int]],
        *,
        keep_counts: bool = False,
        trusted: Collection[int] = (),
    ) -> StatsSegment:
        """Make the segment for ``workers`` worker slots and the master, zeroed: counts
        start again at each daemon start.  A segment of another size is made anew.
        ``keep_counts``: a readable segment of this size is kept as it is (the master
        opening its objects again, ipcd.daemon.objectwatch)."""
        named = list(handlers)
        columns = columns_for(len(named))
        size = segment_size(workers + 1, columns)

        def format(segment: Segment) -> None:
            format_segment(segment.buf, workers + 1, columns, time.time())
            register(segment.buf, named)

        # Never kept (counts start again), and read without a lock (a seqlock per record).
        segment = create_formatted(
            key,
            mode,
            size,
            keep=lambda old: keep_counts and read_header(old.buf) is not None,
            format=format,
            lock=None,
            what="stats segment",
            trusted=trusted,
        )
        return cls(segment)

    @classmethod
    def open(cls, key: int) -> StatsSegment:
        """Attach it to read (``ipcctl``); refuses a planted one (vetting.refuse_untrusted)."""
        return cls(Segment.open(key, what="stats segment"))

    def register(self, handlers: Iterable[tuple[str, int]]) -> list[str]:
        return register(self.buf, handlers)

    def for_master(self) -> Recorder:
        return Recorder(self.buf, 0, timed=False)

    def for_worker(self, slot: int) -> Recorder:
        return Recorder(self.buf, slot + 1)

    def snapshot(self) -> Snapshot | None:
        return snapshot(self.buf)

    def total(self, counter: int) -> int:
        return counter_total(self.buf, counter)
