"""The master's recovery of jobs held by dead workers (ipcd.daemon.recovery), in-process.

Recovery gets its collaborators through its constructor, so its decisions are tested
here with hand-written fakes of ipcd's own seams (the outcomes, the result store, the
in-flight table, the queue, the stats recorder, the logger) and never of the kernel.
The end-to-end paths (a worker SIGKILLed holding a job, a daemon killed with jobs in
flight) stay in tests/faults/.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import pytest

from ipcd.config import JobsConfig
from ipcd.daemon.log import Logger
from ipcd.daemon.outcomes import Outcomes
from ipcd.daemon.recovery import DAEMON_KILLED, Recovery
from ipcd.handlers.registry import Registration, Registry
from ipcd.kernel.queues import Queue
from ipcd.layout.results import Kind, Result, Status
from ipcd.tables import stats
from ipcd.tables.inflight import Held, InflightTable, State
from ipcd.tables.results import ResultStore
from ipcd.tables.stats import Recorder
from ipcd.wire import protocol

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
        self.calls.append(("reject", "", fields))


class FakeStore:
    def __init__(self, stored: dict[str, Result] | None = None) -> None:
        self.stored = stored or {}

    def get(self, job_id: str) -> Result | None:
        return self.stored.get(job_id)


class FakeTable:
    """The in-flight table's parking: free parked slots, or none (``room=False``)."""

    text_size = 8192

    def __init__(self, *, room: bool = True) -> None:
        self.room = room
        self.parked: list[tuple[str, int, float]] = []
        self.kept_in_slot: list[tuple[int, str, int]] = []

    def park(self, type_: int, body: bytes, job_id: str, attempt: int, due: float) -> bool:
        if self.room:
            self.parked.append((job_id, attempt, due))
        return self.room

    def park_in(
        self, slot: int, type_: int, body: bytes, job_id: str, attempt: int, due: float
    ) -> None:
        self.kept_in_slot.append((slot, job_id, attempt))


class FakeQueue:
    def __init__(self, *, full: bool = True) -> None:
        self.full = full
        self.sent: list[bytes] = []

    def send_nowait(self, body: bytes, type_: int) -> bool:
        if not self.full:
            self.sent.append(body)
        return not self.full


class FakeRecorder:
    def __init__(self) -> None:
        self.bumped: list[int] = []

    def bump(self, counter: int) -> None:
        self.bumped.append(counter)


class FakeLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))

    def error(self, event: str, **fields: Any) -> None:
        self.events.append(("error", event, fields))


class Fixture:
    """A Recovery wired to fakes, with a handler of type TYPE: 3 attempts, 10 s base delay."""

    def __init__(
        self,
        *,
        stored: dict[str, Result] | None = None,
        room: bool = True,
        queue_full: bool = True,
    ) -> None:
        self.outcomes = FakeOutcomes()
        self.table = FakeTable(room=room)
        self.queue = FakeQueue(full=queue_full)
        self.stats = FakeRecorder()
        self.log = FakeLog()
        registration = Registration(
            "slow", TYPE, "x:y", lambda job: None, max_attempts=3, retry_delay=10.0
        )
        self.recovery = Recovery(
            outcomes=cast(Outcomes, self.outcomes),
            store=cast(ResultStore, FakeStore(stored)),
            table=cast(InflightTable, self.table),
            queue=cast(Queue, self.queue),
            registry=Registry({TYPE: registration}),
            jobs=JobsConfig(),
            stats=cast(Recorder, self.stats),
            log=cast(Logger, self.log),
        )


def _held(job_id: str = "job1", *, attempt: int = 1, started: float = 0.0) -> Held:
    body = protocol.encode(b"data", job_id=job_id, attempt=attempt)
    return Held(3, State.RUNNING, 4242, TYPE, body, attempt, job_id, started, 0.0)


def test_a_job_with_attempts_left_is_parked_for_the_next_with_back_off() -> None:
    """A worker's death on attempt 1 of 3 parks the job as attempt 2, due after the
    handler's retry delay, and counts it recovered and requeued."""
    f = Fixture()
    before = time.time()
    f.recovery.recover(_held(attempt=1), cause="killed by SIGKILL", timed_out=False)
    ((job_id, attempt, due),) = f.table.parked
    assert (job_id, attempt) == ("job1", 2)
    assert before + 10.0 <= due <= time.time() + 10.0
    assert f.outcomes.calls == []
    assert f.stats.bumped == [stats.JOBS_RECOVERED, stats.JOBS_REQUEUED]
    assert [(level, event) for level, event, _ in f.log.events] == [("warning", "job.requeued")]


