"""The job store's shapes: a job's states, what the intake adds, what the store returns,
and the :class:`JobStore` protocol every implementation serves.

They live apart from the package's ``__init__`` so that an implementation
(ipcd.store.sqlite) can import them while ``__init__`` imports the implementation, without a
cycle; and so that a lean caller (ipcctl parsing ``--state``) can use :class:`State` without
loading ``sqlite3``. ``from ipcd.store import State`` is the usual spelling on the daemon's
side.

The protocol is the seam for a later PostgreSQL store (several hosts sharing one queue):
callers speak only these types and ipcd's own exceptions (ipcd.errors.StoreError and its
subclasses), never a driver's.
"""

from __future__ import annotations

import builtins
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Protocol

from ipcd.config import HandlerConfig
from ipcd.wire import protocol


class State(enum.StrEnum):
    """Where a job is in its life; the value is what the store records and ``list`` shows."""

    #: Waiting to be dispatched, in dispatch order (type, priority, age).
    QUEUED = "queued"
    #: Waiting for its due time (``--delay``, or a retry's back-off); then QUEUED.
    SCHEDULED = "scheduled"
    #: Handed to a worker.
    RUNNING = "running"
    #: Final: the handler returned.
    DONE = "done"
    #: Final: the handler failed for good, or the message was rejected at intake.
    FAILED = "failed"
    #: Final: an operator cancelled it (``ipcctl cancel``).
    CANCELLED = "cancelled"


#: The states a job never leaves by itself (``retry`` alone turns FAILED or CANCELLED back).
FINAL = frozenset({State.DONE, State.FAILED, State.CANCELLED})
#: The states whose jobs make the backlog that ``[store] max_queued`` bounds.
WAITING = frozenset({State.QUEUED, State.SCHEDULED})
#: In :meth:`JobStore.paused`: every type is paused (``pause(())``).
ALL_TYPES = 0
#: The error of a job cancelled because it did not start by its ``expires``.
EXPIRED = "expired"
#: How long a writer waits for another's transaction, in milliseconds.
DEFAULT_BUSY_TIMEOUT = 10_000
#: Results larger than this many bytes are not kept, only their size (``[store] max_result``).
DEFAULT_MAX_RESULT = 1 << 20


class NewJob(NamedTuple):
    """A job as the intake commits it (or recovery re-commits it)."""

    #: 1..16 of ``[0-9A-Za-z_.-]``.
    id: str
    #: The message type (1..2**31-1).
    type: int
    #: The handler's name (``"-"`` when none, e.g. a rejected message).
    handler: str
    #: The message exactly as received from the kernel queue.
    body: bytes
    #: True: no ipcd envelope (PHP ``serialize()``, plain text, ...).
    bare: bool
    #: When the intake took it (``time.time()``).
    accepted: float
    #: The payload's size in bytes (a spilled payload: its size).
    size: int
    #: At most 80 printable characters of the payload, for ``list``.
    preview: str
    #: The envelope's ``submitted``, else ``accepted``.
    submitted: float = 0.0
    #: Later than ``accepted``: the job is SCHEDULED until then.
    due: float = 0.0
    #: Higher first, -100..100.
    priority: int = 0
    unique: str | None = None
    sender_pid: int = 0
    sender_uid: int | None = None
    reply_to: int | None = None
    timeout: float | None = None
    #: Attempts already made (a job re-stored after a crash).
    attempts: int = 0
    #: QUEUED (SCHEDULED when ``due`` is later than ``accepted``), or FAILED (a rejected
    #: message, with ``error``).
    state: State = State.QUEUED
    error: str | None = None
    #: Unix time after which the job, not yet started, is cancelled as expired
    #: (``--expire``); None: it waits as long as it takes.
    expires: float | None = None
    #: The jobs this one waits for (``--after``): it is held until all of them are DONE,
    #: and cancelled when one of them fails for good or is cancelled (ipcd.store.chains).
    after: tuple[str, ...] = ()
    #: What the stored body holds after ``body``: a spilled payload's bytes, as its
    #: segment holds them (ipcd.wire.split); the store writes both to the body's file in
    #: one ``writev``, so the intake never copies them into a bytes object.
    tail: bytes | memoryview = b""


