"""The spill table: which segments of their own hold large payloads and results.

Each large payload or result lives in a SysV segment of its own, made with IPC_PRIVATE
(key 0) by its producer: the client for a payload, the worker for a result.  The queue
carries only a small envelope naming the segment (``"spill"``, see docs/protocol.md) and
the result ring only a 16-byte descriptor (ipcd.layout.results), so neither fills with data.

A segment with key 0 is known only by its id, so a producer that dies at the wrong moment
would orphan it.  The *spill table* (a segment and a SEM_UNDO lock at the job key plus
``7 * 0x01000000``) records every one.  Its entries move through these states:

    FREE -> CLAIMING   claimed under the lock *before* shmget: pid, claimed_at, job id
         -> (shmid recorded, data written, segment handed to the daemon's uid)
         -> QUEUED     the envelope is about to be sent (marked before the send, with the
                       sender's pid, and freed again if the send fails); the job's
                       outcome frees it (ipcd.daemon.outcomes)
            -> FAILED  the job failed for good and the failed list holds it: dropping
                       it from the list frees it, ``ipcctl retry`` makes it QUEUED again
         or RESULT     the ring holds the descriptor; eviction from the ring frees it

Spilled results are a cache.  A claim that finds every entry taken evicts the oldest
RESULT entry (removes its segment, frees the entry), so results never starve payloads;
a result's claim also evicts the oldest results while those kept would exceed
``[results] spill_bytes``.  The ring's record of an evicted result then reads as no
result.  Payloads never starve results either: the table's header keeps ``reserved``
entries (``[results] spill_reserved``) out of the payloads' reach, so payloads (claimed,
queued or failed) hold at most ``entries - reserved`` and a payload's claim beyond that
is refused (QueueFullError, exit 75, at submit time) while a result's claim always finds
a free entry or a result to evict.  The failed list holds at most half the entries
(FAILED): beyond that a failed job's payload goes at once and its failed entry says so.

The master sweeps entries left CLAIMING by a dead process (ipcd.daemon.sweep).  QUEUED
entries belong to the queue, FAILED ones to the failed list, RESULT entries to the ring.

Layout (little-endian)::

    table header, 64 bytes: magic 8s b"IPCDSPT\\0", version u32, header_size u32,
                            entries u32, entry_size u32, evicted u64 (results evicted
                            for room), evicted_by_payloads u64 (of those, by a payload's
                            claim), reserved u32 (entries payloads may not take: kept
                            for results; 0 in a table made before it), then zeros
    entry, 48 bytes:        state u32, pid u32 (the claimer, or the sender once QUEUED),
                            claimed_at f64, shmid i32 (-1: none yet),
                            reserved u32, size u64, job_id 16s
    spill segment:          magic 8s b"IPCDSPD\\0", version u32, role u32 (0 payload,
                            1 result), kind u32 (0 bytes, 1 text, 2 JSON), reserved u32,
                            size u64, job_id 16s, zeros to 64 bytes; then the raw data

Data is copied once in (the producer writes straight into the segment) and once out (the
reader copies it into a bytes object): no base64, no JSON, no CRC over the data.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, NamedTuple

from ipcd.errors import IpcdError, QueueFullError
from ipcd.kernel.segments import Lock, Segment, create_formatted, remove_id
from ipcd.layout.results import Kind
from ipcd.tables.spill.segment import DATA, Role, exists, remove_checked, write

if TYPE_CHECKING:
    pass

MAGIC = b"IPCDSPT\0"
VERSION = 1
HEADER = struct.Struct("<8sIIII")
HEADER_SIZE = 64
ENTRY = struct.Struct("<IIdiIQ16s")
ENTRY_SIZE = 48
LOCK_TIMEOUT = 5.0
#: The eviction counters in the table header (zeros in a table made before them).
COUNTERS = struct.Struct("<QQ")
COUNTERS_OFFSET = 24
#: The entries kept for results, after the counters (zero in a table made before it).
RESERVED = struct.Struct("<I")
RESERVED_OFFSET = 40

assert ENTRY.size == ENTRY_SIZE


class State(enum.IntEnum):
    FREE = 0
    CLAIMING = 1
    QUEUED = 2
    RESULT = 3
    #: A payload the failed list holds (its job failed for good).
    FAILED = 4


class Entry(NamedTuple):
    slot: int
    state: State
    pid: int
    claimed_at: float
    shmid: int
    size: int
    job_id: str


class Claim(NamedTuple):
    #: The entry now CLAIMING.
    slot: int
    #: The results evicted to make room, oldest first (their segments removed).
    evicted: tuple[Entry, ...] = ()


class Usage(NamedTuple):
    """What the table holds, for ``ipcctl status`` and the metrics."""

    slots: int
    used: int
    results: int
    #: Payloads claimed, queued or running.
    payloads: int
    #: Payloads the failed list holds.
    failed: int
    #: Bytes of data in the segments the entries name.
    bytes: int
    result_bytes: int
    #: Results evicted for room since the table was made.
    evicted: int


def segment_size(entries: int) -> int:
    return HEADER_SIZE + entries * ENTRY_SIZE


class SpillTable:
    """The table over a live segment; every change holds its lock."""

    def __init__(
        self,
        segment: Segment,
        lock: Lock,
        *,
        max_result: int = 0,
        mode: int = 0o600,
        gid: int | None = None,
        spill_bytes: int | None = None,
    ) -> None:
        self.segment = segment
        self.lock = lock
        self.buf = segment.buf
        magic, version, hsize, count, esize = HEADER.unpack_from(self.buf, 0)
        if magic != MAGIC or version != VERSION or hsize != HEADER_SIZE or esize != ENTRY_SIZE:
            raise ValueError("not a spill table")
        if segment_size(count) > segment.size:
            raise ValueError("spill table larger than its segment")
        self.count: int = count
        #: The daemon's limits for results ([results] max_result, [ipc] mode).
        self.max_result = max_result
        self.mode = mode
        #: The group of the daemon's objects ([ipc] group), given to result segments.
        self.gid = gid
        #: [results] spill_bytes: the most data spilled results may hold (None: no cap).
        self.spill_bytes = spill_bytes

    @classmethod
    def create(
        cls,
        key: int,
        mode: int,
        entries: int,
        reserved: int = 0,
        *,
        trusted: Collection[int] = (),
        max_result: int = 0,
        gid: int | None = None,
        spill_bytes: int | None = None,
    ) -> SpillTable:
        """Create the table, or keep the one a previous daemon left (its entries still
        name live segments); one of another size is rebuilt with its entries carried.
        ``reserved`` entries are kept for results (payloads may take the rest)."""
        lock = Lock.create(key, mode, trusted=trusted)
        carried: list[Entry] = []

        def keep(segment: Segment) -> bool:
            with contextlib.suppress(ValueError):
                old = cls(segment, lock)
                if old.count == entries:
                    return True
                carried.extend(e for e in old.entries() if e.state is not State.FREE)
            return False

        def format(segment: Segment) -> None:
            segment.buf[:] = bytes(len(segment.buf))
            HEADER.pack_into(segment.buf, 0, MAGIC, VERSION, HEADER_SIZE, entries, ENTRY_SIZE)
            table = cls(segment, lock)
            for index, entry in enumerate(carried[:entries]):
                table._write(entry._replace(slot=index))

        segment = create_formatted(
            key,
            mode,
            segment_size(entries),
            keep=keep,
            format=format,
            lock=lock,
            lock_timeout=LOCK_TIMEOUT,
            what="spill table",
            trusted=trusted,
        )
        for entry in carried[entries:]:  # no room: what they named cannot be kept
            remove_checked(entry.shmid, entry.job_id)
        table = cls(
            segment, lock, max_result=max_result, mode=mode, gid=gid, spill_bytes=spill_bytes
        )
        with lock.held(LOCK_TIMEOUT):
            RESERVED.pack_into(table.buf, RESERVED_OFFSET, min(reserved, entries))
        return table

    @classmethod
    def open(cls, key: int) -> SpillTable:
        return cls(Segment.open(key, what="spill table"), Lock.open(key))

    # --- entries --------------------------------------------------------------------------

    def entry(self, index: int) -> Entry:
        state, pid, claimed, shmid, _, size, raw_id = ENTRY.unpack_from(
            self.buf, HEADER_SIZE + index * ENTRY_SIZE
        )
        try:
            st = State(state)
        except ValueError:
            st = State.FREE
        job_id = raw_id.rstrip(b"\0").decode("ascii", "replace")
        return Entry(index, st, pid, claimed, shmid, size, job_id)

    def entries(self) -> list[Entry]:
        return [self.entry(i) for i in range(self.count)]

    def _write(self, e: Entry) -> None:
        ENTRY.pack_into(
            self.buf, HEADER_SIZE + e.slot * ENTRY_SIZE, e.state, e.pid, e.claimed_at,
            e.shmid, 0, e.size, e.job_id.encode("ascii", "replace")[:16],
        )  # fmt: skip

    def clear(self, index: int) -> None:
        """Mark entry ``index`` free; the caller holds the lock."""
        self._write(Entry(index, State.FREE, 0, 0.0, -1, 0, ""))

    def claim(self, job_id: str, size: int, *, role: Role, refused: str) -> Claim:
        """Take a free entry for a segment this process is about to make.

        Results are a cache: with every entry taken, the oldest result goes to make room
        (so payloads are never starved by results), and a result's claim also evicts the
        oldest while the results kept would exceed ``spill_bytes``.  A payload's claim is
        refused while payloads hold every entry but the ``reserved`` ones, so a queued
        payload never makes a later result fail.  QueueFullError when refused;
        ``refused`` (from the caller, which knows what was refused) ends its message.
        """
        with self.lock.held(LOCK_TIMEOUT):
            entries = self.entries()
            if role is Role.PAYLOAD:
                # Claims still CLAIMING count as payloads: a worker's result claim is
                # brief, and counting it errs towards keeping room for results.
                payloads = sum(1 for e in entries if e.state not in (State.FREE, State.RESULT))
                if payloads >= self.count - self.reserved():
                    raise QueueFullError(self._full(entries, refused))
            stored = sorted(
                (e for e in entries if e.state is State.RESULT), key=lambda e: e.claimed_at
            )
            evicted: list[Entry] = []
            if role is Role.RESULT and self.spill_bytes is not None:
                kept = sum(e.size for e in stored)
                while stored and kept + size > self.spill_bytes:
                    evicted.append(self._evict(stored.pop(0)))
                    kept -= evicted[-1].size
            free = next((e.slot for e in entries if e.state is State.FREE), None)
            if free is None and evicted:
                free = evicted[0].slot
            if free is None and stored:
                evicted.append(self._evict(stored.pop(0)))
                free = evicted[-1].slot
            if free is None:  # only other claims just now (or a table with no reserve)
                raise QueueFullError(f"every spill slot is taken, none by a result: {refused}")
            self._write(Entry(free, State.CLAIMING, os.getpid(), time.time(), -1, size, job_id))
            if evicted:
                self._count_evicted(len(evicted), by_payload=role is Role.PAYLOAD)
            return Claim(free, tuple(evicted))

    def _evict(self, entry: Entry) -> Entry:
        """Drop a stored result for room (the caller holds the lock).  Its segment goes
        if this process may remove it; if not (a client of another user than the daemon),
        the ring's record still names it and the ring's eviction removes it."""
        remove_checked(entry.shmid, entry.job_id)
        self.clear(entry.slot)
        return entry

    def _full(self, entries: list[Entry], refused: str) -> str:
        failed = sum(1 for e in entries if e.state is State.FAILED)
        reserved = self.reserved()
        return (
            f"the spill table's {self.count - reserved} slots for large payloads are taken "
            f"([jobs] spill_slots = {self.count}, of which [results] spill_reserved = "
            f"{reserved} are kept for large results; {failed} held by the failed list): "
            f"{refused}"
        )

    def reserved(self) -> int:
        """The entries kept for results, which payloads may not take."""
        return int(RESERVED.unpack_from(self.buf, RESERVED_OFFSET)[0])

    def counters(self) -> tuple[int, int]:
        """(results evicted for room, of those by a payload's claim) since the table was made."""
        evicted, by_payloads = COUNTERS.unpack_from(self.buf, COUNTERS_OFFSET)
        return int(evicted), int(by_payloads)

    def _count_evicted(self, n: int, *, by_payload: bool) -> None:
        evicted, by_payloads = self.counters()
        COUNTERS.pack_into(
            self.buf, COUNTERS_OFFSET, evicted + n, by_payloads + (n if by_payload else 0)
        )

    def usage(self) -> Usage:
        """What the entries hold now (read without the lock: a look, not a decision)."""
        entries = [e for e in self.entries() if e.state is not State.FREE]
        results = [e for e in entries if e.state is State.RESULT]
        failed = sum(1 for e in entries if e.state is State.FAILED)
        return Usage(
            self.count, len(entries), len(results), len(entries) - len(results) - failed,
            failed, sum(e.size for e in entries), sum(e.size for e in results),
            self.counters()[0],
        )  # fmt: skip

    def hold_failed(self, shmid: int, job_id: str, hint: int | None = None) -> bool:
        """The failed list takes the job's payload: its entry becomes FAILED.  At most
        half the entries may be FAILED; beyond that the payload's segment goes at once
        and this says False (the failed entry then records that it was not kept)."""
        with self.lock.held(LOCK_TIMEOUT):
            entry = self._match(shmid, job_id, hint)
            if entry is None:
                return True  # not listed (a table made anew): nothing to bound
            held = sum(1 for e in self.entries() if e.state is State.FAILED)
            if entry.state is not State.FAILED and held >= self.count // 2:
                if not remove_checked(shmid, job_id) and exists(shmid):
                    return True  # not ours to remove: keep it as it is
                self.clear(entry.slot)
                return False
            self._write(entry._replace(state=State.FAILED))
            return True

    def _match(self, shmid: int, job_id: str, hint: int | None) -> Entry | None:
        """The entry for this segment of this job (``hint``: where it should be)."""
        if hint is not None and 0 <= hint < self.count:
            entry = self.entry(hint)
            if entry.state is not State.FREE and entry.shmid == shmid and entry.job_id == job_id:
                return entry
        return self.find(shmid, job_id)

    def record(self, index: int, shmid: int) -> None:
        with self.lock.held(LOCK_TIMEOUT):
            self._write(self.entry(index)._replace(shmid=shmid))

    def mark(self, index: int, state: State, shmid: int) -> None:
        """Move an entry on, if it still names that segment.  QUEUED records this
        process as the sender: the master's sweep frees a QUEUED entry whose sender died
        and whose job is neither queued nor in flight (it died before it sent).
        """
        with self.lock.held(LOCK_TIMEOUT):
            entry = self.entry(index)
            if entry.shmid == shmid:
                pid = os.getpid() if state is State.QUEUED else entry.pid
                self._write(entry._replace(state=state, pid=pid))

    def find(self, shmid: int, job_id: str) -> Entry | None:
        for entry in self.entries():
            if entry.state is not State.FREE and entry.shmid == shmid and entry.job_id == job_id:
                return entry
        return None

    def discard(self, index: int, shmid: int) -> None:
        """Remove a segment this process made (its creator may, whoever owns it now) and
        free its entry: a submission that failed before its envelope was sent."""
        remove_id(shmid)
        self.free(index)

    def free(self, index: int) -> None:
        with self.lock.held(LOCK_TIMEOUT):
            self.clear(index)

    def release(self, shmid: int, job_id: str, hint: int | None = None) -> None:
        """Remove the segment (only if it really is this job's) and free its entry."""
        with self.lock.held(LOCK_TIMEOUT):
            entry = self._match(shmid, job_id, hint)
            if not remove_checked(shmid, job_id) and exists(shmid):
                return  # not ours to remove (a client's process): leave it recorded
            if entry is not None:
                self.clear(entry.slot)

    # --- making segments ------------------------------------------------------------------

    def put(
        self,
        data: bytes,
        *,
        job_id: str,
        kind: Kind,
        role: Role,
        mode: int,
        owner: int | None,
        refused: str,
    ) -> tuple[int, int, tuple[Entry, ...]]:
        """Claim an entry, make the segment, write header and data, hand it to ``owner``.

        Returns (entry, shmid, the results evicted for room); the entry is still
        CLAIMING.  On any failure the segment is removed and the entry freed before the
        error goes on.  ``refused`` ends the message of a claim that finds no room.
        """
        index, evicted = self.claim(job_id, len(data), role=role, refused=refused)
        shmid = -1
        try:
            segment = Segment.create_private(DATA + len(data), mode)
            shmid = segment.id
            self.record(index, shmid)
            try:
                write(segment, data, job_id=job_id, role=role, kind=kind)
                segment.give_to(owner, self.gid if role is Role.RESULT else None)
            finally:
                segment.close()
        except BaseException:
            if shmid >= 0:
                remove_id(shmid)
            self.free(index)
            raise
        return index, shmid, evicted


def usage(key: int) -> Usage | None:
    """The use of the spill table at ``key``; None when there is none to read."""
    try:
        table = SpillTable.open(key)
    except (IpcdError, ValueError):
        return None
    try:
        return table.usage()
    finally:
        table.segment.close()
