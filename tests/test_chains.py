"""The store's decisions about jobs that follow jobs (ipcd.store.chains), in-process on real
SQLite files, with the clock given to every call: dependencies (``after``) held, released
and cancelled in the transaction that records the outcome, and completion hooks queued in
it.  The daemon's side (ipcctl, the intake, workers) is tests/test_chains_daemon.py's.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import Any

import test_store

from ipcd.store import Hook, Hooks, JobStore, NewJob, Outcome, Retention, State, open_store
from ipcd.store.chains import HELD
from ipcd.wire import protocol

NOW = 1_700_000_000.0


def _job(job_id: str, *after: str, **fields: Any) -> NewJob:
    body = protocol.encode(job_id, job_id=job_id)
    job = NewJob(job_id, 1, "step", body, False, NOW, len(body), job_id, after=after)
    return job._replace(**fields)


# The store's fixtures: a file of the test's own, and the store opened on it.
path, store = test_store.path, test_store.store


def _state(store: JobStore, job_id: str) -> tuple[State, str | None]:
    record = store.get(job_id)
    assert record is not None
    return record.state, record.error


def _run(store: JobStore, job_id: str, *, ok: bool, now: float = NOW + 1) -> None:
    """Claim ``job_id`` (it must be the first queued) and record its outcome."""
    [(record, _)] = store.claim(1, now)
    assert record.id == job_id
    store.finish(
        job_id, ok=ok, finished=now + 1, result_kind=1, data=b"r", error=None if ok else "boom"
    )


def test_a_job_waits_until_every_dependency_is_done_then_is_queued(store: JobStore) -> None:
    """Held while any job it names is not done, not claimable, and queued in the very
    transaction that records the last one's success, counted for the doorbell."""
    store.add([_job("a"), _job("b")])
    [admitted] = store.admit([_job("c", "a", "b")]).jobs
    assert admitted == (admitted.id, State.SCHEDULED, None)
    held = store.get("c")
    assert held is not None and held.due == HELD and held.after == ("a", "b")
    assert store.waits(["a", "c"]) == {"c": ["a", "b"]}
    assert store.next_due() is None  # a held job has no due time to wake for
    assert store.promote_due(NOW + 10**9) == 0
    _run(store, "a", ok=True)
    assert store.get("c").state is State.SCHEDULED  # type: ignore[union-attr]
    assert store.waits(["c"]) == {"c": ["b"]}
    assert store.take_chained().queued == 0
    [(record, _)] = store.claim(5, NOW + 3)
    assert record.id == "b"  # c is not claimable while it waits
    store.finish("b", ok=True, finished=NOW + 4, result_kind=1, data=b"", error=None)
    assert _state(store, "c") == (State.QUEUED, None)
    assert store.get("c").due == 0  # type: ignore[union-attr]
    assert store.waits(["c"]) == {}
    assert store.take_chained().queued == 1
    assert store.take_chained().queued == 0  # taken once


def test_a_released_job_is_claimed_in_the_same_exchange_that_records_its_dependency(
    store: JobStore,
) -> None:
    """A worker's exchange records the outcome, releases the dependent and claims it, in
    one transaction."""
    store.add([_job("a"), _job("b", "a")])
    store.claim(1, NOW)
    got = store.exchange([Outcome("a", True, NOW + 1, 1, b"", None)], 5, NOW + 2)
    assert [record.id for record, _ in got] == ["b"]


def test_a_delayed_dependent_is_scheduled_for_its_own_due_time_once_released(
    store: JobStore,
) -> None:
    """``--delay`` and ``--after`` together: released before its due time, it waits for it."""
    store.add([_job("a"), _job("b", "a", due=NOW + 100)])
    _run(store, "a", ok=True)
    record = store.get("b")
    assert record is not None and (record.state, record.due) == (State.SCHEDULED, NOW + 100)
    assert store.take_chained().scheduled == 1
    assert store.next_due() == NOW + 100


