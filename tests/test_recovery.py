"""The master's recovery of jobs held by dead workers (ipcd.daemon.recovery), in-process.

Recovery gets its collaborators through its constructor, so its decisions are tested
here with hand-written fakes of ipcd's own seams (the outcomes, the result store, the
job store, the stats recorder, the logger) and never of the kernel.  A dead worker's
slot holds the hand-off message it claimed (ipcd.wire.handoff): the job's id and attempt
in the store, then the client's message or, for a large one, a reference to the store.
The end-to-end paths (a worker SIGKILLed holding a job, a daemon killed with jobs in
flight) stay in tests/faults/.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import pytest
from fakes import FakeJobStore, FakeLog, new_job

from ipcd.config import JobsConfig
from ipcd.daemon.log import Logger
from ipcd.daemon.outcomes import Outcomes
from ipcd.daemon.recovery import CANCELLED, DAEMON_KILLED, Recovery
from ipcd.errors import StoreFullError
from ipcd.handlers.registry import Registration, Registry
from ipcd.layout.results import Kind, Result, Status
from ipcd.store import JobRecord, JobStore
from ipcd.store import State as JobState
from ipcd.tables import stats
from ipcd.tables.inflight import Held, State
from ipcd.tables.results import ResultStore
from ipcd.tables.stats import Recorder
from ipcd.wire import handoff, protocol

TYPE = 7


class FakeOutcomes:
    """Records how each job ended instead of storing, listing and logging it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.results: dict[str, Result] = {}

    def finish(self, job: protocol.Job, result: Result, **fields: Any) -> None:
        self.calls.append(("finish", job.id, fields))
        self.results[job.id] = result

    def conclude(self, job: protocol.Job, result: Result, **fields: Any) -> None:
        self.calls.append(("conclude", job.id, fields))

    def announce(self, job: protocol.Job, result: Result, **fields: Any) -> None:
        self.calls.append(("announce", job.id, fields))

    def reject(self, exc: Exception, body: bytes, type_: int, **fields: Any) -> None:
        self.calls.append(("reject", str(exc), fields))

    def record(self, job_id: str, result: Result) -> bool:
        self.calls.append(("record", job_id, {}))
        self.results[job_id] = result
        return True


class FakeStore:
    """The result ring, of which recovery only asks for a stored result."""

    def __init__(self, stored: dict[str, Result] | None = None) -> None:
        self.stored = stored or {}

    def get(self, job_id: str) -> Result | None:
        return self.stored.get(job_id)


class FakeRecorder:
    def __init__(self) -> None:
        self.bumped: list[int] = []

    def bump(self, counter: int) -> None:
        self.bumped.append(counter)


class Fixture:
    """A Recovery wired to fakes, with a handler of type TYPE: 3 attempts, 10 s base delay.
    The job store holds job1, running, as the dead worker claimed it."""

    def __init__(self, *, stored: dict[str, Result] | None = None, attempt: int = 1) -> None:
        self.outcomes = FakeOutcomes()
        self.jobs = FakeJobStore()
        self.jobs.put(new_job("job1", TYPE, _message(), attempts=attempt), state=JobState.RUNNING)
        self.stats = FakeRecorder()
        self.log = FakeLog()
        registration = Registration(
            "slow", TYPE, "x:y", lambda job: None, max_attempts=3, retry_delay=10.0
        )
        self.recovery = Recovery(
            outcomes=cast(Outcomes, self.outcomes),
            store=cast(ResultStore, FakeStore(stored)),
            jobs=cast(JobStore, self.jobs),
            registry=Registry({TYPE: registration}),
            config=JobsConfig(),
            stats=cast(Recorder, self.stats),
            log=cast(Logger, self.log),
        )


def _message(job_id: str = "job1", payload: bytes = b"data", **fields: Any) -> bytes:
    """The client's message, as the store holds it."""
    return protocol.encode(payload, job_id=job_id, **fields)


