"""Removing everything at ipcd's keys, for the tests and the benchmark: the spill
segments first, then the queues, segments and semaphores themselves.

A spill segment has key 0 and is known only by its id, which only the spill table (or,
for a result evicted from it, the result ring) names: so those go while the tables that
name them still exist, and then the kernel objects at the keys (ipcd.kernel.vetting).
"""

from __future__ import annotations

from ipcd.errors import IpcdError
from ipcd.kernel.vetting import remove_objects
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.segment import remove_checked
from ipcd.tables.spill.table import SpillTable, State


def remove_all(keys: tuple[int, ...]) -> list[str]:
    """Remove every queue, segment and semaphore at these keys, and the spill segments
    their tables list; what was removed, one line each."""
    removed = [f"{n} spill segments" for k in keys if (n := remove_listed(k))]
    return removed + remove_objects(keys)


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
