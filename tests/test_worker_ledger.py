"""The worker with its ledger (ipcd.daemon.ledger) and ipcd's own Outcomes, as
worker_process wires them (over the fakes of test_worker_unit and test_outcomes):
every claim, the one a waiter's flush makes included, stays within the worker's stop and
max_jobs_per_worker."""

from __future__ import annotations

from typing import Any, cast

import test_outcomes as fo
from fakes import FakeLog
from test_worker_unit import Fixture, _body

from ipcd.daemon.log import Events, Logger
from ipcd.daemon.outcomes import Outcomes
from ipcd.daemon.worker import Exit, Worker
from ipcd.handlers import Handler
from ipcd.kernel.queues import Queue
from ipcd.store import JobStore, State
from ipcd.tables.failed import FailedList
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.stats import Recorder
from ipcd.tables.unique import UniqueTable
from ipcd.wire.protocol import Job

REPLY_TO = 4242


class RealOutcomes(Fixture):
    """test_worker_unit's Fixture, but the worker's outcomes are ipcd's Outcomes with
    the worker's ledger (as worker_process wires them)."""

    def __init__(self, handler: Handler, **kw: Any) -> None:
        self.journal: list[str] = []
        super().__init__(handler, **kw)

    def new_worker(self) -> Worker:
        self.new_ledger()
        journal = self.journal
        self.real = Outcomes(
            store=cast(ResultStore, fo.FakeStore(journal, None, capacity=1 << 20, broken=False)),
            failed=cast(FailedList, fo.FakeFailed(journal)),
            replies=cast(Queue, fo.FakeReplies(journal, room=10_000)),
            log=cast(Logger, FakeLog()),
            events=cast(Events, fo.FakeEvents()),
            unique=cast(UniqueTable, fo.FakeUnique(journal)),
            stats=cast(Recorder, fo.FakeRecorder()),
            jobs=cast(JobStore, self.jobs),
            keep_trying=lambda: not self.flags.stopping,
            ledger=self.ledger,
        )
        return Worker(
            slot=2, config=self._config, queue=cast(Queue, self.doorbell), table=self._table,
            outcomes=self.real, store=self.real.store,
            spills=cast(SpillTable, self.spills), registry=self.registry, flags=self.flags,
            log=cast(Logger, self.log), events=cast(Events, self.events),
            stats=cast(Recorder, self.stats), wake_master=self._wake,
            jobs=cast(JobStore, self.jobs), ledger=self.ledger,
        )  # fmt: skip


def _submit_waiters(f: Fixture, ids: list[str]) -> None:
    for job_id in ids:
        f.submit(_body(job_id=job_id, reply_to=REPLY_TO), job_id=job_id)


def test_max_jobs_per_worker_bounds_a_worker_whose_jobs_have_waiters() -> None:
    """max_jobs_per_worker = 2 and six jobs, each with a waiter: the worker runs two and
    leaves RECYCLED, though each waiter's outcome is recorded with a claim of the next
    batch (Ledger.flush)."""
    ran: list[str] = []
    f = RealOutcomes(lambda job: ran.append(job.id), max_jobs_per_worker=2)
    ids = [f"j{n}" for n in range(6)]
    _submit_waiters(f, ids)
    f.worker = f.new_worker()
    assert f.worker.serve() == Exit.RECYCLED
    assert ran == ids[:2], f"ran {len(ran)} jobs with max_jobs_per_worker = 2"


def test_asked_to_stop_a_worker_whose_jobs_have_waiters_claims_no_more() -> None:
    """SIGTERM while the first of several waiter jobs runs, clients submitting more with
    --wait all the while: the flush that records the waiter's outcome claims nothing, the
    worker leaves after the job in hand (a reload's retiring worker must not go on
    running the old handlers)."""
    ran: list[str] = []
    f: RealOutcomes

    def handler(job: Job) -> None:
        ran.append(job.id)
        f.flags.stopping = True  # SIGTERM: a stop, or a reload retiring this worker
        if len(ran) < 50:  # clients keep submitting with --wait
            _submit_waiters(f, [f"more{len(ran)}"])

    f = RealOutcomes(handler)
    _submit_waiters(f, ["a", "b"])
    f.worker = f.new_worker()
    f.flags.stopping = False
    assert f.worker.serve() == Exit.STOPPED
    assert len(ran) == 1, (
        f"a worker asked to stop ran {len(ran)} jobs, claims={len(f.jobs.claimers)}"
    )
    assert f.jobs.state("b") is State.QUEUED