def test_a_failure_cancels_its_dependents_and_theirs_with_the_reason(store: JobStore) -> None:
    """extract → transform → load: transform fails for good, so load (which waits for it)
    and report (which waits for load) are cancelled in that transaction, each saying why;
    extract's other dependent is untouched."""
    store.add([_job("extract"), _job("transform", "extract"), _job("load", "transform")])
    store.add([_job("report", "load"), _job("other", "extract")])
    _run(store, "extract", ok=True)
    assert {r.id for r, _ in store.claim(5, NOW + 3)} == {"transform", "other"}
    assert store.take_chained().queued == 2
    store.finish("transform", ok=False, finished=NOW + 4, result_kind=1, data=b"", error="bad")
    assert _state(store, "load") == (State.CANCELLED, "dependency transform failed")
    assert _state(store, "report") == (State.CANCELLED, "dependency load was cancelled")
    assert _state(store, "other") == (State.RUNNING, None)
    chained = store.take_chained()
    assert [r.id for r in chained.cancelled] == ["load", "report"]
    assert all(r.state is State.CANCELLED and r.finished == NOW + 4 for r in chained.cancelled)
    assert store.waits(["load", "report"]) == {}
    load = store.get("load")
    assert load is not None and load.due == 0  # its held due time is not shown


def test_a_retry_is_no_failure_for_good(store: JobStore) -> None:
    """A job sent back for another attempt (requeue) keeps its dependents waiting."""
    store.add([_job("a"), _job("b", "a")])
    store.claim(1, NOW)
    store.requeue("a", due=NOW + 60)
    assert store.get("b").state is State.SCHEDULED  # type: ignore[union-attr]
    assert store.waits(["b"]) == {"b": ["a"]}


def test_an_operator_cancel_cascades_to_dependents_and_frees_a_cancelled_holds_rows(
    store: JobStore,
) -> None:
    """Cancelling a waiting job cancels the jobs held for it; cancelling a held job
    removes what it waited for, and a job it waited for then ends with no effect on it."""
    store.add([_job("a"), _job("b", "a"), _job("c", "b"), _job("d", "a")])
    cancelled = store.cancel(["b"], now=NOW + 5)
    assert [r.id for r in cancelled] == ["b"]
    assert _state(store, "c") == (State.CANCELLED, "dependency b was cancelled")
    assert [r.id for r in store.take_chained().cancelled] == ["c"]
    assert store.waits(["b", "c", "d"]) == {"d": ["a"]}
    store.cancel(["a"], now=NOW + 6)
    assert _state(store, "d") == (State.CANCELLED, "dependency a was cancelled")


def test_an_expired_job_cancels_its_dependents_and_a_held_one_expires_whole(
    store: JobStore,
) -> None:
    """Expiry cancels as an operator's cancel does: the jobs waiting for the expired one
    are cancelled with the reason in the same transaction (counted for the master to
    tell their waiters), and a held job that expires gets its own due time back and
    waits for nothing more."""
    store.add([_job("a"), _job("x", expires=NOW + 5), _job("b", "a", expires=NOW + 5)])
    store.add([_job("y", "x"), _job("c", "b")])
    assert store.take_chained().cancelled == ()
    assert [r.id for r in store.expire(NOW + 6)] == ["b", "x"]  # by expiry, then id
    assert _state(store, "x") == (State.CANCELLED, "expired")
    assert _state(store, "b") == (State.CANCELLED, "expired")
    assert store.get("b").due == 0  # type: ignore[union-attr]
    assert _state(store, "y") == (State.CANCELLED, "dependency x was cancelled")
    assert _state(store, "c") == (State.CANCELLED, "dependency b was cancelled")
    assert sorted(r.id for r in store.take_chained().cancelled) == ["c", "y"]
    assert store.waits(["b", "c", "y"]) == {}


