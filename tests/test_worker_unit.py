"""A worker's handling of one message (ipcd.daemon.worker), in-process.

The Worker gets its collaborators through its constructor, so what it does with a message
is tested here with hand-written fakes of ipcd's own seams (the in-flight table, the job
queue, the outcomes, the result store, the spill table, the logger, the event log, the
stats recorder) and real handlers in a real Registry, never with fakes of the kernel.
The end-to-end paths (a crashing handler, retries through a running daemon, a worker
SIGKILLed in the middle of a job) stay in test_workers.py, test_poison.py and tests/faults/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

from fakes import FakeLog

from ipcd import config as config_mod
from ipcd.daemon.log import Events, Logger
from ipcd.daemon.outcomes import Outcomes
from ipcd.daemon.signals import Flags
from ipcd.daemon.worker import Exit, Worker
from ipcd.errors import IpcdError, MessageError, NotRunningError
from ipcd.handlers import Handler, HandlerError, HandlerResult, Retry
from ipcd.handlers.registry import Registration, Registry
from ipcd.kernel.queues import Queue, TooBigError
from ipcd.kernel.waits import Interrupted
from ipcd.layout.results import Kind, Result, Status
from ipcd.tables.inflight import InflightTable
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.stats import Recorder
from ipcd.wire import protocol
from ipcd.wire.protocol import Job, SpillRef

TYPE = 7
SLOT = 2


class FakeTable:
    """One worker's slot of the in-flight table, and the parked slots (``room``)."""

    def __init__(self, *, room: bool = True, text_size: int = 8192) -> None:
        self.room = room
        self.text_size = text_size
        self.type = 0
        self.body = b""
        self.calls: list[tuple[Any, ...]] = []
        self.parked: list[tuple[str, int, float]] = []

    def deliver(self, type_: int, body: bytes) -> int:
        """What msgrcv does: the message lands in the slot; its length is returned."""
        self.type, self.body = type_, body
        return len(body)

    def reset_worker(self, index: int, pid: int) -> None:
        self.calls.append(("reset_worker", index))

    def msgbuf_address(self, index: int) -> int:
        return 0x1000 + index

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

    def rewrite(self, index: int, body: bytes, attempt: int) -> None:
        self.body = body
        self.calls.append(("rewrite", index, attempt))

    def park(self, type_: int, body: bytes, job_id: str, attempt: int, due: float) -> bool:
        if self.room:
            self.parked.append((job_id, attempt, due))
        return self.room


#: In a FakeQueue's script: a stop signal arrives during the receive.
STOP = "stop"


class FakeQueue:
    """The job queue: what the worker receives (messages, exceptions or STOP, in order),
    and whether a job put back may be sent (``full``)."""

    def __init__(self, table: FakeTable, flags: Flags, *, full: bool = True) -> None:
        self.table = table
        self.flags = flags
        self.full = full
        self.key = 0x1234
        self.script: list[tuple[int, bytes] | BaseException | str] = []
        self.sent: list[tuple[bytes, int]] = []

    def receive_into(self, address: int, size: int) -> int:
        item = self.script.pop(0)
        if item == STOP:
            self.flags.stopping = True  # what the SIGTERM handler records
            raise Interrupted("msgrcv interrupted by a signal")
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, tuple)
        return self.table.deliver(*item)

    def receive(self, type_: int, *, timeout: float | None = None) -> tuple[bytes, int]:
        item = self.script.pop(0)
        assert isinstance(item, tuple)
        return item[1], item[0]

    def send_nowait(self, body: bytes, type_: int) -> bool:
        if not self.full:
            self.sent.append((body, type_))
        return not self.full


class FakeOutcomes:
    """Records how each message ended; ``broken`` calls of finish raise first."""

    def __init__(self, *, broken: int = 0) -> None:
        self.broken = broken
        self.finished: list[tuple[Job, Result, str]] = []
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

    def reject(self, exc: MessageError, body: bytes, type_: int, **_: Any) -> None:
        self.rejected.append((exc, body, type_))


class FakeStore:
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

    def retried(self, handler: str) -> None:
        self.retries.append(handler)


def _config(**daemon: Any) -> config_mod.Config:
    config = config_mod.parse({"ipc": {"key": 0x1234}}, Path("/nonexistent/ipcd.toml"))
    return config._replace(daemon=config.daemon._replace(**daemon))


