"""Where every job ends (ipcd.daemon.outcomes), in-process: the order of its steps.

Outcomes gets its collaborators through its constructor, so the order in which it lists,
stores, frees and notifies is tested here with hand-written fakes of ipcd's own seams
(the result store, the failed list, the reply queue, the spill table, the unique-key
table, the logger, the event log, the stats recorder) that write every step into one
journal; never with fakes of the kernel.  The same promises, kept by the real daemon
under SIGKILLs, are checked end to end in tests/faults/ and test_spill.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any, cast

from fakes import FakeJobStore, FakeLog, new_job

from ipcd.daemon.log import Events, Logger
from ipcd.daemon.outcomes import Outcomes, error_result
from ipcd.errors import IpcdError, MessageError, NotRunningError, StoreUnavailableError
from ipcd.kernel.queues import Queue
from ipcd.layout.results import Kind, Result, Spilled, Status
from ipcd.store import JobStore
from ipcd.store import State as JobState
from ipcd.tables.failed import FailedJob, FailedList
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.table import Entry
from ipcd.tables.spill.table import State as SpillState
from ipcd.tables.stats import RESULTS_LOST, STORE_ERRORS, Recorder
from ipcd.tables.unique import UniqueTable
from ipcd.wire.protocol import CONFIRMED, Job, SpillRef

TYPE = 7
REPLY_TO = 4242
#: The payload of a spilled job, and the segment of a spilled result.
PAYLOAD = SpillRef(shmid=55, size=100_000, slot=3, kind="bytes")
SPILLED = Spilled(shmid=66, entry=4, size=9000)


class FakeStore:
    """The result store: results by id; ``capacity`` bytes per result; ``broken`` makes
    every put fail as a removed segment does."""

    def __init__(
        self, journal: list[str], spills: FakeSpills | None, *, capacity: int, broken: bool
    ) -> None:
        self.journal = journal
        self.spills = spills
        self.room = capacity
        self.broken = broken
        self.stored: dict[str, Result] = {}
        #: Headers this process mended, as (records kept, records lost), not yet taken.
        self.mends: list[tuple[int, int]] = []

    def capacity(self) -> int | None:
        return self.room

    def take_mends(self) -> list[tuple[int, int]]:
        taken, self.mends = self.mends, []
        return taken

    def put(self, result: Result) -> None:
        if self.broken:
            raise IpcdError("result segment removed")
        self.journal.append(f"store {result.job_id} {result.status.name}")
        self.stored[result.job_id] = result


class FakeFailedStore:
    """The failed list's own ring, of which Outcomes only asks what was mended."""

    def __init__(self) -> None:
        self.mends: list[tuple[int, int]] = []

    def take_mends(self) -> list[tuple[int, int]]:
        taken, self.mends = self.mends, []
        return taken


class FakeFailed:
    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.store = FakeFailedStore()
        self.jobs: list[FailedJob] = []

    def add(
        self,
        job_id: str,
        type_: int,
        body: bytes,
        attempts: int,
        error: str,
        *,
        payload_kept: bool = True,
    ) -> None:
        self.journal.append(f"failed.add {job_id}")
        self.jobs.append(FailedJob(job_id, type_, attempts, error, 0.0, body, payload_kept))

    def entries(self) -> list[FailedJob]:
        return list(self.jobs)


class FakeReplies:
    """The reply queue: room for ``room`` notifications; ``pending`` those already in it."""

    def __init__(self, journal: list[str], *, room: int = 100, removed: bool = False) -> None:
        self.journal = journal
        self.room = room
        self.removed = removed
        self.pending: list[tuple[bytes, int]] = []

    def send_nowait(self, body: bytes, type_: int) -> bool:
        if self.removed:
            raise NotRunningError("reply queue removed")
        if len(self.pending) >= self.room:
            return False
        self.pending.append((body, type_))
        self.journal.append(f"reply {type_} {body.decode()}")
        return True

    def receive_nowait(self, type_: int) -> tuple[bytes, int] | None:
        return self.pending.pop(0) if self.pending else None


