"""A worker process: take a job, run its handler, finish the job.

Workers are forked by the master (ipcd.daemon.arbiter) and each blocks in ``msgrcv`` on the
hand-off queue, the master's private queue on which it gives out jobs from the job store
(ipcd.wire.handoff), lowest type first.  The message is received straight into the
worker's slot of the in-flight table, so it is on record before any Python code runs; the
slot is released only once the job's outcome is stored.  A handler's exception fails that
job and never the worker; a handler that kills the whole process (``os._exit``, a
segfault, a timeout) leaves its job in the slot for the master.  Nor does a message's
content end a worker: what cannot be a job is rejected, a result that cannot be stored
fails its job, and an error of ipcd's own while handling a message fails that message
(``job.internal_error``) rather than the worker, which would only be handed the same job
again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from collections.abc import Callable

from ipcd.config import Config
from ipcd.daemon import lockwaits
from ipcd.daemon import log as log_mod
from ipcd.daemon.capture import Capture, RunDir
from ipcd.daemon.doorbell import Doorbell
from ipcd.daemon.ledger import Ledger
from ipcd.daemon.log import Logger
from ipcd.daemon.outcomes import Outcomes, error_result
from ipcd.daemon.signals import Flags
from ipcd.daemon.startup import Prepared
from ipcd.errors import IpcdError, MessageError, NotRunningError, StoreError
from ipcd.handlers import HandlerError, HandlerResult, Retry
from ipcd.handlers.registry import Registration, Registry
from ipcd.kernel.queues import Queue
from ipcd.kernel.waits import Interrupted
from ipcd.layout.results import Kind, Result, Status
from ipcd.store import JobStore
from ipcd.tables import spill, stats
from ipcd.tables.inflight import InflightTable
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.stats import STORE_ERRORS, Recorder
from ipcd.wire import handoff, jsoncodec, protocol, split
from ipcd.wire.protocol import Job

#: How long a worker waits before it asks a store that failed again.
CLAIM_BACKOFF = 0.5


class Exit:
    """Worker exit statuses, which the master reads from waitpid."""

    STOPPED = 0
    RECYCLED = 3
    #: The job queue was removed under the worker: the master makes it anew and starts
    #: workers that use the new one (ipcd.daemon.objectwatch).
    QUEUE_GONE = 4
    CRASHED = 70


def execute(registry: Registry, job: Job, log: Logger) -> tuple[Result | Retry, str]:
    """Run the job's handler: its result (or a retry request) and the handler's name."""
    return call(registry.lookup(job.type), job, log)


def call(registration: Registration | None, job: Job, log: Logger) -> tuple[Result | Retry, str]:
    """:func:`execute` with the job's handler looked up (None: it has none)."""
    if registration is None:
        return error_result(job, f"no handler for message type {job.type}"), "-"
    try:
        value = registration.func(job)
    except Retry as retry:
        return retry, registration.name
    except HandlerError as exc:
        return error_result(job, str(exc) or type(exc).__name__), registration.name
    except Exception as exc:  # a plugin's bug fails its job, never the worker
        log.error(
            "handler.exception",
            job_id=job.id,
            handler=registration.name,
            traceback=traceback.format_exc(),
        )
        return error_result(job, f"{type(exc).__name__}: {exc}"), registration.name
    return _ok(job, value), registration.name


def _ok(job: Job, value: HandlerResult) -> Result:
    """The handler's value as a result, or an error result naming why it cannot be one."""
    if isinstance(value, _BINARY):
        kind, data = _BYTES, bytes(value)
    elif isinstance(value, str):
        try:
            # surrogateescape: text decoded from bytes that way gets its bytes back.
            data = value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            where = f"lone surrogate U+{ord(value[exc.start]):04X} at index {exc.start}"
            return error_result(job, f"handler returned text that is not valid Unicode: {where}")
        kind = _TEXT
    else:
        try:
            data = _encode_result(value).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            return error_result(job, f"handler returned a value that is not JSON-able: {exc}")
        # ASCII JSON escapes a lone surrogate as \udXXX, which a client's decoder (PHP's
        # json_decode, a UTF-8 print) refuses: look only when an escape is there at all.
        if b"\\ud" in data and (lone := protocol.lone_surrogate(value)):
            return error_result(job, f"handler returned a value that is not valid Unicode: {lone}")
        kind = _JSON
    return Result(job.id, job.type, _OK, kind, data, job.attempt, job.submitted, time.time())


