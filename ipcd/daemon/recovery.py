"""Finishing or re-running the jobs that workers held when they died.

The master (ipcd.daemon.arbiter) calls this when it reaps a worker, at start for the jobs a
killed daemon's workers held, and at stop for jobs cut off after graceful_timeout.  Every
path ends with the job parked for another attempt, or with an error result: the job
table, not the worker, is the record, so nothing a worker held is lost.
"""

from __future__ import annotations

import time

from ipcd.config import JobsConfig
from ipcd.daemon.log import Logger
from ipcd.daemon.outcomes import Outcomes, error_result, run_again
from ipcd.errors import MessageError
from ipcd.handlers.registry import Registry
from ipcd.kernel.queues import Queue
from ipcd.tables import stats
from ipcd.tables.inflight import Held, InflightTable
from ipcd.tables.results import ResultStore
from ipcd.tables.stats import Recorder
from ipcd.wire import protocol
from ipcd.wire.protocol import Job

#: Why a job found in a worker's slot at start is run again.
DAEMON_KILLED = "the daemon was killed"


class Recovery:
    def __init__(
        self,
        *,
        outcomes: Outcomes,
        store: ResultStore,
        table: InflightTable,
        queue: Queue,
        registry: Registry,
        jobs: JobsConfig,
        stats: Recorder,
        log: Logger,
    ) -> None:
        """``outcomes`` ends the jobs; ``store`` says whether a dead worker stored its
        outcome first; ``table`` and ``queue`` take a job run again; ``registry`` and
        ``jobs`` give the retry policy; ``stats`` counts recovered and requeued jobs."""
        self.outcomes = outcomes
        self.store = store
        self.table = table
        self.queue = queue
        self.registry = registry
        self.jobs = jobs
        self.stats = stats
        self.log = log

    def _recover(self, held: Held, *, cause: str, timed_out: bool) -> None:
        """Finish or re-run the job a dead worker held (at-least-once)."""
        started = _monotonic_start(held)
        self.stats.bump(stats.JOBS_RECOVERED)
        job = self._job_of(held)
        if job is None:
            return
        existing = self.store.get(job.id)
        if existing is not None and existing.finished >= held.started > 0:
            # The worker stored the outcome and died before it said so: finish what it
            # left (key, failed list, payload segment) and say it for it.
            self.outcomes.conclude(job, existing, body=held.body)
            self.outcomes.announce(
                job, existing, body=held.body, handler=self._handler_name(job),
                started=started, recovered=True,
            )  # fmt: skip
            return
        if timed_out:
            self.outcomes.finish(
                job, error_result(job, cause), body=held.body, handler=self._handler_name(job),
                started=started, killed=True,
            )  # fmt: skip
            return
        policy = self.registry.policy(job.type, self.jobs)
        if job.attempt >= policy.max_attempts:
            message = f"worker died ({cause}) on attempt {job.attempt} of {policy.max_attempts}"
            self.outcomes.finish(
                job, error_result(job, message), body=held.body,
                handler=self._handler_name(job), started=started,
            )  # fmt: skip
            return
        # A worker's death may be the job's doing: back off.  The daemon's is not.
        delay = 0.0 if cause == DAEMON_KILLED else policy.delay(job.attempt)
        self.run_again(job, held, attempt=job.attempt + 1, delay=delay, cause=cause)

    def run_again(self, job: Job, held: Held, *, attempt: int, delay: float, cause: str) -> None:
        due = time.time() + delay
        again = run_again(job, attempt=attempt, due=due, table=self.table, queue=self.queue)
        if again.refused:
            self.outcomes.finish(
                job, error_result(job, f"{cause}; {again.refused}"), body=held.body,
                handler=self._handler_name(job), started=time.monotonic(),
            )  # fmt: skip
            return
        self.stats.bump(stats.JOBS_REQUEUED)
        if not again.placed:
            # Every parked slot is taken and the queue is full: the job stays where it is,
            # in the dead worker's slot, parked; that slot takes no new worker meanwhile.
            self.table.park_in(held.slot, job.type, again.body, job.id, attempt, due)
        self.log.warning(
            "job.requeued", job_id=job.id, type=job.type, attempt=attempt, cause=cause,
            delay_s=round(delay, 3),
        )  # fmt: skip

    def recover(self, held: Held, *, cause: str, timed_out: bool) -> None:
        """_recover, but a failure to recover one job never takes the master down."""
        try:
            self._recover(held, cause=cause, timed_out=timed_out)
        except Exception:
            self.log.error(
                "job.recovery_failed", type=held.type, job_id=held.job_id,
                head=held.body[:64].hex(), exc_info=True,
            )  # fmt: skip

    def _job_of(self, held: Held) -> Job | None:
        """The held message as a job (a bare one under the id its slot recorded); None,
        with the message rejected and accounted for, when it cannot be one."""
        try:
            job = protocol.decode(held.body, held.type, received=time.time())
        except MessageError as exc:
            self.outcomes.reject(exc, held.body, held.type, recovered=True)
            return None
        if job.bare and held.job_id:
            job = job._replace(id=held.job_id)
        return job

    def keep_for_next_start(self, held: Held, cause: str) -> None:
        """A job interrupted by shutdown is not a failure: it runs again, same attempt."""
        job = self._job_of(held)
        if job is None:
            return
        self.run_again(job, held, attempt=job.attempt, delay=0.0, cause=cause)

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
