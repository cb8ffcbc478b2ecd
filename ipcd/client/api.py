"""The Python client API: submit jobs, wait for and read their results.

This is the cron-facing path, so it imports only the standard library, sysv_ipc and
ipcd's own light modules (never structlog, python-daemon or the daemon's code): its cost
should be close to ``python3 -c 'import sysv_ipc'``.

Waiting never sleep-polls.  A submitter that waits names a reply type (its PID) in the
envelope; the daemon sends the job id to the reply queue under that type once the result
is stored, and ``msgrcv`` on that type wakes the submitter.  Someone waiting for a job it
did not submit waits on the result gate instead, a semaphore the daemon pulses after
every result.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ipcd.config import Config
from ipcd.errors import (
    IpcdError,
    JobFailedError,
    NotConfirmedError,
    NotRunningError,
    OverwrittenError,
    ResultLostError,
    UsageError,
    WaitTimeoutError,
)
from ipcd.kernel.keys import Keys, derive
from ipcd.kernel.procs import SPIN_SECONDS as SPIN_SECONDS
from ipcd.kernel.procs import alive, poll_seconds
from ipcd.kernel.queues import Queue, QueueStats
from ipcd.kernel.segments import Gate, Segment
from ipcd.layout.results import WAIT_HORIZON_MS, Header, Result
from ipcd.tables.results import ResultStore
from ipcd.wire import protocol
from ipcd.wire.protocol import Payload
from ipcd.wire.submitting import JobIds, Template

if TYPE_CHECKING:
    # Imported where used: the submit path that cron scripts take does not need them.
    from ipcd.tables.failed import FailedJob, FailedList
    from ipcd.tables.inflight import WorkerView
    from ipcd.tables.spill.table import Usage


#: Longest pause between looks at the segment while waiting on the gate: it bounds the
#: delay when a result lands between our look and our wait (a pulse nobody saw).
GATE_RECHECK = 0.25
#: Seconds a client reads an overwritten result segment again, while the daemon (which
#: looks at least once a second) writes its header back.
REPAIR_WAIT = 3.0


def _spin_seconds(last_wait: float = 0.0) -> float:
    """How long to poll the reply queue first (ipcd.kernel.procs.poll_seconds), unless
    the last reply took longer than that (``last_wait`` seconds): a poll that cannot
    find its reply only burns the CPU for its whole length (a slow handler's callers
    paid a millisecond of CPU per call).  A reply that comes within the poll is worth
    it: polling keeps the client's CPU awake, and on a quiet 2-CPU virtual machine
    round trips ran 1.5x as many per second as with a client that slept at once (1,945
    against 1,291 calls/s, 435 against 104 us of the client's CPU per call).  A client
    that sleeps still measures its waits, and polls again once replies come quickly."""
    spin = poll_seconds(SPIN_SECONDS)
    return spin if last_wait <= spin else 0.0


class Status(NamedTuple):
    """What ``ipcctl status`` shows."""

    keys: Keys
    queue: QueueStats
    results: Header | None
    results_size: int
    workers: tuple[WorkerView, ...] = ()
    #: Entries of the failed list in shared memory (a cache of the job store's failed
    #: jobs, bounded by ``[jobs] failed_size``), and how many older ones it dropped.
    failed: int = 0
    failed_dropped: int = 0
    #: The spill table's use (None when there is none to read).
    spill: Usage | None = None

    def daemon_running(self) -> bool:
        return serving(self.results)


def serving(header: Header | None) -> bool:
    """Whether a daemon serves the queue: its master wrote its PID into the result
    segment's header at start (0 again when it stops), and that process has not exited.
    A master killed without the chance to clear it, or one that lingers as a zombie, is
    not serving (ipcd.kernel.procs.alive)."""
    return header is not None and alive(header.daemon_pid)


class Client:
    """One configuration's queue and result segment, opened on first use."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._keys: Keys | None = None
        self._queue: Queue | None = None
        self._replies: Queue | None = None
        self._store: ResultStore | None = None
        self._gate: Gate | None = None
        #: Notifications that arrived while waiting for another of this client's jobs.
        self._notified: set[bytes] = set()
        #: Segments status() attached, for close().
        self._attached: list[Segment] = []
        #: This client's job ids and envelope templates (ipcd.wire.submitting).
        self._ids = JobIds()
        self._templates: dict[tuple[bool, bool], Template] = {}
        #: How long the last reply this client waited for took (_spin_seconds).
        self._last_wait = 0.0

    @property
    def keys(self) -> Keys:
        if self._keys is None:
            self._keys = derive(self.config.ipc)
        return self._keys

    @property
    def queue(self) -> Queue:
        if self._queue is None:
            self._queue = Queue.open(self.keys.jobs, what="job queue")
        return self._queue

    @property
    def store(self) -> ResultStore:
        if self._store is None:
            self._store = ResultStore.open(self.keys.results)
        return self._store

    def submit(
        self,
        handler: str | int,
        payload: Payload = None,
        *,
        notify: bool = False,
        send_timeout: float | None = None,
        job_timeout: float | None = None,
        delay: float | None = None,
        unique: str | None = None,
        confirm: bool = False,
        priority: int = 0,
        confirm_timeout: float | None = None,
        expire: float | None = None,
        after: Sequence[str] = (),
    ) -> str:
        """Queue a job and return its id; ``notify`` asks for a reply-queue wake-up.

        Blocks at most ``send_timeout`` (default ``[ipc] send_timeout``) while the queue
        is full, then raises QueueFullError: the job is either accepted or refused.
        With ``confirm`` it returns only once the daemon committed the job to its job
        store (durable), waiting at most ``confirm_timeout`` (default ``[ipc]
        send_timeout``); else NotConfirmedError (exit 5): the job waits in the kernel
        queue, unconfirmed (the daemon is down, or its store cannot be written).
        With ``delay`` the job runs no sooner than that many seconds from now (the store
        keeps it ``scheduled`` until then).  ``priority`` (-100 to 100) puts it before
        (higher) or after other queued jobs of its type.  With ``expire`` a job not
        started within that many seconds of its acceptance (or of its ``delay``'s end) is
        cancelled, its error "expired" (at most protocol.MAX_EXPIRE).
        With ``unique`` nothing is queued while a job with that key waits or runs: raises
        AlreadyQueuedError (exit 4), which names that job (ipcd.tables.unique).
        With ``after`` (at most protocol.MAX_AFTER job ids) the job is held until all of
        those jobs succeeded, and cancelled when one of them fails for good or is
        cancelled; naming a job the store does not hold makes a confirmed submit raise
        UsageError (exit 64), and an unconfirmed one's job fail with that error.
        """
        type_ = handler if isinstance(handler, int) else self.config.handler_type(handler)
        waits_for = check_after(after)
        if not protocol.MIN_PRIORITY <= priority <= protocol.MAX_PRIORITY:
            raise UsageError(
                f"priority {priority} is outside {protocol.MIN_PRIORITY}..{protocol.MAX_PRIORITY}"
            )
        if expire is not None and not 0 < expire <= protocol.MAX_EXPIRE:
            raise UsageError(
                f"expire {expire} is outside 0..{protocol.MAX_EXPIRE:.0f} seconds (not 0)"
            )
        pid = os.getpid()
        job_id = self._ids(pid)
        if notify or confirm:
            self.queue  # noqa: B018 - no job queue is the first thing to say
            self._reply_queue()  # fail before sending when no one could wake us
        reply_to = pid if notify else None
        asks = pid if confirm else None
        due = time.time() + delay if delay else None
        body = None
        if not _surely_too_large(payload, self.queue):
            if (
                job_timeout is None and unique is None and due is None and not priority
                and expire is None and not waits_for
            ):  # fmt: skip
                # The common case: only the id, the time and the payload change per job.
                body = self._template(pid, notify, confirm).encode(payload, job_id, time.time())
            else:
                body = protocol.encode(
                    payload, job_id=job_id, reply_to=reply_to, timeout=job_timeout,
                    unique=unique, confirm=asks, due=due, priority=priority, expire=expire,
                    after=waits_for,
                )  # fmt: skip
            if not self.queue.fits(len(body)):
                body = None
            elif len(body) > self.config.jobs.max_payload:  # a tiny limit; rare, so exact now
                from ipcd.tables.spill import within_max_payload

                within_max_payload(payload, self.config.jobs.max_payload)
        timeout = self.config.ipc.send_timeout if send_timeout is None else send_timeout
        if body is not None and unique is None:  # the common case, kept short
            self.queue.send(body, type_, timeout=timeout)
        else:
            # A payload too large for one message goes to a segment of its own
            # (ipcd.tables.spill).
            with (
                self._claim(unique, job_id),
                outgoing(
                    self, payload, body, job_id=job_id, reply_to=reply_to,
                    timeout=job_timeout, unique=unique, confirm=asks, due=due,
                    priority=priority, expire=expire, after=waits_for,
                ) as body,
            ):  # fmt: skip
                self.queue.send(body, type_, timeout=timeout)
        if confirm:
            self.wait_confirmed(job_id, timeout if confirm_timeout is None else confirm_timeout)
        return job_id

    def wait_confirmed(self, job_id: str, timeout: float, *, deadline: float | None = None) -> None:
        """Wait until the daemon says ``job_id`` (submitted with ``confirm``) is in its
        job store; NotConfirmedError when it does not within ``timeout``.  A job the
        daemon refused outright (rejected, no handler, a dependency that failed already)
        ends here too: its result is stored already, and JobFailedError says why; one
        that names an unknown job in ``after`` raises UsageError.  ``deadline`` (monotonic)
        ends a wait that began earlier (ipcctl's lean path hands it over): the errors
        still name ``timeout``."""
        if not self.daemon_serving():
            raise NotConfirmedError(job_id, "ipcd is not running")
        replies = self._reply_queue()
        if deadline is None:
            deadline = time.monotonic() + timeout
        confirmed = protocol.CONFIRMED + job_id.encode("ascii")
        refused = protocol.REFUSED + job_id.encode("ascii")
        ended = job_id.encode("ascii")
        pid = os.getpid()
        while True:
            left = deadline - time.monotonic()
            try:
                body, _ = replies.receive(pid, timeout=max(left, 0.0))
            except WaitTimeoutError:
                why = f"not stored within {timeout:g}s (see ipcctl status and the log)"
                if not self.daemon_serving():
                    why = "ipcd is not running"
                raise NotConfirmedError(job_id, why) from None
            if body == confirmed:
                return
            if body == refused:
                result = self.result(job_id)
                why = result.error if result is not None else "refused by the daemon"
                raise UsageError(f"job {job_id} was not queued: {why}")
            if body == ended:  # refused at intake: its outcome is final already
                result = self.result(job_id)
                if result is not None:
                    raise_for_status(result)
                return
            if len(self._notified) < 4096:
                self._notified.add(body)  # another job's notification: kept for its waiter

    def _claim(self, unique: str | None, job_id: str) -> contextlib.AbstractContextManager[object]:
        """Hold the unique key while the job is sent (nothing to hold without one)."""
        if unique is None:
            return contextlib.nullcontext()
        from ipcd.tables.unique import Claim, UniqueTable, check_key

        check_key(unique)
        self.queue  # noqa: B018 - the daemon's queue must exist, as for any submit
        try:
            table = UniqueTable.open(self.keys.unique)
        except NotRunningError:
            raise NotRunningError(
                f"no unique-key table at key {self.keys.unique:#010x}: is ipcd running "
                "with this configuration (and new enough for --unique)?"
            ) from None
        return Claim(table, unique, job_id, alive=alive, finished=self._finished)

    def _finished(self, job_id: str) -> float | None:
        """When the job's stored result was written, or None while none is stored."""
        result = self.result(job_id)
        return None if result is None else result.finished

    def call(
        self,
        handler: str | int,
        payload: Payload = None,
        *,
        timeout: float = 30.0,
        send_timeout: float | None = None,
    ) -> Result:
        """Submit and wait: the job's result (ok or error), or WaitTimeoutError."""
        job_id = self.submit(handler, payload, notify=True, send_timeout=send_timeout)
        return self.wait_submitted(job_id, timeout)

    def wait_submitted(
        self, job_id: str, timeout: float, *, deadline: float | None = None
    ) -> Result:
        """Wait for a job this process submitted with ``notify=True``; ``deadline`` as
        in :meth:`wait_confirmed`."""
        replies = self._reply_queue()
        if deadline is None:
            deadline = time.monotonic() + timeout
        wanted = job_id.encode("ascii")
        pid = os.getpid()
        spin = _spin_seconds(self._last_wait)
        started = time.monotonic()
        if wanted in self._notified:
            self._notified.discard(wanted)
            result = self.result(job_id)
            if result is not None:
                return result
        while True:
            left = deadline - time.monotonic()
            try:
                # The last reply came within the poll: poll for this one first.
                got = replies.receive_spinning(pid, spin) if spin else None
                body, _ = got or replies.receive(pid, timeout=max(left, 0.0))
            except WaitTimeoutError:
                result = self.result(job_id)
                if result is not None:
                    return result
                raise self._timeout(job_id, timeout) from None
            except NotRunningError:
                # The reply queue was removed (the daemon makes it anew); the job goes on:
                # wait for its result in the result segment instead.
                return self.wait(job_id, max(deadline - time.monotonic(), 0.0))
            if body == wanted:
                self._last_wait = time.monotonic() - started
                result = self.result(job_id)
                if result is not None:
                    return result
                raise ResultLostError(
                    f"job {job_id} ended, but its result was lost: the result segment was "
                    "removed or overwritten meanwhile, or the ring overwrote it. The job ran; "
                    f"its outcome is in the log (ipcctl logs --job {job_id})"
                )
            elif len(self._notified) < 4096:
                # Another job of ours (its waiter comes later), or a stale notification for
                # an earlier process that had our PID: remember it and keep waiting.
                self._notified.add(body)

    def wait(self, job_id: str, timeout: float) -> Result:
        """Wait for any job's result (one this process may not have submitted)."""
        gate = self._result_gate()
        deadline = time.monotonic() + timeout
        while True:
            pause = min(max(deadline - time.monotonic(), 0.0), GATE_RECHECK)
            self.store.waiting(pause)  # before the look: a result stored after it is pulsed
            result = self.result(job_id)
            if result is not None:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(job_id, timeout)
            gate.wait(min(left, pause))

    def await_news(self, timeout: float) -> None:
        """Sleep until the daemon announces a stored result (the result gate) or
        ``timeout`` seconds pass: how a watcher of jobs it did not submit
        (ipcd.client.waiting) looks again soon after each job ends, without polling the
        job store in a tight loop.  Without a gate to wait on (no daemon, or a gate this
        user may not read) it simply sleeps."""
        try:
            gate = self._result_gate()
            timeout = min(timeout, WAIT_HORIZON_MS / 1000)
            self.store.waiting(timeout)
            gate.wait(timeout)
        except IpcdError:
            time.sleep(timeout)

    def daemon_serving(self) -> bool:
        """Whether a live daemon serves this configuration's queue (:func:`serving`).

        Cheap enough for every fire-and-forget submit: one ``shmget``/``shmat`` of the
        result segment (the same key as the queue) and a look at /proc; no lock is taken,
        as the PID is one aligned word the master writes.  A missing or foreign-formatted
        segment means no daemon can store results: not serving.
        """
        try:
            return serving(self.store.header())
        except NotRunningError:
            return False

    def result(self, job_id: str) -> Result | None:
        """The stored result, or None while there is none (queued, running or evicted).

        A result segment another program overwrote is read again for up to
        REPAIR_WAIT seconds, while the daemon writes ipcd's header back.
        """
        deadline = time.monotonic() + REPAIR_WAIT
        while True:
            try:
                return self.store.get(job_id)
            except OverwrittenError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def status(self) -> Status:
        from ipcd.tables.failed import FailedList
        from ipcd.tables.inflight import InflightTable

        queue = self.queue.stats()
        try:
            store = self.store
        except NotRunningError:
            return Status(self.keys, queue, None, 0)
        try:
            header: Header | None = store.header()
        except OverwrittenError:  # another program's header: report what is there
            header = None
        status = Status(self.keys, queue, header, store.segment.size)
        try:
            table = InflightTable.open(self.keys.inflight)
            failed = FailedList.open(self.keys.failed)
        except (NotRunningError, ValueError):  # missing, or overwritten (not ipcd's)
            return status
        self._attached += [table.segment, failed.store.segment]
        live = tuple(w for w in table.worker_views() if w.pid and status.daemon_running())
        from ipcd.tables.spill.table import usage

        return status._replace(
            workers=live,
            failed=len(failed.entries()),
            failed_dropped=failed.dropped(),
            spill=usage(self.keys.spill),
        )

    def close(self) -> None:
        """Detach every segment this client attached and forget the objects it opened.

        The kernel keeps a segment attached until the process detaches it or exits, so a
        long-running caller (``ipcctl status --watch``) closes after each look; the next
        look opens the objects anew, also those a restarted daemon made.
        """
        if self._store is not None:
            self._attached.append(self._store.segment)
        for segment in self._attached:
            segment.close()
        self._attached.clear()
        self._queue = self._store = None

    def failed(self) -> tuple[list[FailedJob], int]:
        """The failed list, oldest first, and how many older entries were dropped."""
        failed = self._failed_list()
        return failed.entries(), failed.dropped()

    def retry(self, job_id: str, send_timeout: float | None = None) -> str:
        """Queue a failed (or cancelled) job again, as it was, with fresh attempts: the
        daemon puts it back in its job store (through its control socket, as ``ipcctl
        retry`` does).  NoResultError (66) when the store has no such failed job.
        ``send_timeout`` is kept for callers of the version before the job store."""
        from ipcd.client.control import ControlClient

        self.store.clear(job_id)  # so that waiting for it waits for the new outcome
        ControlClient(self.config.control_socket).retry(job_id)
        return job_id

    def _failed_list(self) -> FailedList:
        from ipcd.tables.failed import FailedList

        return FailedList.open(self.keys.failed)

    def _template(self, pid: int, reply: bool, confirm: bool) -> Template:
        """The envelope template for these options, made anew in a forked child."""
        template = self._templates.get((reply, confirm))
        if template is None or template.pid != pid:
            template = protocol.template(pid, reply=reply, confirm=confirm)
            self._templates[reply, confirm] = template
        return template

    def _reply_queue(self) -> Queue:
        if self._replies is None:
            self._replies = Queue.open(self.keys.replies, what="reply queue")
        return self._replies

    def _result_gate(self) -> Gate:
        if self._gate is None:
            self._gate = Gate.open(self.keys.gate)
        return self._gate

    def _timeout(self, job_id: str, timeout: float) -> WaitTimeoutError:
        hint = ""
        if not self.daemon_serving():
            hint = " (no daemon is serving the queue: the job waits for the next start)"
        return WaitTimeoutError(f"no result for job {job_id} within {timeout:g}s{hint}")


@contextlib.contextmanager
def outgoing(
    client: Client,
    payload: Payload,
    body: bytes | None,
    *,
    job_id: str,
    reply_to: int | None,
    timeout: float | None,
    unique: str | None = None,
    confirm: int | None = None,
    due: float | None = None,
    priority: int = 0,
    expire: float | None = None,
    after: tuple[str, ...] = (),
) -> Iterator[bytes]:
    """The envelope to send: ``body`` when the client could encode the payload into a
    message, else one that points to a segment the payload is spilled into.

    Used as ``with outgoing(...) as body: send(body)``: for a spilled payload the entry
    becomes QUEUED before the block sends it, and if the block raises (queue full, ...)
    the segment is removed and the entry freed, so a refused job leaves nothing behind.
    QUEUED comes first because the master's sweep frees the entries of dead claimers: a
    client killed just after its send must leave an entry that says its job is queued,
    not one the sweep takes for a submission that never happened.  (One killed between
    the mark and the send, or while blocked on a full queue, leaves a QUEUED entry for a
    job that was never sent; the master's sweep frees it, see ipcd.daemon.sweep.)
    """
    if body is not None:
        yield body
        return
    # Here, not at the top: only a large payload pays for the spill modules.
    from ipcd.tables.spill import KINDS, within_max_payload
    from ipcd.tables.spill.segment import Role
    from ipcd.tables.spill.table import SpillTable, State
    from ipcd.wire.protocol import SpillRef

    kind, raw = within_max_payload(payload, client.config.jobs.max_payload)
    table = SpillTable.open(client.keys.spill)
    owner = client.queue.info().uid  # the daemon's: its workers remove the segment
    index, shmid, _ = table.put(
        raw, job_id=job_id, kind=KINDS[kind], role=Role.PAYLOAD, mode=0o600,
        owner=owner if owner != os.geteuid() else None,
        refused="the large job was not accepted",
    )  # fmt: skip
    ref = SpillRef(shmid, len(raw), index, kind)
    try:
        body = protocol.encode(
            None, job_id=job_id, reply_to=reply_to, timeout=timeout, unique=unique, spill=ref,
            confirm=confirm, due=due, priority=priority, expire=expire,
            after=after,
        )  # fmt: skip
        table.mark(index, State.QUEUED, shmid)
        yield body
    except BaseException:
        table.discard(index, shmid)
        raise


def check_after(after: Sequence[str]) -> tuple[str, ...]:
    """The job ids a job waits for, once each; UsageError (64) for one that cannot be a
    job id, or more than protocol.MAX_AFTER of them."""
    ids = tuple(dict.fromkeys(after))
    for job_id in ids:
        if not protocol.is_job_id(job_id):
            raise UsageError(f"--after: {job_id!r} is not a job id (1-16 of [0-9A-Za-z_.-])")
    if len(ids) > protocol.MAX_AFTER:
        raise UsageError(f"--after names {len(ids)} jobs, at most {protocol.MAX_AFTER}")
    return ids


def _surely_too_large(payload: Payload, queue: Queue) -> bool:
    """True when no envelope could carry the payload: saves encoding MiBs as base64 or
    JSON only to find that out (a base64 text is 4/3 of its bytes)."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return not queue.fits(len(payload) * 4 // 3)
    return isinstance(payload, str) and not queue.fits(len(payload))


def raise_for_status(result: Result) -> Result:
    """Turn an error result into JobFailedError (for scripts that want exceptions)."""
    if not result.ok:
        raise JobFailedError(f"job {result.job_id} failed: {result.error}")
    return result