_encode_result = jsoncodec.encoder(ensure_ascii=True, allow_nan=False)
#: What a handler returns as bytes: a tuple, not ``bytes | bytearray | memoryview``, which
#: builds a union object on every call.
_BINARY = (bytes, bytearray, memoryview)
#: The members _ok reads for every job, bound once (ipcd.layout.results says why).
_BYTES, _TEXT, _JSON, _OK = Kind.BYTES, Kind.TEXT, Kind.JSON, Status.OK


def _started_fields(job: Job, registration: Registration | None) -> dict[str, object]:
    fields: dict[str, object] = {
        "job_id": job.id,
        "type": job.type,
        "handler": registration.name if registration else "-",
        "attempt": job.attempt,
    }
    if job.sender_pid:
        fields["sender_pid"] = job.sender_pid
    return fields


class Worker:
    """Serves the queue from one in-flight slot until told to stop."""

    def __init__(
        self,
        *,
        slot: int,
        config: Config,
        queue: Queue,
        table: InflightTable,
        outcomes: Outcomes,
        store: ResultStore,
        spills: SpillTable | None,
        registry: Registry,
        flags: Flags,
        log: Logger,
        events: log_mod.Events,
        stats: Recorder,
        wake_master: Callable[[], None],
        jobs: JobStore,
        ledger: Ledger,
        sink: log_mod.Sink | None = None,
        orphaned: Callable[[], bool] = lambda: False,
        capture: Capture | None = None,
    ) -> None:
        """``queue`` is the hand-off queue, the doorbell a worker sleeps on when the
        store has no job for it (ipcd.daemon.doorbell); ``outcomes`` ends each job; ``store`` says
        whether a job's outcome was stored before an error of ipcd's own; ``spills`` holds
        spilled payloads; ``events`` logs job starts when debugging; ``stats`` counts
        retries and the log lines ``sink`` dropped (None: nothing to count); ``jobs`` is
        the job store, which takes a job back for a retry and holds the bodies too large
        to hand over; ``ledger`` (the one ``outcomes`` keeps outcomes in) claims jobs in
        batches; ``wake_master`` tells the master a job with a deadline started;
        ``orphaned`` says whether the master has died (the worker then leaves the rest
        of its batch to the next master); ``capture`` catches what each job writes and
        reports (ipcd.daemon.capture; None: nothing caught)."""
        self.slot = slot
        self.config = config
        self.queue = queue
        self.table = table
        self.outcomes = outcomes
        self.store = store
        self.spills = spills
        self.registry = registry
        self.flags = flags
        self.log = log
        self.events = events
        self.stats = stats
        self.wake_master = wake_master
        self.jobs = jobs
        self.ledger = ledger
        self.sink = sink
        self.orphaned = orphaned
        self.capture = capture
        #: Where each job's ``job.progress()`` goes (bound once, not per job).
        self._reporter = capture.progress if capture is not None else None
        self.jobs_done = 0
        self.pid = os.getpid()
        self._claim_failing = False

    def serve(self) -> int:
        """Receive and handle messages until stopped or recycled; returns the exit status.

        Before each wait for a message and on leaving, what this process noticed while it
        handled the last one is counted and said (log lines dropped, ring headers mended)."""
        try:
            return self._serve()
        finally:
            self._settle_up()
            self.count_noticed()

    def _settle_up(self) -> None:
        """On leaving: the outcomes not yet recorded go to the store, and the jobs claimed
        but not started go back (else the master gives them back when it reaps us, and
        the ring gives it the outcomes)."""
        try:
            given = self.ledger.give_back()
        except StoreError as exc:
            self.log.error("store.write_failed", error=str(exc), then="the master settles")
            return
        for record in given:
            self.log.info("job.requeued", job_id=record.id, cause="claimed, never started")

    def count_noticed(self) -> None:
        """Count the log lines this process dropped (ipcd.daemon.log) and say which ring
        headers it mended (Outcomes.report_mends) since the last call."""
        if self.sink is not None and (dropped := self.sink.take_dropped()):
            self.stats.bump(stats.LOG_DROPPED, dropped)
        self.outcomes.report_mends()

    def _serve(self) -> int:
        self.table.reset_worker(self.slot, self.pid)
        previous = 0
        # Asked to stop, a worker still runs the jobs it claimed in its batch (quick ones,
        # ipcd.daemon.ledger), as it finishes the job in hand: none is handed back.  Not
        # when its master died: the next master runs them again from the store.
        while not self.flags.stopping or (self.ledger.holding and not self.orphaned()):
            if self.ledger.spent:  # max_jobs_per_worker handed out, and run
                return Exit.RECYCLED
            self.count_noticed()
            self.table.begin_receive(self.slot, self.pid, previous)
            try:
                taken = self._take()
            except StoreError as exc:
                # No ring comes for jobs already stored: look again after a pause,
                # not on the doorbell (ipcd.daemon.doorbell), until the store answers.
                self._claim_failed(exc)
                continue
            self._claim_failing = False
            if taken is None:
                if self.flags.stopping:
                    break
                try:
                    self.queue.wait_any()  # the doorbell: the store has work again
                except Interrupted:
                    pass  # a signal: the loop condition says what to do
                except NotRunningError:
                    self.log.warning("worker.queue_gone", queue=f"{self.queue.key:#010x}")
                    return Exit.QUEUE_GONE
                previous = 0
                continue
            previous = taken[0]
            self.handle(*taken)
        return Exit.STOPPED

    def _take(self) -> tuple[int, int, handoff.Handoff] | None:
        """The next job claimed from the store (in batches, ipcd.daemon.ledger) into this
        worker's slot, as the hand-off message (ipcd.wire.handoff) the master's recovery
        reads back should the worker die; its length, message type and what it holds (so
        that the worker need not read any of it back), or None when the store has no job
        for us now (StoreError when the store refuses the claim)."""
        claimed = self.ledger.next()  # within the stop and max_jobs_per_worker
        if claimed is None:
            return None
        record, body = claimed
        message = handoff.encode(record.id, record.attempts, body, self.table.text_size)
        self.table.deliver(self.slot, record.type, message)
        return len(message), record.type, handoff.Handoff(record.id, record.attempts, body)

    def _record_kept(self) -> None:
        """Record the outcomes the ledger keeps now; a store that refuses is left to the
        next exchange (they wait in the ledger, and in the ring)."""
        if not self.ledger.pending:
            return
        try:
            self.ledger.settle()
        except StoreError as exc:
            self.stats.bump(STORE_ERRORS)
            self.log.warning("store.write_failed", error=str(exc), then="with the next claim")

    def _claim_failed(self, exc: StoreError) -> None:
        """A claim the store refused (a full disk, a lock held too long): counted, logged
        once per episode, and a pause before the next.  With outcomes of the last batch
        in the same transaction, it is logged as the write of those (``store.write_failed``,
        as an outcome recorded on its own would be): they wait, and go with the next try."""
        self.stats.bump(STORE_ERRORS)
        if not self._claim_failing:
            self._claim_failing = True
            if self.ledger.pending:
                self.log.error(
                    "store.write_failed", error=str(exc), outcomes=self.ledger.pending,
                    then="try again",
                )  # fmt: skip
            else:
                self.log.error("store.claim_failed", error=str(exc), then="try again")
        time.sleep(CLAIM_BACKOFF)

    def handle(self, length: int, type_: int, given: handoff.Handoff) -> None:
        """Everything that happens to one handed-over job: ``given`` is what the slot
        holds (``length`` bytes of hand-off message of type ``type_``), as the worker
        wrote it there."""
        started = time.monotonic()
        received = time.time()
        body = given.body or b""
        try:
            job, body = job_from(given, type_, received, self.jobs, self._reporter)
            job = self._loaded(job, body)
        except MessageError as exc:
            self.outcomes.reject(exc, body, type_)
            self.table.finished(self.slot)
            self.ledger.uncount()  # not a job: max_jobs_per_worker counts jobs
            return
        try:
            self.run(job, body, length, started)
        except Exception as exc:  # ipcd's own error, reached by this job: it fails, not us
            self._failed_inside(job, body, exc, started, received)
        self.table.finished(self.slot)
        self.jobs_done += 1

    def _loaded(self, job: Job, body: bytes) -> Job:
        """The job with a spilled payload loaded; MessageError when it cannot be one.
        decode promises nothing but MessageError (tests/test_protocol.py holds it to
        that); should a bug break the promise, the message is still only rejected."""
        try:
            if job.spill is not None:  # the payload waits in a segment of its own
                job = spill.load(job, self.spills, self.config.jobs.max_payload)
            return job
        except MessageError:
            raise
        except Exception as exc:  # see the docstring: a message never ends a worker
            self.log.error("job.decode_failed", type=job.type, traceback=traceback.format_exc())
            error = MessageError(f"ipcd could not read the message: {type(exc).__name__}: {exc}")
            error.job_id, error.reply_to, error.unique = job.id, job.reply_to, job.unique
            error.spill = job.spill
            raise error from None

    def _failed_inside(
        self, job: Job, body: bytes, exc: Exception, started: float, received: float
    ) -> None:
        """An error of ipcd's own while running ``job`` fails the job with its cause, unless
        the job's outcome was stored before it.  If even that fails, the worker exits and
        the master finishes the job from the slot (ipcd.daemon.recovery), attempts bounded."""
        self.log.error(
            "job.internal_error", job_id=job.id, type=job.type, traceback=traceback.format_exc()
        )
        try:
            stored = self.store.get(job.id)
        except IpcdError:
            stored = None
        if stored is not None and stored.finished >= received:
            return
        registration = self.registry.lookup(job.type)
        message = f"ipcd failed while handling the job: {type(exc).__name__}: {exc}"
        self.outcomes.finish(
            job,
            error_result(job, message),
            body=body,
            handler=registration.name if registration else "-",
            started=started,
        )

    def run(self, job: Job, body: bytes, length: int, started: float) -> None:
        """Run the job until it has an outcome, or is put back in the store for a retry."""
        registration = self.registry.lookup(job.type)
        timeout = job.timeout or (registration and registration.timeout) or None
        if timeout:
            # A job that may be killed at its deadline could take the outcomes kept
            # before it along (their results only in the ring, which may have moved on
            # by then): they are recorded first, before its time starts.
            self._record_kept()
        deadline = time.time() + timeout if timeout else 0.0
        self.table.received(self.slot, length, job.attempt, job.id, deadline)
        if deadline:
            self.wake_master()  # the master enforces the deadline
        if self.events.debugging:  # `ipcctl logs -f` sees long jobs start
            self.events.debug("job.started", _started_fields(job, registration))
        capture = self.capture
        if capture is not None:
            capture.begin(job.id)  # job_from gave the job its reporter (handle)
        outcome, handler = call(registration, job, self.log)
        captured = capture.end() if capture is not None else None
        if not isinstance(outcome, Retry):
            self.outcomes.finish(
                job, outcome, body=body, handler=handler, started=started, captured=captured
            )
            return
        self._retry(job, body, outcome, handler, started)

    def _retry(self, job: Job, body: bytes, retry: Retry, handler: str, started: float) -> None:
        """Put the job back in the store for another attempt once its delay has passed,
        or fail it when it has none left (or the store cannot take it back)."""
        policy = self.registry.policy(job.type, self.config.jobs)
        if job.attempt >= policy.max_attempts:
            message = f"gave up after {job.attempt} attempts: {retry.reason}"
            self.outcomes.finish(
                job, error_result(job, message), body=body, handler=handler, started=started
            )
            return
        delay = policy.delay(job.attempt) if retry.delay is None else max(retry.delay, 0.0)
        try:
            self.jobs.requeue(job.id, due=time.time() + delay)
        except StoreError as exc:
            message = f"cannot be put back for a retry: {exc}"
            self.outcomes.finish(
                job, error_result(job, message), body=body, handler=handler, started=started
            )
            return
        self.log.info(
            "job.retry",
            job_id=job.id,
            type=job.type,
            handler=handler,
            attempt=job.attempt,
            delay_s=round(delay, 3),
            reason=retry.reason,
        )
        self.stats.retried(handler)
        if delay > 0:
            self.wake_master()  # it keeps the due times: this one may be the soonest


