"""Where every job ends: its result stored, waiters woken, failures listed, one log event.

Both a worker (after running a job) and the master (for a job whose worker died) finish
jobs, and they must do it the same way; this module is that one way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ipcd.daemon import uniquerelease
from ipcd.daemon.doorbell import Doorbell
from ipcd.daemon.ledger import Ledger
from ipcd.daemon.log import Events, Logger
from ipcd.errors import (
    IpcdError,
    MessageError,
    NotRunningError,
    RefusedPayloadError,
    StoreError,
)
from ipcd.kernel.procs import alive
from ipcd.kernel.queues import Queue
from ipcd.layout.results import Kind, Result, Status, too_large
from ipcd.store import Captured, JobRecord, JobStore, Outcome
from ipcd.tables import spill
from ipcd.tables.failed import FailedList
from ipcd.tables.results import ResultStore
from ipcd.tables.stats import RESULTS_LOST, STORE_ERRORS, NullRecorder, Recorder
from ipcd.tables.unique import UniqueTable
from ipcd.wire.protocol import CONFIRMED, REFUSED, Job, SpillRef


def error_result(job: Job, message: str) -> Result:
    return Result(
        job.id, job.type, Status.ERROR, Kind.TEXT, message.encode("utf-8", "replace"),
        job.attempt, job.submitted, time.time(),
    )  # fmt: skip


#: The first pause before an outcome the store refused is tried again, and the longest.
RECORD_RETRY = 0.1
MAX_RECORD_RETRY = 2.0


class Outcomes:
    """Finishes jobs: result, failed list, reply notification, log event."""

    def __init__(
        self,
        *,
        store: ResultStore,
        failed: FailedList,
        replies: Queue,
        log: Logger,
        events: Events,
        unique: UniqueTable | None = None,
        stats: Recorder | None = None,
        jobs: JobStore | None = None,
        keep_trying: Callable[[], bool] | None = None,
        ledger: Ledger | None = None,
        doorbell: Doorbell | None = None,
        wake_master: Callable[[], None] | None = None,
    ) -> None:
        """``jobs`` is this process's connection to the job store (ipcd.store), which
        records each outcome; None where no store is kept (tests of the rings alone).
        ``ledger`` (a worker's, ipcd.daemon.ledger) keeps outcomes nobody waits for until
        its next exchange with the store, instead of a transaction each.
        ``keep_trying`` (a worker's: while it is not asked to stop) makes an outcome the
        store refuses be tried again until it is recorded; without it (the master, which
        must not block) the outcome is given up on at once.
        ``doorbell`` and ``wake_master``: whom to tell of jobs the store's transactions
        released or queued on their own (dependents, hook jobs; :meth:`follow_chains`)."""
        self.store = store
        self.doorbell = doorbell
        self.wake_master = wake_master
        self.jobs = jobs
        self.keep_trying = keep_trying
        self.ledger = ledger
        self.failed = failed
        self.replies = replies
        self.log = log
        self.events = events
        #: The daemon's unique-key table: a final outcome frees the job's key.
        self.unique = unique
        #: This process's record in the stats segment (ipcd.tables.stats).
        self.stats = stats if stats is not None else NullRecorder()

    def report_mends(self) -> None:
        """Say what this process mended since the last call: for each overwritten header
        of the result ring or the failed list it wrote back (ipcd.tables.results), one
        ``ipc.recreated`` event, and the records lost counted.  Called after this class's
        own use of the rings, and by the process's loop for the other users of them
        (recovery, the spill sweep)."""
        if not (self.store.mends or self.failed.store.mends):
            return  # the usual case, twice per job: nothing mended
        for name, store in (("result segment", self.store), ("failed list", self.failed.store)):
            for kept, lost in store.take_mends():
                self.stats.bump(RESULTS_LOST, lost)
                self.log.warning(
                    "ipc.recreated", objects=[f"{name} overwritten"], results_kept=kept,
                    results_lost=lost,
                )  # fmt: skip

    def finish(
        self,
        job: Job,
        result: Result,
        *,
        body: bytes,
        handler: str,
        started: float,
        listed: bool = True,
        logged: bool = True,
        captured: Captured | None = None,
        **fields: Any,
    ) -> None:
        """Store ``result`` for ``job``; a failure also goes to the failed list.
        ``captured``: what the job wrote and reported (ipcd.daemon.capture), recorded
        with its outcome.

        A failure is listed (its spilled payload then held by the list) *before* the result
        is stored: a waiter reads the result the moment it is stored, and must find the
        job on the failed list and its spill entry FAILED, never the state before.  (A
        worker that dies between the two leaves no result: the master runs the job again.)
        What follows the stored result, freeing the unique key and a success's payload,
        comes after it: a worker that dies before storing the result must leave the job
        whole for its next run.

        ``listed=False`` keeps a failure off the failed list (a malformed message cannot be
        retried); ``logged=False`` skips the ``job.done`` event when the caller has already
        logged the job's one event (``job.rejected``).
        """
        whole = result
        room = self.store.capacity()
        if room is not None and len(result.data) > room:
            # Decided here, so the log says error (or the size of what was spilled).
            result = self._spill(result) if self.store.spills else too_large(result, room + 64)
        ok = result.ok
        if not ok and listed:
            self._list_failed(job, body, result.error)
        stored = self._store(result)
        # The store keeps the result whole (not the ring's reference to its spill segment),
        # unless it became an error here (too large): then the job failed, there as well.
        self.record(
            job.id,
            whole if ok else result,
            waiter=job.reply_to is not None,
            captured=captured,
        )
        self.report_mends()
        self._release(job, result, listed=listed)
        if not logged:
            if job.reply_to is not None:
                self.notify(job.reply_to, job.id)
            return
        if not stored:
            fields["stored"] = False
        self.announce(job, result, body=body, handler=handler, started=started, **fields)
        if result.spill is not None and stored:
            self._refill(result.spill.size)

    def unstarted(self, record: JobRecord, reason: str, **fields: Any) -> None:
        """A job that ended before any worker started it (cancelled by an operator or for
        its dependency, or expired) ends as a failed run would for its waiter and its
        unique key: the error result ``reason`` in the ring, the key freed; not on the
        failed list (``ipcctl retry`` takes it back from the store).  ``fields`` go to
        its ``job.done`` event; ``logged=False`` when the caller logs the job's one event
        itself."""
        job = Job(
            id=record.id, type=record.type, payload=None, submitted=record.submitted,
            sender_pid=record.sender_pid, reply_to=record.reply_to, unique=record.unique,
            attempt=max(record.attempts, 1),
        )  # fmt: skip
        self.finish(
            job, error_result(job, reason), body=b"", handler=record.handler,
            started=time.monotonic(), listed=False, **fields,
        )  # fmt: skip

    def reject(self, exc: MessageError, body: bytes, type_: int, **fields: Any) -> None:
        """A message that cannot be a job: the ``job.rejected`` event and counter, and when
        its id could be read, an error result under it (its waiter woken, its unique key
        and spilled payload freed).  It is not listed as failed: retrying it would fail
        the same way.  The intake, workers and the master (a recovered message) share this.
        """
        self.stats.rejected()
        self.log.warning(
            "job.rejected",
            job_id=exc.job_id,
            type=type_,
            bytes_in=len(body),
            refused=isinstance(exc, RefusedPayloadError),
            error=str(exc),
            head=body[:64].hex(),
            **fields,
        )
        if exc.job_id is None:
            return
        job = Job(
            id=exc.job_id,
            type=type_,
            payload=None,
            submitted=time.time(),
            reply_to=exc.reply_to,
            unique=exc.unique,
            spill=exc.spill if isinstance(exc.spill, SpillRef) else None,
        )
        self.finish(
            job,
            error_result(job, str(exc)),
            body=body,
            handler="-",
            started=time.monotonic(),
            listed=False,
            logged=False,
        )

    def record(
        self, job_id: str, result: Result, *, waiter: bool = False, captured: Captured | None = None
    ) -> bool:
        """The outcome in the job store, the job's record of truth (the ring is its cache
        for waiters).  With a ledger, an outcome nobody waits for is only kept for the
        ledger's next exchange; a ``waiter``'s is recorded now, with those kept before it,
        so that a reply still means "recorded".

        A store that cannot be written (a full disk) is logged and counted, and tried
        again with a growing pause for as long as ``keep_trying`` says: a job whose
        outcome is not recorded stays ``running`` in the store, and would run again after
        the next restart.  Given up on (asked to stop, or no ``keep_trying``) the job runs
        again after a restart (at-least-once).  False when the store kept its state (a
        job cancelled meanwhile stays cancelled) or was not written."""
        if self.jobs is None:
            return False
        ok = result.ok
        outcome = Outcome(
            job_id, ok, result.finished or time.time(), int(result.kind), result.data,
            None if ok else result.error, captured,
        )  # fmt: skip
        jobs, ledger = self.jobs, self.ledger
        if ledger is None:
            recorded = self._persist(
                job_id,
                lambda: jobs.finish(
                    job_id, ok=outcome.ok, finished=outcome.finished,
                    result_kind=outcome.result_kind, data=outcome.data, error=outcome.error,
                    captured=captured,
                ),
            )  # fmt: skip
            self.follow_chains()
            return recorded
        ledger.record(outcome)
        if not waiter:
            return True

        def flush() -> bool:
            ledger.flush()
            return True

        return self._persist(job_id, flush)

    def _persist(self, job_id: str, write: Callable[[], bool]) -> bool:
        """``write`` until it is done or ``keep_trying`` says to give up (see record)."""
        pause = RECORD_RETRY
        while True:
            try:
                return write()
            except StoreError as exc:
                if pause == RECORD_RETRY:  # once per job: the first refusal
                    self.log.error("store.write_failed", job_id=job_id, error=str(exc))
                self.stats.bump(STORE_ERRORS)
                if self.keep_trying is None or not self.keep_trying():
                    return False
            time.sleep(pause)
            pause = min(pause * 2, MAX_RECORD_RETRY)

    def follow_chains(self) -> None:
        """After this process's store committed: what its transactions decided on their
        own (ipcd.store.chains) told to whom it concerns.  Workers are rung for jobs
        that became queued (dependents released, hook jobs), the master woken for
        released jobs that wait for their ``--delay``, and each dependent cancelled ends
        as a cancelled job does (:meth:`unstarted`), with its reason.  Nothing to do,
        and no store call, when nothing was decided."""
        if self.jobs is None:
            return
        chained = self.jobs.take_chained()
        for record in chained.cancelled:
            self.log.info("job.cancelled", job_id=record.id, reason=record.error)
            self.unstarted(record, record.error or "cancelled", cancelled=True)
        if chained.queued and self.doorbell is not None:
            self.doorbell.ring(chained.queued)
        if chained.scheduled and self.wake_master is not None:
            self.wake_master()

    def conclude(self, job: Job, result: Result, *, body: bytes) -> None:
        """What a worker that died after storing ``result`` may have left undone: a failure
        put on the failed list (which keeps a spilled payload), the job's unique key freed,
        a success's spilled payload removed (the master calls this).

        Each step tolerates having been done: a job already on the failed list is not
        listed twice, and a key or segment already freed is left alone.
        """
        if not result.ok and not self.listed(job.id):
            self._list_failed(job, body, result.error)
        self.record(job.id, result)
        self.report_mends()
        self._release(job, result, listed=True)

    def _release(self, job: Job, result: Result, *, listed: bool) -> None:
        """After the stored outcome: the job's unique key freed, and its spilled payload
        removed unless the failed list holds it."""
        if job.unique is not None and self.unique is not None:
            uniquerelease.release(self.unique, job, self.log)
        if job.spill is not None and (result.ok or not listed):
            spill.settle(self.store.spills, job)  # final: the payload's segment goes

    def listed(self, job_id: str) -> bool:
        """Whether the failed list holds ``job_id`` (False when it cannot be read)."""
        try:
            return any(entry.job_id == job_id for entry in self.failed.entries())
        except IpcdError:
            return False

    def announce(
        self,
        job: Job,
        result: Result,
        *,
        body: bytes,
        handler: str,
        started: float,
        **fields: Any,
    ) -> None:
        """The ``job.done`` event and the waiter's wake-up, for a result already stored.

        The master calls this alone for a worker that died between storing a result and
        saying so.
        """
        if job.reply_to is not None:
            self.notify(job.reply_to, job.id)
        ok = result.ok
        self.stats.done(handler, ok, started)
        event: dict[str, Any] = {
            "job_id": job.id,
            "type": job.type,
            "handler": handler,
            "outcome": "ok" if ok else "error",
            "ms": round((time.monotonic() - started) * 1000, 3),
            "attempt": job.attempt,
            "bytes_in": job.spill.size if job.spill else len(body),
            "bytes_out": result.spill.size if result.spill else len(result.data),
        }
        if job.bare:
            event["bare"] = True
        if job.sender_pid:
            event["sender_pid"] = job.sender_pid
        if not ok:
            event["error"] = result.error
        if fields:
            event.update(fields)
        self.events.info("job.done", event)

    def _spill(self, result: Result) -> Result:
        assert self.store.spills is not None
        result, evicted = spill.spill_result(self.store.spills, result)
        if evicted:
            self.log.info(
                "spill.evicted",
                job_id=result.job_id,
                evicted=[e.job_id for e in evicted],
                bytes=sum(e.size for e in evicted),
            )
        return result

    def _refill(self, size: int) -> None:
        """After a pooled result, its waiter told: a spare for the next one of its size
        (SpillTable.refill), so that one does not wait for the kernel's fresh pages."""
        if self.store.spills is None:
            return
        try:
            self.store.spills.refill(size)
        except IpcdError as exc:
            self.log.warning("spill.refill_failed", bytes=size, error=str(exc))

    def _store(self, result: Result) -> bool:
        try:
            self.store.put(result)
        except IpcdError as exc:
            if result.spill is not None and self.store.spills is not None:
                self.store.spills.release(result.spill.shmid, result.job_id, result.spill.entry)
            # The segment was removed or overwritten (the master makes it anew within
            # seconds, ipcd.daemon.objectwatch): say so, count it and go on serving; the job's
            # outcome is in the log event, and its waiter is told the result was lost.
            self.log.error("result.store_failed", job_id=result.job_id, error=str(exc))
            self.stats.bump(RESULTS_LOST)
            return False
        return True

    def _list_failed(self, job: Job, body: bytes, error: str) -> None:
        try:
            kept = spill.keep_failed(self.store.spills, job)  # a spilled payload, bounded
            self.failed.add(job.id, job.type, body, job.attempt, error, payload_kept=kept)
        except IpcdError as exc:
            self.log.error("failed_list.unavailable", job_id=job.id, error=str(exc))

    def notify(self, reply_to: int, job_id: str) -> None:
        """Tell a waiting client its result is stored; never block on a full reply queue."""
        self._reply(reply_to, job_id, job_id.encode("ascii"))

    def refuse(self, reply_to: int, job_id: str) -> None:
        """Tell a submitter its job was refused as a usage error (``after`` names an
        unknown job); its error result is stored already."""
        self._reply(reply_to, job_id, REFUSED + job_id.encode("ascii"))

    def confirm(self, reply_to: int, job_id: str) -> None:
        """Tell a submitter its job is committed to the job store (``"confirm"``)."""
        self._reply(reply_to, job_id, CONFIRMED + job_id.encode("ascii"))

    def _reply(self, reply_to: int, job_id: str, body: bytes) -> None:
        try:
            if self.replies.send_nowait(body, reply_to):
                return
            self._purge_replies()
            if self.replies.send_nowait(body, reply_to):
                return
            why = "the reply queue is full"
        except NotRunningError as exc:  # removed: the master makes it anew
            why = str(exc)
        self.log.warning("reply.dropped", job_id=job_id, reply_to=reply_to, error=why)

    def _purge_replies(self) -> None:
        """Drop notifications nobody will read: those of clients that have exited."""
        kept: list[tuple[bytes, int]] = []
        dropped = 0
        for _ in range(4096):
            message = self.replies.receive_nowait(0)
            if message is None:
                break
            if alive(message[1]):
                kept.append(message)
            else:
                dropped += 1
        for body, type_ in kept:
            self.replies.send_nowait(body, type_)
        self.log.info("reply.purged", dropped=dropped, kept=len(kept))
