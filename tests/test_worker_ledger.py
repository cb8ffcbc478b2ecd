"""The worker with its ledger (ipcd.daemon.ledger) and ipcd's own Outcomes, as
worker_process wires them (over the fakes of test_worker_unit and test_outcomes), and
under the real daemon: every claim, the one a waiter's flush makes included, stays within
the worker's stop and max_jobs_per_worker; outcomes kept by the ledger are not lost or
run twice when a job that may be killed runs after them; a body file that cannot be read
fails its own job only."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, cast

import test_outcomes as fo
from conftest import Instance
from fakes import FakeLog
from test_worker_unit import Fixture, _body

from ipcd.daemon.ledger import Ledger
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


STALL_ON_CUE = """
[handlers.cue]
type = 2
target = "ipcd_test_plugins:stall_on_cue"
timeout = 1.5
max_attempts = 3
retry_delay = 0.1
"""


def test_outcomes_pending_behind_a_job_killed_by_its_timeout_are_not_run_again(
    instance: Instance,
) -> None:
    """A batch of quick jobs and one that stalls until its handler's timeout kills the
    worker, while other results overwrite the result ring (jobs of a type without
    handler, failed at once by the intake, in a ring of two slots): the quick jobs'
    outcomes were recorded before the job with a deadline started, so none runs twice
    (without that, the master found no result in the ring and ran them again)."""
    import time

    from test_jobstore import store_of, wait_state

    from ipcd.client import Client

    instance.write(handlers=STALL_ON_CUE)
    text = instance.config_path.read_text().replace("workers = 2", "workers = 1")
    text = text.replace("size = 262144", "size = 4160")  # two result slots
    instance.config_path.write_text(text)
    assert instance.ipcd("start").returncode == 0, instance.ipcd("status")
    try:
        client = Client(instance.config)
        warm = client.submit("cue", "warm", confirm=True)  # the type is timed as quick
        wait_state(instance, warm, State.DONE)
        assert instance.ipcctl("pause", "cue").returncode == 0
        quick = [client.submit("cue", f"q{n}", confirm=True) for n in range(5)]
        stall = client.submit("cue", "stall", confirm=True)
        assert instance.ipcctl("resume").returncode == 0
        time.sleep(0.5)  # the quick ones ran; the stalled one runs
        for n in range(6):  # results of a type nobody handles overwrite the ring
            client.submit(9, f"x{n}")
        wait_state(instance, stall, State.FAILED, timeout=20)
        for job_id in quick:
            wait_state(instance, job_id, State.DONE)
        time.sleep(0.5)
        events = instance.log_events()
        done = [e["job_id"] for e in events if e.get("event") == "job.done"]
        requeued = [
            e["job_id"] for e in events
            if e.get("event") == "job.requeued" and e.get("job_id") in quick
        ]  # fmt: skip
        with store_of(instance) as jobs:
            attempts = {j: getattr(jobs.get(j), "attempts", None) for j in quick}
        twice = [j for j in quick if done.count(j) > 1]
        assert not twice, (
            f"run twice: {twice}; requeued as never started: {requeued}; attempts: {attempts}"
        )
    finally:
        instance.ipcd("stop")


def test_an_unreadable_body_file_fails_its_job_not_every_claim(tmp_path: Path) -> None:
    """A body file that cannot be read (EACCES, EIO; here a directory in its place) is
    that job's problem only: the exchange that claims it records the ledger's outcomes
    (a large result's file included, once) and hands the job out with no body (the
    worker fails it), and the job after it is claimed too."""
    import shutil

    from ipcd.errors import StoreError
    from ipcd.store import NewJob, Outcome, open_store

    path = str(tmp_path / "jobs.db")
    jobs = open_store(path)
    now = time.time()
    jobs.add([NewJob("done-me", 3, "h3", b"{}", False, now, 2, "")])
    ledger = Ledger(jobs, worker_pid=4242)
    got = ledger.next()
    assert got is not None and got[0].id == "done-me"
    big = b"x" * (100 * 1024)
    jobs.add([
        NewJob("big", 2, "h2", big, False, now + 1, 2, ""),
        NewJob("small", 2, "h2", b"{}", False, now + 2, 2, ""),
    ])  # fmt: skip
    bodies = path + ".bodies"
    (name,) = os.listdir(bodies)
    os.unlink(os.path.join(bodies, name))
    os.mkdir(os.path.join(bodies, name))  # cannot be read as a file
    ledger.record(Outcome("done-me", True, time.time(), 1, b"r" * (100 * 1024), None))
    failures = 0
    handed: dict[str, bytes | None] = {}
    for _ in range(5):  # the worker's loop, every CLAIM_BACKOFF
        try:
            taken = ledger.next()
        except StoreError:
            failures += 1
            continue
        if taken is not None:
            handed[taken[0].id] = taken[1]
    record = jobs.get("done-me")
    files = [n for n in os.listdir(bodies) if n.startswith("done-me")]
    shutil.rmtree(os.path.join(bodies, name))
    assert failures == 0 and record is not None and record.state is State.DONE, (
        f"{failures} of 5 exchanges failed; done-me is {record and record.state}; "
        f"{len(files)} result files written for it"
    )
    assert len(files) == 1
    assert handed == {"big": None, "small": b"{}"}
    assert {r.id for r in jobs.running()} == {"big", "small"}
