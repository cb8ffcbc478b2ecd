"""The dispatcher's decisions in the job store's claim: per-handler concurrency and rate
limits, and job expiry, on real SQLite files with the clock given to each call (``now``).

Several connections to one file stand for several worker processes: each claim counts
the RUNNING jobs and spends the tokens in its own write transaction, so the limits hold
across them.  (tests/test_limits.py tries the same through the running daemon.)
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcd.store import Limit, LimitState, NewJob, Outcome, State, open_store
from ipcd.store.model import JobStore
from ipcd.store.sqlite import SqliteStore, connect, tokens

NOW = 1_700_000_000.0


def _job(job_id: str, type_: int = 1, accepted: float = NOW, **fields: Any) -> NewJob:
    body = job_id.encode()
    return NewJob(job_id, type_, "h", body, False, accepted, len(body), job_id)._replace(**fields)


def _ids(claimed: list[Any]) -> list[str]:
    return [record.id for record, _ in claimed]


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "jobs.db")


@contextlib.contextmanager
def _opened(path: str, limits: dict[int, Limit]) -> Iterator[JobStore]:
    store = open_store(path, limits=limits)
    try:
        yield store
    finally:
        store.close()


def _done(store: JobStore, job_id: str, at: float) -> None:
    assert store.finish(job_id, ok=True, finished=at, result_kind=1, data=b"", error=None)


# -- concurrency ---------------------------------------------------------------------------


def test_concurrency_caps_a_type_while_the_others_run(path: str) -> None:
    """concurrency = 2 for type 1: a claim of ten gets two of type 1 and the type-2 jobs
    behind them; the next gets nothing of type 1 until one of its jobs ends."""
    with _opened(path, {1: Limit(concurrency=2)}) as store:
        store.add([_job(f"a{i}", 1, NOW + i) for i in range(5)])
        store.add([_job(f"b{i}", 2, NOW + i) for i in range(2)])
        assert _ids(store.claim(10, NOW)) == ["a0", "a1", "b0", "b1"]
        assert store.claim(10, NOW) == []
        _done(store, "a0", NOW + 1)
        assert _ids(store.claim(10, NOW + 1)) == ["a2"]
        assert store.claim(10, NOW + 1) == []


def test_concurrency_holds_across_connections_and_caps_batches(path: str) -> None:
    """Two connections (two workers) share concurrency = 3: their claims of batches of up
    to 32 get three between them, one each time; an exchange that records an outcome of
    the type frees room for its own claim in the same transaction."""
    limits = {1: Limit(concurrency=3)}
    with _opened(path, limits) as first, _opened(path, limits) as second:
        first.add([_job(f"a{i}", 1, NOW + i) for i in range(10)])
        for store, pid, job_id in ((first, 1, "a0"), (second, 2, "a1"), (first, 1, "a2")):
            got = store.exchange((), 32, NOW, worker_pid=pid, batches={1: 32})
            assert _ids(got) == [job_id]
        assert second.exchange((), 32, NOW, worker_pid=2, batches={1: 32}) == []
        assert first.counts()[State.RUNNING] == 3
        outcome = Outcome("a0", True, NOW + 1, 1, b"", None)
        again = second.exchange([outcome], 32, NOW + 1, worker_pid=2, batches={1: 32})
        assert _ids(again) == ["a3"]
        assert first.counts()[State.RUNNING] == 3


def test_a_type_out_of_room_is_skipped_not_waited_behind(path: str) -> None:
    """Batches of one type: a limited type at its concurrency gives way to the next type
    in dispatch order, and a paused type stays skipped as well."""
    with _opened(path, {1: Limit(concurrency=1), 3: Limit(concurrency=5)}) as store:
        store.add([_job(f"a{i}", 1, NOW + i) for i in range(3)])
        store.add([_job(f"b{i}", 2, NOW + i) for i in range(2)])
        store.add([_job(f"c{i}", 3, NOW + i) for i in range(2)])
        store.pause([2], NOW)
        assert _ids(store.exchange((), 8, NOW, batches={1: 8, 3: 8})) == ["a0"]
        assert _ids(store.exchange((), 8, NOW, batches={1: 8, 3: 8})) == ["c0"]
        assert _ids(store.exchange((), 8, NOW, batches={1: 8, 3: 8})) == ["c1"]
        assert store.exchange((), 8, NOW, batches={1: 8, 3: 8}) == []


def test_a_paused_limited_type_is_not_claimed_nor_rung_for(path: str) -> None:
    """The pause wins over a limit: a paused type with room, by concurrency or by tokens,
    gives no job, and next_start does not ask for a ring while it stays paused."""
    limits = {1: Limit(concurrency=2), 2: Limit(rate=10.0, burst=10)}
    with _opened(path, limits) as store:
        store.add([_job("a0", 1), _job("b0", 2), _job("c0", 3)])
        store.pause([1, 2], NOW)
        assert _ids(store.claim(5, NOW)) == ["c0"]
        assert store.exchange((), 8, NOW, batches={}) == []
        assert store.next_start(NOW) is None
        store.resume([1])
        assert store.next_start(NOW) == NOW
        assert _ids(store.claim(5, NOW)) == ["a0"]


def test_a_concurrency_limited_type_is_claimed_one_job_at_a_time(path: str) -> None:
    """A batch runs in one worker, one job after another: of a type with a concurrency
    limit, each claim takes one job, so the others' places stay for other workers."""
    with _opened(path, {1: Limit(concurrency=3), 2: Limit(rate=100.0, burst=100)}) as store:
        store.add([_job(f"a{i}", 1, NOW + i) for i in range(5)])
        assert _ids(store.exchange((), 32, NOW, batches={1: 32})) == ["a0"]
        assert _ids(store.exchange((), 32, NOW, batches={1: 32})) == ["a1"]
        store.add([_job(f"b{i}", 2, NOW + i) for i in range(5)])
        store.pause([1], NOW)
        got = store.exchange((), 32, NOW, batches={2: 32})  # a rate alone: batches as usual
        assert _ids(got) == ["b0", "b1", "b2", "b3", "b4"]


