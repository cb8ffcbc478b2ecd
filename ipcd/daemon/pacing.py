"""The master's look at the jobs the dispatcher holds back: those a handler's limits keep
waiting, and those past their expiry.

Workers claim jobs themselves (ipcd.store's claim decides, in its transaction, what each
may start: ipcd.store.JobStore.claim) and sleep on the doorbell when a claim found
nothing (ipcd.daemon.doorbell).  Two kinds of waiting job no commit rings for:

- **Held by a limit.**  A rate-limited handler's jobs wait for their next token, which no
  process makes: it is due at a time.  And a job of a handler at its ``concurrency`` may
  start once one of its jobs ends, which the worker that ran it claims in the same
  transaction, unless that worker claims nothing (it is stopping, say).  So the master
  asks the store when a held job may start next (:meth:`JobStore.next_start`), wakes at
  that time, and rings for an idle worker.  Without limits configured it never asks.
- **Expired.**  ``--expire S``: a job not started by then is cancelled (its waiter gets
  the error "expired", its unique key is freed), so that ``list`` shows it ended; the
  claim never starts one meanwhile, whenever this pass comes.  The master asks the store
  for the next expiry at most every :data:`EXPIRY_LOOK` seconds, from a partial index
  that only jobs with an expiry are in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from ipcd.daemon.doorbell import Doorbell
from ipcd.store import JobRecord, JobStore

#: The longest the master goes without asking whether a limit holds jobs back (a limited
#: type's jobs may have come, and been held, since the last look).
HELD_LOOK = 0.25
#: After a ring for held jobs: when to look whether more may start (the woken worker
#: took what its claim could).
RING_GAP = 0.05
#: The longest the master goes without looking for the next expiry (the intake may have
#: stored a job that expires sooner than the soonest known).
EXPIRY_LOOK = 1.0


class Pacer:
    """Rings for jobs the limits held back once they may start, and cancels expired jobs."""

    def __init__(
        self,
        jobs: JobStore,
        doorbell: Doorbell,
        *,
        limited: bool,
        idle: Callable[[], bool],
        expired: Callable[[JobRecord], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``jobs`` is the master's store; ``limited`` whether any handler has a limit
        (else the store is never asked about held jobs); ``idle`` whether a worker sleeps
        on the doorbell now (a ring for a busy pool only wakes a worker for nothing once
        it is done); ``expired`` ends each job the store cancelled as expired (its
        waiter, its unique key, its log event)."""
        self.jobs = jobs
        self.doorbell = doorbell
        self.limited = limited
        self.idle = idle
        self.expired = expired
        self.clock = clock
        self._held_look = 0.0
        self._expiry_look = 0.0

    def turn(self) -> None:
        """Cancel the jobs expired by now, then ring for held jobs that may start now.
        StoreError when the store refuses (each step is tried again at its next time)."""
        now = self.clock()
        if now >= self._expiry_look:
            self._expiry_look = now + EXPIRY_LOOK
            self._expire(now)
        if self.limited and now >= self._held_look:
            self._held_look = now + HELD_LOOK
            self._ring_held(now)

    def next_event(self) -> float:
        """When :meth:`turn` has something to do next (the master sleeps until then)."""
        return min(self._expiry_look, self._held_look if self.limited else math.inf)

    def _expire(self, now: float) -> None:
        soonest = self.jobs.next_expiry()
        if soonest is not None and soonest <= now:
            for record in self.jobs.expire(now):
                self.expired(record)
            soonest = self.jobs.next_expiry()
        if soonest is not None:
            self._expiry_look = min(self._expiry_look, soonest)

    def _ring_held(self, now: float) -> None:
        when = self.jobs.next_start(now)
        if when is None:
            return
        if when > now:
            self._held_look = min(self._held_look, when)
            return
        if self.idle():
            self.doorbell.ring()
            self._held_look = now + RING_GAP
