"""A worker's handling of its jobs (ipcd.daemon.worker), in-process.

The Worker gets its collaborators through its constructor, so what it does with a job is
tested here with hand-written fakes of ipcd's own seams (the job store, the in-flight
table, the hand-off queue it sleeps on, the outcomes, the result store, the spill table,
the logger, the event log, the stats recorder) and real handlers in a real Registry,
never with fakes of the kernel; one test uses a real in-flight table, to read the slot
back as the master's recovery does.  Every job goes the worker's own way: claimed from
the store, written into the slot as a hand-off message, run.  The end-to-end paths (a
crashing handler, retries through a running daemon, a worker SIGKILLed in the middle of
a job) stay in test_workers.py, test_poison.py and tests/faults/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import Instance
from fakes import FakeJobStore, FakeLog, new_job

from ipcd import config as config_mod
from ipcd.daemon.ledger import Ledger
from ipcd.daemon.log import Events, Logger
from ipcd.daemon.outcomes import Outcomes
from ipcd.daemon.signals import Flags
from ipcd.daemon.worker import Exit, Worker, job_of
from ipcd.errors import IpcdError, MessageError, NotRunningError, StoreUnavailableError
from ipcd.handlers import Handler, HandlerError, HandlerResult, Retry
from ipcd.handlers.registry import Registration, Registry
from ipcd.kernel.queues import Queue
from ipcd.kernel.waits import Interrupted
from ipcd.layout.results import Kind, Result, Status
from ipcd.store import JobStore, State
from ipcd.tables.inflight import InflightTable
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.stats import STORE_ERRORS, Recorder
from ipcd.wire import handoff, protocol
from ipcd.wire.protocol import Job, SpillRef

TYPE = 7
SLOT = 2


class FakeTable:
    """One worker's slot of the in-flight table: what it holds, and the calls made."""

    def __init__(self, *, text_size: int = 8192) -> None:
        self.text_size = text_size
        self.type = 0
        self.body = b""
        self.calls: list[tuple[Any, ...]] = []

    def deliver(self, index: int, type_: int, body: bytes) -> None:
        """The hand-off message lands in the slot, as msgrcv would put it there."""
        self.type, self.body = type_, body
        self.calls.append(("deliver", index, type_))

    def reset_worker(self, index: int, pid: int) -> None:
        self.calls.append(("reset_worker", index))

    def begin_receive(self, index: int, pid: int, previous_length: int) -> None:
        self.calls.append(("begin_receive", index, previous_length))

    def text(self, index: int, length: int) -> memoryview:
        return memoryview(self.body)[:length]

    def message_type(self, index: int) -> int:
        return self.type

    def received(self, index: int, length: int, attempt: int, job_id: str, deadline: float) -> None:
        self.calls.append(("received", index, length, attempt, job_id, deadline))

    def finished(self, index: int) -> None:
        self.calls.append(("finished", index))


#: In a FakeDoorbell's script: a stop signal arrives while the worker sleeps.
STOP = "stop"


class FakeDoorbell:
    """The hand-off queue a worker sleeps on when the store has nothing for it; each
    wait takes the next item of ``script``: a ring (a callable, run first: what was
    committed meanwhile), STOP, or an exception to raise."""

    def __init__(self, flags: Flags) -> None:
        self.flags = flags
        self.key = 0x1234
        self.script: list[Callable[[], None] | BaseException | str] = []
        self.waits = 0

    def wait_any(self) -> None:
        self.waits += 1
        item = self.script.pop(0)
        if isinstance(item, str):
            assert item == STOP
            self.flags.stopping = True  # what the SIGTERM handler records
            raise Interrupted("msgrcv interrupted by a signal")
        if isinstance(item, BaseException):
            raise item
        item()


class FakeOutcomes:
    """Records how each job ended; ``broken`` calls of finish raise first."""

    def __init__(self, *, broken: int = 0) -> None:
        self.broken = broken
        self.finished: list[tuple[Job, Result, str]] = []
        self.bodies: list[bytes] = []
        self.rejected: list[tuple[MessageError, bytes, int]] = []
        #: How often the worker asked for mended headers to be said (before each wait).
        self.mends_reported = 0

    def report_mends(self) -> None:
        self.mends_reported += 1

    def finish(self, job: Job, result: Result, *, body: bytes, handler: str, **_: Any) -> None:
        if self.broken:
            self.broken -= 1
            raise RuntimeError("result segment wedged")
        self.finished.append((job, result, handler))
        self.bodies.append(body)

    def reject(self, exc: MessageError, body: bytes, type_: int, **_: Any) -> None:
        self.rejected.append((exc, body, type_))