def job_of(message: bytes, type_: int, received: float, jobs: JobStore) -> tuple[Job, bytes]:
    """The job a hand-off message names, and the client's message it came as (read from
    the store when it was handed over by reference).  MessageError when it cannot be one.
    The job carries the id and attempt the store knows (a bare message has no id of its
    own, and an envelope's attempt is the one its submitter sent)."""
    return job_from(handoff.decode(message), type_, received, jobs)


def job_from(
    given: handoff.Handoff,
    type_: int,
    received: float,
    jobs: JobStore,
    reporter: Callable[[float, str], None] | None = None,
) -> tuple[Job, bytes]:
    """The job a hand-off names (see job_of), its ``job.progress()`` going to
    ``reporter``."""
    body = given.body
    if body is None:
        try:
            body = jobs.body(given.job_id)
        except StoreError as exc:
            why = f"its message could not be read from the store: {exc}"
            raise _unreadable(given.job_id, why) from None
        if body is None:
            raise _unreadable(given.job_id, "its message is no longer in the store")
    try:
        job = split.decode(body, type_, received=received)  # a spilled payload's, split
    except MessageError as exc:
        exc.job_id = given.job_id
        raise
    return job.running(given.job_id, given.attempt, reporter), body


def _unreadable(job_id: str, why: str) -> MessageError:
    exc = MessageError(f"job {job_id}: {why}")
    exc.job_id = job_id
    return exc


