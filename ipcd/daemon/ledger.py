"""A worker's account with the job store: the jobs it claimed and has not started, and
the outcomes it has not yet recorded, settled in one transaction per batch.

Why: a write transaction on the store costs a worker about 100 µs of CPU (the lock, the
rows, their index entries, the WAL pages), more than ipcd's own work on a small job.  A
worker that claimed one job and recorded one outcome per transaction paid two of them per
job.  With a ledger it pays one per batch: it records the outcomes of the batch it ran and
claims the next batch together (:meth:`ipcd.store.JobStore.exchange`).

Nothing is held only in the worker's memory:

- A claimed job is RUNNING in the store under the worker's pid from the claim on.  When
  the worker dies, the master gives back those it never started (no attempt counted;
  ipcd.daemon.arbiter) and recovers the one in its slot (ipcd.daemon.recovery).
- A finished job's result is in the result ring, its failure on the failed list and its
  unique key freed before its outcome waits here; a worker that dies before the next
  exchange leaves the job RUNNING, and the master records the outcome from the ring
  (ipcd.daemon.recovery.Recovery.settle_from_ring) rather than run the job again.
- An outcome someone waits for (``--wait``) is recorded before the waiter is told, with
  the outcomes waiting before it: the reply still means "recorded in the store".

How many jobs one claim takes follows how long jobs of that type took in this worker:
a batch is of one type only (the first waiting job's, ipcd.store.JobStore.exchange), of
as many jobs as ran in about :data:`BATCH_SPAN` at that type's last pace, at most
:data:`BATCH_MAX`; one job of a type not yet timed.  So a quick handler's jobs go in
batches, a slow handler's one at a time, and a quick job never waits in one worker behind
a slow job of another type while another worker sits idle; nor does a recorded outcome
wait behind one.  What is left: a job of a usually quick type that hangs holds the rest
of its batch (at most :data:`BATCH_SPAN` of work at the pace measured) and the outcomes
before it until it ends or its timeout kills it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from ipcd.store import JobRecord, JobStore, Outcome

#: The most jobs one claim takes.
BATCH_MAX = 32
#: About how long the jobs of one claim take to run, at the pace of the last batch.
BATCH_SPAN = 0.005


class Ledger:
    """One worker's claimed-but-not-started jobs and not-yet-recorded outcomes."""

    def __init__(
        self,
        jobs: JobStore,
        *,
        worker_pid: int,
        limit: int = 0,
        stopping: Callable[[], bool] = lambda: False,
        chained: Callable[[], None] = lambda: None,
    ) -> None:
        """``jobs`` is the worker's own connection to the store; ``worker_pid`` is
        recorded with each claim, so that the master finds the jobs of a worker that
        died.  The ledger never claims more than ``limit`` jobs in all (the worker's
        ``max_jobs_per_worker``; 0: no limit), nor anything once ``stopping`` says so
        (the worker's stop flag): every claim, the one a waiter's flush makes included,
        stays within the worker's bounds.  ``chained`` is called after each exchange, for
        what the store decided on its own (ipcd.daemon.outcomes.Outcomes.follow_chains:
        dependents released or cancelled, hook jobs queued)."""
        self.jobs = jobs
        self.chained = chained
        self.worker_pid = worker_pid
        self.limit = limit
        self.stopping = stopping
        #: Jobs handed to the worker so far (``limit`` counts these).
        self.handed = 0
        self._claimed: collections.deque[tuple[JobRecord, bytes | None]] = collections.deque()
        self._pending: list[Outcome] = []
        #: When the last claim that got jobs was made, how many it got, of which type.
        self._last_claim = 0.0
        self._last_got = 0
        self._last_type = 0
        #: How many jobs of each type one claim takes (types not here: one).
        self._batches: dict[int, int] = {}
        #: The claim with the last flush found nothing: the doorbell says when to look
        #: again.
        self._drained = False

    @property
    def pending(self) -> int:
        """How many outcomes wait to be recorded."""
        return len(self._pending)

    @property
    def holding(self) -> bool:
        """Whether jobs claimed in the last batch wait to be run."""
        return bool(self._claimed)

    @property
    def spent(self) -> bool:
        """Whether the worker has been handed its ``limit`` of jobs (time to recycle)."""
        return bool(self.limit) and self.handed >= self.limit and not self._claimed

    def next(self) -> tuple[JobRecord, bytes | None] | None:
        """The next job to run, with its message (None: it could not be read, the
        worker fails the job): one claimed before, or else the first of a batch claimed
        now together with recording the outcomes waiting.  None when the store has no
        job for this worker (it then sleeps on the doorbell, ipcd.daemon.doorbell, which
        rings after every commit of new work), or when the worker may take no more
        (stopping, or its limit reached).  StoreError when the store refuses: nothing is
        lost, the outcomes wait for the next try."""
        if not self._claimed:
            room = self._room()
            if room <= 0:
                return None
            if self._drained and not self._pending:
                # The last flush looked and found nothing: whatever came since rang.
                self._drained = False
                return None
            self.settle(claim=room)
        if not self._claimed:
            return None
        self.handed += 1
        return self._claimed.popleft()

    def uncount(self) -> None:
        """The job last handed out was no job (a message rejected): it does not count
        against ``limit``."""
        self.handed = max(self.handed - 1, 0)

    def record(self, outcome: Outcome) -> None:
        """Keep ``outcome`` for the next exchange."""
        self._pending.append(outcome)

    def flush(self) -> None:
        """Record the outcomes waiting now (someone waits for the last): StoreError when
        the store refuses, the outcomes kept for the next try.  When the claimed jobs
        are all run, the next batch is claimed in the same transaction (within the
        worker's bounds), which saves the worker's next one."""
        room = self._room()
        if self._claimed or room <= 0:
            self.settle()
            return
        self.settle(claim=room)
        # Found nothing: the worker's next look would find nothing either, short of a
        # commit since, and every commit of new work rings the doorbell.
        self._drained = not self._claimed

    def _room(self) -> int:
        """How many jobs a claim may take now."""
        if self.stopping():
            return 0
        if self.limit:
            return min(self.limit - self.handed, BATCH_MAX)
        return BATCH_MAX

    def settle(self, *, claim: int = 0) -> None:
        """Record the waiting outcomes and claim a batch of up to ``claim`` jobs, in one
        transaction (StoreError when the store refuses; nothing changes then)."""
        if not self._pending and claim <= 0:
            return
        if claim > 0:
            self._timed()
        got = self.jobs.exchange(
            self._pending, claim, time.time(), worker_pid=self.worker_pid, batches=self._batches
        )
        self._pending = []
        if claim > 0:
            self._last_claim, self._last_got = time.monotonic(), len(got)
            self._last_type = got[0][0].type if got else 0
        self._claimed.extend(got)
        self.chained()

    def give_back(self) -> list[JobRecord]:
        """Before the worker leaves: the jobs it claimed and will not start go back to
        the store as they were (their claim's attempt not counted), after the outcomes
        waiting are recorded.  Returns the jobs given back.  StoreError when the store
        refuses (the master then gives them back when it reaps the worker)."""
        self.settle()
        given: list[JobRecord] = []
        while self._claimed:
            record, _ = self._claimed[0]
            if self.jobs.requeue(record.id, due=0.0, attempts=max(record.attempts - 1, 0)):
                given.append(record)  # else cancelled meanwhile: it stays so
            self._claimed.popleft()
        return given

    def _timed(self) -> None:
        """Before a claim, the last batch all run: its type's next batch is as many jobs
        as ran in :data:`BATCH_SPAN` at its pace."""
        if self._last_got <= 0 or self._claimed:
            return
        per_job = (time.monotonic() - self._last_claim) / self._last_got
        size = BATCH_MAX if per_job <= 0 else int(BATCH_SPAN / per_job)
        self._batches[self._last_type] = max(1, min(BATCH_MAX, size))
        self._last_got = 0