class FakeSpills:
    """The spill table: the segments it records, by shmid, with their job's id."""

    mode = 0o660
    max_result = 1 << 20
    spill_bytes = 1 << 20

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.segments: dict[int, str] = {PAYLOAD.shmid: "job1"}
        self.failed: set[int] = set()
        self.evicts: tuple[Entry, ...] = ()

    def release(self, shmid: int, job_id: str, hint: int | None = None) -> None:
        self.journal.append(f"spill.release {shmid}")
        if self.segments.get(shmid) == job_id:  # only this job's, as the real table
            del self.segments[shmid]

    def refill(self, size: int) -> int | None:
        self.journal.append(f"spill.refill {size}")
        return None

    def hold_failed(self, shmid: int, job_id: str, hint: int | None = None) -> bool:
        self.journal.append(f"spill.hold_failed {shmid}")
        self.failed.add(shmid)
        return True

    def put(self, data: bytes, *, job_id: str, **_: Any) -> tuple[int, int, tuple[Entry, ...]]:
        self.journal.append(f"spill.put {job_id} {len(data)}")
        self.segments[SPILLED.shmid] = job_id
        return SPILLED.entry, SPILLED.shmid, self.evicts


class FakeUnique:
    """The unique-key table: which job holds which key."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.keys = {"k": "job1"}

    def release(self, key: str, job_id: str) -> bool:
        self.journal.append(f"unique.release {key}")
        if self.keys.get(key) != job_id:
            return False
        del self.keys[key]
        return True


class FakeEvents:
    def __init__(self) -> None:
        self.done: list[dict[str, Any]] = []

    def info(self, event: str, fields: dict[str, Any]) -> None:
        assert event == "job.done"
        self.done.append(fields)


class FakeRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def done(self, handler: str, ok: bool, started: float) -> None:
        self.calls.append(("done", handler, ok))

    def rejected(self) -> None:
        self.calls.append(("rejected",))

    def bump(self, counter: int, by: int = 1) -> None:
        self.calls.append(("bump", counter) if by == 1 else ("bump", counter, by))


class Fixture:
    """Outcomes wired to fakes that write every step into ``journal``."""

    def __init__(
        self,
        *,
        spills: bool = True,
        capacity: int = 4032,
        broken_store: bool = False,
        reply_room: int = 100,
        replies_removed: bool = False,
        jobs: FakeJobStore | None = None,
    ) -> None:
        self.journal: list[str] = []
        self.spills = FakeSpills(self.journal) if spills else None
        self.store = FakeStore(self.journal, self.spills, capacity=capacity, broken=broken_store)
        self.failed = FakeFailed(self.journal)
        self.replies = FakeReplies(self.journal, room=reply_room, removed=replies_removed)
        self.unique = FakeUnique(self.journal)
        self.log = FakeLog()
        self.events = FakeEvents()
        self.stats = FakeRecorder()
        self.outcomes = Outcomes(
            store=cast(ResultStore, self.store),
            failed=cast(FailedList, self.failed),
            replies=cast(Queue, self.replies),
            log=cast(Logger, self.log),
            events=cast(Events, self.events),
            unique=cast(UniqueTable, self.unique),
            stats=cast(Recorder, self.stats),
            jobs=cast(JobStore, jobs),
        )

    def finish(self, job: Job, result: Result, **fields: Any) -> None:
        self.outcomes.finish(
            job, result, body=b"envelope", handler="h", started=time.monotonic(), **fields
        )


def _job(**fields: Any) -> Job:
    """Job job1 of type TYPE, its payload spilled, its key "k", its client waiting."""
    defaults: dict[str, Any] = {
        "id": "job1", "type": TYPE, "payload": None, "attempt": 2, "submitted": 1.0,
        "reply_to": REPLY_TO, "unique": "k", "spill": PAYLOAD,
    }  # fmt: skip
    return Job(**(defaults | fields))


def _ok(job: Job, data: bytes = b"done") -> Result:
    return Result(job.id, job.type, Status.OK, Kind.BYTES, data, job.attempt, 1.0, 2.0)


# --- mended headers -----------------------------------------------------------------------


def test_headers_mended_since_the_last_job_are_said_and_their_losses_counted_once() -> None:
    """After a job, each header of the result ring or the failed list that this process
    wrote back meanwhile (PHP's shm_attach over it, say) is one ``ipc.recreated`` event,
    its lost records are counted, and the next job says nothing more of it."""
    f = Fixture()
    f.store.mends = [(5, 2)]
    f.failed.store.mends = [(3, 0)]
    f.finish(_job(spill=None), _ok(_job(spill=None)))
    said = [(e, fields) for _, e, fields in f.log.events if e == "ipc.recreated"]
    assert said == [
        ("ipc.recreated", {"objects": ["result segment overwritten"], "results_kept": 5,
                           "results_lost": 2}),
        ("ipc.recreated", {"objects": ["failed list overwritten"], "results_kept": 3,
                           "results_lost": 0}),
    ]  # fmt: skip
    assert ("bump", RESULTS_LOST, 2) in f.stats.calls
    f.finish(_job(id="job2", spill=None), _ok(_job(id="job2", spill=None)))
    assert len([e for _, e, _ in f.log.events if e == "ipc.recreated"]) == 2


# --- finish -------------------------------------------------------------------------------


def test_a_failure_is_listed_before_its_result_is_stored() -> None:
    """A failed job's spilled payload goes to the failed list with it, both before the
    result is stored (a waiter reading the result finds the job listed); its key is freed
    after, then its waiter woken; the payload it still needs for a retry stays."""
    f = Fixture()
    job = _job()
    f.finish(job, error_result(job, "no such image"))
    assert f.journal == [
        "spill.hold_failed 55",
        "failed.add job1",
        "store job1 ERROR",
        "unique.release k",
        f"reply {REPLY_TO} job1",
    ]
    (listed,) = f.failed.jobs
    assert (listed.job_id, listed.error, listed.attempts, listed.body) == (
        "job1", "no such image", 2, b"envelope"
    )  # fmt: skip
    assert f.spills is not None and PAYLOAD.shmid in f.spills.segments
    (done,) = f.events.done
    assert (done["outcome"], done["error"], done["bytes_in"]) == (
        "error", "no such image", PAYLOAD.size
    )  # fmt: skip
    assert f.stats.calls == [("done", "h", False)]


def test_a_successs_spilled_payload_is_removed_after_its_result_is_stored() -> None:
    """A success is never listed; its key and its spilled payload are freed only once
    its result is stored (a worker dying before that leaves the job whole for its next
    run), and its waiter is woken last."""
    f = Fixture()
    f.finish(_job(), _ok(_job()))
    assert f.journal == [
        "store job1 OK",
        "unique.release k",
        "spill.release 55",
        f"reply {REPLY_TO} job1",
    ]
    assert f.failed.jobs == []
    assert f.spills is not None and PAYLOAD.shmid not in f.spills.segments
    assert f.unique.keys == {}
    assert [d["outcome"] for d in f.events.done] == ["ok"]


def test_a_failure_kept_off_the_failed_list_frees_its_payload_after_storing() -> None:
    """listed=False (nothing to retry): no failed entry, and the payload goes as for a
    success, after the result is stored."""
    f = Fixture()
    job = _job(reply_to=None)
    f.finish(job, error_result(job, "bad"), listed=False)
    assert f.journal == ["store job1 ERROR", "unique.release k", "spill.release 55"]


def test_job_done_carries_the_callers_fields() -> None:
    """The one job.done event names the job, its handler and outcome, the sizes in and
    out, the sender, and whatever the caller adds (the master's ``recovered``)."""
    f = Fixture()
    job = _job(spill=None, sender_pid=99, bare=True)
    f.finish(job, _ok(job, b"12345"), recovered=True)
    (done,) = f.events.done
    assert {k: v for k, v in done.items() if k != "ms"} == {
        "job_id": "job1", "type": TYPE, "handler": "h", "outcome": "ok", "attempt": 2,
        "bytes_in": len(b"envelope"), "bytes_out": 5, "bare": True, "sender_pid": 99,
        "recovered": True,
    }  # fmt: skip


def test_a_result_larger_than_a_slot_is_spilled_before_it_is_stored() -> None:
    """A result too large for a slot goes to a segment of its own, then the ring stores
    its descriptor; results evicted for room are logged as spill.evicted."""
    f = Fixture(capacity=100)
    assert f.spills is not None
    f.spills.evicts = (Entry(1, SpillState.RESULT, 1, 0.0, 70, 512, "old1"),)
    job = _job(spill=None, unique=None)
    f.finish(job, _ok(job, b"x" * 9000))
    assert f.journal == [  # the pool's spare is made after the reply, not before it
        "spill.put job1 9000",
        "store job1 OK",
        f"reply {REPLY_TO} job1",
        "spill.refill 9000",
    ]
    stored = f.store.stored["job1"]
    assert (stored.data, stored.spill) == (b"", SPILLED)
    assert f.log.events == [
        ("info", "spill.evicted", {"job_id": "job1", "evicted": ["old1"], "bytes": 512})
    ]
    assert f.events.done[0]["bytes_out"] == 9000


def test_a_result_larger_than_a_slot_without_spilling_fails_the_job() -> None:
    """Without a spill table, a result too large for a slot fails its job, listed as
    failed with the reason, instead of being cut."""
    f = Fixture(spills=False, capacity=100)
    job = _job(spill=None, unique=None, reply_to=None)
    f.finish(job, _ok(job, b"x" * 9000))
    assert f.journal == ["failed.add job1", "store job1 ERROR"]
    assert f.store.stored["job1"].error.startswith(
        "result too large for the result segment: 9000 bytes"
    )


def test_a_result_that_cannot_be_stored_is_counted_lost_and_its_waiter_still_woken() -> None:
    """The result segment removed under the worker: result.store_failed is logged, the
    result counted lost, its spilled data removed, job.done says stored=False, and the
    waiter is woken to find no result rather than wait for ever."""
    f = Fixture(capacity=100, broken_store=True)
    job = _job(spill=None, unique=None)
    f.finish(job, _ok(job, b"x" * 9000))
    assert f.journal == [
        "spill.put job1 9000",
        f"spill.release {SPILLED.shmid}",
        f"reply {REPLY_TO} job1",
    ]
    assert f.log.names() == [("error", "result.store_failed")]
    assert ("bump", RESULTS_LOST) in f.stats.calls
    assert f.events.done[0]["stored"] is False


# --- reject -------------------------------------------------------------------------------


def _message_error(**fields: Any) -> MessageError:
    exc = MessageError("'attempt' must be 1..1000")
    for name, value in fields.items():
        setattr(exc, name, value)
    return exc


def test_a_rejected_message_with_an_id_gets_an_error_result_and_wakes_its_waiter() -> None:
    """A message that cannot be a job but whose id was read: job.rejected and its
    counter, an error result under its id, its key and payload freed after the result is
    stored, its waiter woken; it is not listed as failed, and job.rejected is its one
    event."""
    f = Fixture()
    exc = _message_error(job_id="job1", reply_to=REPLY_TO, unique="k", spill=PAYLOAD)
    f.outcomes.reject(exc, b"envelope", TYPE, recovered=True)
    assert f.journal == [
        "store job1 ERROR",
        "unique.release k",
        "spill.release 55",
        f"reply {REPLY_TO} job1",
    ]
    assert f.store.stored["job1"].error == "'attempt' must be 1..1000"
    ((level, event, fields),) = f.log.events
    assert (level, event, fields["job_id"], fields["recovered"]) == (
        "warning", "job.rejected", "job1", True
    )  # fmt: skip
    assert f.events.done == []
    assert f.failed.jobs == []
    assert f.stats.calls == [("rejected",)]


def test_a_rejected_message_without_an_id_is_only_logged_and_counted() -> None:
    """No id: nothing can be stored or woken; the event and the counter remain."""
    f = Fixture()
    f.outcomes.reject(_message_error(), b"\xff" * 80, TYPE)
    assert f.journal == []
    ((_, event, fields),) = f.log.events
    assert (event, fields["bytes_in"], fields["head"]) == ("job.rejected", 80, "ff" * 64)
    assert f.stats.calls == [("rejected",)]


# --- conclude -----------------------------------------------------------------------------


def test_conclude_lists_a_failure_and_frees_its_key_once_however_often_called() -> None:
    """For a worker that died after storing a failure: the job is listed (its payload
    held) and its key freed; a second conclude lists nothing more and changes nothing.
    Neither stores nor wakes anybody: the master announces the stored result itself."""
    f = Fixture()
    job = _job()
    result = error_result(job, "no such image")
    assert f.spills is not None
    f.outcomes.conclude(job, result, body=b"envelope")
    first = list(f.journal)
    state = (list(f.failed.jobs), dict(f.unique.keys), dict(f.spills.segments))
    f.outcomes.conclude(job, result, body=b"envelope")
    assert first == ["spill.hold_failed 55", "failed.add job1", "unique.release k"]
    assert f.journal[len(first) :] == ["unique.release k"]
    assert (list(f.failed.jobs), dict(f.unique.keys), dict(f.spills.segments)) == state
    assert [j.job_id for j in f.failed.jobs] == ["job1"]
    assert PAYLOAD.shmid in f.spills.failed
    assert f.store.stored == {}
    assert f.events.done == []


def test_conclude_frees_a_successs_payload_and_key_and_may_be_repeated() -> None:
    """For a success: its key and spilled payload are freed, and nothing is listed;
    again, a repeat finds both freed and leaves them so."""
    f = Fixture()
    job = _job()
    for _ in range(2):
        f.outcomes.conclude(job, _ok(job), body=b"envelope")
    assert f.journal == ["unique.release k", "spill.release 55"] * 2
    assert f.failed.jobs == []
    assert f.unique.keys == {}
    assert f.spills is not None and f.spills.segments == {}


def test_conclude_does_not_list_a_job_the_failed_list_holds() -> None:
    """A failure the dead worker had listed already is not listed twice."""
    f = Fixture()
    job = _job()
    result = error_result(job, "no such image")
    f.finish(job, result)
    del f.journal[:]
    f.outcomes.conclude(job, result, body=b"envelope")
    assert f.journal == ["unique.release k"]
    assert len(f.failed.jobs) == 1


# --- notify -------------------------------------------------------------------------------


def test_a_full_reply_queue_is_purged_of_exited_clients_notifications() -> None:
    """With the reply queue full, the notifications of clients that have exited are
    dropped (those of live ones put back) and the waiter is notified."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    f = Fixture(reply_room=2)
    live = os.getpid()
    f.replies.pending = [(b"old1", dead.pid), (b"old2", live)]
    f.outcomes.notify(REPLY_TO, "job1")
    assert f.replies.pending == [(b"old2", live), (b"job1", REPLY_TO)]
    assert f.log.events == [("info", "reply.purged", {"dropped": 1, "kept": 1})]


def test_a_notification_that_cannot_be_sent_is_dropped_not_waited_for() -> None:
    """Reply queue full of live clients' notifications, or removed: the notification is
    dropped with reply.dropped naming why, and finishing goes on."""
    f = Fixture(reply_room=0)
    f.outcomes.notify(REPLY_TO, "job1")
    g = Fixture(replies_removed=True)
    g.outcomes.notify(REPLY_TO, "job1")
    assert f.log.events[-1] == (
        "warning", "reply.dropped",
        {"job_id": "job1", "reply_to": REPLY_TO, "error": "the reply queue is full"},
    )  # fmt: skip
    assert g.log.events[-1][1:] == (
        "reply.dropped", {"job_id": "job1", "reply_to": REPLY_TO, "error": "reply queue removed"}
    )  # fmt: skip


# --- the job store ------------------------------------------------------------------------


def _running(job_id: str = "job1") -> FakeJobStore:
    jobs = FakeJobStore()
    jobs.put(new_job(job_id, TYPE, b"envelope"), state=JobState.RUNNING)
    return jobs


def test_each_outcome_is_recorded_in_the_job_store() -> None:
    """A success ends DONE with its result's kind and size, a failure FAILED with its
    error, in the job store, the jobs' record of truth."""
    jobs = _running()
    jobs.put(new_job("job2", TYPE, b"envelope"), state=JobState.RUNNING)
    f = Fixture(jobs=jobs)
    job = _job(spill=None, unique=None)
    f.finish(job, _ok(job, b"12345"))
    failed = _job(id="job2", spill=None, unique=None)
    f.finish(failed, error_result(failed, "no such image"))
    done, lost = jobs.records["job1"], jobs.records["job2"]
    assert (done.state, done.result_kind, done.result_size, done.error) == (
        JobState.DONE, int(Kind.BYTES), 5, None
    )  # fmt: skip
    assert (lost.state, lost.error) == (JobState.FAILED, "no such image")


def test_a_job_cancelled_meanwhile_stays_cancelled() -> None:
    """A job an operator cancelled while it ran keeps its state in the store; its result
    is still stored and its waiter woken."""
    jobs = _running()
    jobs.records["job1"] = jobs.records["job1"]._replace(state=JobState.CANCELLED)
    f = Fixture(jobs=jobs)
    job = _job(spill=None, unique=None)
    f.finish(job, _ok(job))
    assert jobs.state("job1") is JobState.CANCELLED
    assert f.journal == ["store job1 OK", f"reply {REPLY_TO} job1"]


def test_a_store_that_cannot_record_an_outcome_is_logged_and_counted_not_fatal() -> None:
    """The job store failing to record an outcome is logged as store.write_failed and
    counted; the result is stored, the key freed and the waiter woken all the same."""
    jobs = _running()
    jobs.errors["finish"] = [StoreUnavailableError("jobs.db: disk I/O error")]
    f = Fixture(jobs=jobs)
    job = _job(spill=None)
    f.finish(job, _ok(job))
    assert f.log.events == [
        ("error", "store.write_failed", {"job_id": "job1", "error": "jobs.db: disk I/O error"})
    ]
    assert ("bump", STORE_ERRORS) in f.stats.calls
    assert f.journal == ["store job1 OK", "unique.release k", f"reply {REPLY_TO} job1"]
    assert jobs.state("job1") is JobState.RUNNING


def test_confirm_tells_the_submitter_its_job_is_committed() -> None:
    """A confirmation is the CONFIRMED prefix and the job's id, on the submitter's reply
    type, never blocking."""
    f = Fixture()
    f.outcomes.confirm(REPLY_TO, "job1")
    assert f.replies.pending == [(CONFIRMED + b"job1", REPLY_TO)]