class Fixture:
    """A Worker in slot SLOT wired to fakes; ``handler`` serves TYPE (3 attempts, 10 s
    base delay) under the name "h"."""

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        timeout: float | None = None,
        room: bool = True,
        queue_full: bool = True,
        text_size: int = 8192,
        broken_finish: int = 0,
        stored: Result | IpcdError | None = None,
        spills: FakeSpills | None = None,
        debugging: bool = False,
        max_jobs_per_worker: int = 0,
    ) -> None:
        self.table = FakeTable(room=room, text_size=text_size)
        self.flags = Flags()
        self.queue = FakeQueue(self.table, self.flags, full=queue_full)
        self.outcomes = FakeOutcomes(broken=broken_finish)
        self.spills = spills
        self.log = FakeLog()
        self.events = FakeEvents(debugging=debugging)
        self.stats = FakeRecorder()
        self.wakes = 0
        by_type = {}
        if handler is not None:
            by_type[TYPE] = Registration(
                "h", TYPE, "x:h", handler, timeout=timeout, max_attempts=3, retry_delay=10.0
            )
        self.worker = Worker(
            slot=SLOT,
            config=_config(max_jobs_per_worker=max_jobs_per_worker),
            queue=cast(Queue, self.queue),
            table=cast(InflightTable, self.table),
            outcomes=cast(Outcomes, self.outcomes),
            store=cast(ResultStore, FakeStore(stored)),
            spills=cast(SpillTable, spills),
            registry=Registry(by_type),
            flags=self.flags,
            log=cast(Logger, self.log),
            events=cast(Events, self.events),
            stats=cast(Recorder, self.stats),
            wake_master=self._wake,
        )

    def _wake(self) -> None:
        self.wakes += 1

    def handle(self, body: bytes, type_: int = TYPE) -> None:
        """Deliver one message to the worker's slot and have the worker handle it."""
        self.worker.handle(self.table.deliver(type_, body))

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
    name; the slot records the job while it runs and is freed after its outcome."""
    seen: list[Job] = []

    def handler(job: Job) -> HandlerResult:
        seen.append(job)
        return {"echo": str(job.payload)}

    f = Fixture(handler)
    body = _body("hi", attempt=2)
    f.handle(body)
    job, result, name = f.only_result()
    assert [j.payload for j in seen] == ["hi"]
    assert (job.id, job.attempt, name) == ("job1", 2, "h")
    assert (result.job_id, result.status, result.kind) == ("job1", Status.OK, Kind.JSON)
    assert json.loads(result.data) == {"echo": "hi"}
    assert f.slot_calls("received") == [("received", SLOT, len(body), 2, "job1", 0.0)]
    assert f.table.calls[-1] == ("finished", SLOT)
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
    assert f.table.calls[-1] == ("finished", SLOT)


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
    f.handle(_body(job_id="job2"))
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


def test_a_retry_parks_the_job_as_its_next_attempt_with_back_off() -> None:
    """Retry on attempt 2 of 3 parks the job as attempt 3, due after the handler's delay
    doubled once; it has no outcome yet, the retry is counted and the master woken."""
    handler, _ = _retrying(1)
    f = Fixture(handler)
    before = time.time()
    f.handle(_body(attempt=2))
    ((job_id, attempt, due),) = f.table.parked
    assert (job_id, attempt) == ("job1", 3)
    assert before + 20.0 <= due <= time.time() + 20.0
    assert f.outcomes.finished == []
    assert f.stats.retries == ["h"]
    assert f.wakes == 1
    ((level, event, fields),) = f.log.events
    assert (level, event, fields["reason"], fields["kept_in_worker"]) == (
        "info", "job.retry", "busy", False
    )  # fmt: skip
    assert f.table.calls[-1] == ("finished", SLOT)
    assert f.worker.jobs_done == 1


def test_a_retry_delay_of_the_handler_overrides_the_back_off() -> None:
    """Retry(delay=...) sets when the next attempt is due."""
    handler, _ = _retrying(1, delay=2.5)
    f = Fixture(handler)
    before = time.time()
    f.handle(_body())
    ((_, _, due),) = f.table.parked
    assert before + 2.5 <= due <= time.time() + 2.5


def test_a_retry_on_the_last_attempt_fails_the_job() -> None:
    """With no attempts left, a retry request fails the job, naming the reason."""
    handler, _ = _retrying(1)
    f = Fixture(handler)
    f.handle(_body(attempt=3))
    _, result, name = f.only_result()
    assert (result.error, name) == ("gave up after 3 attempts: busy", "h")
    assert f.table.parked == []
    assert f.stats.retries == []


def test_a_retry_due_now_goes_to_the_queue_when_parking_is_full() -> None:
    """No parked slot free: a job due at once is sent to the queue as its next attempt."""
    handler, _ = _retrying(1, delay=0.0)
    f = Fixture(handler, room=False, queue_full=False)
    f.handle(_body())
    ((body, type_),) = f.queue.sent
    assert type_ == TYPE
    assert protocol.decode(body, TYPE).attempt == 2
    assert f.outcomes.finished == []


def test_a_retry_with_nowhere_to_go_runs_again_in_this_worker() -> None:
    """Parking and queue full: the job's next envelope is written into its own slot and
    it runs again here, so that a crash in between loses nothing."""
    handler, attempts = _retrying(1, delay=0.0)
    f = Fixture(handler, room=False, queue_full=True)
    f.handle(_body())
    assert attempts == [1, 2]
    assert f.slot_calls("rewrite") == [("rewrite", SLOT, 2)]
    assert protocol.decode(f.table.body, TYPE).attempt == 2
    assert [call[3] for call in f.slot_calls("received")] == [1, 2]
    job, result, _ = f.only_result()
    assert (job.attempt, result.attempt, result.data) == (2, 2, b"done")
    assert f.log.events[0][2]["kept_in_worker"] is True
    assert f.worker.jobs_done == 1


def test_a_retry_too_large_with_its_attempt_count_fails_the_job() -> None:
    """A message that fitted msgmax exactly and outgrows it with its attempt number
    cannot run again: the job fails saying so, the worker goes on."""
    handler, _ = _retrying(1)
    body = _body()
    f = Fixture(handler, text_size=len(body))
    f.handle(body)
    result = f.only_result()[1]
    assert result.error.startswith("cannot be run again: with its attempt count the job is ")
    assert f.table.parked == []


# --- messages that are not jobs -----------------------------------------------------------


def test_a_message_that_cannot_be_decoded_is_rejected_without_running() -> None:
    """An envelope with a field out of range is rejected, with its id, and counts as no
    job done; the slot is freed."""
    ran: list[Job] = []
    f = Fixture(ran.append)
    doc = json.loads(_body(reply_to=77))
    doc["attempt"] = 0
    body = json.dumps(doc).encode()
    f.handle(body)
    ((exc, rejected, type_),) = f.outcomes.rejected
    assert (exc.job_id, exc.reply_to, rejected, type_) == ("job1", 77, body, TYPE)
    assert ran == []
    assert f.outcomes.finished == []
    assert f.table.calls == [("finished", SLOT)]
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
    assert f.table.calls[-1] == ("finished", SLOT)
    assert f.worker.jobs_done == 1
    f.handle(_body(job_id="job2"))  # and the next message is served as usual
    assert [(j.id, r.status) for j, r, _ in f.outcomes.finished[1:]] == [("job2", Status.OK)]


def test_an_internal_error_after_the_outcome_was_stored_keeps_that_outcome() -> None:
    """When this attempt's result was stored before the error, it stands: no second
    outcome is written over it."""
    stored = Result("job1", TYPE, Status.OK, Kind.TEXT, b"fine", 1, 0.0, time.time() + 60)
    f = Fixture(lambda job: "fine", broken_finish=1, stored=stored)
    f.handle(_body())
    assert f.outcomes.finished == []
    assert f.log.names() == [("error", "job.internal_error")]
    assert f.table.calls[-1] == ("finished", SLOT)


def test_an_earlier_runs_stored_result_does_not_stop_the_failure() -> None:
    """A result of the same id stored before this message arrived is an earlier
    attempt's, and an unreadable store is no answer: either way the job fails."""
    old = Result("job1", TYPE, Status.ERROR, Kind.TEXT, b"old", 1, 0.0, time.time() - 60)
    for stored in (old, IpcdError("result segment removed")):
        f = Fixture(lambda job: "fine", broken_finish=1, stored=stored)
        f.handle(_body())
        assert f.only_result()[1].error.startswith("ipcd failed while handling the job: ")


