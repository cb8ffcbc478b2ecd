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

The pool.  Most of the cost of a fresh 16 MiB segment is the kernel's: allocating and
zeroing its pages, mapping and unmapping them.  So a result of at least ``POOL_FROM``
bytes gets a segment of its size class (:func:`size_class`, a quarter of a power of two
at most, in pages), and when the ring evicts it (:meth:`SpillTable.retire`) the segment
is kept as a *spare* while the spares' bytes stay within ``[results] pool_bytes`` (in
the table header): its header's role becomes spare (so a reader of the evicted result
finds none) and its entry stays RESULT with pid 0 and claimed_at 0, the job id kept.  A
later result's claim takes the smallest spare that fits (entry and segment at once,
under the lock), writes its own header, then its data.  A spare is a result to everyone
else, the oldest of them: a payload's claim evicts spares first and never counts them
against its share, a client of an older ipcd does the same (it never sees an entry
state it does not know), and whatever removes a result by its id removes a spare.  The
spares count within ``spill_bytes`` (results and spares by their segments' capacity)
and go first when a result needs room.  No process keeps a spare attached: their pages
are the kernel's shared memory, in no process's RSS.  The master's sweep keeps spares at
start (up to ``pool_bytes``) and removes them at stop.

Layout (little-endian)::

    table header, 64 bytes: magic 8s b"IPCDSPT\\0", version u32, header_size u32,
                            entries u32, entry_size u32, evicted u64 (results evicted
                            for room), evicted_by_payloads u64 (of those, by a payload's
                            claim), reserved u32 (entries payloads may not take: kept
                            for results; 0 in a table made before it), zeros u32,
                            pool_bytes u64 ([results] pool_bytes: 0, no pool), zeros
    entry, 48 bytes:        state u32, pid u32 (the claimer, or the sender once QUEUED;
                            0 for a spare), claimed_at f64, shmid i32 (-1: none yet),
                            pages u32 (a pooled segment's capacity in 4 KiB pages; 0:
                            exactly size bytes), size u64, job_id 16s
    spill segment:          magic 8s b"IPCDSPD\\0", version u32, role u32 (0 payload,
                            1 result, 2 spare), kind u32 (0 bytes, 1 text, 2 JSON),
                            table u32 (the table's key; 0 from an older ipcd), size u64,
                            job_id 16s, zeros to 64 bytes; then the raw data

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
from ipcd.tables.spill.segment import (
    DATA,
    Role,
    exists,
    make_spare,
    mismatch,
    remove_checked,
    write,
)

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
#: [results] pool_bytes, after the reserve (zero in a table made before it: no pool).
POOL = struct.Struct("<Q")
POOL_OFFSET = 48
#: The unit of a pooled segment's capacity.
PAGE = 4096
#: Results this large go through the pool; a fresh segment for a smaller one costs little.
POOL_FROM = 64 << 10

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
    #: A pooled segment's capacity in pages (0: the segment holds exactly ``size`` bytes).
    pages: int = 0

    @property
    def spare(self) -> bool:
        """A result's segment kept for the next result: RESULT, and no claimer."""
        return self.state is State.RESULT and self.pid == 0

    @property
    def capacity(self) -> int:
        """Bytes of data the segment holds room for."""
        return self.pages * PAGE if self.pages else self.size


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
    #: Spare segments kept for the next large results (the pool), and their capacity.
    spares: int = 0
    spare_bytes: int = 0
    #: [results] pool_bytes (0: no pool).
    pool_bytes: int = 0


def segment_size(entries: int) -> int:
    return HEADER_SIZE + entries * ENTRY_SIZE


def size_class(size: int) -> int:
    """The pages of a pooled segment for ``size`` bytes of data: rounded up to a multiple
    of a power of two with at most two more bits after the leading one (4, 5, 6 or 7
    times it), so a class is at most a quarter larger than what it holds and results of
    similar sizes share segments."""
    pages = -(-size // PAGE)
    step = 1 << max(0, pages.bit_length() - 3)
    return -(-pages // step) * step


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
        pool_bytes: int = 0,
    ) -> SpillTable:
        """Create the table, or keep the one a previous daemon left (its entries still
        name live segments); one of another size is rebuilt with its entries carried.
        ``reserved`` entries are kept for results (payloads may take the rest);
        ``pool_bytes`` of spare segments may be kept for results (0: none)."""
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
            POOL.pack_into(table.buf, POOL_OFFSET, pool_bytes)
        return table

    @classmethod
    def open(cls, key: int) -> SpillTable:
        return cls(Segment.open(key, what="spill table"), Lock.open(key))

    # --- entries --------------------------------------------------------------------------

    def entry(self, index: int) -> Entry:
        state, pid, claimed, shmid, pages, size, raw_id = ENTRY.unpack_from(
            self.buf, HEADER_SIZE + index * ENTRY_SIZE
        )
        try:
            st = State(state)
        except ValueError:
            st = State.FREE
        job_id = raw_id.rstrip(b"\0").decode("ascii", "replace")
        return Entry(index, st, pid, claimed, shmid, size, job_id, pages)

    def entries(self) -> list[Entry]:
        return [self.entry(i) for i in range(self.count)]

    def _write(self, e: Entry) -> None:
        ENTRY.pack_into(
            self.buf, HEADER_SIZE + e.slot * ENTRY_SIZE, e.state, e.pid, e.claimed_at,
            e.shmid, e.pages, e.size, e.job_id.encode("ascii", "replace")[:16],
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
        return self._claim(job_id, size, role=role, refused=refused)[0]

    def _claim(
        self, job_id: str, size: int, *, role: Role, refused: str, pooled: bool = False
    ) -> tuple[Claim, int, Entry | None]:
        """:meth:`claim`, and for a ``pooled`` result (the pool): the smallest spare that
        fits is taken, entry and segment (returned third; the claim records its shmid),
        else the new entry records the pages of its size class (returned second).

        Spares are the oldest results (claimed_at 0), so room is made from them first.
        """
        with self.lock.held(LOCK_TIMEOUT):
            entries = self.entries()
            if role is Role.PAYLOAD:
                # Claims still CLAIMING count as payloads: a worker's result claim is
                # brief, and counting it errs towards keeping room for results.
                payloads = sum(1 for e in entries if e.state not in (State.FREE, State.RESULT))
                if payloads >= self.count - self.reserved():
                    raise QueueFullError(self._full(entries, refused))
            spare = self._fitting(entries, size) if pooled else None
            pages = size_class(size) if pooled and spare is None else 0
            if pages and self.spill_bytes is not None and pages * PAGE > self.spill_bytes:
                pages = 0  # its class would not fit: a segment of its own size
            stored = sorted(
                (e for e in entries if e.state is State.RESULT and e is not spare),
                key=lambda e: e.claimed_at,
            )
            dropped: list[Entry] = []
            if role is Role.RESULT and self.spill_bytes is not None:
                kept = sum(e.capacity for e in stored)
                need = spare.capacity if spare is not None else pages * PAGE or size
                while stored and kept + need > self.spill_bytes:
                    dropped.append(self._evict(stored.pop(0)))
                    kept -= dropped[-1].capacity
            free = next((e.slot for e in entries if e.state is State.FREE), None)
            if spare is not None:
                free = spare.slot
            if free is None and dropped:
                free = dropped[0].slot
            if free is None and stored:
                dropped.append(self._evict(stored.pop(0)))
                free = dropped[-1].slot
            if free is None:  # only other claims just now (or a table with no reserve)
                raise QueueFullError(f"every spill slot is taken, none by a result: {refused}")
            shmid, pages = (spare.shmid, spare.pages) if spare is not None else (-1, pages)
            self._write(
                Entry(free, State.CLAIMING, os.getpid(), time.time(), shmid, size, job_id, pages)
            )
            evicted = tuple(e for e in dropped if not e.spare)  # a spare held no result
            if evicted:
                self._count_evicted(len(evicted), by_payload=role is Role.PAYLOAD)
            return Claim(free, evicted), pages, spare

    def _fitting(self, entries: list[Entry], size: int) -> Entry | None:
        """The smallest spare with room for ``size`` bytes."""
        spares = [e for e in entries if e.spare and e.capacity >= size]
        return min(spares, key=lambda e: e.capacity, default=None)

    def pool_bytes(self) -> int:
        """[results] pool_bytes as the daemon set it (0: no pool)."""
        return int(POOL.unpack_from(self.buf, POOL_OFFSET)[0])

    def retire(self, shmid: int, job_id: str, hint: int | None = None) -> None:
        """The ring evicts this result: a pooled segment becomes a spare while the spares
        stay within ``pool_bytes`` (its header's role first, then its entry: a reader of
        the evicted result meanwhile finds none); otherwise it goes (:meth:`release`)."""
        with self.lock.held(LOCK_TIMEOUT):
            entry = self._match(shmid, job_id, hint)
            if entry is not None and self._keep_spare(entry):
                self._write(entry._replace(pid=0, claimed_at=0.0, size=0))
                return
            if not remove_checked(shmid, job_id) and exists(shmid):
                return  # not ours to remove (a client's process): leave it recorded
            if entry is not None:
                self.clear(entry.slot)

    def _keep_spare(self, entry: Entry) -> bool:
        """Mark a pooled result's segment spare if the pool has room for it; the caller
        holds the lock."""
        if entry.state is not State.RESULT or entry.spare or not entry.pages:
            return False
        spares = sum(e.capacity for e in self.entries() if e.spare)
        if spares + entry.capacity > self.pool_bytes():
            return False
        segment = Segment.attach_id(entry.shmid)
        if segment is None:
            return False
        try:
            mode = result_mode(self.mode)
            if mismatch(segment, entry.job_id, None, Role.RESULT) or not _ours(segment, mode):
                return False
            make_spare(segment)
            return True
        finally:
            segment.close()

    def refill(self, size: int) -> int | None:
        """After a pooled result of ``size`` bytes was stored and its waiter told: make a
        spare of its class, pages faulted in, when no spare fits such a result, the pool
        has room, the spares and results stay within spill_bytes and an entry is free
        (a spare never takes a result's or payload's place).  The kernel's zeroing is then
        paid here, after the reply, not by the next such result.  The shmid made, or None.

        Crash-safe as a result's claim: the entry is CLAIMING with its pages (so the
        master's sweep knows the segment's size) until the spare is whole."""
        if size < POOL_FROM or not self.pool_bytes():
            return None
        pages = size_class(size)
        with self.lock.held(LOCK_TIMEOUT):
            entries = self.entries()
            if self._fitting(entries, size) is not None:
                return None
            spares = sum(e.capacity for e in entries if e.spare)
            held = sum(e.capacity for e in entries if e.state in (State.RESULT, State.CLAIMING))
            limit = self.spill_bytes
            if spares + pages * PAGE > self.pool_bytes() or (
                limit is not None and held + pages * PAGE > limit
            ):
                return None
            index = next((e.slot for e in entries if e.state is State.FREE), None)
            if index is None:
                return None
            self._write(Entry(index, State.CLAIMING, os.getpid(), time.time(), -1, 0, "", pages))
        shmid = self._written(
            index, None, pages * PAGE, b"", job_id="", role=Role.SPARE, kind=Kind.BYTES,
            mode=result_mode(self.mode), owner=None, faulted=DATA + pages * PAGE,
        )  # fmt: skip
        with self.lock.held(LOCK_TIMEOUT):
            entry = self.entry(index)
            if entry.state is State.CLAIMING and entry.shmid == shmid:
                self._write(entry._replace(state=State.RESULT, pid=0, claimed_at=0.0))
                return shmid
        remove_id(shmid)  # its entry was taken from us meanwhile: nothing names it
        return None

    def drop_spares(self, keep: int = 0) -> int:
        """Remove spares, largest first, until those kept hold at most ``keep`` bytes
        (the master: at start, to [results] pool_bytes; at stop, all); how many went."""
        with self.lock.held(LOCK_TIMEOUT):
            spares = sorted((e for e in self.entries() if e.spare), key=lambda e: e.capacity)
            held = sum(e.capacity for e in spares)
            dropped = 0
            while spares and held > keep:
                entry = spares.pop()
                remove_checked(entry.shmid, entry.job_id)
                self.clear(entry.slot)
                held -= entry.capacity
                dropped += 1
            return dropped

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
        spares = [e for e in entries if e.spare]
        results = [e for e in entries if e.state is State.RESULT and not e.spare]
        failed = sum(1 for e in entries if e.state is State.FAILED)
        return Usage(
            self.count, len(entries), len(results),
            len(entries) - len(results) - len(spares) - failed, failed,
            sum(e.size for e in entries), sum(e.size for e in results), self.counters()[0],
            len(spares), sum(e.capacity for e in spares), self.pool_bytes(),
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
        A result of at least POOL_FROM bytes, with the pool on, goes into a spare that
        fits, else into a new segment of its size class (the pool, above).
        """
        size = len(data)
        pooled = role is Role.RESULT and size >= POOL_FROM and self.pool_bytes() > 0
        claim, pages, spare = self._claim(job_id, size, role=role, refused=refused, pooled=pooled)
        index, evicted = claim
        shmid = self._written(
            index, spare, pages * PAGE or size, data, job_id=job_id, role=role, kind=kind,
            mode=mode, owner=owner, faulted=DATA + size,
        )  # fmt: skip
        return index, shmid, evicted

    def _written(
        self,
        index: int,
        spare: Entry | None,
        capacity: int,
        data: bytes,
        *,
        job_id: str,
        role: Role,
        kind: Kind,
        mode: int,
        owner: int | None,
        faulted: int,
    ) -> int:
        """For the claimed entry ``index``: the spare's segment, else a new one with room
        for ``capacity`` bytes (its id recorded at once, its first ``faulted`` bytes
        mapped in); header and data written; handed to ``owner`` (and a result's to the
        daemon's group).  On any failure the segment is removed and the entry freed
        before the error goes on.  Returns the segment's id."""
        shmid = -1
        try:
            segment = _reused(spare, len(data), mode) if spare is not None else None
            if segment is None:
                segment = Segment.create_private(DATA + capacity, mode, faulted)
                self.record(index, segment.id)
            shmid = segment.id
            try:
                write(segment, data, job_id=job_id, role=role, kind=kind, table=self.segment.key)
                segment.give_to(owner, self.gid if role is not Role.PAYLOAD else None)
            finally:
                segment.close()
        except BaseException:
            if shmid >= 0:
                remove_id(shmid)
            self.free(index)
            raise
        return shmid


def result_mode(ipc_mode: int) -> int:
    """A result segment's mode under ``[ipc] mode``: the daemon's user reads and writes
    it; whoever that mode lets read the ring may read it, nobody else may write it."""
    return 0o600 | (ipc_mode & 0o044)


def _reused(spare: Entry, size: int, mode: int) -> Segment | None:
    """The spare's segment, attached to be written, if it still is that spare (one removed
    meanwhile may have left its id to another segment) and opens it to no more than
    ``mode`` would; None: make a new one instead (the master's sweep removes the spare)."""
    segment = Segment.attach_id(spare.shmid)
    if segment is None:
        return None
    if (
        mismatch(segment, spare.job_id, None, Role.SPARE)
        or not _ours(segment, mode)
        or segment.size < DATA + size
    ):
        segment.close()
        return None
    segment.populate(DATA + size)
    return segment


def _ours(segment: Segment, mode: int) -> bool:
    """Whether this process's user made the segment, still owns it, and it grants no
    permission beyond ``mode``: only then does a pooled result go into it (a planted one
    could be read by its maker; one a daemon with a looser ``[ipc] mode`` left, by
    users the configuration now keeps out)."""
    info = segment.info()
    return info.cuid == info.uid == os.geteuid() and not info.mode & 0o777 & ~mode


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