# -- rate ----------------------------------------------------------------------------------


def test_the_rate_is_a_token_bucket_spent_by_claims(path: str) -> None:
    """rate 2/s with a burst of 2: two start at once, then one each half second, and a
    quiet spell refills no more than the burst."""
    with _opened(path, {1: Limit(rate=2.0, burst=2)}) as store:
        store.add([_job(f"a{i}", 1, NOW + i) for i in range(10)])
        store.add([_job("b0", 2)])
        assert _ids(store.claim(10, NOW)) == ["a0", "a1", "b0"]
        assert store.claim(10, NOW + 0.25) == []
        assert _ids(store.claim(10, NOW + 0.5)) == ["a2"]
        assert _ids(store.claim(10, NOW + 1.0)) == ["a3"]
        assert _ids(store.claim(10, NOW + 60)) == ["a4", "a5"]


def test_the_bucket_is_shared_by_connections_and_survives_reopening(path: str) -> None:
    """A token spent by one connection is gone for the other, and for a store opened
    afresh (a restart): the bucket is a row in the file."""
    limits = {1: Limit(rate=1.0, burst=1)}
    with _opened(path, limits) as first, _opened(path, limits) as second:
        first.add([_job(f"a{i}", 1, NOW + i) for i in range(5)])
        assert _ids(first.claim(5, NOW)) == ["a0"]
        assert second.claim(5, NOW + 0.5) == []
    with _opened(path, limits) as again:
        assert again.claim(5, NOW + 0.9) == []
        assert _ids(again.claim(5, NOW + 1.0)) == ["a1"]


def test_concurrency_and_rate_together_take_the_smaller_room(path: str) -> None:
    """concurrency 1 and 10/s: one at a time however many tokens wait."""
    with _opened(path, {1: Limit(concurrency=1, rate=10.0, burst=10)}) as store:
        store.add([_job(f"a{i}", 1, NOW + i) for i in range(5)])
        assert _ids(store.claim(5, NOW)) == ["a0"]
        assert store.claim(5, NOW) == []
        _done(store, "a0", NOW)
        assert _ids(store.claim(5, NOW)) == ["a1"]
        [state] = store.limited(NOW)
        assert state == LimitState(1, Limit(1, 10.0, 10), running=1, tokens=8, queued=3)


def test_a_limited_types_queue_counts_no_job_past_its_expiry(path: str) -> None:
    """What ``ipcctl status`` shows as waiting behind a limit: the jobs that may still
    start, not one past its expiry that the master has yet to cancel."""
    with _opened(path, {1: Limit(concurrency=1)}) as store:
        store.add([_job("late", 1, NOW, expires=NOW + 1.0), _job("fine", 1, NOW + 0.5)])
        [state] = store.limited(NOW)
        assert state.queued == 2
        [state] = store.limited(NOW + 2.0)
        assert state.queued == 1
        assert _ids(store.claim(5, NOW + 2.0)) == ["fine"]


def test_tokens_refill_to_the_burst_and_a_clock_gone_back_adds_none() -> None:
    """The bucket's arithmetic: full when never written, refilled at the rate, capped."""
    limit = Limit(rate=0.5, burst=3)
    assert tokens(limit, None, NOW) == 3
    assert tokens(limit, (0.0, NOW), NOW + 2) == 1
    assert tokens(limit, (1.0, NOW), NOW + 100) == 3
    assert tokens(limit, (1.0, NOW), NOW - 100) == 1