# --- the receive loop ---------------------------------------------------------------------


def test_serving_stops_when_a_signal_asked_for_it() -> None:
    """A receive interrupted by a stop signal ends serving with Exit.STOPPED; the slot
    says before each receive how long the previous message was."""
    f = Fixture(lambda job: None)
    first, second = _body(), _body(job_id="job2")
    f.queue.script = [(TYPE, first), (TYPE, second), STOP]
    assert f.worker.serve() == Exit.STOPPED
    assert [call[2] for call in f.slot_calls("begin_receive")] == [0, len(first), len(second)]
    assert [j.id for j, _, _ in f.outcomes.finished] == ["job1", "job2"]


def test_a_removed_job_queue_ends_the_worker_with_its_status() -> None:
    """The queue removed under the worker: Exit.QUEUE_GONE, so the master makes it anew."""
    f = Fixture(lambda job: None)
    f.queue.script = [NotRunningError("queue removed")]
    assert f.worker.serve() == Exit.QUEUE_GONE
    assert f.log.names() == [("warning", "worker.queue_gone")]


def test_a_worker_is_recycled_after_max_jobs_per_worker() -> None:
    """After max_jobs_per_worker jobs the worker leaves with Exit.RECYCLED; a rejected
    message does not count as a job."""
    f = Fixture(lambda job: None, max_jobs_per_worker=2)
    doc = json.loads(_body())
    doc["attempt"] = 0
    f.queue.script = [(TYPE, _body()), (TYPE, json.dumps(doc).encode()), (TYPE, _body())]
    assert f.worker.serve() == Exit.RECYCLED
    assert f.queue.script == []
    assert (len(f.outcomes.finished), len(f.outcomes.rejected)) == (2, 1)


def test_a_message_larger_than_the_slot_is_handled_unprotected() -> None:
    """A message too big for the slot (msgmax raised after start) is received outside
    it, logged as job.unprotected, and run; it cannot be retried, so a retry fails it."""
    handler, _ = _retrying(1)
    f = Fixture(handler)
    f.queue.script = [TooBigError("E2BIG"), (TYPE, _body()), STOP]
    assert f.worker.serve() == Exit.STOPPED
    _, result, _ = f.only_result()
    assert result.error == "retry impossible for oversized job: busy"
    assert f.log.names()[0] == ("warning", "job.unprotected")
    assert f.table.parked == []
