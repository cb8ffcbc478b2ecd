"""The master's decisions about its workers (ipcd.daemon.arbiter), in-process: how many
to fork, the back-off after workers that die young, reload generations, and deadlines.
The end-to-end paths (a crashing handler, a reload under load) stay in test_workers.py
and tests/faults/."""

from __future__ import annotations

from ipcd.daemon.arbiter import MAX_BACKOFF, MIN_BACKOFF, YOUNG, Pool, WorkerInfo, overdue
from ipcd.tables.inflight import Peek, State


def _pool(workers: int = 0, *, free: int = 4) -> Pool:
    pool = Pool(free_slots=list(range(workers, workers + free)))
    for slot in range(workers):
        pool.workers[100 + slot] = WorkerInfo(100 + slot, slot, 0, 0.0)
    return pool


def test_forks_up_to_the_wanted_number_as_slots_allow() -> None:
    """Missing workers are forked, but never more than there are free slots."""
    assert _pool(1, free=4).to_spawn(3, now=10.0) == 2
    assert _pool(1, free=1).to_spawn(3, now=10.0) == 1
    assert _pool(3, free=4).to_spawn(3, now=10.0) == 0


def test_retiring_workers_do_not_count_as_active() -> None:
    """A retiring worker (old generation) is replaced at once, not when it has left."""
    pool = _pool(2, free=2)
    pool.workers[100].retiring = True
    assert pool.to_spawn(2, now=10.0) == 1


def test_a_worker_dying_young_doubles_the_back_off_up_to_its_cap() -> None:
    """Each death under YOUNG doubles the delay before the next fork, up to MAX_BACKOFF,
    and nothing is forked before it has passed."""
    pool = _pool(0, free=1)
    seen = [pool.died_unexpectedly(YOUNG / 2, now=100.0) for _ in range(12)]
    assert seen[:3] == [MIN_BACKOFF * 2, MIN_BACKOFF * 4, MIN_BACKOFF * 8]
    assert seen[-1] == MAX_BACKOFF
    assert pool.next_spawn == 100.0 + MAX_BACKOFF
    assert pool.to_spawn(1, now=100.0 + MAX_BACKOFF - 0.01) == 0
    assert pool.to_spawn(1, now=100.0 + MAX_BACKOFF) == 1
    assert pool.restarts == 12


def test_a_worker_that_lived_long_resets_the_back_off() -> None:
    """A death after YOUNG seconds is no crash loop: the back-off starts over."""
    pool = _pool(0, free=1)
    pool.died_unexpectedly(0.0, now=100.0)
    assert pool.died_unexpectedly(YOUNG, now=200.0) is None
    assert pool.backoff == MIN_BACKOFF


def test_a_new_generation_retires_the_old_and_may_fork_at_once() -> None:
    """A reload starts a generation that may fork at once, even during a back-off, and
    hands back the old generation's workers (not those already retiring) to retire."""
    pool = _pool(2, free=2)
    pool.workers[101].retiring = True
    pool.died_unexpectedly(0.0, now=100.0)
    old = pool.new_generation()
    assert [w.pid for w in old] == [100]
    assert pool.generation == 1
    assert pool.to_spawn(2, now=100.0) == 1


def _peek(state: State = State.RUNNING, *, deadline: float = 50.0) -> Peek:
    return Peek(state, 7, 20.0, deadline, "job1")


def test_a_running_job_past_its_deadline_is_overdue_by_how_long_it_ran() -> None:
    """At or after its deadline, a running job is overdue; the master kills it."""
    info = WorkerInfo(100, 0, 0, 0.0)
    assert overdue(info, _peek(), now=50.0) == 30.0
    assert overdue(info, _peek(), now=49.9) is None


def test_only_running_jobs_with_a_deadline_and_no_kill_under_way_are_overdue() -> None:
    """No deadline, a parked or free slot, or a worker already being killed: not overdue."""
    info = WorkerInfo(100, 0, 0, 0.0)
    assert overdue(info, _peek(deadline=0.0), now=99.0) is None
    assert overdue(info, _peek(State.PARKED), now=99.0) is None
    assert overdue(info, _peek(State.FREE), now=99.0) is None
    info.kill_reason = "timeout: killed after 30s"
    assert overdue(info, _peek(), now=99.0) is None