def test_next_start_says_when_held_jobs_may_start(path: str, tmp_path: Path) -> None:
    """None without limits or without held jobs; the next token's time when the rate
    holds them; now when room is free; None when the concurrency is full."""
    with _opened(str(tmp_path / "plain.db"), {}) as plain:
        plain.add([_job("x", 1)])
        assert plain.next_start(NOW) is None
    with _opened(path, {1: Limit(rate=4.0, burst=1), 2: Limit(concurrency=1)}) as store:
        assert store.next_start(NOW) is None
        store.add([_job("a0", 1), _job("a1", 1, NOW + 1), _job("b0", 2), _job("b1", 2, NOW + 1)])
        assert store.next_start(NOW) == NOW
        assert _ids(store.claim(10, NOW)) == ["a0", "b0"]
        assert store.next_start(NOW) == pytest.approx(NOW + 0.25)
        assert store.next_start(NOW + 0.3) == NOW + 0.3
        assert _ids(store.claim(10, NOW + 0.3)) == ["a1"]
        assert store.next_start(NOW + 0.3) is None  # b1 waits for b0's end, a has none


def test_set_limits_applies_to_the_next_claim(path: str) -> None:
    """A reload's new limits: concurrency lifted, the held jobs go with the next claim."""
    with _opened(path, {1: Limit(concurrency=1)}) as store:
        store.add([_job(f"a{i}", 1, NOW + i) for i in range(3)])
        assert len(store.claim(5, NOW)) == 1
        store.set_limits({})
        assert len(store.claim(5, NOW)) == 2
        assert store.limited(NOW) == []


def test_a_claim_without_limits_for_its_type_reads_two_limit_rows_only_when_configured(
    path: str,
) -> None:
    """Without limits a claim is the five statements of tests/test_store.py; with a
    limited type configured, two more reads (its RUNNING count, its bucket), each an
    index search."""
    conn = connect(path)
    store = SqliteStore(conn, path, limits={9: Limit(concurrency=2, rate=5.0, burst=5)})
    store.add([_job("j1"), _job("j2", 9)])
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    assert _ids(store.claim(2, NOW)) == ["j1", "j2"]
    conn.set_trace_callback(None)
    claimed = list(dict.fromkeys(statements))
    kinds = [s.split()[0] for s in claimed]
    assert kinds == ["BEGIN", "SELECT", "SELECT", "SELECT", "SELECT", "SELECT", "UPDATE",
                     "INSERT", "COMMIT"]  # fmt: skip
    with contextlib.closing(sqlite3.connect(path)) as raw:
        for sql in claimed:
            if sql.startswith("SELECT"):
                plan = [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}")]
                assert not any(step.startswith("SCAN jobs") for step in plan), (sql, plan)
    store.close()


# -- expiry --------------------------------------------------------------------------------


def test_an_expired_job_is_never_claimed_and_expire_cancels_it(path: str) -> None:
    """A job whose expiry passed is skipped by the claim; expire() makes it CANCELLED
    with the error "expired", and only jobs never started."""
    with _opened(path, {}) as store:
        store.add(
            [
                _job("old", 1, NOW, expires=NOW + 5),
                _job("fresh", 1, NOW + 1, expires=NOW + 60),
                _job("later", 1, NOW + 2, due=NOW + 30, expires=NOW + 40),
                _job("retried", 1, NOW + 3, attempts=1, expires=NOW + 5),
                _job("plain", 1, NOW + 4),
            ]
        )
        assert store.next_expiry() == NOW + 5
        assert _ids(store.claim(1, NOW + 6)) == ["fresh"]
        assert _ids(store.claim(1, NOW + 6)) == ["retried"]  # started before: runs
        expired = store.expire(NOW + 6)
        assert [(r.id, r.state) for r in expired] == [("old", State.QUEUED)]
        old = store.get("old")
        assert old is not None
        assert (old.state, old.error, old.finished) == (State.CANCELLED, "expired", NOW + 6)
        assert store.next_expiry() == NOW + 40
        assert [r.id for r in store.expire(NOW + 40)] == ["later"]  # scheduled too
        assert store.next_expiry() is None
        assert _ids(store.claim(5, NOW + 41)) == ["plain"]


def test_retry_of_an_expired_job_runs_it_without_an_expiry(path: str) -> None:
    """``ipcctl retry`` of an expired job queues it with no expiry: the operator asked."""
    with _opened(path, {}) as store:
        store.add([_job("a", 1, NOW, expires=NOW + 1)])
        store.expire(NOW + 2)
        record = store.retry("a", NOW + 3)
        assert record is not None
        assert (record.state, record.expires) == (State.QUEUED, None)
        assert _ids(store.claim(1, NOW + 100)) == ["a"]


def test_expiry_queries_read_the_partial_index(path: str) -> None:
    """next_expiry and expire search jobs_expires, never the table (the probe of the
    dependents of what expired reads waits' primary key)."""
    conn = connect(path)
    store = SqliteStore(conn, path)
    store.add([_job(f"j{i}", 1, NOW + i, expires=NOW + i if i % 3 else None) for i in range(30)])
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    store.next_expiry()
    store.expire(NOW + 10)
    conn.set_trace_callback(None)
    with contextlib.closing(sqlite3.connect(path)) as raw:
        plans = [
            [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}")]
            for sql in dict.fromkeys(statements)
            if sql.startswith("SELECT") and "FROM waits" not in sql
        ]
    assert plans and all(any("jobs_expires" in step for step in plan) for plan in plans)
    store.close()
