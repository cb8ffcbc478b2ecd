"""A worker's ledger (ipcd.daemon.ledger) on a real SQLite store, and under the real
daemon: jobs claimed in batches of one type, outcomes recorded with the next claim (or at
once when someone waits), and nothing run twice when a worker dies with outcomes not yet
recorded."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Instance
from test_jobstore import store_of, wait_state

from ipcd.client import Client
from ipcd.daemon.ledger import BATCH_MAX, Ledger
from ipcd.store import JobStore, NewJob, Outcome, State, open_store

PID = 4242


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    store = open_store(str(tmp_path / "jobs.db"))
    yield store
    store.close()


def _add(jobs: JobStore, type_: int, count: int, *, prefix: str) -> list[str]:
    now = time.time()
    new = [
        NewJob(f"{prefix}{n:03d}", type_, f"h{type_}", b"{}", False, now + n * 1e-6, 2, "")
        for n in range(count)
    ]
    return jobs.add(new)


def _done(job_id: str) -> Outcome:
    return Outcome(job_id, True, time.time(), 1, b'"ok"', None)


def test_a_type_not_yet_timed_is_claimed_one_job_at_a_time_then_in_batches(
    jobs: JobStore,
) -> None:
    """The first claim of a type takes one job (how long its jobs take is not known);
    once that ran quickly, the next claim takes the rest of the type in one batch."""
    ids = _add(jobs, 2, 10, prefix="a")
    ledger = Ledger(jobs, worker_pid=PID)
    first = ledger.next()
    assert first is not None and first[0].id == ids[0]
    assert jobs.counts()[State.RUNNING] == 1
    ledger.record(_done(ids[0]))
    second = ledger.next()
    assert second is not None and second[0].id == ids[1]
    counts = jobs.counts()
    assert counts[State.RUNNING] == 9 and counts[State.DONE] == 1  # one commit for both
    assert all(r.worker_pid == PID for r in jobs.running())


def test_a_batch_is_of_one_type_so_quick_jobs_never_wait_behind_another_types(
    jobs: JobStore,
) -> None:
    """Even with both types timed as quick, a claim takes jobs of the first waiting
    job's type only: the other type's jobs stay queued for any worker."""
    quick = _add(jobs, 2, 2, prefix="q")
    other = _add(jobs, 3, 2, prefix="o")
    ledger = Ledger(jobs, worker_pid=PID)
    for job_id in (quick[0], quick[1], other[0]):  # each type run once, quickly
        got = ledger.next()
        assert got is not None and got[0].id == job_id
        ledger.record(_done(job_id))
    more = _add(jobs, 2, 5, prefix="r")
    later = _add(jobs, 3, 5, prefix="s")
    got = ledger.next()
    assert got is not None and got[0].id == more[0]  # type 2 first, in dispatch order
    assert {r.id for r in jobs.running()} == set(more)
    queued = jobs.list(states=[State.QUEUED], limit=20)
    assert {r.id for r in queued} == {other[1], *later}  # for any worker


def test_outcomes_wait_for_the_next_claim_unless_flushed(jobs: JobStore) -> None:
    """An outcome kept by the ledger is not in the store until the next claim; flush
    records it at once (a waiter's reply must mean "recorded")."""
    ids = _add(jobs, 2, 1, prefix="w")
    ledger = Ledger(jobs, worker_pid=PID)
    assert ledger.next() is not None
    ledger.record(_done(ids[0]))
    assert ledger.pending == 1
    assert jobs.counts()[State.RUNNING] == 1
    ledger.flush()
    assert ledger.pending == 0
    record = jobs.get(ids[0])
    assert record is not None and record.state is State.DONE
    assert jobs.result(ids[0]) == (1, b'"ok"')
    # The flush looked for more and found none: the next look waits for the doorbell.
    assert ledger.next() is None


def test_jobs_claimed_and_not_started_go_back_as_they_were(jobs: JobStore) -> None:
    """A worker that leaves records its outcomes and gives back the jobs it claimed but
    never started: queued again, their claim's attempt not counted."""
    ids = _add(jobs, 2, 6, prefix="g")
    ledger = Ledger(jobs, worker_pid=PID)
    got = ledger.next()
    assert got is not None
    ledger.record(_done(got[0].id))
    got = ledger.next()
    assert got is not None
    ledger.record(_done(got[0].id))
    given = ledger.give_back()
    assert [r.id for r in given] == ids[2:]
    for job_id in ids[2:]:
        record = jobs.get(job_id)
        assert record is not None and record.state is State.QUEUED and record.attempts == 0
    assert jobs.counts()[State.DONE] == 2 and ledger.pending == 0


def test_a_claimed_job_cancelled_meanwhile_is_not_given_back(jobs: JobStore) -> None:
    """`cancel --kill` of a job a worker claimed and has not started: on leaving, the
    worker does not put it back (nor say so); it stays cancelled."""
    ids = _add(jobs, 2, 3, prefix="c")
    ledger = Ledger(jobs, worker_pid=PID)
    got = ledger.next()
    assert got is not None
    ledger.record(_done(got[0].id))
    assert ledger.next() is not None  # the rest claimed: ids[1] in hand, ids[2] held
    jobs.cancel([ids[2]], running=True, now=time.time())
    assert ledger.give_back() == []
    record = jobs.get(ids[2])
    assert record is not None and record.state is State.CANCELLED


def test_batch_size_is_bounded(jobs: JobStore) -> None:
    """However quick the jobs, one claim takes at most BATCH_MAX."""
    ids = _add(jobs, 2, BATCH_MAX * 2, prefix="b")
    ledger = Ledger(jobs, worker_pid=PID)
    got = ledger.next()
    assert got is not None
    ledger.record(_done(ids[0]))
    assert ledger.next() is not None
    assert jobs.counts()[State.RUNNING] == BATCH_MAX


DIE_ON_CUE = """
[handlers.cue]
type = 2
target = "ipcd_test_plugins:die_on_cue"
max_attempts = 3
retry_delay = 0.1
"""


def test_a_worker_killed_with_outcomes_not_recorded_runs_no_job_twice(
    instance: Instance,
) -> None:
    """One worker takes ten quick jobs and a job that SIGKILLs it in one batch: the
    quick jobs' outcomes are in the result ring but not yet in the store.  The master
    records them from the ring (``job.recorded``) instead of running them again; the
    killer runs again as its next attempt.  Every job ends done, each quick one once."""
    instance.write(handlers=DIE_ON_CUE)
    text = instance.config_path.read_text().replace("workers = 2", "workers = 1")
    instance.config_path.write_text(text)
    assert instance.ipcd("start").returncode == 0
    client = Client(instance.config)
    warm = client.submit("cue", "warm", confirm=True)  # the type is timed as quick
    wait_state(instance, warm, State.DONE)
    assert instance.ipcctl("pause", "cue").returncode == 0
    quick = [client.submit("cue", f"q{n}", confirm=True) for n in range(10)]
    killer = client.submit("cue", "die", confirm=True)
    assert instance.ipcctl("resume").returncode == 0
    for job_id in [*quick, killer]:
        wait_state(instance, job_id, State.DONE)
    with store_of(instance) as jobs:
        assert all(getattr(jobs.get(j), "attempts", None) == 1 for j in quick)
        record = jobs.get(killer)
        assert record is not None and record.attempts == 2
    events = instance.log_events()
    done = [e["job_id"] for e in events if e.get("event") == "job.done"]
    assert sorted(j for j in done if j in quick) == sorted(quick)  # each once
    recorded = {e["job_id"] for e in events if e.get("event") == "job.recorded"}
    assert recorded and recorded <= set(quick)
    assert instance.ipcd("stop").returncode == 0
    assert os.path.exists(instance.dir / "jobs.db")