def _held(
    job_id: str = "job1", *, attempt: int = 1, started: float = 0.0, message: bytes | None = None,
    limit: int = 8192,
) -> Held:  # fmt: skip
    """A dead worker's slot: the hand-off message of ``job_id`` on ``attempt``."""
    body = handoff.encode(job_id, attempt, message or _message(job_id), limit)
    return Held(3, State.RUNNING, 4242, TYPE, body, attempt, job_id, started, 0.0)


def _requeued(f: Fixture) -> tuple[str, float, int | None]:
    """The one requeue call recovery made."""
    (call,) = f.jobs.requeued
    return call


def test_a_job_with_attempts_left_goes_back_to_the_store_with_back_off() -> None:
    """A worker's death on attempt 1 of 3 puts the job back in the store, due after the
    handler's retry delay (its attempt count left for the next claim to raise), and
    counts it recovered and requeued."""
    f = Fixture()
    before = time.time()
    f.recovery.recover(_held(attempt=1), cause="killed by SIGKILL", timed_out=False)
    job_id, due, attempts = _requeued(f)
    assert (job_id, attempts) == ("job1", None)
    assert before + 10.0 <= due <= time.time() + 10.0
    assert f.jobs.state("job1") is JobState.SCHEDULED
    assert f.outcomes.calls == []
    assert f.stats.bumped == [stats.JOBS_RECOVERED, stats.JOBS_REQUEUED]
    ((level, event, fields),) = f.log.events
    assert (level, event, fields["attempt"], fields["cause"]) == (
        "warning", "job.requeued", 2, "killed by SIGKILL"
    )  # fmt: skip


def test_a_job_cut_off_by_the_daemons_death_runs_again_at_once() -> None:
    """A job found at start in a killed daemon's slot is not the job's fault: no delay."""
    f = Fixture(attempt=2)
    before = time.time()
    f.recovery.recover(_held(attempt=2), cause=DAEMON_KILLED, timed_out=False)
    _, due, attempts = _requeued(f)
    assert attempts is None
    assert before <= due <= time.time()
    assert f.jobs.state("job1") is JobState.QUEUED


def test_a_job_on_its_last_attempt_fails_naming_the_cause() -> None:
    """A worker's death on attempt 3 of 3 ends the job with an error, not another run."""
    f = Fixture(attempt=3)
    f.recovery.recover(_held(attempt=3), cause="killed by SIGSEGV", timed_out=False)
    assert [call[:2] for call in f.outcomes.calls] == [("finish", "job1")]
    result = f.outcomes.results["job1"]
    assert result.status is Status.ERROR
    assert result.data == b"worker died (killed by SIGSEGV) on attempt 3 of 3"
    assert f.jobs.requeued == []


def test_a_job_killed_at_its_timeout_fails_at_once() -> None:
    """A job past its deadline is finished as killed with the cause, attempts or not."""
    f = Fixture()
    f.recovery.recover(_held(attempt=1), cause="timed out after 5s", timed_out=True)
    ((what, job_id, fields),) = f.outcomes.calls
    assert (what, job_id, fields["killed"]) == ("finish", "job1", True)
    assert f.outcomes.results["job1"].data == b"timed out after 5s"
    assert f.jobs.requeued == []


def test_a_job_the_store_says_cancelled_ends_cancelled_and_is_not_retried() -> None:
    """An operator cancelled the job (``ipcctl cancel --kill``) and its worker died of
    it: the job ends with the cancellation as its error, kept off the failed list, and
    does not run again, attempts left or not."""
    f = Fixture()
    f.jobs.records["job1"] = f.jobs.records["job1"]._replace(state=JobState.CANCELLED)
    f.recovery.recover(_held(attempt=1), cause="killed by SIGTERM", timed_out=False)
    ((what, job_id, fields),) = f.outcomes.calls
    assert (what, job_id) == ("finish", "job1")
    assert {k: fields[k] for k in ("listed", "killed", "cancelled")} == {
        "listed": False, "killed": True, "cancelled": True
    }  # fmt: skip
    assert f.outcomes.results["job1"].data == CANCELLED.encode()
    assert f.jobs.requeued == []
    assert f.jobs.state("job1") is JobState.CANCELLED


