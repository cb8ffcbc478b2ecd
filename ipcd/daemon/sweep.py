"""Cleaning up spill segments: the master's sweep for what dead makers left (removing
every listed segment when the daemon's objects are purged is ipcd.tables.purge's).

A segment with key 0 is known only by its id, so a producer that dies at the wrong
moment would orphan it.  Every few seconds (and at start) the master sweeps entries left
CLAIMING by a dead process: it removes the recorded segment, or, when none was recorded
(it died between shmget and recording the id), the key-0 segment of the entry's size
that process created since it claimed, nobody has attached and nothing else names; then
it frees the entry.  A segment some other entry records, or an envelope in an in-flight
slot names, is an accepted job's and is never swept (the queue cannot be read without
taking its messages, but every envelope sent names an entry already QUEUED).

A client marks its entry QUEUED just before it sends (ipcd.client.api.outgoing), so a client
killed after its send leaves an entry that says its job is queued.  One killed between the
mark and the send, or while blocked on a full queue, leaves a QUEUED entry for a job that
was never sent: the sweep frees it once the sender is dead, the queue empty and no
in-flight slot names the segment, at two sweeps in a row (one at start, when nothing
moves jobs).  At start it also frees RESULT entries the ring no longer holds, and keeps
the pool's spares (ipcd.tables.spill.table) a killed daemon left, up to [results]
pool_bytes: they are reused.  ``ipcd stop`` removes the spares (:func:`drop_pool`).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, NamedTuple

from ipcd.errors import IpcdError, MessageError
from ipcd.kernel.procs import alive
from ipcd.kernel.segments import remove_id
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.segment import (
    exists,
    lost_spares,
    orphans,
    proc_shm,
    remove_checked,
)
from ipcd.tables.spill.table import LOCK_TIMEOUT, Entry, SpillTable, State
from ipcd.wire import protocol

if TYPE_CHECKING:
    from ipcd.kernel.queues import Queue
    from ipcd.tables.inflight import InflightTable


class Swept(NamedTuple):
    freed: int
    removed: int
    #: Results evicted by payload claims (clients, which cannot log) since the last sweep.
    evicted: int = 0


class Sweeper:
    """The master's sweeps of one table; remembers what it has reported."""

    def __init__(self, table: SpillTable, queue: Queue, inflight: InflightTable) -> None:
        self.table = table
        #: The job queue and the intake's slots: where a queued job's envelope can be
        #: until the intake has read its payload into the job store.
        self.queue = queue
        self.inflight = inflight
        #: The evicted_by_payloads counter at the last sweep.
        self._seen_evicted: int | None = None
        #: (shmid, job id) of the QUEUED entries the last sweep found nowhere.
        self._unsent: set[tuple[int, str]] = set()

    def sweep(self, store: ResultStore | None = None) -> Swept:
        """Free entries left CLAIMING by dead processes, removing what they made, and
        QUEUED entries of dead senders whose job is nowhere; with ``store`` (at start,
        before any worker runs) also RESULT entries the ring no longer holds."""
        entries = segments = 0
        referenced: set[int] | None = None
        with contextlib.ExitStack() as stack:
            if store is not None:  # ring lock first, as ResultStore.put takes them
                stack.enter_context(store.lock.held(store.lock_timeout))
                referenced = {r.spill.shmid for r in store.records() if r.spill is not None}
            stack.enter_context(self.table.lock.held(LOCK_TIMEOUT))
            table = self.table.entries()
            dead = [e for e in table if e.state is State.CLAIMING and not alive(e.pid)]
            unsent = self._nowhere(table, at_start=store is not None)
            shm, flying = (proc_shm(), self._in_flight()) if dead else ([], set())
            for entry in table:
                if entry in dead:
                    taken = {e.shmid for e in table if e.state is not State.FREE}
                    taken = (taken | flying) - {entry.shmid}
                    found = orphans(
                        shm, entry.pid, entry.shmid, entry.claimed_at, entry.capacity, taken
                    )
                    segments += sum(remove_id(shmid) for shmid in found)
                    if entry.pages and entry.shmid not in found:
                        # a spare another process made, which the dead claimer reused
                        segments += remove_checked(entry.shmid, entry.job_id, or_spare=True)
                elif entry in unsent:
                    removed = remove_checked(entry.shmid, entry.job_id)
                    if not removed and exists(entry.shmid):
                        continue  # not ours to remove (a client's): leave it recorded
                    segments += removed
                elif (
                    entry.state is State.RESULT
                    and not entry.spare  # the pool's: no record names it
                    and referenced is not None
                    and entry.shmid not in referenced
                ):
                    segments += remove_checked(entry.shmid, entry.job_id)
                else:
                    continue
                self.table.clear(entry.slot)
                entries += 1
            by_payloads = self.table.counters()[1]
            segments += self._drop_lost_spares(shm or proc_shm())
        if store is not None:  # a killed daemon's spares serve, within today's pool
            segments += self.table.drop_spares(self.table.pool_bytes())
        seen, self._seen_evicted = self._seen_evicted, by_payloads
        return Swept(entries, segments, by_payloads - seen if seen is not None else 0)

    def drop_pool(self) -> int:
        """Remove every spare (at stop: a stopped daemon keeps no memory for results it
        will not make); how many went."""
        with self.table.lock.held(LOCK_TIMEOUT):
            lost = self._drop_lost_spares(proc_shm())
        return self.table.drop_spares(0) + lost

    def _drop_lost_spares(self, shm: list[list[str]]) -> int:
        """Remove the spares no entry names any more (segment.lost_spares: a client of
        another user evicted them for room but could not remove them); the caller holds
        the table's lock, so none is being listed or reused meanwhile."""
        listed = {e.shmid for e in self.table.entries() if e.state is not State.FREE}
        lost = lost_spares(shm, os.geteuid(), listed, self.table.segment.key)
        return sum(remove_id(shmid) for shmid in lost)

    def _nowhere(self, table: list[Entry], *, at_start: bool) -> list[Entry]:
        """The QUEUED entries whose job was never sent (its sender died between marking
        the entry and sending, or while blocked on a full queue) or was lost with a
        removed queue: the sender is dead, the queue is empty and no in-flight slot names
        the segment.  At start nothing moves jobs, so one look decides; while workers run
        a job is copied from the queue into a slot just after it leaves the queue, so an
        entry must be found nowhere by two sweeps in a row."""
        queued = [e for e in table if e.state is State.QUEUED and not alive(e.pid)]
        if not queued or not self._queue_empty():  # looked at after the deaths
            self._unsent = set()
            return []
        named = self._in_flight()
        found = {(e.shmid, e.job_id) for e in queued if e.shmid not in named}
        seen, self._unsent = self._unsent, found
        return [e for e in queued if (e.shmid, e.job_id) in (found if at_start else seen & found)]

    def _queue_empty(self) -> bool:
        try:
            return self.queue.stats().messages == 0
        except IpcdError:
            return False

    def _in_flight(self) -> set[int]:
        """The segments named by the envelopes the slots hold (the intake's: messages
        taken off the queue and not yet committed)."""
        found: set[int] = set()
        for index in range(self.inflight.workers + self.inflight.parked):
            held = self.inflight.held(index)
            if held is None or b'"spill"' not in held.body:
                continue
            with contextlib.suppress(MessageError):
                job = protocol.decode(held.body, held.type)
                if job.spill is not None:
                    found.add(job.spill.shmid)
        return found