def test_a_job_naming_a_finished_job_is_decided_at_once(store: JobStore) -> None:
    """After done jobs: queued. After a failed or cancelled one: cancelled at once. After
    an unknown id (never stored, or deleted by retention): failed, a usage error. Each
    with its reason, and nothing left waiting."""
    store.add([_job("ok"), _job("bad", accepted=NOW + 0.1), _job("gone", accepted=NOW + 0.2)])
    _run(store, "ok", ok=True)
    _run(store, "bad", ok=False, now=NOW + 3)
    store.cancel(["gone"], now=NOW + 5)
    store.take_chained()
    admitted = store.admit(
        [_job("x", "ok"), _job("y", "ok", "bad"), _job("z", "gone"), _job("w", "ok", "nope")]
    ).jobs
    assert [(a.id, a.state, a.error) for a in admitted] == [
        ("x", State.QUEUED, None),
        ("y", State.CANCELLED, "dependency bad failed"),
        ("z", State.CANCELLED, "dependency gone was cancelled"),
        ("w", State.FAILED, "unknown dependency nope: no such job in the job store"),
    ]
    for job_id in ("y", "z", "w"):
        record = store.get(job_id)
        assert record is not None and record.finished == NOW
    assert store.waits(["x", "y", "z", "w"]) == {}
    # Queued at submit is the intake's to ring for, not a chained release.
    assert store.take_chained() == (0, 0, ())


def test_a_job_of_the_same_batch_may_name_an_earlier_one_never_a_later_one(
    store: JobStore,
) -> None:
    """Jobs are decided in the order given: a later job of a batch waits for an earlier
    one, an earlier one cannot name a later one (unknown), so no cycle can be made."""
    admitted = store.admit([_job("p", "q"), _job("q"), _job("r", "q")]).jobs
    assert [a.state for a in admitted] == [State.FAILED, State.QUEUED, State.SCHEDULED]


def test_retention_never_deletes_a_job_a_held_job_waits_for(store: JobStore) -> None:
    """A held job's dependencies are never final (their rows go the moment they end), so
    retention at keep 0 deletes the done ones around it and the dependent is still
    decided correctly: released when its running dependency succeeds, even after that
    dependency is itself deleted at once."""
    store.add([_job("old"), _job("a", accepted=NOW + 0.1)])
    _run(store, "old", ok=True)
    [(record, _)] = store.claim(1, NOW + 3)
    assert record.id == "a"
    store.add([_job("b", "a")])
    nothing = Retention(0, 0, 0, 0)
    assert store.retain(nothing, NOW + 10) == 1  # "old" only
    assert store.get("a") is not None and store.waits(["b"]) == {"b": ["a"]}
    store.finish("a", ok=True, finished=NOW + 11, result_kind=1, data=b"", error=None)
    assert store.retain(nothing, NOW + 12) == 1  # "a" goes, b was released before
    assert _state(store, "b") == (State.QUEUED, None)
    # A job naming the deleted one learns it is unknown.
    [late] = store.admit([_job("c", "a")]).jobs
    assert late.state is State.FAILED and late.error is not None and "unknown" in late.error


def test_a_retried_dependent_runs_without_waiting_again(store: JobStore) -> None:
    """``retry`` of a job cancelled for its dependency queues it: the operator decided."""
    store.add([_job("a"), _job("b", "a")])
    _run(store, "a", ok=False)
    retried = store.retry("b", NOW + 9)
    assert retried is not None and retried.state is State.QUEUED and retried.due == 0


def test_the_dependencies_survive_a_reopen(path: str) -> None:
    """Held jobs and what they wait for are in the file: another connection (a restarted
    daemon) releases them."""
    first = open_store(path)
    first.add([_job("a"), _job("b", "a")])
    first.claim(1, NOW)
    first.close()
    second = open_store(path)
    try:
        assert second.reset_running()[0].id == "a"
        _run(second, "a", ok=True)
        assert _state(second, "b") == (State.QUEUED, None)
    finally:
        second.close()


HOOKS = {"step": Hooks(on_success=Hook("done-hook", 7), on_failure=Hook("notify", 9))}


def _hooked(path: str) -> JobStore:
    return open_store(path, hooks=HOOKS)


