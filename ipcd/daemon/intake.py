"""The intake: drain the kernel's job queue into the job store, a batch per transaction.

Clients keep sending to the public job queue (ipcctl, ipcd.client, PHP's msg_send, C);
the intake is the one process that takes from it.  It blocks in ``msgrcv`` until a
message comes, then takes whatever else waits without blocking, vets every message once
(decodes it, finds its handler, loads a spilled payload so that the store holds the job
whole), and commits the batch to the store in one transaction.  Only then does it tell
the submitters that asked (``"confirm"``), wake the master to hand the jobs to workers,
and free its slots.

Like a worker, the intake receives straight into shared memory (its slots of a table at
``K + 0x08000000``, ipcd.tables.inflight): a message taken off the queue is on record
before any Python code runs, and stays there until its batch is committed.  Killed at any
point, the intake loses nothing: the master commits what its slots hold (the store skips
ids it already has) before it starts the next intake.

The store is bounded: past ``[store] max_queued`` (jobs or bytes) the intake stops
draining; the kernel queue fills and submitters get its backpressure (exit 75).  A store
that cannot be written (full disk, read-only, corrupt) stops the draining too: the
messages wait in the kernel queue and in the slots, the error is logged and counted, and
the intake tries again until the store takes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from ipcd.config import Config
from ipcd.daemon.doorbell import Doorbell
from ipcd.daemon.log import Logger
from ipcd.daemon.outcomes import Outcomes, error_result
from ipcd.daemon.signals import Flags
from ipcd.errors import MessageError, NotRunningError, StoreError
from ipcd.handlers.registry import Registry
from ipcd.kernel.queues import Queue, TooBigError
from ipcd.kernel.segments import Segment
from ipcd.kernel.waits import Interrupted
from ipcd.store import Admitted, Backlog, JobStore, NewJob, State
from ipcd.store.chains import is_unknown_error
from ipcd.tables import spill
from ipcd.tables.inflight import InflightTable
from ipcd.tables.spill.segment import DATA
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.stats import STORE_ERRORS, Recorder
from ipcd.wire import protocol, split
from ipcd.wire.protocol import Job, Payload
from ipcd.wire.submitting import JobIds

#: Messages the intake takes per batch: its slots (each the size of the kernel's msgmax).
SLOTS = 64
#: How long the intake waits before it tries a failing store again, at most.
MAX_BACKOFF = 5.0
#: How often a full store is looked at again.
FULL_RECHECK = 0.2
#: The states a vetted job ends in at once (one look-up: an enum member's is two).
_ENDED = frozenset({State.FAILED, State.CANCELLED})
#: Seconds a commit's backlog stands for the store's (see Intake._room): under load
#: every batch reads it in its own commit; after a quiet spell one read is paid again.
BACKLOG_FRESH = 1.0


class Exit:
    """Intake exit statuses, which the master reads from waitpid."""

    STOPPED = 0
    #: The job queue was removed under it: the master makes it anew and starts another.
    QUEUE_GONE = 4
    CRASHED = 70


class Vetted(NamedTuple):
    """One message as the store will hold it, and what to do once it is committed."""

    record: NewJob
    job: Job | None
    #: Why it cannot be a job (then ``job`` is what could be read of it, or None).
    error: MessageError | None = None


class Intake:
    """Takes messages off the job queue into the store; see the module's docstring."""

    def __init__(
        self,
        *,
        queue: Queue,
        slots: InflightTable,
        jobs: JobStore,
        registry: Registry,
        config: Config,
        outcomes: Outcomes,
        spills: SpillTable | None,
        flags: Flags,
        log: Logger,
        stats: Recorder,
        wake_master: Callable[[], None],
        doorbell: Doorbell,
    ) -> None:
        """``slots`` hold the messages taken until they are committed to ``jobs``;
        ``outcomes`` rejects what cannot be a job and tells submitters; ``stats`` counts
        failed commits; ``doorbell`` wakes workers for the jobs committed, and
        ``wake_master`` the master for the delayed ones (it keeps their due times)."""
        self.queue = queue
        self.slots = slots
        self.jobs = jobs
        self.registry = registry
        self.config = config
        self.outcomes = outcomes
        self.spills = spills
        self.flags = flags
        self.log = log
        self.stats = stats
        self.wake_master = wake_master
        self.doorbell = doorbell
        self.pid = os.getpid()
        self._lengths = [0] * slots.workers
        #: Ids for messages without one of their own, counted (a getrandom(2) call per
        #: message otherwise, though most messages bring their own id).
        self._ids = JobIds()
        #: The backlog as the last commit left it (None: not known), which the next
        #: batch's room is reckoned from while it is below the bounds.
        self._backlog: Backlog | None = None
        self._backlog_at = 0.0
        #: Since when the store is over its bounds, or fails (0: it is not).
        self._full_since = 0.0
        self._failing_since = 0.0
        self._backoff = 0.1
        #: The segments of the spilled payloads vetted for the batch being committed.
        self._attached: list[Segment] = []

    # --- the loop -----------------------------------------------------------------------

    def serve(self) -> int:
        """Drain the queue into the store until stopped; returns the exit status."""
        for index in range(self.slots.workers):
            if self.slots.held(index) is None:
                self.slots.reset_worker(index, self.pid)
        self.commit_held()  # what an intake killed before us left (the master did at start)
        while not self.flags.stopping:
            room = self._room()
            if not room:
                continue
            try:
                taken = self._take(room)
            except NotRunningError:
                self.log.warning("intake.queue_gone", queue=f"{self.queue.key:#010x}")
                return Exit.QUEUE_GONE
            if taken:
                self.commit_held(taken)
        return Exit.STOPPED

    def _room(self) -> int:
        """How many messages the next batch may take: no more than the store has room
        for below ``max_queued`` (bytes are known only once taken: ``max_queued_bytes``
        may be passed by one batch).  0: wait a moment (and say so once): the kernel
        queue fills and submitters get its backpressure.

        The backlog is the one the last commit read in its own transaction (``admit``),
        while that is younger than BACKLOG_FRESH and below the bounds, else read afresh.
        Workers' claims only shrink it meanwhile; what other processes add meanwhile (a
        retry, a dead worker's unstarted jobs, hook jobs, a schedule's runs) may pass the
        bound by that many jobs, for at most that long."""
        limits = self.config.store
        backlog = self._backlog
        self._backlog = None
        if time.monotonic() - self._backlog_at > BACKLOG_FRESH:
            backlog = None
        if backlog is None or not (
            backlog.jobs < limits.max_queued and backlog.bytes < limits.max_queued_bytes
        ):
            try:
                backlog = self.jobs.backlog()
            except StoreError as exc:
                self._store_failed(exc)
                return 0
        if backlog.jobs < limits.max_queued and backlog.bytes < limits.max_queued_bytes:
            self._backlog = backlog
            if self._full_since:
                self.log.info("intake.resumed", after_s=round(time.time() - self._full_since, 3))
                self._full_since = 0.0
            return limits.max_queued - backlog.jobs
        if not self._full_since:
            self._full_since = time.time()
            self.log.warning(
                "intake.store_full", queued=backlog.jobs, bytes=backlog.bytes,
                max_queued=limits.max_queued, max_queued_bytes=limits.max_queued_bytes,
            )  # fmt: skip
        self._pause(FULL_RECHECK)
        return 0

    def _pause(self, seconds: float) -> None:
        """Sleep, but no longer than it takes to notice a stop."""
        until = time.monotonic() + seconds
        while not self.flags.stopping and (left := until - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def _take(self, room: int) -> int:
        """Wait for a message, then take what else waits (``room`` at most), each into a
        slot of its own.

        Returns how many were taken (0: a signal came first)."""
        count = 0
        for index in range(min(self.slots.workers, room)):
            self.slots.begin_receive(index, self.pid, self._lengths[index])
            address = self.slots.msgbuf_address(index)
            try:
                if index == 0:
                    length: int | None = self.queue.receive_into(address, self.slots.text_size)
                else:
                    length = self.queue.receive_into_nowait(address, self.slots.text_size)
            except Interrupted:
                break
            except TooBigError:
                self._take_oversized()
                break
            if length is None:
                break
            self._lengths[index] = length
            # The id a message without one of its own (a bare message, an unreadable
            # envelope) is stored under: in the slot, so that an intake killed after its
            # commit and before freeing the slot stores it under the same id again
            # (the store skips ids it has), not twice.
            self.slots.received(index, length, 0, self._ids(self.pid), 0.0)
            count += 1
        return count

    def _take_oversized(self) -> None:
        """msgmax was raised above the slot size after start: take the message unprotected
        and commit it alone."""
        body, type_ = self.queue.receive(0, timeout=0)
        self.log.warning("job.unprotected", type=type_, bytes_in=len(body))
        self._commit([self.vet(body, type_)])

    # --- committing -----------------------------------------------------------------------

    def commit_held(self, used: int | None = None) -> None:
        """Commit every message the slots hold, then free the slots; waits (and tries
        again) while the store cannot be written, unless asked to stop, when the messages
        stay in the slots for the next intake.  ``used``: only the first slots, those
        the last batch filled (a batch takes slots in order, and every batch before it
        was committed and freed); None: every slot (at start, after a killed intake)."""
        count = self.slots.workers if used is None else min(used, self.slots.workers)
        held = [(index, h) for index in range(count) if (h := self.slots.held(index))]
        if not held:
            return
        if self._commit([self.vet(h.body, h.type, h.job_id or None) for _, h in held]):
            for index, _ in held:
                self.slots.finished(index)

    def _commit(self, batch: list[Vetted]) -> bool:
        try:
            return self._commit_batch(batch)
        finally:
            while self._attached:  # the spilled payloads vetted for it: stored, or not
                self._attached.pop().close()

    def _commit_batch(self, batch: list[Vetted]) -> bool:
        while True:
            try:
                admission = self.jobs.admit([v.record for v in batch])
            except StoreError as exc:
                self._store_failed(exc)
                if self.flags.stopping:
                    return False
                continue
            break
        if self._failing_since:
            self.log.info(
                "store.writable", after_s=round(time.time() - self._failing_since, 3)
            )  # fmt: skip
            self._failing_since, self._backoff = 0.0, 0.1
        self._backlog, self._backlog_at = admission.backlog, time.monotonic()
        if any(v.record.after for v in batch):
            given = {entry.id: entry for entry in admission.jobs}
            batch = [_decided(v, given) for v in batch]
        self._after_commit(batch)
        return True

    def _store_failed(self, exc: StoreError) -> None:
        """Log (once per episode) and count a store that refuses, then back off."""
        self.stats.bump(STORE_ERRORS)
        if not self._failing_since:
            self._failing_since = time.time()
            self.log.error("store.unwritable", error=str(exc), then="jobs wait in the kernel queue")
        self._pause(self._backoff)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _after_commit(self, batch: list[Vetted]) -> None:
        """What follows a committed batch: rejections said, submitters told, spilled
        payloads' segments freed (the store holds them now), the master woken."""
        queued = scheduled = 0
        for vetted in batch:
            job = vetted.job
            if vetted.error is not None:
                self.outcomes.reject(vetted.error, vetted.record.body, vetted.record.type)
                continue
            assert job is not None
            state, error = vetted.record.state, vetted.record.error or ""
            if state in _ENDED:
                # No handler, an unknown dependency, or a dependency that failed already:
                # it ended at once, its error result stored, and no confirmation.
                result = error_result(job, error)
                self.outcomes.finish(
                    job, result, body=vetted.record.body, handler=vetted.record.handler,
                    started=time.monotonic(), listed=state is State.FAILED,
                )  # fmt: skip
                if job.confirm is not None and job.confirm != job.reply_to:
                    if is_unknown_error(error):
                        self.outcomes.refuse(job.confirm, job.id)  # a usage error
                    else:
                        self.outcomes.notify(job.confirm, job.id)
                continue
            if state is State.SCHEDULED:
                scheduled += 1
            else:
                queued += 1
            if job.confirm is not None:
                self.outcomes.confirm(job.confirm, job.id)
            if job.spill is not None:
                spill.settle(self.spills, job)
        if queued:
            self.doorbell.ring(queued)
        if scheduled:
            self.wake_master()

    # --- vetting --------------------------------------------------------------------------

    def vet(self, body: bytes, type_: int, given_id: str | None = None) -> Vetted:
        """The message as the store will hold it.  Never raises: what cannot be a job is
        recorded as failed, with why, under the id that could be read, else ``given_id``
        (the one its slot holds), else a new one; a bare message gets ``given_id`` too."""
        now = time.time()
        tail: memoryview | None = None
        try:
            job = protocol.decode(body, type_, received=now)
            if job.bare and given_id is not None:
                job = job._replace(id=given_id)
            if job.spill is not None:
                job, body, tail = self._split(job, body)
        except MessageError as exc:
            return self._rejected(exc, body, type_, now, given_id)
        except Exception as exc:  # a bug must not cost the batch: reject this message
            self.log.error("job.decode_failed", type=type_, exc_info=True)
            error = MessageError(f"ipcd could not read the message: {type(exc).__name__}: {exc}")
            return self._rejected(error, body, type_, now, given_id)
        registration = self.registry.lookup(job.type)
        due = job.due if job.due > now else 0.0
        # NewJob's fields in their order, positionally: a call with keywords first builds
        # a dict of them, which doubles what making the record costs, on every job.
        record = NewJob(
            job.id,
            job.type,
            registration.name if registration else "-",  # handler
            body,
            job.bare,
            now,  # accepted
            _size(job.payload) if tail is None else len(tail),  # size
            protocol.preview(job.payload),
            job.submitted or now,  # submitted
            due,
            job.priority,
            job.unique,
            job.sender_pid,
            _uid_of(job.sender_pid),  # sender_uid
            job.reply_to,
            job.timeout,
            job.attempt - 1,  # attempts
            State.SCHEDULED if due else State.QUEUED,  # state
            None,  # error
            None if job.expire is None else (due or now) + job.expire,  # expires
            job.after,
            b"" if tail is None else tail,  # tail
        )
        if registration is None:
            message = f"no handler for message type {job.type}"
            return Vetted(record._replace(state=State.FAILED, error=message), job)
        return Vetted(record, job)

    def _split(self, job: Job, body: bytes) -> tuple[Job, bytes, memoryview]:
        """A job whose payload came in a segment, as the store will hold it: split
        (ipcd.wire.split), the head and then the payload's bytes straight from the
        segment, attached until the batch is committed (a segment does not survive a
        reboot; the store's file does).  Text and JSON are checked here, as a payload in
        the message is, so that a malformed one is refused at once; the job's ``payload``
        is then what ``list`` previews."""
        ref = job.spill
        assert ref is not None
        segment = spill.attach(job, self.spills, self.config.jobs.max_payload)
        assert segment is not None
        self._attached.append(segment)
        data = segment.buf[DATA : DATA + ref.size]
        try:
            if ref.kind == "bytes":
                shown: Payload = _first_bytes(data, protocol.PREVIEW * 4)
            else:
                shown = split.payload(data, ref.kind, job.id)
        except MessageError as exc:
            exc.reply_to, exc.unique, exc.spill = job.reply_to, job.unique, ref
            raise
        return job._replace(payload=shown), split.head(body), data

    def _rejected(
        self, exc: MessageError, body: bytes, type_: int, now: float, given_id: str | None
    ) -> Vetted:
        """A message that is no job: recorded failed under its readable id, if any."""
        job_id = exc.job_id or given_id or protocol.new_job_id()
        record = NewJob(
            id=job_id, type=max(type_, 0), handler="-", body=body[: self.slots.text_size],
            bare=False, accepted=now, size=len(body),
            preview=protocol.preview(body[: protocol.PREVIEW]), submitted=now,
            state=State.FAILED, error=str(exc),
        )  # fmt: skip
        return Vetted(record, None, exc)


def _first_bytes(data: memoryview, count: int) -> bytes:
    """The first ``count`` bytes of a large bytes payload, for its preview: cut back to
    the start of a UTF-8 character the cut falls inside, so that a text previews as text
    (as the whole payload would)."""
    head = bytes(data[:count])
    if len(data) > count:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.reason == "unexpected end of data":
                return head[: exc.start]
    return head


def _decided(vetted: Vetted, admitted: dict[str, Admitted]) -> Vetted:
    """``vetted`` with the state the store gave it (a job with ``after`` may be held,
    cancelled or failed for its dependencies, ipcd.store.chains); as it was when the
    store had it already (an intake killed after its commit)."""
    entry = admitted.get(vetted.record.id)
    if not vetted.record.after or entry is None:
        return vetted
    return vetted._replace(record=vetted.record._replace(state=entry.state, error=entry.error))


def _size(payload: Payload) -> int:
    if isinstance(payload, bytes):
        return len(payload)
    if isinstance(payload, str):
        return len(payload.encode("utf-8", "surrogateescape"))
    with contextlib.suppress(ValueError, TypeError):
        return len(json.dumps(payload, separators=(",", ":")))
    return 0


def _uid_of(pid: int) -> int | None:
    """The submitter's user, while it runs (its /proc directory's owner)."""
    if pid <= 0:
        return None
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
