"""Waiting for several jobs to end: what ``ipcctl wait ID…`` does.

The job store is the one place that knows every way a job ends (done, failed for good,
cancelled, rejected at intake), so the waiter asks it, over the control socket, for the
records of the jobs it still waits for.  It asks again soon after each result the daemon
announces (the result gate, ``Client.await_news``) and at least every
:data:`RECHECK` seconds (a cancelled job announces nothing), never more often than every
:data:`MIN_GAP` seconds: a flood of other jobs' results must not become a flood of
requests to the daemon.

A job the store does not hold yet may still be in the kernel's queue (an unconfirmed
submission the intake has not drained): it is asked for again for :data:`GRACE` seconds
before it counts as unknown.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from ipcd.wire.control import FINAL, JobInfo

#: Seconds between two looks at the store when no result is announced.
RECHECK = 0.25
#: The fewest seconds between two looks, however many results are announced.
MIN_GAP = 0.05
#: How long a job unknown to the store is looked for before it is reported unknown.
GRACE = 2.0


class Waiting:
    """The jobs named, and what the store last said of each.

    ``look`` asks the store for records (``ControlClient.jobs``: None for an unknown
    job), ``pause`` sleeps until news or a timeout (``Client.await_news``), ``clock`` is
    monotonic seconds and ``sleep`` sleeps (both injected by the tests).  :meth:`ended`
    yields the jobs as they end.
    """

    def __init__(
        self,
        ids: Sequence[str],
        look: Callable[[Sequence[str]], Sequence[JobInfo | None]],
        pause: Callable[[float], object],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.ids = list(dict.fromkeys(ids))  # each once, in the order named
        self.look = look
        self.pause = pause
        self.clock = clock
        self.sleep = sleep
        #: The last record the store gave for each job (None: not known to it yet).
        self.last: dict[str, JobInfo | None] = dict.fromkeys(self.ids)
        #: The jobs that have not ended, in the order named.
        self.pending: list[str] = list(self.ids)
        #: The jobs the store did not know for GRACE seconds; :meth:`ended` stops then.
        self.unknown: list[str] = []

    def ended(self, deadline: float | None) -> Iterator[JobInfo]:
        """Each job as the store says it ended, in the order they are seen to end, until
        none is pending, some job stays unknown (:attr:`unknown`), or the monotonic
        ``deadline`` passes (None: no deadline); the caller may stop early (``--any``)."""
        started = self.clock()
        while self.pending:
            looked = self.clock()
            for job_id, record in zip(self.pending, self.look(self.pending), strict=True):
                self.last[job_id] = record
            unknown = [i for i in self.pending if self.last[i] is None]
            if unknown and looked - started >= GRACE:
                self.unknown = unknown
                return
            for job_id in list(self.pending):
                record = self.last[job_id]
                if record is not None and record.state in FINAL:
                    self.pending.remove(job_id)
                    yield record
            if not self.pending:
                return
            now = self.clock()
            if deadline is not None and now >= deadline:
                return
            self.pause(RECHECK if deadline is None else min(RECHECK, deadline - now))
            gap = MIN_GAP - (self.clock() - looked)
            if deadline is not None:
                gap = min(gap, deadline - self.clock())
            if gap > 0:
                self.sleep(gap)