def own_job(
    handler: str,
    type_: int,
    payload: protocol.Payload,
    now: float,
    *,
    pid: int,
    uid: int | None = None,
    unique: str | None = None,
    priority: int = 0,
    timeout: float | None = None,
) -> NewJob:
    """A job the daemon makes itself (a schedule's run, a completion hook's follow-up),
    its body the envelope ``ipcctl submit`` would send, so that a worker reads it as
    any other; PayloadError when ``payload`` cannot be JSON."""
    job_id = protocol.new_job_id()
    body = protocol.encode(
        payload, job_id=job_id, submitted=now, pid=pid, timeout=timeout, unique=unique,
        priority=priority,
    )  # fmt: skip
    return NewJob(
        id=job_id, type=type_, handler=handler, body=body, bare=False, accepted=now,
        size=len(protocol.payload_json(payload)), preview=protocol.preview(payload),
        submitted=now, priority=priority, unique=unique, sender_pid=pid, sender_uid=uid,
        timeout=timeout,
    )  # fmt: skip


class JobRecord(NamedTuple):
    """A job as the store holds it; its body and result are read on their own
    (:meth:`JobStore.body`, :meth:`JobStore.result`), so listing never reads them."""

    id: str
    type: int
    handler: str
    state: State
    attempts: int
    priority: int
    unique: str | None
    submitted: float
    accepted: float
    due: float
    started: float | None
    finished: float | None
    sender_pid: int
    sender_uid: int | None
    reply_to: int | None
    timeout: float | None
    bare: bool
    size: int
    preview: str
    worker_pid: int | None
    error: str | None
    result_kind: int | None
    result_size: int | None
    #: Not started by then (Unix time), the job is cancelled as expired; None: never.
    expires: float | None = None
    #: The jobs it was submitted to wait for (``--after``), as named; which of them it
    #: still waits for is :meth:`JobStore.waits`'s.
    after: tuple[str, ...] = ()


class Outcome(NamedTuple):
    """A job's outcome as a worker records it (:meth:`JobStore.finish`,
    :meth:`JobStore.exchange`)."""

    job_id: str
    #: DONE when true, else FAILED.
    ok: bool
    finished: float
    result_kind: int | None
    #: The result's bytes (kept when not larger than the store's ``max_result``).
    data: bytes | None
    error: str | None
    #: What the job wrote and its last progress (None: it wrote nothing, reported none).
    captured: Captured | None = None


class Captured(NamedTuple):
    """What a job wrote to its stdout and stderr, and the last progress it reported
    (ipcd.daemon.capture), as recorded with its outcome."""

    #: The last bytes written, at most ``[jobs] max_output`` of them.
    output: bytes
    #: How many bytes the job wrote in all (more than ``len(output)``: the tail was kept).
    size: int
    #: The last ``job.progress()`` fraction (None: it reported none) and its message.
    fraction: float | None = None
    message: str = ""


class Limit(NamedTuple):
    """How many jobs of one type may start (``[handlers.NAME] concurrency``, ``rate``,
    ``burst``): the store's claim holds to it in every process that claims."""

    #: At most this many of its jobs RUNNING at once across the pool; None: the pool's.
    concurrency: int | None = None
    #: Starts per second: a token bucket refilled at this rate; None: no rate limit.
    rate: float | None = None
    #: How many tokens the bucket holds (the starts that may follow each other at once
    #: after a quiet spell), at least 1.
    burst: int = 1


def limits_of(handlers: Iterable[HandlerConfig]) -> dict[int, Limit]:
    """The limits of the handlers that have any, by message type."""
    return {
        h.type: Limit(h.concurrency, h.rate_per_second, h.burst_size)
        for h in handlers
        if h.concurrency is not None or h.rate is not None
    }


class LimitState(NamedTuple):
    """A limited type's limit and what it uses now (``ipcctl status``)."""

    type: int
    limit: Limit
    #: Its jobs RUNNING now.
    running: int
    #: Whole tokens in its bucket now (None: no rate limit).
    tokens: int | None
    #: Its jobs QUEUED now.
    queued: int