class FakeStore:
    """The result ring, of which a worker only asks for a stored result."""

    def __init__(self, stored: Result | IpcdError | None = None) -> None:
        self.stored = stored

    def get(self, job_id: str) -> Result | None:
        if isinstance(self.stored, IpcdError):
            raise self.stored
        return self.stored


class FakeSpills:
    """The spill table: the entries released; ``broken`` makes a release fail."""

    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken
        self.released: list[tuple[int, str, int]] = []

    def release(self, shmid: int, job_id: str, index: int) -> None:
        if self.broken:
            raise RuntimeError("spill table broken")
        self.released.append((shmid, job_id, index))


class FakeEvents:
    def __init__(self, *, debugging: bool = False) -> None:
        self.debugging = debugging
        self.debugged: list[tuple[str, dict[str, Any]]] = []

    def debug(self, event: str, fields: dict[str, Any]) -> None:
        self.debugged.append((event, fields))


class FakeRecorder:
    def __init__(self) -> None:
        self.retries: list[str] = []
        self.bumped: list[tuple[int, int]] = []

    def retried(self, handler: str) -> None:
        self.retries.append(handler)

    def bump(self, counter: int, by: int = 1) -> None:
        self.bumped.append((counter, by))


def _config(**daemon: Any) -> config_mod.Config:
    config = config_mod.parse({"ipc": {"key": 0x1234}}, Path("/nonexistent/ipcd.toml"))
    return config._replace(daemon=config.daemon._replace(**daemon))


class Fixture:
    """A Worker in slot SLOT wired to fakes; ``handler`` serves TYPE (3 attempts, 10 s
    base delay) under the name "h"; ``table`` replaces the fake slot by a real one."""

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        timeout: float | None = None,
        text_size: int = 8192,
        broken_finish: int = 0,
        stored: Result | IpcdError | None = None,
        spills: FakeSpills | None = None,
        debugging: bool = False,
        max_jobs_per_worker: int = 0,
        table: InflightTable | None = None,
    ) -> None:
        self.table = FakeTable(text_size=text_size)
        self.flags = Flags()
        self.doorbell = FakeDoorbell(self.flags)
        self.jobs = FakeJobStore()
        self.outcomes = FakeOutcomes(broken=broken_finish)
        self.spills = spills
        self.log = FakeLog()
        self.events = FakeEvents(debugging=debugging)
        self.stats = FakeRecorder()
        self.wakes = 0
        self.accepted = time.time()
        by_type = {}
        if handler is not None:
            by_type[TYPE] = Registration(
                "h", TYPE, "x:h", handler, timeout=timeout, max_attempts=3, retry_delay=10.0
            )
        self._config = _config(max_jobs_per_worker=max_jobs_per_worker)
        self._table = table if table is not None else cast(InflightTable, self.table)
        self._stored = stored
        self.registry = Registry(by_type)
        self.worker = self.new_worker()

    def new_ledger(self) -> Ledger:
        """A worker process's ledger, as worker_process makes it: nothing claimed yet."""
        self.ledger = Ledger(
            cast(JobStore, self.jobs),
            worker_pid=os.getpid(),
            limit=self._config.daemon.max_jobs_per_worker,
            stopping=lambda: self.flags.stopping,
        )
        return self.ledger

    def new_worker(self) -> Worker:
        """A worker process's Worker: its own ledger, nothing claimed yet."""
        self.new_ledger()
        return Worker(
            slot=SLOT,
            config=self._config,
            queue=cast(Queue, self.doorbell),
            table=self._table,
            outcomes=cast(Outcomes, self.outcomes),
            store=cast(ResultStore, FakeStore(self._stored)),
            spills=cast(SpillTable, self.spills),
            registry=self.registry,
            flags=self.flags,
            log=cast(Logger, self.log),
            events=cast(Events, self.events),
            stats=cast(Recorder, self.stats),
            wake_master=self._wake,
            jobs=cast(JobStore, self.jobs),
            ledger=self.ledger,
        )

    def _wake(self) -> None:
        self.wakes += 1

    def submit(
        self, body: bytes, type_: int = TYPE, *, job_id: str = "job1", attempt: int = 1,
        priority: int = 0,
    ) -> None:  # fmt: skip
        """Put a job in the store, queued for its ``attempt`` (one accepted after those
        before it)."""
        self.accepted += 1
        job = new_job(
            job_id, type_, body, attempts=attempt - 1, accepted=self.accepted, priority=priority
        )
        self.jobs.put(job)

    def serve(self) -> int:
        """Serve, as a worker process just started, until the store runs dry and the
        doorbell's script says stop."""
        self.worker = self.new_worker()
        self.flags.stopping = False
        self.doorbell.script.append(STOP)
        return self.worker.serve()

    def handle(
        self, body: bytes, type_: int = TYPE, *, job_id: str = "job1", attempt: int = 1
    ) -> None:
        """Have the worker claim and run one job from the store, then stop."""
        self.submit(body, type_, job_id=job_id, attempt=attempt)
        assert self.serve() == Exit.STOPPED

    def only_result(self) -> tuple[Job, Result, str]:
        (finished,) = self.outcomes.finished
        return finished

    def slot_calls(self, name: str) -> list[tuple[Any, ...]]:
        return [call for call in self.table.calls if call[0] == name]