def test_a_failure_for_good_queues_its_on_failure_job_with_the_outcome(path: str) -> None:
    """In the outcome's transaction: one job of the hook's handler and type, whose
    envelope's payload is the outcome; claimable at once and counted for the doorbell."""
    store = _hooked(path)
    try:
        store.add([_job("a")])
        store.claim(1, NOW + 1)
        store.finish("a", ok=False, finished=NOW + 3.5, result_kind=1, data=b"", error="boom")
        assert store.take_chained().queued == 1
        [(hook, body)] = store.claim(5, NOW + 4)
        assert (hook.handler, hook.type, hook.state) == ("notify", 9, State.RUNNING)
        job = protocol.decode(body or b"", hook.type)
        assert job.payload == {
            "id": "a",
            "handler": "step",
            "type": 1,
            "state": "failed",
            "attempts": 1,
            "error": "boom",
            "duration": 2.5,
            "result_size": 0,
            "finished": NOW + 3.5,
        }
        assert hook.preview.startswith('{"id":"a"')
    finally:
        store.close()


def test_hooks_set_after_opening_apply_to_the_next_outcomes(path: str) -> None:
    """A reload gives the master's open store the new hooks (set_hooks): the outcome it
    records next (a dead worker's job) queues the new follow-up, and none once removed."""
    store = open_store(path)
    try:
        store.add([_job("a"), _job("b"), _job("c")])
        store.claim(3, NOW + 1)
        store.finish("a", ok=False, finished=NOW + 2, result_kind=1, data=b"", error="x")
        assert store.take_chained().queued == 0
        store.set_hooks(HOOKS)
        store.finish("b", ok=False, finished=NOW + 2, result_kind=1, data=b"", error="x")
        assert store.take_chained().queued == 1
        store.set_hooks({})
        store.finish("c", ok=False, finished=NOW + 2, result_kind=1, data=b"", error="x")
        assert store.take_chained().queued == 0
    finally:
        store.close()


def test_success_queues_on_success_and_cancel_or_a_retry_queues_nothing(path: str) -> None:
    """on_success follows a job done; a job sent back for another attempt, or cancelled
    (by an operator or for its dependency), has no follow-up; nor has a job of a handler
    without hooks."""
    store = _hooked(path)
    try:
        store.add([_job("a"), _job("b", "a"), _job("c"), _job("other", handler="plain")])
        batch = store.claim(1, NOW + 1)
        store.requeue("a", due=0)
        assert store.take_chained().queued == 0
        batch = store.claim(1, NOW + 2)
        assert batch[0][0].id == "a"
        store.finish("a", ok=True, finished=NOW + 3, result_kind=1, data=b"xyz", error=None)
        assert store.take_chained().queued == 2  # b released, and a's hook
        store.cancel(["b", "c"], now=NOW + 4)
        [(other, _)] = store.claim(1, NOW + 5)
        store.finish(other.id, ok=True, finished=NOW + 6, result_kind=1, data=b"", error=None)
        hooks = store.list(types=[7]) + store.list(types=[9])
        assert [h.handler for h in hooks] == ["done-hook"]
        payload = protocol.decode(store.body(hooks[0].id) or b"", 7).payload
        assert isinstance(payload, dict) and payload["id"] == "a"
        assert (payload["state"], payload["result_size"], payload["attempts"]) == ("done", 3, 2)
    finally:
        store.close()


def test_exchange_queues_hooks_and_settles_dependents_before_it_claims(path: str) -> None:
    """A worker's exchange of a failed job: its hook job and its dependent's cancel are in
    the transaction, and the hook job is what the same exchange claims."""
    store = _hooked(path)
    try:
        store.add([_job("a"), _job("b", "a")])
        store.claim(1, NOW)
        got = store.exchange([Outcome("a", False, NOW + 1, 1, b"", "no")], 5, NOW + 2)
        assert [(r.handler, r.type) for r, _ in got] == [("notify", 9)]
        assert _state(store, "b") == (State.CANCELLED, "dependency a failed")
    finally:
        store.close()


def test_waits_rows_go_with_their_job(path: str, store: JobStore) -> None:
    """The waits table holds nothing once the jobs it held are decided, so nothing in it
    can keep a job from being purged."""
    store.add([_job("a"), _job("b", "a"), _job("c", "a")])
    _run(store, "a", ok=True)
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("SELECT COUNT(*) FROM waits").fetchone() == (0,)
    assert store.check() == []