def test_a_job_handed_over_by_reference_is_read_from_the_store() -> None:
    """A slot holding a hand-off by reference (the message too large to go with it):
    recovery reads the client's message from the store, and ends the job with it."""
    f = Fixture(attempt=3)
    held = _held(attempt=3, limit=40)
    assert handoff.decode(held.body).body is None
    f.recovery.recover(held, cause="killed by SIGKILL", timed_out=False)
    ((what, job_id, fields),) = f.outcomes.calls
    assert (what, job_id, fields["body"]) == ("finish", "job1", f.jobs.bodies["job1"])


def test_a_job_by_reference_whose_message_the_store_lost_is_rejected() -> None:
    """A by-reference hand-off naming a job whose message the store no longer has
    (purged under it) is rejected, saying so; nothing is requeued."""
    f = Fixture()
    del f.jobs.bodies["job1"]
    f.recovery.recover(_held(limit=40), cause="killed by SIGKILL", timed_out=False)
    assert [(what, why) for what, why, _ in f.outcomes.calls] == [
        ("reject", "job job1: its message is no longer in the store")
    ]
    assert f.jobs.requeued == []


def _running(f: Fixture, started: float, attempts: int = 1) -> JobRecord:
    record = f.jobs.records["job1"]._replace(started=started, attempts=attempts)
    f.jobs.records["job1"] = record
    return record


def test_an_outcome_in_the_ring_not_yet_in_the_store_is_recorded_from_it() -> None:
    """A job the store says is running whose result of this attempt, stored after its
    claim, is in the ring: its worker ran it and died before its ledger recorded the
    outcome.  The ring's result is recorded and said (job.recorded): no second run."""
    claimed = time.time() - 2
    ring = Result("job1", TYPE, Status.OK, Kind.BYTES, b"done", 2, claimed, claimed + 1)
    f = Fixture(stored={"job1": ring})
    assert f.recovery.recorded_from_ring(_running(f, claimed, attempts=2))
    assert f.outcomes.calls == [("record", "job1", {})] and f.outcomes.results["job1"] == ring
    assert [event for _, event, _ in f.log.events] == ["job.recorded"]


@pytest.mark.parametrize("which", ["none", "earlier attempt", "before the claim"])
def test_a_result_in_the_ring_of_another_run_is_not_this_ones_outcome(which: str) -> None:
    """No result, one of an earlier attempt, or one stored before this claim: the job
    did not finish this run, and nothing is recorded."""
    claimed = time.time() - 2
    stored = {
        "none": None,
        "earlier attempt": Result("job1", TYPE, Status.OK, Kind.BYTES, b"", 1, 0, claimed + 1),
        "before the claim": Result("job1", TYPE, Status.OK, Kind.BYTES, b"", 2, 0, claimed - 1),
    }[which]
    f = Fixture(stored={"job1": stored} if stored else None)
    assert not f.recovery.recorded_from_ring(_running(f, claimed, attempts=2))
    assert f.outcomes.calls == []


def test_an_outcome_stored_before_the_death_is_concluded_not_rerun() -> None:
    """A worker that stored the result and died before saying so: the master finishes
    what it left and announces the stored result, and the job does not run again."""
    started = time.time() - 1
    stored = Result("job1", TYPE, Status.OK, Kind.BYTES, b"done", 1, started, started + 0.5)
    f = Fixture(stored={"job1": stored})
    f.recovery.recover(_held(started=started), cause="killed by SIGKILL", timed_out=False)
    assert [(what, fields.get("recovered")) for what, _, fields in f.outcomes.calls] == [
        ("conclude", None),
        ("announce", True),
    ]
    assert f.jobs.requeued == []