def _body(payload: protocol.Payload = "hi", *, job_id: str = "job1", **fields: Any) -> bytes:
    return protocol.encode(payload, job_id=job_id, **fields)


# --- a handler's outcome ------------------------------------------------------------------


def test_a_handlers_value_is_finished_as_an_ok_result_and_the_slot_freed() -> None:
    """The handler's value becomes an OK JSON result of its job, under the handler's
    name and the attempt the store counted; the slot records the job while it runs and
    is freed after its outcome."""
    seen: list[Job] = []

    def handler(job: Job) -> HandlerResult:
        seen.append(job)
        return {"echo": str(job.payload)}

    f = Fixture(handler)
    body = _body("hi")
    f.handle(body, attempt=2)
    job, result, name = f.only_result()
    assert [j.payload for j in seen] == ["hi"]
    assert (job.id, job.attempt, name) == ("job1", 2, "h")
    assert (result.job_id, result.status, result.kind) == ("job1", Status.OK, Kind.JSON)
    assert json.loads(result.data) == {"echo": "hi"}
    assert f.outcomes.bodies == [body]
    length = len(handoff.encode("job1", 2, body, 8192))
    assert f.slot_calls("received") == [("received", SLOT, length, 2, "job1", 0.0)]
    done = [call[0] for call in f.table.calls if call[0] in ("received", "finished")]
    assert done == ["received", "finished"]
    assert f.worker.jobs_done == 1
    assert f.wakes == 0


def test_bytes_and_text_keep_their_kind() -> None:
    """Bytes are stored as BYTES and text as TEXT (UTF-8), not as JSON."""
    f = Fixture(lambda job: b"\x00\xff")
    f.handle(_body())
    g = Fixture(lambda job: "héllo")
    g.handle(_body())
    assert f.only_result()[1][3:5] == (Kind.BYTES, b"\x00\xff")
    assert g.only_result()[1][3:5] == (Kind.TEXT, "héllo".encode())


def test_a_value_that_is_not_json_able_fails_its_job() -> None:
    """A handler's value JSON cannot hold fails the job with the reason, not the worker."""
    f = Fixture(lambda job: {1, 2})  # type: ignore[arg-type, return-value]
    f.handle(_body())
    result = f.only_result()[1]
    assert result.status is Status.ERROR
    assert result.error.startswith("handler returned a value that is not JSON-able: ")
    assert f.worker.jobs_done == 1


def test_a_handler_error_fails_the_job_with_its_message() -> None:
    """HandlerError is the handler's way to fail a job: its message is the error."""

    def handler(job: Job) -> None:
        raise HandlerError("no such image")

    f = Fixture(handler)
    f.handle(_body())
    _, result, name = f.only_result()
    assert (result.status, result.error, name) == (Status.ERROR, "no such image", "h")
    assert f.log.events == []
    assert f.slot_calls("finished") == [("finished", SLOT)]


