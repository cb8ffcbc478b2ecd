"""Finishing or re-running the jobs that workers held when they died.

The master (ipcd.daemon.arbiter) calls this when it reaps a worker, at start for the jobs a
killed daemon's workers held, and at stop for jobs cut off after graceful_timeout.  Every
path ends with the job back in the job store for another attempt, or with an error
result: the in-flight slot and the store, not the worker, are the record, so nothing a
worker held is lost.
"""

from __future__ import annotations

import time

from ipcd.config import JobsConfig
from ipcd.daemon.log import Logger
from ipcd.daemon.outcomes import Outcomes, error_result
from ipcd.daemon.worker import job_of
from ipcd.errors import IpcdError, MessageError, StoreError
from ipcd.handlers.registry import Registry
from ipcd.store import Captured, JobRecord, JobStore, State
from ipcd.tables import stats
from ipcd.tables.inflight import Held
from ipcd.tables.results import ResultStore
from ipcd.tables.stats import Recorder
from ipcd.wire.protocol import Job

#: Why a job found in a worker's slot at start is run again.
DAEMON_KILLED = "the daemon was killed"
#: The error result of a job an operator cancelled (``ipcctl cancel``).
CANCELLED = "cancelled by operator"


class Recovery:
    def __init__(
        self,
        *,
        outcomes: Outcomes,
        store: ResultStore,
        jobs: JobStore,
        registry: Registry,
        config: JobsConfig,
        stats: Recorder,
        log: Logger,
    ) -> None:
        """``outcomes`` ends the jobs; ``store`` says whether a dead worker stored its
        outcome first; ``jobs`` (the job store) takes a job back for another run and says
        whether an operator cancelled it; ``registry`` and ``config`` give the retry
        policy; ``stats`` counts recovered and requeued jobs."""
        self.outcomes = outcomes
        self.store = store
        self.jobs = jobs
        self.registry = registry
        self.config = config
        self.stats = stats
        self.log = log

    def _recover(
        self, held: Held, *, cause: str, timed_out: bool, captured: Captured | None
    ) -> None:
        """Finish or re-run the job a dead worker held (at-least-once)."""
        started = _monotonic_start(held)
        self.stats.bump(stats.JOBS_RECOVERED)
        got = self._job_of(held)
        if got is None:
            return
        job, body = got
        handler = self._handler_name(job)
        existing = self.store.get(job.id)
        if existing is not None and existing.finished >= held.started > 0:
            # The worker stored the outcome and died before it said so: finish what it
            # left (key, failed list, payload segment, the store's record) and say it.
            self.outcomes.conclude(job, existing, body=body)
            self.outcomes.announce(
                job, existing, body=body, handler=handler, started=started, recovered=True
            )
            return
        if self._cancelled(job.id):
            self.outcomes.finish(
                job, error_result(job, CANCELLED), body=body, handler=handler,
                started=started, listed=False, killed=True, cancelled=True, captured=captured,
            )  # fmt: skip
            return
        if timed_out:
            self.outcomes.finish(
                job, error_result(job, cause), body=body, handler=handler,
                started=started, killed=True, captured=captured,
            )  # fmt: skip
            return
        policy = self.registry.policy(job.type, self.config)
        if job.attempt >= policy.max_attempts:
            message = f"worker died ({cause}) on attempt {job.attempt} of {policy.max_attempts}"
            self.outcomes.finish(
                job, error_result(job, message), body=body, handler=handler, started=started,
                captured=captured,
            )  # fmt: skip
            return
        # A worker's death may be the job's doing: back off.  The daemon's is not.
        delay = 0.0 if cause == DAEMON_KILLED else policy.delay(job.attempt)
        self.run_again(job, delay=delay, cause=cause)

    def _cancelled(self, job_id: str) -> bool:
        """Whether an operator cancelled the job (``ipcctl cancel --kill``)."""
        try:
            record = self.jobs.get(job_id)
        except StoreError:
            return False
        return record is not None and record.state is State.CANCELLED

    def run_again(self, job: Job, *, delay: float, cause: str, attempts: int | None = None) -> None:
        """Back to the store, to run once ``delay`` has passed (its next attempt, or with
        ``attempts`` the count of attempts it is to have made)."""
        try:
            self.jobs.requeue(job.id, due=time.time() + delay, attempts=attempts)
        except StoreError as exc:
            # It stays "running" in the store; the next start runs it again.
            self.log.error("job.requeue_failed", job_id=job.id, cause=cause, error=str(exc))
            return
        self.stats.bump(stats.JOBS_REQUEUED)
        self.log.warning(
            "job.requeued", job_id=job.id, type=job.type, attempt=job.attempt + 1, cause=cause,
            delay_s=round(delay, 3),
        )  # fmt: skip

    def recover(
        self, held: Held, *, cause: str, timed_out: bool, captured: Captured | None = None
    ) -> None:
        """_recover, but a failure to recover one job never takes the master down.
        ``captured``: what the job wrote before its worker died (its run file), recorded
        with its outcome when this ends the job."""
        try:
            self._recover(held, cause=cause, timed_out=timed_out, captured=captured)
        except Exception:
            self.log.error(
                "job.recovery_failed", type=held.type, job_id=held.job_id,
                head=held.body[:64].hex(), exc_info=True,
            )  # fmt: skip

    def _job_of(self, held: Held) -> tuple[Job, bytes] | None:
        """The held hand-off as a job and its message; None, with the message rejected
        and accounted for, when it cannot be one."""
        try:
            return job_of(held.body, held.type, time.time(), self.jobs)
        except MessageError as exc:
            self.outcomes.reject(exc, held.body, held.type, recovered=True)
            return None

    def recorded_from_ring(self, record: JobRecord) -> bool:
        """Whether a job the store says is running was in fact finished, its outcome
        then recorded from the result ring.  A worker records the outcomes of a batch
        with its next claim (ipcd.daemon.ledger), after their results are in the ring;
        one that dies in between leaves them running in the store.  A result in the ring
        of this very attempt, stored after the claim, is the job's outcome: recorded, so
        the job does not run twice.  Its key, failed-list entry and log event came
        before the outcome was kept for the ledger."""
        if record.started is None:
            return False
        try:
            found = self.store.get(record.id)
        except IpcdError:
            return False
        if found is None or found.attempt != record.attempts or found.finished < record.started:
            return False
        if self.outcomes.record(record.id, found):  # else refused: the caller tries again
            self.log.info(
                "job.recorded", job_id=record.id, type=record.type, attempt=record.attempts,
                cause="finished, its worker died before recording it",
            )  # fmt: skip
        return True

    def keep_for_next_start(self, held: Held, cause: str) -> None:
        """A job interrupted by shutdown is not a failure: it runs again, same attempt."""
        got = self._job_of(held)
        if got is None:
            return
        job, _ = got
        self.run_again(job, delay=0.0, cause=cause, attempts=job.attempt - 1)

    def _handler_name(self, job: Job) -> str:
        reg = self.registry.lookup(job.type)
        return reg.name if reg else "-"


def _monotonic_start(held: Held) -> float:
    """When the dead worker started the job, on the monotonic clock that the ``ms`` of
    ``job.done`` and the duration histograms are measured from: a job killed at its
    timeout ran that long, not the moment the master takes to record it.  The slot holds
    wall-clock time; a slot whose job never started (still in msgrcv) counts from now."""
    now = time.monotonic()
    if held.started <= 0:
        return now
    return now - max(time.time() - held.started, 0.0)