def test_a_job_cut_off_by_the_daemons_death_runs_again_at_once() -> None:
    """A job found at start in a killed daemon's slot is not the job's fault: no delay."""
    f = Fixture()
    before = time.time()
    f.recovery.recover(_held(attempt=2), cause=DAEMON_KILLED, timed_out=False)
    ((_, attempt, due),) = f.table.parked
    assert attempt == 3
    assert before <= due <= time.time()


def test_a_job_on_its_last_attempt_fails_naming_the_cause() -> None:
    """A worker's death on attempt 3 of 3 ends the job with an error, not another run."""
    f = Fixture()
    f.recovery.recover(_held(attempt=3), cause="killed by SIGSEGV", timed_out=False)
    assert [call[:2] for call in f.outcomes.calls] == [("finish", "job1")]
    result = f.outcomes.results["job1"]
    assert result.status is Status.ERROR
    assert result.data == b"worker died (killed by SIGSEGV) on attempt 3 of 3"
    assert f.table.parked == []


def test_a_job_killed_at_its_timeout_fails_at_once() -> None:
    """A job past its deadline is finished as killed with the cause, attempts or not."""
    f = Fixture()
    f.recovery.recover(_held(attempt=1), cause="timed out after 5s", timed_out=True)
    ((what, job_id, fields),) = f.outcomes.calls
    assert (what, job_id, fields["killed"]) == ("finish", "job1", True)
    assert f.outcomes.results["job1"].data == b"timed out after 5s"
    assert f.table.parked == []


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
    assert f.table.parked == []


def test_an_older_stored_result_of_the_same_id_does_not_count() -> None:
    """A result stored before this attempt started is an earlier run's: the job reruns."""
    started = time.time()
    old = Result("job1", TYPE, Status.ERROR, Kind.TEXT, b"old", 1, started - 9, started - 5)
    f = Fixture(stored={"job1": old})
    f.recovery.recover(_held(attempt=1, started=started), cause="killed", timed_out=False)
    assert f.outcomes.calls == []
    assert [p[:2] for p in f.table.parked] == [("job1", 2)]


def test_with_parking_and_queue_full_the_job_stays_in_its_slot() -> None:
    """No parked slot free and the queue full: the job is parked in the dead worker's
    own slot, never dropped."""
    f = Fixture(room=False, queue_full=True)
    f.recovery.recover(_held(attempt=1), cause=DAEMON_KILLED, timed_out=False)
    assert f.table.kept_in_slot == [(3, "job1", 2)]
    assert f.outcomes.calls == []


def test_an_unreadable_message_in_a_slot_is_rejected() -> None:
    """A slot holding an envelope that fails validation is rejected, as recovered."""
    f = Fixture()
    doc = json.loads(_held().body)
    doc["attempt"] = 0  # out of range
    held = _held()._replace(body=json.dumps(doc).encode())
    f.recovery.recover(held, cause="killed", timed_out=False)
    assert [(what, fields) for what, _, fields in f.outcomes.calls] == [
        ("reject", {"recovered": True})
    ]


def test_a_job_kept_at_stop_runs_again_with_the_same_attempt() -> None:
    """Shutdown is no failure: a job cut off at stop keeps its attempt number."""
    f = Fixture()
    f.recovery.keep_for_next_start(_held(attempt=2), "killed at stop after graceful_timeout")
    assert [p[:2] for p in f.table.parked] == [("job1", 2)]


def test_a_failure_to_recover_one_job_never_reaches_the_master() -> None:
    """An error while recovering is logged as job.recovery_failed and goes no further."""
    f = Fixture()

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("store gone")

    f.outcomes.finish = broken  # type: ignore[method-assign]
    f.recovery.recover(_held(attempt=3), cause="killed", timed_out=False)
    assert [(level, event) for level, event, _ in f.log.events] == [
        ("error", "job.recovery_failed")
    ]


@pytest.mark.parametrize("attempt", [1, 2])
def test_the_back_off_doubles_with_each_attempt(attempt: int) -> None:
    """The delay before attempt n + 1 is the base delay times 2 ** (n - 1)."""
    f = Fixture()
    before = time.time()
    f.recovery.recover(_held(attempt=attempt), cause="killed", timed_out=False)
    ((_, _, due),) = f.table.parked
    expected = 10.0 * 2 ** (attempt - 1)
    assert before + expected <= due <= time.time() + expected