def test_a_handlers_bug_fails_the_job_with_a_logged_traceback() -> None:
    """Any other exception fails the job with its type and message, and its traceback
    goes to the log as handler.exception; the worker goes on."""

    def handler(job: Job) -> None:
        raise KeyError("width")

    f = Fixture(handler)
    f.handle(_body())
    result = f.only_result()[1]
    assert result.error == "KeyError: 'width'"
    ((level, event, fields),) = f.log.events
    assert (level, event, fields["job_id"], fields["handler"]) == (
        "error", "handler.exception", "job1", "h"
    )  # fmt: skip
    assert "KeyError: 'width'" in fields["traceback"]
    assert f.worker.jobs_done == 1


def test_a_type_without_handler_fails_the_job() -> None:
    """A message of a type no handler serves fails as such, under handler "-"."""
    f = Fixture()
    f.handle(_body(), type_=9)
    _, result, name = f.only_result()
    assert (result.error, name) == ("no handler for message type 9", "-")


def test_a_job_with_a_timeout_wakes_the_master_with_its_deadline() -> None:
    """A job's own timeout (or else its handler's) sets the slot's deadline, and the
    master is woken to enforce it."""
    f = Fixture(lambda job: None, timeout=30.0)
    before = time.time()
    f.handle(_body(timeout=5.0))
    f.handle(_body(job_id="job2"), job_id="job2")
    (first, second) = [call[5] for call in f.slot_calls("received")]
    assert before + 5.0 <= first <= time.time() + 5.0
    assert before + 30.0 <= second <= time.time() + 30.0
    assert f.wakes == 2


def test_a_job_start_is_an_event_only_when_debugging() -> None:
    """job.started is written at debug level, and not even built otherwise."""
    f = Fixture(lambda job: None, debugging=True)
    f.handle(_body(pid=4242))
    g = Fixture(lambda job: None)
    g.handle(_body())
    assert f.events.debugged == [
        ("job.started", {"job_id": "job1", "type": TYPE, "handler": "h", "attempt": 1,
                         "sender_pid": 4242}),
    ]  # fmt: skip
    assert g.events.debugged == []


# --- retries ------------------------------------------------------------------------------


def _retrying(times: int, *, delay: float | None = None) -> tuple[Handler, list[int]]:
    """A handler that asks for a retry ``times`` times, then returns "done"."""
    attempts: list[int] = []

    def handler(job: Job) -> str:
        attempts.append(job.attempt)
        if len(attempts) <= times:
            raise Retry("busy", delay=delay)
        return "done"

    return handler, attempts


def test_a_retry_puts_the_job_back_in_the_store_due_after_the_back_off() -> None:
    """Retry on attempt 2 of 3 puts the job back in the store, due after the handler's
    delay doubled once (its attempt count left for the next claim to raise); it has no
    outcome yet and the retry is counted."""
    handler, attempts = _retrying(1)
    f = Fixture(handler)
    before = time.time()
    f.handle(_body(), attempt=2)
    ((job_id, due, counted),) = f.jobs.requeued
    assert (job_id, counted) == ("job1", None)
    assert before + 20.0 <= due <= time.time() + 20.0
    assert f.jobs.state("job1") is State.SCHEDULED
    assert attempts == [2]
    assert f.outcomes.finished == []
    assert f.stats.retries == ["h"]
    ((level, event, fields),) = f.log.events
    assert (level, event, fields["reason"], fields["attempt"]) == ("info", "job.retry", "busy", 2)
    assert f.slot_calls("finished") == [("finished", SLOT)]
    assert f.worker.jobs_done == 1


def test_a_retry_delay_of_the_handler_overrides_the_back_off() -> None:
    """Retry(delay=...) sets when the next attempt is due."""
    handler, _ = _retrying(1, delay=2.5)
    f = Fixture(handler)
    before = time.time()
    f.handle(_body())
    ((_, due, _),) = f.jobs.requeued
    assert before + 2.5 <= due <= time.time() + 2.5


def test_a_retry_due_at_once_is_claimed_again_as_the_next_attempt() -> None:
    """Retry(delay=0) queues the job again at once: the next claim runs it as attempt 2."""
    handler, attempts = _retrying(1, delay=0.0)
    f = Fixture(handler)
    f.handle(_body())
    assert attempts == [1, 2]
    job, result, _ = f.only_result()
    assert (job.attempt, result.attempt, result.data) == (2, 2, b"done")
    assert f.jobs.state("job1") is State.RUNNING  # the fake outcomes record nothing


