"""Cleaning up spill segments: the master's sweep for what dead makers left, and the
removal of every listed segment when the daemon's objects are purged.

A segment with key 0 is known only by its id, so a producer that dies at the wrong
moment would orphan it.  Every few seconds (and at start) the master sweeps entries left
CLAIMING by a dead process: it removes the recorded segment and also any key-0 segment
that process created since it claimed (it died between shmget and recording the id),
then frees the entry.  At start it also frees RESULT entries the ring no longer holds.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

from ipcd.errors import IpcdError
from ipcd.procs import alive
from ipcd.resultstore import ResultStore
from ipcd.shm import remove_id
from ipcd.spillsegment import orphans, proc_shm, remove_checked
from ipcd.spilltable import LOCK_TIMEOUT, SpillTable, State


class Swept(NamedTuple):
    freed: int
    removed: int
    #: Results evicted by payload claims (clients, which cannot log) since the last sweep.
    evicted: int = 0


class Sweeper:
    """The master's sweeps of one table; remembers what it has reported."""

    def __init__(self, table: SpillTable) -> None:
        self.table = table
        #: The evicted_by_payloads counter at the last sweep.
        self._seen_evicted: int | None = None

    def sweep(self, store: ResultStore | None = None) -> Swept:
        """Free entries left CLAIMING by dead processes, removing what they made; with
        ``store`` (at start) also RESULT entries the ring no longer holds."""
        entries = segments = 0
        referenced: set[int] | None = None
        with contextlib.ExitStack() as stack:
            if store is not None:  # ring lock first, as ResultStore.put takes them
                stack.enter_context(store.lock.held(store.lock_timeout))
                referenced = {r.spill.shmid for r in store.records() if r.spill is not None}
            stack.enter_context(self.table.lock.held(LOCK_TIMEOUT))
            shm: list[list[str]] | None = None
            for entry in self.table.entries():
                if entry.state is State.CLAIMING and not alive(entry.pid):
                    if shm is None:
                        shm = proc_shm()
                    for shmid in orphans(shm, entry.pid, entry.shmid, entry.claimed_at):
                        segments += remove_id(shmid)
                elif (
                    entry.state is State.RESULT
                    and referenced is not None
                    and entry.shmid not in referenced
                ):
                    segments += remove_checked(entry.shmid, entry.job_id)
                else:
                    continue
                self.table.clear(entry.slot)
                entries += 1
            by_payloads = self.table.counters()[1]
        seen, self._seen_evicted = self._seen_evicted, by_payloads
        return Swept(entries, segments, by_payloads - seen if seen is not None else 0)


def remove_segments(table: SpillTable) -> int:
    """Remove every segment the table lists (when the daemon's objects are purged)."""
    return sum(
        remove_checked(e.shmid, e.job_id)
        for e in table.entries()
        if e.state is not State.FREE and e.shmid >= 0
    )


def remove_listed(key: int) -> int:
    """Remove the segments listed by a spill table at ``key``, if that is one, or named
    by the spilled records of a result ring there (a result evicted from the table by a
    client that could not remove it is known only to the ring)."""
    try:
        table = SpillTable.open(key)
    except (IpcdError, ValueError):
        return _remove_ring_spills(key)
    try:
        return remove_segments(table)
    finally:
        table.segment.close()


def _remove_ring_spills(key: int) -> int:
    try:
        store = ResultStore.open(key)
    except IpcdError:
        return 0
    try:
        if store.capacity() is None:
            return 0
        return sum(
            remove_checked(r.spill.shmid, r.job_id) for r in store.records() if r.spill is not None
        )
    finally:
        store.close()