def worker_process(  # pragma: no cover - runs in the forked worker
    prepared: Prepared, slot: int, *, master_pid: int, close: list[int], notify_master: int
) -> int:
    """The child's side of the master's fork: reset what belongs to the master, then serve.

    Returns the exit status for ``os._exit``.
    """
    code = Exit.CRASHED
    try:
        # If the master dies (even of SIGKILL), finish the job in hand and leave: a
        # worker without its master would go on taking jobs nobody supervises.
        parent_death_signal(signal.SIGTERM)
        if os.getppid() != master_pid:
            return Exit.STOPPED  # the master died before the line above took effect
        os.setpgid(0, 0)  # its own process group: a timeout kills what the job started
        signal.set_wakeup_fd(-1)
        for fd in close:
            os.close(fd)
        flags = Flags()
        flags.install()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the master reloads, not workers
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        with contextlib.suppress(OSError):  # else the master's descriptor serves on
            prepared.sink.reopen()
        context = {"role": "worker", "worker_pid": os.getpid(), "slot": slot}
        log = log_mod.get_logger(**context)
        events = log_mod.Events(prepared.sink, prepared.config.log.level, **context)
        # A held lock delays the job, never fails it.
        lockwaits.be_patient(prepared.objects().locks(), log)

        def wake_master() -> None:
            with contextlib.suppress(OSError):
                os.write(notify_master, b"!")

        run_file = RunDir.beside(prepared.config.store.path).slot_file(slot)
        capture: Capture | None = None
        try:
            capture = Capture.open(run_file, prepared.config.jobs.max_output)
        except OSError as exc:  # a full disk, say: jobs run on, uncaptured
            log.error("capture.unavailable", path=str(run_file), error=exc.strerror or str(exc))
        if capture is not None and prepared.config.jobs.max_output > 0:
            # Handler output is the job's from now on, never the log's: a console the log
            # writes to (``ipcd run``) keeps its own descriptor.
            prepared.sink.keep_console()
            capture.redirect()
            capture.start_trimming()
        recorder = prepared.stats.for_worker(slot)
        # What the master dropped or mended before the fork is the master's to count.
        prepared.sink.take_dropped()
        prepared.store.take_mends()
        prepared.failed.store.take_mends()
        jobs = prepared.open_jobs()  # its own connection: never one shared across fork
        ledger = Ledger(
            jobs,
            worker_pid=os.getpid(),
            limit=prepared.config.daemon.max_jobs_per_worker,
            stopping=lambda: flags.stopping,
            chained=lambda: outcomes.follow_chains(),
        )
        outcomes = Outcomes(
            store=prepared.store,
            failed=prepared.failed,
            replies=prepared.replies,
            log=log,
            events=events,
            unique=prepared.unique,
            stats=recorder,
            jobs=jobs,
            keep_trying=lambda: not flags.stopping,
            ledger=ledger,
            doorbell=Doorbell(prepared.handoff, prepared.config.daemon.workers),
            wake_master=wake_master,
        )
        worker = Worker(
            slot=slot,
            config=prepared.config,
            queue=prepared.handoff,
            table=prepared.table,
            outcomes=outcomes,
            store=prepared.store,
            spills=prepared.spills,
            registry=prepared.registry,
            flags=flags,
            log=log,
            events=events,
            stats=recorder,
            wake_master=wake_master,
            jobs=jobs,
            ledger=ledger,
            sink=prepared.sink,
            orphaned=lambda: os.getppid() != master_pid,
            capture=capture,
        )
        code = worker.serve()
    except BaseException:
        with contextlib.suppress(Exception):
            log_mod.get_logger(role="worker").critical("worker.crashed", exc_info=True)
    return code


def parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG): have the kernel send ``signum`` when the master exits."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum, 0, 0, 0)


def describe_exit(status: int, *, holding: bool) -> str:
    """Why a worker ended, from its wait status, for log events and error results."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}"
    code = os.WEXITSTATUS(status)
    if holding:
        return f"exited with status {code} in the middle of the job"
    names = {
        Exit.STOPPED: "stopped",
        Exit.RECYCLED: "recycled",
        Exit.QUEUE_GONE: "job queue removed",
        Exit.CRASHED: "crashed",
    }
    return f"exited with status {code}" + (f" ({names[code]})" if code in names else "")