def test_a_retry_on_the_last_attempt_fails_the_job() -> None:
    """With no attempts left, a retry request fails the job, naming the reason."""
    handler, _ = _retrying(1)
    f = Fixture(handler)
    f.handle(_body(), attempt=3)
    _, result, name = f.only_result()
    assert (result.error, name) == ("gave up after 3 attempts: busy", "h")
    assert f.jobs.requeued == []
    assert f.stats.retries == []


def test_a_retry_the_store_cannot_take_back_fails_the_job() -> None:
    """A store that refuses the job back fails it with the store's error, rather than
    leaving it running for ever; the worker goes on."""
    handler, _ = _retrying(1)
    f = Fixture(handler)
    f.jobs.errors["requeue"] = [StoreUnavailableError("jobs.db: disk I/O error")]
    f.handle(_body())
    _, result, _ = f.only_result()
    assert result.error == "cannot be put back for a retry: jobs.db: disk I/O error"
    assert f.stats.retries == []
    assert f.worker.jobs_done == 1


# --- messages that are not jobs -----------------------------------------------------------


def test_a_message_that_cannot_be_decoded_is_rejected_without_running() -> None:
    """An envelope with a field out of range is rejected under the store's id with its
    reply type, and counts as no job done; the slot is freed."""
    ran: list[Job] = []
    f = Fixture(ran.append)
    doc = json.loads(_body(reply_to=77))
    doc["attempt"] = 0
    f.handle(json.dumps(doc).encode(), job_id="job9")
    ((exc, _, type_),) = f.outcomes.rejected
    assert (exc.job_id, exc.reply_to, type_) == ("job9", 77, TYPE)
    assert str(exc) == "malformed envelope: 'attempt' must be an integer from 1 to 65535"
    assert ran == []
    assert f.outcomes.finished == []
    assert f.slot_calls("received") == []
    assert f.slot_calls("finished") == [("finished", SLOT)]
    assert f.worker.jobs_done == 0


def test_a_spilled_payload_over_max_payload_is_rejected_and_its_entry_freed() -> None:
    """A spilled payload larger than [jobs] max_payload is never read: the message is
    rejected and its spill entry released at once (its rejection is final)."""
    spills = FakeSpills()
    f = Fixture(lambda job: None, spills=spills)
    ref = SpillRef(shmid=55, size=(256 << 20) + 1, slot=3, kind="bytes")
    f.handle(_body(None, spill=ref))
    ((exc, _, _),) = f.outcomes.rejected
    why = f"spilled payload of {ref.size} bytes exceeds [jobs] max_payload"
    assert str(exc) == f"spilled payload of job job1: {why}"
    assert spills.released == [(55, "job1", 3)]


def test_a_bug_while_reading_a_message_rejects_it_with_what_was_read() -> None:
    """An error of ipcd's own while reading a message (here a broken spill table) is
    logged with its traceback and rejects the message, keeping its id, reply type,
    unique key and spill reference so that it can be answered and freed."""
    f = Fixture(lambda job: None, spills=FakeSpills(broken=True))
    ref = SpillRef(shmid=55, size=(256 << 20) + 1, slot=3, kind="bytes")
    f.handle(_body(None, spill=ref, reply_to=77, unique="k"))
    ((exc, _, _),) = f.outcomes.rejected
    assert str(exc) == "ipcd could not read the message: RuntimeError: spill table broken"
    assert (exc.job_id, exc.reply_to, exc.unique, exc.spill) == ("job1", 77, "k", ref)
    assert f.log.names() == [("error", "job.decode_failed")]
    assert f.worker.jobs_done == 0


# --- ipcd's own errors --------------------------------------------------------------------


def test_an_internal_error_fails_the_job_not_the_worker() -> None:
    """An error of ipcd's own while finishing a job (the result store wedged) fails that
    job with the cause, logged as job.internal_error; the worker frees the slot and goes on."""
    f = Fixture(lambda job: "fine", broken_finish=1)
    f.handle(_body())
    _, result, name = f.only_result()
    assert result.error == "ipcd failed while handling the job: RuntimeError: result segment wedged"
    assert name == "h"
    assert f.log.names() == [("error", "job.internal_error")]
    assert f.slot_calls("finished") == [("finished", SLOT)]
    assert f.worker.jobs_done == 1
    f.handle(_body(job_id="job2"), job_id="job2")  # and the next job is served as usual
    assert [(j.id, r.status) for j, r, _ in f.outcomes.finished[1:]] == [("job2", Status.OK)]