class Admitted(NamedTuple):
    """A job :meth:`JobStore.admit` inserted, and the state the store gave it: what was
    asked, or (``after``) held, cancelled or failed for its dependencies, with why."""

    id: str
    state: State
    error: str | None = None


class Admission(NamedTuple):
    """What :meth:`JobStore.admit` did: the jobs inserted and their states, and the
    backlog once they are in."""

    jobs: list[Admitted]
    backlog: Backlog


class Chained(NamedTuple):
    """What the store's transactions decided besides what was asked, since the last
    :meth:`JobStore.take_chained`: the caller's to act on after the commit."""

    #: Jobs that became QUEUED: dependents released, follow-up (hook) jobs queued.
    queued: int = 0
    #: Dependents released that wait for their ``--delay`` (SCHEDULED).
    scheduled: int = 0
    #: Dependents cancelled because a job they wait for failed or was cancelled, as they
    #: are now (CANCELLED, with the reason in ``error``).
    cancelled: tuple[JobRecord, ...] = ()


class Hook(NamedTuple):
    """The handler a finished job's follow-up job goes to (``[handlers.NAME] on_success``
    or ``on_failure``)."""

    handler: str
    type: int


class Hooks(NamedTuple):
    """A handler's completion hooks (None: none)."""

    on_success: Hook | None = None
    on_failure: Hook | None = None


class Backlog(NamedTuple):
    """What waits to be dispatched: the figures ``[store] max_queued`` and
    ``max_queued_bytes`` bound."""

    #: Queued and scheduled jobs.
    jobs: int
    #: The sum of their bodies' sizes in bytes.
    bytes: int


class ScheduleState(NamedTuple):
    """What the store keeps of one recurring schedule (``[schedules.NAME]``) between
    the master's passes and across restarts (ipcd.daemon.schedules decides; the store
    keeps)."""

    name: str
    #: The timing as the schedule's runs are counted (``cron 15 2 * * * Europe/Berlin``,
    #: ``every 300s``): a change of it starts the count anew.
    spec: str
    handler: str
    #: When the next run is due (Unix time).
    next_due: float
    #: The last run: the time it was due, when it was queued, and its job.
    last_due: float | None = None
    last_fired: float | None = None
    last_job: str | None = None
    #: Runs not queued because the previous one still waited or ran (no overlap).
    overlaps: int = 0


class Retention(NamedTuple):
    """How many finished jobs the store keeps (``[store] keep_*``); cancelled jobs follow
    the failed jobs' limits."""

    #: The newest N done jobs are kept (0: none).
    keep_done: int
    #: And none finished longer ago than this many seconds (0: no age limit).
    keep_done_age: float
    keep_failed: int
    keep_failed_age: float


