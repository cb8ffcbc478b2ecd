"""A worker's ledger (ipcd.daemon.ledger) on a real SQLite store, and under the real
daemon: jobs claimed in batches of one type, outcomes recorded with the next claim (or at
once when someone waits), and nothing run twice when a worker dies with outcomes not yet
recorded, or when a job that may be killed runs after them; a body file that cannot be
read fails its own job only."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from conftest import Instance
from test_jobstore import store_of, wait_state

from ipcd.client import Client
from ipcd.daemon.ledger import BATCH_MAX, Ledger
from ipcd.errors import StoreError
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


def _one_worker(
    instance: Instance, handlers: str, edits: Mapping[str, str] | None = None
) -> Client:
    """Start the daemon with one worker and ``handlers`` (``edits``: more replacements in
    its configuration); a client of it."""
    instance.write(handlers=handlers)
    text = instance.config_path.read_text().replace("workers = 2", "workers = 1")
    for old, new in (edits or {}).items():
        text = text.replace(old, new)
    instance.config_path.write_text(text)
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    return Client(instance.config)


def _one_batch(instance: Instance, client: Client, payloads: Sequence[str]) -> list[str]:
    """Jobs of handler "cue", one each of ``payloads``, that the one worker claims in
    one batch: the type is timed as quick first (a job run alone), then dispatch is
    paused while they are queued, and resumed.  Their ids, in order."""
    warm = client.submit("cue", "warm", confirm=True)
    wait_state(instance, warm, State.DONE)
    assert instance.ipcctl("pause", "cue").returncode == 0
    ids = [client.submit("cue", payload, confirm=True) for payload in payloads]
    assert instance.ipcctl("resume").returncode == 0
    return ids


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
    client = _one_worker(instance, DIE_ON_CUE)
    *quick, killer = _one_batch(instance, client, [f"q{n}" for n in range(10)] + ["die"])
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
    client = _one_worker(instance, STALL_ON_CUE, {"size = 262144": "size = 4160"})  # 2 slots
    try:
        *quick, stall = _one_batch(instance, client, [f"q{n}" for n in range(5)] + ["stall"])
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