def test_an_internal_error_after_the_outcome_was_stored_keeps_that_outcome() -> None:
    """When this attempt's result was stored before the error, it stands: no second
    outcome is written over it."""
    stored = Result("job1", TYPE, Status.OK, Kind.TEXT, b"fine", 1, 0.0, time.time() + 60)
    f = Fixture(lambda job: "fine", broken_finish=1, stored=stored)
    f.handle(_body())
    assert f.outcomes.finished == []
    assert f.log.names() == [("error", "job.internal_error")]
    assert f.slot_calls("finished") == [("finished", SLOT)]


def test_an_earlier_runs_stored_result_does_not_stop_the_failure() -> None:
    """A result of the same id stored before this job was claimed is an earlier
    attempt's, and an unreadable store is no answer: either way the job fails."""
    old = Result("job1", TYPE, Status.ERROR, Kind.TEXT, b"old", 1, 0.0, time.time() - 60)
    for stored in (old, IpcdError("result segment removed")):
        f = Fixture(lambda job: "fine", broken_finish=1, stored=stored)
        f.handle(_body())
        assert f.only_result()[1].error.startswith("ipcd failed while handling the job: ")


# --- taking jobs from the store -----------------------------------------------------------


def test_jobs_are_claimed_in_batches_in_the_stores_order() -> None:
    """The worker claims under its own pid and runs jobs in the order the store gives
    them (type, then priority, then age): one job first, whose pace is not known, then
    the rest of these quick jobs in one claim (ipcd.daemon.ledger)."""
    ran: list[str] = []
    f = Fixture(lambda job: ran.append(job.id))
    f.submit(_body(job_id="old"), job_id="old")
    f.submit(_body(job_id="urgent"), job_id="urgent", priority=5)
    f.submit(_body(job_id="new"), job_id="new")
    assert f.serve() == Exit.STOPPED
    assert ran == ["urgent", "old", "new"]
    assert f.jobs.claimers == [os.getpid()] * 3  # the third found nothing
    assert f.doorbell.waits == 1


def test_an_idle_worker_sleeps_on_the_doorbell_and_claims_again_when_it_rings() -> None:
    """With the store empty the worker sleeps on the hand-off queue; a ring (a job
    committed meanwhile) wakes it to claim again, and it sleeps again when that runs dry."""
    ran: list[str] = []
    f = Fixture(lambda job: ran.append(job.id))
    f.submit(_body())
    f.doorbell.script = [lambda: f.submit(_body(job_id="job2"), job_id="job2")]
    assert f.serve() == Exit.STOPPED
    assert ran == ["job1", "job2"]
    assert f.doorbell.waits == 2


def test_a_store_that_fails_a_claim_is_asked_again_without_waiting_for_a_ring() -> None:
    """A claim the store fails is logged as store.claim_failed and counted; the worker
    does not end, and asks the store again rather than sleep on the doorbell (whose one
    ring may have been this job's)."""
    ran: list[str] = []
    f = Fixture(lambda job: ran.append(job.id))
    f.submit(_body())
    f.jobs.errors["claim"] = [StoreUnavailableError("jobs.db: database is locked")]
    assert f.serve() == Exit.STOPPED
    assert ran == ["job1"]
    assert f.log.names() == [("error", "store.claim_failed")]
    assert f.log.events[0][2]["error"] == "jobs.db: database is locked"
    assert f.stats.bumped == [(STORE_ERRORS, 1)]
    assert f.doorbell.waits == 1  # only once the store had nothing left


def test_a_job_handed_over_by_reference_is_read_from_the_store() -> None:
    """A message too large to share the slot with the hand-off header is handed over
    by reference: the slot names the job, and the worker reads its message from the store."""
    seen: list[Job] = []
    f = Fixture(seen.append, text_size=200)
    body = _body("x" * 300)
    f.handle(body)
    assert handoff.decode(f.table.body) == handoff.Handoff("job1", 1, None)
    assert [(j.id, j.payload) for j in seen] == [("job1", "x" * 300)]
    assert f.outcomes.bodies == [body]


def test_a_job_too_large_for_its_slot_runs_with_the_message_its_claim_read() -> None:
    """A hand-off too large for the slot holds the job by reference (for recovery); the
    worker itself runs the job with the message its claim read, never reading it from
    the store again (so a purge meanwhile changes nothing)."""
    seen: list[object] = []
    f = Fixture(lambda job: seen.append(job.payload), text_size=200)
    f.submit(_body("x" * 300))
    asked: list[str] = []
    f.jobs.before = asked.append
    assert f.serve() == Exit.STOPPED
    assert seen == ["x" * 300] and "body" not in asked
    assert f.outcomes.rejected == []