def test_an_older_stored_result_of_the_same_id_does_not_count() -> None:
    """A result stored before this attempt started is an earlier run's: the job reruns."""
    started = time.time()
    old = Result("job1", TYPE, Status.ERROR, Kind.TEXT, b"old", 1, started - 9, started - 5)
    f = Fixture(stored={"job1": old})
    f.recovery.recover(_held(attempt=1, started=started), cause="killed", timed_out=False)
    assert f.outcomes.calls == []
    assert _requeued(f)[0] == "job1"


def test_a_store_that_cannot_take_the_job_back_is_logged_not_raised() -> None:
    """The store refusing the job back (full, say) is logged as job.requeue_failed with
    the cause and goes no further: the job stays running in the store, where the next
    start finds it; it is not counted requeued."""
    f = Fixture()
    f.jobs.errors["requeue"] = [StoreFullError("jobs.db: database or disk is full")]
    f.recovery.recover(_held(attempt=1), cause="killed by SIGKILL", timed_out=False)
    ((level, event, fields),) = f.log.events
    assert (level, event, fields["job_id"], fields["cause"], fields["error"]) == (
        "error", "job.requeue_failed", "job1", "killed by SIGKILL",
        "jobs.db: database or disk is full",
    )  # fmt: skip
    assert f.stats.bumped == [stats.JOBS_RECOVERED]
    assert f.outcomes.calls == []
    assert f.jobs.state("job1") is JobState.RUNNING


@pytest.mark.parametrize("what", ["envelope", "hand-off"])
def test_an_unreadable_message_in_a_slot_is_rejected(what: str) -> None:
    """A slot holding an envelope that fails validation, or something that is no
    hand-off message at all, is rejected, as recovered; nothing is requeued."""
    f = Fixture()
    if what == "envelope":
        doc = json.loads(_message())
        doc["attempt"] = 0  # out of range
        held = _held(message=json.dumps(doc).encode())
    else:
        held = _held()._replace(body=_message())
    f.recovery.recover(held, cause="killed", timed_out=False)
    assert [(what, fields) for what, _, fields in f.outcomes.calls] == [
        ("reject", {"recovered": True})
    ]
    assert f.jobs.requeued == []


def test_a_job_kept_at_stop_runs_again_with_the_same_attempt() -> None:
    """Shutdown is no failure: a job cut off at stop goes back queued with the attempts
    it had before this one, so that its next claim counts this attempt again."""
    f = Fixture(attempt=2)
    before = time.time()
    f.recovery.keep_for_next_start(_held(attempt=2), "killed at stop after graceful_timeout")
    job_id, due, attempts = _requeued(f)
    assert (job_id, attempts) == ("job1", 1)
    assert before <= due <= time.time()
    assert f.jobs.records["job1"].attempts == 1
    (claimed, _) = f.jobs.claim(1, time.time())[0]
    assert claimed.attempts == 2


def test_a_failure_to_recover_one_job_never_reaches_the_master() -> None:
    """An error while recovering is logged as job.recovery_failed and goes no further."""
    f = Fixture(attempt=3)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("store gone")

    f.outcomes.finish = broken  # type: ignore[method-assign]
    f.recovery.recover(_held(attempt=3), cause="killed", timed_out=False)
    assert f.log.names() == [("error", "job.recovery_failed")]


@pytest.mark.parametrize("attempt", [1, 2])
def test_the_back_off_doubles_with_each_attempt(attempt: int) -> None:
    """The delay before attempt n + 1 is the base delay times 2 ** (n - 1)."""
    f = Fixture(attempt=attempt)
    before = time.time()
    f.recovery.recover(_held(attempt=attempt), cause="killed", timed_out=False)
    _, due, _ = _requeued(f)
    expected = 10.0 * 2 ** (attempt - 1)
    assert before + expected <= due <= time.time() + expected
