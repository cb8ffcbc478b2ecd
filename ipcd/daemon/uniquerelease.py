"""Where the daemon frees unique keys: at a job's final outcome, and at start for the
keys no live job or submitter holds any more.

The table itself and the client's claim are in :mod:`ipcd.tables.unique`, which ``ipcctl
submit`` imports; this module is the daemon's side only (ipcd.daemon.outcomes, ipcd.daemon.startup).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ipcd.errors import IpcdError
from ipcd.kernel.procs import alive
from ipcd.tables.unique import Entry, State, UniqueTable
from ipcd.wire.protocol import Job

if TYPE_CHECKING:
    from ipcd.daemon.log import Logger
    from ipcd.kernel.queues import Queue
    from ipcd.tables.inflight import InflightTable


def release(table: UniqueTable, job: Job, log: Logger) -> None:
    """The job's outcome is final (stored ok, or failed for good): free its unique key."""
    if job.unique is None:
        return
    try:
        table.release(job.unique, job.id)
    except IpcdError as exc:
        # Wedged or removed: the next submit of the key sees the stored result instead.
        log.error("unique.release_failed", job_id=job.id, unique=job.unique, error=str(exc))


def sweep_lost(
    table: UniqueTable,
    *,
    queue: Queue,
    inflight: InflightTable,
    stored: Callable[[str], bool] = lambda job_id: False,
) -> list[tuple[Entry, str]]:
    """At daemon start, before any worker runs, or when the master made the job queue
    anew (no worker takes from it yet): free keys no live job or submitter holds.

    Under the table's lock, an entry turns QUEUED only after its job was sent, so when
    the job queue is empty, a QUEUED job that no in-flight slot holds (parked, or in a
    worker's slot) is gone: the queue was removed and made again.  When the queue holds
    messages, they cannot be read without taking them, and QUEUED entries stay.  A job the
    job store holds unfinished (``stored``) is not gone either.
    """

    def judge() -> Callable[[Entry], str | None]:
        queue_empty = queue.stats().messages == 0
        bodies = [
            held.body
            for index in range(inflight.workers + inflight.parked)
            if (held := inflight.held(index)) is not None
        ]

        def lost(entry: Entry) -> str | None:
            if entry.state is State.CLAIMING:
                return None if alive(entry.pid) else "its submitter died before sending it"
            if not queue_empty or stored(entry.job_id):
                return None
            wanted = entry.job_id.encode("ascii", "replace")
            if any(wanted in body for body in bodies):
                return None
            return "its job is neither queued nor in flight"

        return lost

    return table.sweep(judge)