@pytest.mark.parametrize("size", [10, 8150], ids=["inline", "by-reference"])
def test_the_slot_holds_the_hand_off_message_recovery_reads_back(
    instance: Instance, size: int
) -> None:
    """While a job runs, a real in-flight slot holds its hand-off message, the store's
    id and attempt: what the master's recovery reads (job_of) is the job being run."""
    keys = instance.keys
    table, _ = InflightTable.create(keys.inflight, 0o600, SLOT + 1, 0, 8192)
    read: list[tuple[Job, bytes]] = []
    body = _body("y" * size)

    def handler(job: Job) -> None:
        held = table.held(SLOT)
        assert held is not None
        assert (held.job_id, held.attempt, held.type) == ("job1", 2, TYPE)
        read.append(job_of(held.body, held.type, time.time(), cast(JobStore, f.jobs)))

    f = Fixture(handler, table=table)
    f.handle(body, attempt=2)
    ((job, message),) = read
    assert (job.id, job.attempt, job.payload, message) == ("job1", 2, "y" * size, body)
    assert table.held(SLOT) is None  # freed after its outcome


# --- the serving loop ---------------------------------------------------------------------


def test_serving_stops_when_a_signal_asked_for_it() -> None:
    """A stop signal while the worker sleeps ends serving with Exit.STOPPED; the slot
    says before each claim how long the previous hand-off message was."""
    f = Fixture(lambda job: None)
    first, second = _body(), _body(job_id="job2")
    f.submit(first)
    f.submit(second, job_id="job2")
    assert f.serve() == Exit.STOPPED
    lengths = [len(handoff.encode(i, 1, b, 8192)) for i, b in (("job1", first), ("job2", second))]
    assert [call[2] for call in f.slot_calls("begin_receive")] == [0, *lengths]
    assert [j.id for j, _, _ in f.outcomes.finished] == ["job1", "job2"]
    assert f.outcomes.mends_reported >= 3  # before each claim, and on leaving


def test_a_removed_hand_off_queue_ends_the_worker_with_its_status() -> None:
    """The hand-off queue removed under the sleeping worker: Exit.QUEUE_GONE, so the
    master makes it anew."""
    f = Fixture(lambda job: None)
    f.doorbell.script = [NotRunningError("queue removed")]
    assert f.worker.serve() == Exit.QUEUE_GONE
    assert f.log.names() == [("warning", "worker.queue_gone")]


def test_a_worker_is_recycled_after_max_jobs_per_worker() -> None:
    """After max_jobs_per_worker jobs the worker leaves with Exit.RECYCLED, claiming no
    more; a rejected message does not count as a job."""
    f = Fixture(lambda job: None, max_jobs_per_worker=2)
    doc = json.loads(_body())
    doc["attempt"] = 0
    f.submit(_body(), job_id="a")
    f.submit(json.dumps(doc).encode(), job_id="b")
    f.submit(_body(), job_id="c")
    f.submit(_body(), job_id="d")
    assert f.worker.serve() == Exit.RECYCLED
    assert (len(f.outcomes.finished), len(f.outcomes.rejected)) == (2, 1)
    assert f.jobs.state("d") is State.QUEUED
    assert f.doorbell.waits == 0


def test_asked_to_stop_a_worker_runs_the_rest_of_its_batch_and_claims_no_more() -> None:
    """SIGTERM (a stop, a reload retiring the worker) in the middle of a batch: the jobs
    already claimed run, as the job in hand does, none goes back to the store, and no
    new claim is made."""
    ran: list[str] = []
    f: Fixture

    def handler(job: Job) -> None:
        ran.append(job.id)
        if job.id == "b":
            f.flags.stopping = True  # what the SIGTERM handler records

    f = Fixture(handler)
    for job_id in ("a", "b", "c", "d"):
        f.submit(_body(job_id=job_id), job_id=job_id)
    f.worker = f.new_worker()
    f.flags.stopping = False
    assert f.worker.serve() == Exit.STOPPED
    assert ran == ["a", "b", "c", "d"]
    assert f.jobs.claimers == [os.getpid()] * 2  # "a" alone, then the rest; none after
    assert f.jobs.requeued == []
