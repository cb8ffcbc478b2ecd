"""The result ring over a live segment, guarded by its semaphore.

:mod:`ipcd.layout.results` knows the layout as pure functions of a buffer; this module pairs it
with the kernel objects from :mod:`ipcd.kernel.queues` and holds the semaphore around every access.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from ipcd.errors import IpcdError, OverwrittenError
from ipcd.kernel.segments import Gate, Lock, Segment, create_formatted
from ipcd.layout import results
from ipcd.layout.results import Header, Result

if TYPE_CHECKING:
    from ipcd.tables.spill.table import SpillTable

#: How long any process waits for the semaphore before giving up: far longer than any
#: critical section (a memcpy of one slot), far shorter than a wedge would need to last.
LOCK_TIMEOUT = 5.0
#: Seconds a waiter's stamp reaches past its wait: the look before the wait takes time.
_WAKE_MARGIN = 0.01


class ResultStore:
    """Read and write results in the shared ring."""

    def __init__(
        self,
        segment: Segment,
        lock: Lock,
        gate: Gate | None = None,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        spills: SpillTable | None = None,
        on_evict: Callable[[Result], None] | None = None,
        slot_size: int | None = None,
        repaired: tuple[int, int] | None = None,
    ) -> None:
        self.segment = segment
        self.lock = lock
        self.gate = gate
        self.lock_timeout = lock_timeout
        #: The daemon's spill table: results too large for a slot go there (ipcd.tables.spill).
        self.spills = spills
        #: Called under the lock with each valid record a put is about to overwrite, instead
        #: of releasing an overwritten spilled result (the failed list's own eviction rule).
        self.on_evict = on_evict
        self._capacity: int | None = None
        #: (records kept, records lost) when create() found the header overwritten by
        #: another program and wrote it anew (results.repair_header); else None.
        self.repaired = repaired
        #: The daemon's [results] slot_size: its processes mend an overwritten header at
        #: once (clients, which do not know it, wait for them).
        self.slot_size = slot_size
        #: The serving daemon (pid, started) as set_daemon recorded it, for such a mend.
        self._daemon: tuple[int, float] | None = None
        #: (records kept, records lost) of each such mend this process made and its owner
        #: has not yet taken (take_mends); empty, the usual case, when there is none to
        #: say (a look its owner makes for every job, without a call).
        self.mends: list[tuple[int, int]] = []

    @classmethod
    def open(cls, key: int) -> ResultStore:
        """Attach an existing segment (the client side)."""
        lock = Lock.open(key)
        return cls(Segment.open(key, what="result segment"), lock)

    @classmethod
    def create(
        cls,
        key: int,
        gate_key: int | None,
        mode: int,
        size: int,
        slot_size: int,
        *,
        what: str = "result segment",
        trusted: Collection[int] = (),
        spills: SpillTable | None = None,
        on_evict: Callable[[Result], None] | None = None,
    ) -> ResultStore:
        """Create or reuse the segment and semaphore (the daemon side); ``what`` names the
        segment in errors (the failed list is a ring too).

        An existing segment whose layout matches is kept, so results survive a restart;
        one of another size or version is removed and made anew.
        """
        lock = Lock.create(key, mode, trusted=trusted)
        repaired: list[tuple[int, int]] = []

        def keep(segment: Segment) -> bool:
            header = results.read_header(segment.buf)
            if header is None and segment.size == size:  # overwritten: keep what it holds
                with lock.held(LOCK_TIMEOUT):
                    repaired.append(results.repair_header(segment.buf, slot_size))
                header = results.read_header(segment.buf)
            return segment.size == size and header is not None and header.slot_size == slot_size

        segment = create_formatted(
            key,
            mode,
            size,
            keep=keep,
            format=lambda new: results.format_segment(new.buf, slot_size),
            lock=lock,
            lock_timeout=LOCK_TIMEOUT,
            what=what,
            trusted=trusted,
        )
        return cls(
            segment,
            lock,
            None if gate_key is None else Gate.create(gate_key, mode, trusted=trusted),
            spills=spills,
            on_evict=on_evict,
            slot_size=slot_size,
            repaired=repaired[0] if repaired else None,
        )

    def header(self) -> Header:
        header = results.read_header(self.segment.buf)
        if header is None and self.slot_size is not None:
            # Overwritten (PHP's shm_attach): the daemon's processes know the layout and
            # mend it at once, under the lock the caller holds, keeping the records.
            self.mends.append(results.repair_header(self.segment.buf, self.slot_size, self._daemon))
            header = results.read_header(self.segment.buf)
        if header is None:
            raise OverwrittenError(
                f"the segment at key {self.segment.key:#010x} is not an ipcd result segment "
                "(another program wrote its own header into it, PHP's shm_attach() does; "
                "the daemon writes ipcd's back within seconds)"
            )
        return header

    def take_mends(self) -> list[tuple[int, int]]:
        """(records kept, records lost) of each overwritten header this process mended
        since the last call, oldest first: for its owner to log and count (the store is
        shared by every part of a process, and cannot know whose log that is)."""
        mends, self.mends = self.mends, []
        return mends

    def put(self, result: Result) -> int:
        """Store a result (an error result in its place if it does not fit).

        The record the ring overwrites goes first: a spilled one takes its segment with
        it (or leaves it to the pool as a spare, SpillTable.retire), under this lock, so
        that no reader can be copying it out meanwhile.
        """
        self.lock.acquire(self.lock_timeout)
        try:
            header = self.header()
            if len(result.data) > results.capacity(header.slot_size):
                result = results.too_large(result, header.slot_size)
            self._evict(header)
            seq = results.write_result(self.segment.buf, header, result)
            if result.spill is not None and self.spills is not None:
                from ipcd.tables.spill.table import State

                self.spills.mark(result.spill.entry, State.RESULT, result.spill.shmid)
        finally:
            self.lock.release()
        if self.gate is not None and results.someone_waits(self.segment.buf, time.time()):
            self.gate.pulse()  # only when a client said it waits: no semctl per result
        return seq

    def waiting(self, seconds: float) -> None:
        """Say in the header that this process waits on the result gate for the next
        ``seconds``, so that each result stored meanwhile pulses it (results.mark_waiting);
        call it before looking for the result.  Nothing is written into a header that is
        not ipcd's."""
        buf = self.segment.buf
        if results.read_header(buf) is not None:
            now = time.time()
            results.mark_waiting(buf, now + seconds + _WAKE_MARGIN, now)

    def capacity(self) -> int | None:
        """Bytes of data one result may have, or None if the segment is not readable.

        Read once: a segment's slot size is set when it is formatted, which only a daemon
        start does, and the daemon's processes (which ask for every job) do not outlive it.
        """
        if self._capacity is None:
            header = results.read_header(self.segment.buf)
            self._capacity = None if header is None else results.capacity(header.slot_size)
        return self._capacity

    def _evict(self, header: Header) -> None:
        if header.next_seq < header.slot_count:
            return  # the ring has not come round yet
        if self.on_evict is not None:
            offset = results.HEADER_SIZE + (header.next_seq % header.slot_count) * header.slot_size
            old = results.read_slot(self.segment.buf, offset, header.slot_size)
            if old is not None:
                self.on_evict(old)
            return
        spilled = results.spilled_at(self.segment.buf, header, header.next_seq)
        if spilled is not None and spilled.spill is not None:
            if self.spills is not None:
                self.spills.retire(spilled.spill.shmid, spilled.job_id, spilled.spill.entry)
            else:
                _release(self.spills, spilled)

    def get(self, job_id: str) -> Result | None:
        """The newest result for ``job_id``; a spilled one is copied out of its segment
        under the lock (one copy), so eviction cannot remove it halfway.

        Read first without the lock, where the record's CRC and sequence number prove
        the copy whole (results.find_unlocked): a waiting client's usual read then costs
        no semaphore round trip.  Whatever that read cannot vouch for is read again
        under the lock.
        """
        sure, found = results.find_unlocked(self.segment.buf, job_id)
        if sure:
            return found
        self.lock.acquire(self.lock_timeout)
        try:
            found = results.find_result(self.segment.buf, self.header(), job_id)
            if found is not None and found.spill is not None:
                from ipcd.tables.spill import read_result

                found = read_result(found)
            return found
        finally:
            self.lock.release()

    def records(self) -> list[Result]:
        """Every valid record as stored (spilled ones as descriptors); the caller holds
        the lock."""
        return results.iter_results(self.segment.buf, self.header())

    def clear(self, job_id: str) -> int:
        """Forget ``job_id``'s results (``ipcctl retry``); a spilled one takes its segment
        and spill-table entry with it, or the ring would never release them."""
        with self.lock.held(self.lock_timeout):
            header = self.header()
            spilled = [
                r
                for r in results.iter_results(self.segment.buf, header)
                if r.job_id == job_id and r.spill is not None
            ]
            if spilled:
                table = self.spills or _spill_table(self.segment.key)
                for record in spilled:
                    _release(table, record)
                if table is not None and table is not self.spills:
                    table.segment.close()
            return results.clear_result(self.segment.buf, header, job_id)

    def all(self) -> list[Result]:
        with self.lock.held(self.lock_timeout):
            return results.iter_results(self.segment.buf, self.header())

    def set_daemon(self, pid: int, started: float | None = None) -> None:
        """Record (or with pid 0 clear) the serving daemon, for ``ipcctl status``."""
        started = time.time() if started is None else started
        with self.lock.held(self.lock_timeout):
            results.set_daemon(self.segment.buf, pid, started)
        self._daemon = (pid, started) if pid else None

    def close(self) -> None:
        self.segment.close()


def _spill_table(results_key: int) -> SpillTable | None:
    """The spill table next to a result segment, for a client (None when there is none)."""
    from ipcd.kernel.keys import SPILL_KEY_OFFSET
    from ipcd.tables.spill.table import SpillTable

    try:
        return SpillTable.open((results_key + SPILL_KEY_OFFSET) & 0xFFFFFFFF)
    except (IpcdError, ValueError):
        return None


def _release(table: SpillTable | None, record: Result) -> None:
    """Remove an evicted spilled result's segment and free its entry."""
    assert record.spill is not None
    if table is not None:
        table.release(record.spill.shmid, record.job_id, record.spill.entry)
    else:
        from ipcd.tables.spill.segment import remove_checked

        remove_checked(record.spill.shmid, record.job_id)