class JobStore(Protocol):
    """The job store: the single source of truth for every job's state.

    Each process opens its own (:func:`ipcd.store.open_store`) after it forks and never
    hands it to a child. Every method is one transaction; the ones that change jobs are
    atomic against every other process using the same store. Failures raise
    ipcd.errors.StoreError (StoreUnavailableError, StoreCorruptError, StoreFullError).

    (``builtins.list`` below: after ``def list`` the class body's ``list`` is the method.)
    """

    def add(self, jobs: Sequence[NewJob]) -> list[str]:
        """Commit ``jobs`` in one transaction; ids already present are skipped (recovery
        re-adds safely). Returns the ids inserted, in the order given."""
        ...

    def admit(self, jobs: Sequence[NewJob]) -> Admission:
        """:meth:`add`, saying for each job inserted which state it got: a job with
        ``after`` is decided in the same transaction from the states of the jobs it
        names (ipcd.store.chains): QUEUED or SCHEDULED when all are DONE, held (SCHEDULED,
        never promoted by its due time) while some are not final, CANCELLED when one
        failed or was cancelled, FAILED when one is unknown.  And the :meth:`backlog` as
        that same transaction leaves it: the intake knows its next batch's room below
        ``max_queued`` without a read transaction of its own per batch."""
        ...

    def take_chained(self) -> Chained:
        """What this connection's transactions released, cancelled and queued on their
        own since the last call (dependents, follow-up jobs), and forget it."""
        ...

    def waits(self, ids: Sequence[str]) -> dict[str, builtins.list[str]]:
        """For each of ``ids`` that is held: the jobs it still waits for."""
        ...

    def claim(
        self, n: int, now: float, *, worker_pid: int = 0
    ) -> list[tuple[JobRecord, bytes | None]]:
        """Up to ``n`` QUEUED jobs of types not paused, in dispatch order (type ascending,
        priority descending, accepted, id); each becomes RUNNING with ``attempts + 1`` and
        ``started = now``, and is returned as it is now, with its body (None when the
        body cannot be read, a file of a large body say: that job fails, the others
        run). Two processes never claim the same job.  ``worker_pid``: the worker that
        claims them (recorded, so that the master finds the jobs of a worker that died).
        A job whose expiry has passed (never started) is not claimed.  A type with a
        :class:`Limit` gives no more jobs than its concurrency leaves room for (its
        RUNNING jobs counted across every process) and than its bucket holds tokens, one
        spent per job claimed, in the same transaction."""
        ...

    def exchange(
        self,
        finished: Sequence[Outcome],
        n: int,
        now: float,
        *,
        worker_pid: int = 0,
        batches: Mapping[int, int] | None = None,
    ) -> list[tuple[JobRecord, bytes | None]]:
        """Record ``finished`` as :meth:`finish` would, then claim up to ``n`` jobs as
        :meth:`claim` would, in one transaction: a worker pays one commit for the outcomes
        of its last batch and its next batch (``n`` 0: only the outcomes).  With
        ``batches`` the jobs claimed are all of one type, the first one's in dispatch
        order, and at most ``batches.get(type, 1)`` of them: a batch never puts a
        quick job behind a slow one of another type."""
        ...

    def set_limits(self, limits: Mapping[int, Limit]) -> None:
        """Claims from now on hold to ``limits`` (a reload); types not in it have none."""
        ...

    def set_hooks(self, hooks: Mapping[str, Hooks]) -> None:
        """Outcomes recorded from now on queue ``hooks``' follow-up jobs (a reload)."""
        ...

    def next_start(self, now: float) -> float | None:
        """When a worker should next look for jobs the limits held back: ``now`` when a
        limited type has waiting jobs and room to start one (a job of it ended in a
        process that claimed nothing after it), the time its next token is due when only
        its rate holds them back; None when no limited type has a job to start."""
        ...

    def limited(self, now: float) -> list[LimitState]:
        """Each limited type's limit, its running and queued jobs and its tokens now."""
        ...

    def expire(self, now: float) -> list[JobRecord]:
        """QUEUED or SCHEDULED jobs never started whose expiry is at or before ``now``
        become CANCELLED with the error "expired" (``finished = now``); returns them as
        they were, soonest expiry first.  (A claim never starts one meanwhile.)"""
        ...

    def next_expiry(self) -> float | None:
        """The earliest expiry of a job waiting to be started; None when there is none."""
        ...

    def promote_due(self, now: float) -> int:
        """SCHEDULED jobs due at or before ``now`` become QUEUED; returns how many."""
        ...

    def next_due(self) -> float | None:
        """The earliest due time of a SCHEDULED job; None when there is none."""
        ...

    def mark_worker(self, job_id: str, pid: int) -> None:
        """Record which worker process runs the job."""
        ...

    def finish(
        self,
        job_id: str,
        *,
        ok: bool,
        finished: float,
        result_kind: int | None,
        data: bytes | None,
        error: str | None,
        captured: Captured | None = None,
    ) -> bool:
        """A job not yet final becomes DONE (``ok``) or FAILED. ``data`` is kept when it is
        not larger than the store's ``max_result``, else only its size. ``captured``: its
        output and progress, kept with it (replacing any of an earlier run). A job already
        final (CANCELLED by an operator, say) stays as it is: returns False."""
        ...

    def requeue(self, job_id: str, *, due: float, attempts: int | None = None) -> bool:
        """A job not yet final goes back to QUEUED (``due`` not later than now) or
        SCHEDULED; ``attempts`` unchanged unless given. False when the job is gone or
        final."""
        ...

    def cancel(
        self,
        ids: Sequence[str] = (),
        *,
        types: Sequence[int] = (),
        states: Sequence[State] = (State.QUEUED, State.SCHEDULED),
        running: bool = False,
        now: float,
    ) -> list[JobRecord]:
        """Jobs with one of ``ids`` and of one of ``types`` (either may be empty, not both)
        that are QUEUED or SCHEDULED (among ``states``), or RUNNING with ``running``,
        become CANCELLED (``finished = now``). Returns them as they were."""
        ...

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record; None when the store does not hold it."""
        ...

    def records(self, ids: Sequence[str]) -> dict[str, JobRecord]:
        """The records of those of ``ids`` the store holds, by id, read in one
        transaction (``ipcctl wait`` asks for up to a thousand, many times a second)."""
        ...

    def body(self, job_id: str) -> bytes | None:
        """The job's message as received; None when the store does not hold it."""
        ...

    def output(self, job_id: str) -> Captured | None:
        """What a finished job wrote and its last progress; None when it wrote nothing
        and reported none, or has not finished."""
        ...

    def result(self, job_id: str) -> tuple[int, bytes] | None:
        """The job's stored result as (kind, data); None when none is kept."""
        ...

    def list(
        self,
        *,
        states: Sequence[State] = (),
        types: Sequence[int] = (),
        unique: str | None = None,
        limit: int = 50,
    ) -> list[JobRecord]:
        """At most ``limit`` jobs matching every filter given (empty: any), newest first
        (accepted descending); with ``states == [QUEUED]`` alone, in dispatch order."""
        ...

    def retry(self, job_id: str, now: float) -> JobRecord | None:
        """A FAILED or CANCELLED job becomes QUEUED again as a new job would (accepted
        ``now``, attempts 0, error, result and expiry cleared); None when it is not one
        of those."""
        ...

    def pause(self, types: Sequence[int], now: float) -> None:
        """Stop claiming jobs of ``types`` (empty: every type, recorded as type 0)."""
        ...

    def resume(self, types: Sequence[int]) -> None:
        """Claim jobs of ``types`` again (empty: lift every pause)."""
        ...

    def paused(self) -> dict[int, float]:
        """The paused types and since when (type 0: everything)."""
        ...

    def running(self, types: Sequence[int] = ()) -> builtins.list[JobRecord]:
        """The RUNNING jobs (of ``types``, when given), oldest start first."""
        ...

    def counts(self) -> dict[State, int]:
        """How many jobs the store holds in each state (every state is a key)."""
        ...

    def backlog(self) -> Backlog:
        """Queued and scheduled jobs and their bytes, in constant time."""
        ...

    def purge(self, states: Sequence[State], older_than: float | None, now: float) -> int:
        """Delete finished jobs in ``states`` (finished more than ``older_than`` seconds
        before ``now``, when given); returns how many."""
        ...

    def retain(self, policy: Retention, now: float) -> int:
        """Delete the finished jobs beyond ``policy``'s limits; returns how many."""
        ...

    def reset_running(self) -> builtins.list[JobRecord]:
        """At daemon start: every RUNNING job back to QUEUED (attempts kept: its next claim
        counts the next attempt). Returns them as they were."""
        ...

    def schedules(self) -> builtins.list[ScheduleState]:
        """Every schedule's state, by name."""
        ...

    def save_schedules(
        self, states: Sequence[ScheduleState], *, only: Sequence[str] | None = None
    ) -> None:
        """Write ``states`` (a schedule's row replaced whole) in one transaction; with
        ``only``, first delete the rows of every schedule not named in it (removed from
        the configuration)."""
        ...

    def fire_schedule(self, state: ScheduleState, job: NewJob, due: float) -> str | None:
        """One run of a schedule (the one due at ``due``), in one transaction: unless a
        job with ``job.unique`` is QUEUED, SCHEDULED or RUNNING, add ``job`` and write
        ``state`` with it as the last run; else write ``state`` with one more overlap,
        and add nothing. Returns
        the id of the unfinished job that held the key (None: ``job`` was added)."""
        ...

    def schema(self) -> tuple[int, int]:
        """The file's schema version and the one this ipcd writes (the same, unless the
        store was opened without migrating)."""
        ...

    def check(self) -> builtins.list[str]:
        """The store's problems (integrity, schema version, counters); [] when sound."""
        ...

    def close(self) -> None:
        """Close the connection; the store is not used afterwards."""
        ...
