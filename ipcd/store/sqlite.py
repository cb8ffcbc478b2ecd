"""The job store in a SQLite file: ipcd's default, embedded, single-host store.

This is the only module of ipcd that imports ``sqlite3``; everything else speaks the types
of ipcd.store.model and ipcd's own exceptions, so that a PostgreSQL store can follow
behind the same protocol. To that end the SQL is plain, with ``?`` parameters: no
``RETURNING``, no ``INSERT OR ...``, no ``LIMIT -1``; what is SQLite's own stays in
:func:`connect` (the pragmas) and in ipcd.store.schema (the triggers).

How it is used, and why:

- **One connection per process, opened after fork.** A sqlite3 connection copied into a
  child by ``fork`` shares its file descriptors and lock state with the parent's: using
  it there corrupts the locking, and SQLite's documentation forbids it. Every method
  checks the process it runs in and raises InternalError in another one.
- **WAL mode**: readers (``ipcctl list`` through the control process) never block the
  dispatcher and the intake, and a commit is one append to the ``-wal`` file.
  ``[store] sync``: ``normal`` (a commit survives a crash of any process, fsync at
  checkpoints) or ``full`` (fsync at every commit: it also survives a power cut).
- **Autocommit connection (``isolation_level=None``) with explicit transactions.** Every
  write is ``BEGIN IMMEDIATE`` ... ``COMMIT``: it takes the write lock before it reads
  what it will change, so that ``claim`` in two processes never hands out one job twice;
  a waiting writer waits ``busy_timeout`` ms, then fails as StoreUnavailableError. A
  read of several statements is one deferred transaction, so it sees one snapshot.
- **The file is made 0600** (under umask 077), and SQLite gives its ``-wal`` and ``-shm``
  the database file's mode: only the daemon's user reads jobs; clients ask the daemon.
- **Large bodies and results are files** in ``PATH.bodies/`` (ipcd.store.blobs says why
  and how they stay in step with their rows); a row names its file in ``body_file`` (or
  ``result_file``, ``outputs.file``), and ``COALESCE(body_file, body, ...)`` reads any
  kind in one column: a name (text) or the bytes. Smaller bodies and results are held in
  the job's row, but for bodies above INLINE_BODY: a row of ``bodies`` (see there).
- **Errors** become ipcd's: :func:`store_error` names the path, SQLite's cause and what
  an operator can do, and chooses StoreUnavailableError, StoreCorruptError or
  StoreFullError by SQLite's (extended) error name.
"""

from __future__ import annotations

import builtins
import fcntl
import heapq
import itertools
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

from ipcd.errors import (
    ConfigError,
    InternalError,
    StoreCorruptError,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
    UsageError,
)
from ipcd.store import chains, schema
from ipcd.store.blobs import THRESHOLD, BlobDir
from ipcd.store.model import (
    ALL_TYPES,
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_MAX_RESULT,
    EXPIRED,
    FINAL,
    WAITING,
    Admission,
    Admitted,
    Backlog,
    Captured,
    Chained,
    Hooks,
    JobRecord,
    Limit,
    LimitState,
    NewJob,
    Outcome,
    Retention,
    ScheduleState,
    State,
)

#: ``[store] sync`` to ``PRAGMA synchronous``.
SYNC = {"normal": "NORMAL", "full": "FULL"}
#: The page size of a new store file (see :func:`connect`).
PAGE_SIZE = 1024
#: How many ids one ``IN (...)`` list holds (SQLite allows 32766 parameters).
CHUNK = chains.CHUNK
_LOWEST, _HIGHEST = -(2**63), 2**63 - 1
#: A body of up to this many bytes is held in its job's row (``jobs.body``); a larger one,
#: up to ipcd.store.blobs.THRESHOLD, in a row of ``bodies``.  Every claim and outcome
#: rewrites the job's whole row, its overflow pages included: a body in the row is
#: written three times, where the row in ``bodies`` costs one insert more, once (some
#: 20 us).  Up to about 1 KiB the row keeps it on its page, or on one overflow page.
INLINE_BODY = 1024

_NAMES = {"unique": "unique_key", "after": "after_ids"}
_COLUMNS = ", ".join(_NAMES.get(f, f) for f in JobRecord._fields)
_SELECT = f"SELECT {_COLUMNS} FROM jobs"
_NEWEST = "ORDER BY accepted DESC, id DESC LIMIT ?"
_DISPATCH = "ORDER BY type, priority DESC, accepted, id"
#: A new job's columns: those that always have a value, then those that may be NULL.
_INSERT_COLUMNS = (
    "id", "type", "handler", "state", "attempts", "priority", "submitted", "accepted", "due",
    "sender_pid", "bare", "size", "preview", "body_size", "held_due",
    "unique_key", "finished", "sender_uid", "reply_to", "timeout", "error", "expires",
    "after_ids", "body", "body_file",
)  # fmt: skip
_INSERT_BODY = "INSERT INTO bodies (job_id, body) VALUES (?, ?)"
#: A job's body: the name of its file, the bytes held in its row, or its row of ``bodies``
#: (looked up only when the row holds neither: COALESCE stops at the first not NULL).
_BODY = "COALESCE(body_file, body, (SELECT bodies.body FROM bodies WHERE job_id = jobs.id))"
#: The backlog: each waiting state's row of ``tally`` found by its key, where ``state
#: IN (...)`` makes SQLite build a temporary index of the list on every run (some
#: 30,000 instructions more, paid by every commit of the intake).
_BACKLOG = (
    "SELECT COALESCE(SUM(jobs), 0), COALESCE(SUM(bytes), 0) FROM ("
    "SELECT jobs, bytes FROM tally WHERE state = 'queued' UNION ALL "
    "SELECT jobs, bytes FROM tally WHERE state = 'scheduled')"
)
# A queued job that may still start at ? (now): one past its expiry that was never
# started is skipped (the master cancels it), a test of the row already read.
_STARTABLE = "state = 'queued' AND (expires IS NULL OR expires > ? OR attempts > 0)"
# The literal 'queued' lets SQLite use the partial index jobs_claim. The record and its
# body in the one statement, from the one row: a claim is a job's hot path.
_CLAIM = (
    f"SELECT {_COLUMNS}, {_BODY} FROM jobs "
    f"WHERE {_STARTABLE} AND type BETWEEN ? AND ? {_DISPATCH} LIMIT ?"
)
_SCHEDULE_SELECT = f"SELECT {', '.join(ScheduleState._fields)} FROM schedules"
_SCHEDULE_SAVE = (
    f"INSERT INTO schedules ({', '.join(ScheduleState._fields)}) "
    f"VALUES ({', '.join('?' * len(ScheduleState._fields))}) ON CONFLICT (name) DO UPDATE SET "
    + ", ".join(f"{f} = excluded.{f}" for f in ScheduleState._fields[1:])
)
# The partial index jobs_expires's condition, repeated so that SQLite uses it.
_EXPIRING = "expires IS NOT NULL"
#: A claim's allowance for a type without a limit.
_UNLIMITED = 2**31
#: Where a claim looks when nothing is paused or limited: every type, no cap.
_EVERY_TYPE = ((_LOWEST, _HIGHEST, _UNLIMITED),)
#: The paused types, and _AWAITED (no type: they are 0 up) when a job waits for another.
_AWAITED = -1
_PAUSED_OR_AWAITED = (
    "SELECT type FROM paused UNION ALL SELECT -1 FROM (SELECT 1 FROM waits LIMIT 1)"
)
_ATTEMPTS, _TYPE, _AFTER, _STATE, _BARE, _STARTED, _FINISHED, _WORKER_PID = (
    JobRecord._fields.index(name)
    for name in (
        "attempts", "type", "after", "state", "bare", "started", "finished", "worker_pid",
    )
)  # fmt: skip
_marks, _chunks = chains.marks, chains.chunks


def _record(row: Sequence[Any]) -> JobRecord:
    return JobRecord._make(_fields(row))


def _fields(row: Sequence[Any]) -> builtins.list[Any]:
    """A ``jobs`` row's columns as JobRecord's fields: the columns' values converted in a
    list, which is made into the record once (a NamedTuple's ``_replace`` builds it
    again, field by field: four times the cost, paid by every claimed job)."""
    values = list(row)
    values[_STATE] = _STATE_OF.get(values[_STATE]) or State(values[_STATE])
    values[_BARE] = bool(values[_BARE])
    ids: str | None = values[_AFTER]  # the column: comma-separated, or NULL
    values[_AFTER] = tuple(ids.split(",")) if ids else ()
    return values


def _claimed(row: Sequence[Any], now: float, worker_pid: int) -> JobRecord:
    """A claimed row (its body's column last) as the claim's UPDATE left it: running,
    one attempt more, started ``now`` by ``worker_pid``."""
    values = _fields(row[:-1])
    values[_STATE] = State.RUNNING
    values[_ATTEMPTS] += 1
    values[_STARTED] = now
    values[_FINISHED] = None
    values[_WORKER_PID] = worker_pid or None
    return JobRecord._make(values)


def _insert_sql(nulls: tuple[bool, ...]) -> str:
    """The INSERT of a new job's row whose nullable columns (the last of
    _INSERT_COLUMNS) are NULL where ``nulls`` says True: see SqliteStore._insert."""
    marks = ["?"] * (len(_INSERT_COLUMNS) - len(nulls)) + ["NULL" if n else "?" for n in nulls]
    return (
        f"INSERT INTO jobs ({', '.join(_INSERT_COLUMNS)}) VALUES ({', '.join(marks)}) "
        "ON CONFLICT (id) DO NOTHING"
    )


def _claim_ranges(
    skipped: Iterable[int], capped: Mapping[int, int]
) -> builtins.list[tuple[int, int, int]]:
    """Where a claim looks, in dispatch order: the ranges of types between the ``skipped``
    (paused, or limited and out of room) and the ``capped`` ones, with no cap; and each
    capped type alone, with its cap (how many of its jobs may start now)."""
    ranges = [(low, high, _UNLIMITED) for low, high in _open_ranges([*skipped, *capped])]
    ranges += [(type_, type_, cap) for type_, cap in capped.items()]
    return sorted(ranges, key=lambda r: r[0])


def tokens(limit: Limit, held: tuple[float, float] | None, now: float) -> float:
    """The tokens in a type's bucket at ``now``: ``held`` (tokens, when counted) refilled
    at ``limit.rate`` per second up to ``limit.burst``; a bucket never written is full.  A
    clock that went back (another process's) refills nothing."""
    if held is None or limit.rate is None:
        return float(limit.burst)
    left, counted = held
    return min(float(limit.burst), left + max(now - counted, 0.0) * limit.rate)


def whole(left: float) -> int:
    """The whole tokens in a bucket holding ``left``: a token refilled in float steps may
    sum to 0.999999..., which is one."""
    return int(left + 1e-9)


def _open_ranges(paused: Iterable[int]) -> Iterator[tuple[int, int]]:
    """The ranges of types between the paused ones, in ascending order."""
    low = _LOWEST
    for type_ in sorted(set(paused)):
        if type_ > low:
            yield low, type_ - 1
        low = type_ + 1
    if low <= _HIGHEST:
        yield low, _HIGHEST


_ADVICE_CORRUPT = "restore from a backup or move it aside; ipcd makes a new one"
_ADVICE_FULL = (
    "free space on its file system, or keep fewer finished jobs: [store] keep_done, keep_failed"
)
_ADVICE_WRITE = (
    "make the file, its -wal and -shm files and its directory readable and writable by the "
    "daemon's user, on a file system mounted read-write"
)
_ADVICE_BUSY = "another process held it locked for longer than its busy timeout; try again"
_ADVICE_IO = "check its disk and the kernel log"


def store_error(path: str, exc: sqlite3.Error) -> StoreError:
    """The ipcd error for a sqlite3 error on the store at ``path``, chosen by SQLite's
    extended error name (``sqlite_errorname``, Python 3.11)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    cause = str(exc)
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return StoreCorruptError(f"job store {path}: {cause} ({_ADVICE_CORRUPT})")
    if name.startswith("SQLITE_FULL"):
        return StoreFullError(f"job store {path}: {cause} ({_ADVICE_FULL})")
    if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return StoreUnavailableError(f"job store {path}: {cause} ({_ADVICE_WRITE})")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StoreUnavailableError(f"job store {path}: {cause} ({_ADVICE_BUSY})")
    if name.startswith("SQLITE_IOERR"):
        return StoreUnavailableError(f"job store {path}: {cause} ({_ADVICE_IO})")
    return StoreError(f"job store {path}: {cause}")


def _os_error(path: str, exc: OSError) -> StoreError:
    """The ipcd error for creating or opening the store's file at ``path``."""
    cause = exc.strerror or str(exc)
    if exc.errno is not None and exc.errno == getattr(os, "ENOSPC", None):
        return StoreFullError(f"job store {path}: {cause} ({_ADVICE_FULL})")
    return StoreUnavailableError(f"job store {path}: {cause} ({_ADVICE_WRITE})")


def connect(
    path: str,
    *,
    sync: str = "normal",
    busy_timeout: int = DEFAULT_BUSY_TIMEOUT,
    migrate: bool = True,
) -> sqlite3.Connection:
    """Open the store's file at ``path`` for this process, and bring its schema up to date
    (unless ``migrate`` is false: then a file of an older version is left as it is, for
    ``ipcd check``, which must not convert a file that a running daemon of that older
    version still writes; a newer one is refused either way).

    In order: check ``sync``; refuse a missing directory (the daemon never makes one: its
    owner and mode are the operator's); under umask 077, create the file 0600 when it is
    missing and open it for writing once (so a read-only file or file system fails here,
    not at the first job); connect in autocommit mode; set ``busy_timeout``,
    ``journal_mode=WAL``, ``synchronous`` and ``foreign_keys``; and migrate
    (ipcd.store.schema). Every failure is a StoreError naming the path.
    """
    if sync not in SYNC:
        raise ConfigError(f"[store] sync must be 'normal' or 'full', not {sync!r}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.stat(directory)
    except FileNotFoundError:
        raise StoreUnavailableError(
            f"job store {path}: its directory {directory} does not exist "
            "(create it, writable by the daemon's user only)"
        ) from None
    except OSError:
        pass  # not searchable, say: opening the file below tells why
    conn: sqlite3.Connection | None = None
    # umask is per process; ipcd's processes are single-threaded, so nothing else makes a
    # file meanwhile. SQLite gives -wal and -shm the database file's mode, and they are
    # made under this umask too when this open is the first.
    umask = os.umask(0o077)
    try:
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise _os_error(path, exc) from exc
        # ``timeout`` is SQLite's busy timeout (sqlite3_busy_timeout), in seconds here.
        conn = sqlite3.connect(path, timeout=busy_timeout / 1000, isolation_level=None)
        # Before the first write of a new file (a no-op on an existing one): small pages.
        # A commit writes each page it changed whole into the WAL, with a checksum over
        # it; one job's insert or claim changes a row and an entry in each index, a few
        # bytes on each of some ten pages, so 1 KiB pages write a quarter of the bytes of
        # SQLite's default 4 KiB and a lone job's transaction is 30-40 % quicker.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE:d}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreUnavailableError(
                f"job store {path}: cannot use write-ahead logging (journal mode stays "
                f"{mode}) ({_ADVICE_WRITE})"
            )
        conn.execute(f"PRAGMA synchronous = {SYNC[sync]}")
        conn.execute("PRAGMA foreign_keys = ON")
        # Pages through a shared mapping, not a pread per page: every commit of another
        # process empties this connection's page cache, and the daemon's processes take
        # turns writing for every job.
        conn.execute("PRAGMA mmap_size = 268435456")
        if migrate:
            schema.migrate(conn, path)
        elif (found := schema.version(conn)) > schema.VERSION:
            raise schema.newer_error(path, found)
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise store_error(path, exc) from exc
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    finally:
        os.umask(umask)
    return conn


class SqliteStore:
    """ipcd.store.JobStore over one sqlite3 connection (made by :func:`connect`).

    ``max_result``: results larger than this many bytes are not kept, only their size.
    ``blobs``: where bodies and results larger than ipcd.store.blobs.THRESHOLD go
    (default: ``PATH.bodies/``, not fsync'd).
    ``hooks``: the completion hooks by handler name (``[handlers.NAME] on_success``,
    ``on_failure``): a job of one of them that ends queues its follow-up job in the same
    transaction (ipcd.store.chains).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: str,
        *,
        max_result: int = DEFAULT_MAX_RESULT,
        blobs: BlobDir | None = None,
        limits: Mapping[int, Limit] | None = None,
        hooks: Mapping[str, Hooks] | None = None,
    ) -> None:
        """``limits``: how many jobs of each type may start (ipcd.store.model.Limit);
        types not in it have none beyond the pool.  ``hooks``: the follow-up jobs a
        handler's finished jobs queue (ipcd.store.chains)."""
        self._conn = conn
        self._hooks = dict(hooks or {})
        #: What committed transactions decided on their own, until take_chained.
        self._chained = Chained()
        self._path = path
        self._max_result = max_result
        self._blobs = blobs or BlobDir.beside(path, sync=False)
        self._pid = os.getpid()
        self._lock = -1
        #: The INSERTs of new jobs by the NULLs they hold (True for a column's NULL),
        #: made as first needed (see _insert).
        self._inserts: dict[tuple[bool, ...], str] = {}
        self._writing = _Transaction(self, "BEGIN IMMEDIATE", locked=True)
        self._reading = _Transaction(self, "BEGIN", locked=False)
        self._limits: dict[int, Limit] = {}
        self.set_limits(limits or {})

    def set_hooks(self, hooks: Mapping[str, Hooks]) -> None:
        self._hooks = dict(hooks)

    def set_limits(self, limits: Mapping[int, Limit]) -> None:
        self._limits = {
            type_: limit
            for type_, limit in limits.items()
            if limit.concurrency is not None or limit.rate is not None
        }

    # -- transactions -------------------------------------------------------------------

    def _own(self) -> sqlite3.Connection:
        if os.getpid() != self._pid:
            raise InternalError(
                f"job store {self._path}: a connection opened in process {self._pid} was "
                f"used in process {os.getpid()}; each process opens its own after fork"
            )
        return self._conn

    def _write(self) -> _Transaction:
        """A write transaction: the write lock is taken before the first read (see
        :class:`_Transaction`)."""
        return self._writing

    def _lock_fd(self) -> int:
        if self._lock < 0:
            try:
                self._lock = os.open(
                    self._path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                raise StoreUnavailableError(
                    f"job store {self._path}: cannot open its lock file {self._path}.lock: "
                    f"{exc.strerror}"
                ) from None
        return self._lock

    def _insert(
        self, values: Sequence[Any], nullable: Sequence[Any]
    ) -> tuple[str, builtins.list[Any]]:
        """The INSERT of a new job's row, ``values`` and then ``nullable`` (the columns of
        _INSERT_COLUMNS in its order), and its parameters: those values but the nullable
        ones that are None, which the statement names as NULL.  A None bound as a
        parameter costs sqlite3 an adapter look-up (some 3,000 instructions, a formatted
        AttributeError inside) where a NULL in the text costs nothing, and a plain job's
        row has seven.  One text per set of NULLs (a handful in use), each prepared once
        and then reused from sqlite3's statement cache."""
        nulls = tuple([value is None for value in nullable])
        sql = self._inserts.get(nulls)
        if sql is None:
            sql = self._inserts[nulls] = _insert_sql(nulls)
        return sql, [*values, *[value for value in nullable if value is not None]]

    def _read(self) -> _Transaction:
        """A read transaction: its statements see one snapshot."""
        return self._reading

    @staticmethod
    def _get(db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _record(row)

    @staticmethod
    def _records(db: sqlite3.Connection, sql: str, params: Sequence[object]) -> list[JobRecord]:
        return [_record(row) for row in db.execute(sql, params)]

    # -- adding and dispatching ---------------------------------------------------------

    def add(self, jobs: Sequence[NewJob]) -> builtins.list[str]:
        return [admitted.id for admitted in self.admit(jobs).jobs]

    def admit(self, jobs: Sequence[NewJob]) -> Admission:
        inserted: list[Admitted] = []
        written: list[str] = []
        try:
            with self._write() as db:
                self._add(db, jobs, inserted, written)
                backlog = self._backlog(db)
        except BaseException:
            # Not committed (a failed COMMIT rolls back): no row names these files.
            self._blobs.remove(written)
            raise
        return Admission(inserted, backlog)

    def _add(
        self,
        db: sqlite3.Connection,
        jobs: Sequence[NewJob],
        inserted: builtins.list[Admitted],
        written: builtins.list[str],
    ) -> None:
        """``add``'s inserts; a large body's file is written (``written``) and made
        durable before its row, whose commit follows; a body above INLINE_BODY is a row
        of ``bodies``.  A job with ``after`` is decided from the jobs it names
        (ipcd.store.chains); nothing can wait for a new job yet, so only its own state is
        decided."""
        for job in jobs:
            pending: tuple[str, ...] = ()
            state, due, held_due, error = job.state, job.due, 0.0, job.error
            if job.after and state is not State.FAILED:
                state, due, held_due, error, pending = chains.decide(db, job)
            if due > job.accepted and state is State.QUEUED:
                state = State.SCHEDULED
            if state not in _NEW:
                raise InternalError(f"job {job.id}: a new job cannot be {state}")
            finished = job.accepted if state in _ENDED_NEW else None
            values = (
                job.id, job.type, job.handler, _TEXT[state], job.attempts, job.priority,
                job.submitted or job.accepted, job.accepted, due, job.sender_pid,
                int(job.bare), job.size, job.preview, len(job.body) + len(job.tail), held_due,
            )  # fmt: skip
            body, file = self._keep(job.id, job.body, written, job.tail)
            apart = body is not None and len(body) > INLINE_BODY
            nullable = (
                job.unique, finished, job.sender_uid, job.reply_to, job.timeout, error,
                job.expires, ",".join(job.after) if job.after else None,
                None if apart else body, file,
            )  # fmt: skip
            if db.execute(*self._insert(values, nullable)).rowcount != 1:
                self._unwrite(written, file)  # a job of that id is held already
            else:
                if apart:
                    db.execute(_INSERT_BODY, (job.id, body))
                if pending:
                    chains.hold(db, job.id, pending)
                inserted.append(Admitted(job.id, state, error))
        self._settle(written)

    def _chain(self, chain: chains.Chain, cancelled: Sequence[JobRecord]) -> None:
        """After a commit: what ``chain`` decided (and the records of the jobs it
        cancelled), kept for take_chained."""
        if not (chain.queued or chain.scheduled or cancelled):
            return
        old = self._chained
        self._chained = Chained(
            old.queued + chain.queued,
            old.scheduled + chain.scheduled,
            (*old.cancelled, *cancelled),
        )

    def take_chained(self) -> Chained:
        taken, self._chained = self._chained, Chained()
        return taken

    def waits(self, ids: Sequence[str]) -> dict[str, builtins.list[str]]:
        with self._read() as db:
            return chains.waits(db, ids)

    def _follow(self, db: sqlite3.Connection, chain: chains.Chain, now: float) -> list[JobRecord]:
        """In the caller's write transaction, after outcomes were recorded: the follow-up
        jobs of those with hooks queued, the dependents of every job that ended
        released or cancelled (ipcd.store.chains).  Returns the dependents cancelled, as
        they are now."""
        if self._hooks:
            follow = [
                job
                for job_id, state in chain.ended
                if state is not State.CANCELLED
                and (record := self._get(db, job_id)) is not None
                and (job := chains.follow_up(record, self._hooks, now)) is not None
            ]
            if follow:
                added: list[Admitted] = []
                self._add(db, follow, added, [])  # small bodies: no file is written
                chain.queued += len(added)
        chains.settle(db, chain, now)
        found: list[JobRecord] = []
        for chunk in _chunks(chain.cancelled):
            found += self._records(db, f"{_SELECT} WHERE id IN ({_marks(chunk)})", chunk)
        return found

    def _keep(
        self,
        job_id: str,
        data: bytes,
        written: builtins.list[str],
        tail: bytes | memoryview = b"",
    ) -> tuple[bytes | None, str | None]:
        """What a row holds for ``data`` and then ``tail``: the bytes and no file, or
        (above THRESHOLD) no bytes and the name of the file now holding them, added to
        ``written``."""
        if len(data) + len(tail) <= THRESHOLD:
            return data + tail, None
        try:
            name = self._blobs.write(job_id, data, tail)
        except OSError as exc:
            raise _os_error(self._blobs.path, exc) from exc
        written.append(name)
        return None, name

    def _unwrite(self, written: builtins.list[str], name: str | None) -> None:
        """The file ``name`` (of ``written``) removed at once: the row that was to name
        it was not written (an id held already, an outcome for a job already ended)."""
        if name is not None:
            written.remove(name)
            self._blobs.remove([name])

    def _settle(self, written: Sequence[str]) -> None:
        """The new files' directory entries made durable (``sync = "full"``)."""
        try:
            self._blobs.settle(written)
        except OSError as exc:
            raise _os_error(self._blobs.path, exc) from exc

    def _bytes(self, held: bytes | str | None) -> bytes | None:
        """A ``COALESCE(body_file, body)`` column (or a result's, an output's) as bytes:
        the bytes held, or the named file's (None when the file or the row is gone)."""
        if held is None or isinstance(held, bytes):
            return held
        try:
            return self._blobs.read(held)
        except OSError as exc:
            raise _os_error(f"{self._blobs.path}/{held}", exc) from exc

    def _drop_unlinked(self, db: sqlite3.Connection) -> builtins.list[str]:
        """The files whose rows went in this transaction (table ``unlinked``, kept by the
        schema's triggers), forgotten here: the caller removes them after its commit."""
        names = [str(row[0]) for row in db.execute("SELECT file FROM unlinked")]
        if names:
            db.execute("DELETE FROM unlinked")
        return names

    def claim(
        self, n: int, now: float, *, worker_pid: int = 0
    ) -> builtins.list[tuple[JobRecord, bytes | None]]:
        if n <= 0:
            return []
        return self.exchange((), n, now, worker_pid=worker_pid)

    def exchange(
        self,
        finished: Sequence[Outcome],
        n: int,
        now: float,
        *,
        worker_pid: int = 0,
        batches: Mapping[int, int] | None = None,
    ) -> builtins.list[tuple[JobRecord, bytes | None]]:
        if not finished and n <= 0:
            return []
        written: list[str] = []
        chain = chains.Chain()
        cancelled: list[JobRecord] = []
        try:
            with self._write() as db:
                # One read for what a plain job's exchange needs to know: what is paused,
                # and whether any job waits for another (else no dependents to look up).
                paused: list[int] = []
                awaited = False
                for (type_,) in db.execute(_PAUSED_OR_AWAITED):
                    if type_ == _AWAITED:
                        awaited = True
                    else:
                        paused.append(type_)
                for outcome in finished:
                    self._finish(db, outcome, written, chain)
                if chain.ended and (awaited or self._hooks):
                    cancelled = self._follow(db, chain, now)
                rows = self._claim(db, n, now, worker_pid, batches, paused) if n > 0 else []
        except BaseException:
            self._blobs.remove(written)  # not committed: no row names them
            raise
        self._chain(chain, cancelled)
        # What the UPDATE wrote, without reading it back: the write lock kept every other
        # writer out between the SELECT and the UPDATE.  A body held in a file is read
        # after the commit, outside the lock: a running job's file stays until its row
        # goes, and one that cannot be read fails its own job (None), not every claim.
        return [(_claimed(row, now, worker_pid), self._readable(row[-1])) for row in rows]

    def _readable(self, held: bytes | str | None) -> bytes | None:
        """A claimed body: its bytes, or None when its file cannot be read."""
        try:
            return self._bytes(held) or b""
        except StoreError:
            return None

    def _claim(
        self,
        db: sqlite3.Connection,
        n: int,
        now: float,
        worker_pid: int,
        batches: Mapping[int, int] | None = None,
        paused: Sequence[int] | None = None,
    ) -> builtins.list[Sequence[Any]]:
        """Up to ``n`` queued jobs' rows (and bodies), marked running, in the caller's
        write transaction; with ``batches``, only jobs of the first one's type, at most
        ``batches.get(type, 1)`` of them.  A limited type gives at most its room
        (:meth:`_rooms`), and spends the tokens of those it gives; without limits no
        query is added.  ``paused``: the paused types, when the caller read them."""
        if paused is None:
            paused = [row[0] for row in db.execute("SELECT type FROM paused")]
        if ALL_TYPES in paused:
            return []
        buckets: dict[int, float] = {}
        rooms = self._rooms(db, now, buckets) if self._limits else {}
        # A paused type is skipped whatever its room: the pause wins over the limit.
        capped = {t: room for t, room in rooms.items() if room > 0 and t not in paused}
        rows: list[Sequence[Any]] = []
        # One index range per stretch of types between paused ones (and limited ones,
        # each alone with its cap): a paused type's waiting jobs are skipped by the
        # index, never read.
        skipped = [*paused, *(t for t, room in rooms.items() if room <= 0)]
        ranges = _claim_ranges(skipped, capped) if skipped or capped else _EVERY_TYPE
        for low, high, cap in ranges:
            first = 1 if batches is not None else min(n - len(rows), cap)
            rows += db.execute(_CLAIM, (now, low, high, first)).fetchall()
            if len(rows) >= n or (batches is not None and rows):
                break
        if batches is not None and rows:
            type_ = rows[0][_TYPE]
            size = min(n, batches.get(type_, 1), capped.get(type_, _UNLIMITED))
            limit = self._limits.get(type_)
            if limit is not None and limit.concurrency is not None:
                # One at a time: a batch runs in one worker, one job after another, and
                # would take the places of the handler's other workers while it waits.
                size = 1
            if size > 1:  # the first job again, and more of its type after it
                rows = db.execute(_CLAIM, (now, type_, type_, size)).fetchall()
        for chunk in _chunks([row[0] for row in rows]):
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, "
                f"started = ?, finished = NULL, worker_pid = ? WHERE id IN ({_marks(chunk)})",
                (now, worker_pid or None, *chunk),
            )
        if buckets and rows:
            self._spend(db, rows, buckets, now)
        return rows

    def _rooms(
        self, db: sqlite3.Connection, now: float, buckets: dict[int, float]
    ) -> dict[int, int]:
        """How many more jobs of each limited type may start now: its concurrency less its
        RUNNING jobs (those claimed by any worker, started or not), and no more than the
        whole tokens in its bucket.  ``buckets`` gets the rate-limited types' tokens."""
        running = self._running_counts(db)
        held = self._buckets(db)
        rooms: dict[int, int] = {}
        for type_, limit in self._limits.items():
            room = _UNLIMITED
            if limit.concurrency is not None:
                room = limit.concurrency - running.get(type_, 0)
            if limit.rate is not None:
                buckets[type_] = tokens(limit, held.get(type_), now)
                room = min(room, whole(buckets[type_]))
            rooms[type_] = room
        return rooms

    def _running_counts(self, db: sqlite3.Connection) -> dict[int, int]:
        """The limited types' RUNNING jobs (read from the index jobs_type)."""
        types = builtins.list(self._limits)
        return {
            int(t): int(c)
            for t, c in db.execute(
                f"SELECT type, COUNT(*) FROM jobs WHERE state = 'running' "
                f"AND type IN ({_marks(types)}) GROUP BY type",
                types,
            )
        }

    def _buckets(self, db: sqlite3.Connection) -> dict[int, tuple[float, float]]:
        """The rate-limited types' buckets as written: (tokens, when counted)."""
        types = [t for t, limit in self._limits.items() if limit.rate is not None]
        if not types:
            return {}
        return {
            int(t): (float(left), float(counted))
            for t, left, counted in db.execute(
                f"SELECT type, tokens, updated FROM buckets WHERE type IN ({_marks(types)})",
                types,
            )
        }

    @staticmethod
    def _spend(
        db: sqlite3.Connection,
        rows: Sequence[Sequence[Any]],
        buckets: Mapping[int, float],
        now: float,
    ) -> None:
        """One token of its type's bucket for each job claimed, written in the claim's
        transaction."""
        spent: dict[int, int] = {}
        for row in rows:
            if row[_TYPE] in buckets:
                spent[row[_TYPE]] = spent.get(row[_TYPE], 0) + 1
        for type_, count in spent.items():
            db.execute(
                "INSERT INTO buckets (type, tokens, updated) VALUES (?, ?, ?) ON CONFLICT "
                "(type) DO UPDATE SET tokens = excluded.tokens, "
                "updated = MAX(updated, excluded.updated)",
                (type_, buckets[type_] - count, now),
            )

    def next_start(self, now: float) -> float | None:
        if not self._limits:
            return None
        soonest: float | None = None
        with self._read() as db:
            paused = {int(row[0]) for row in db.execute("SELECT type FROM paused")}
            if ALL_TYPES in paused:
                return None  # nothing starts: nothing to ring for
            running = self._running_counts(db)
            held = self._buckets(db)
            for type_, limit in self._limits.items():
                if type_ in paused:
                    continue  # its jobs wait for a resume, which rings itself
                if limit.concurrency is not None and running.get(type_, 0) >= limit.concurrency:
                    continue  # full: the end of one of its jobs claims the next
                if not self._waiting(db, type_, now):
                    continue
                when = now
                left = tokens(limit, held.get(type_), now)
                if limit.rate is not None and whole(left) < 1:
                    when = now + (1.0 - left) / limit.rate
                soonest = when if soonest is None else min(soonest, when)
        return soonest

    @staticmethod
    def _waiting(db: sqlite3.Connection, type_: int, now: float) -> bool:
        """Whether a job of ``type_`` waits to be claimed and may still start."""
        return (
            db.execute(
                f"SELECT 1 FROM jobs WHERE {_STARTABLE} AND type = ? LIMIT 1",
                (now, type_),
            ).fetchone()
            is not None
        )

    def limited(self, now: float) -> builtins.list[LimitState]:
        if not self._limits:
            return []
        found = []
        with self._read() as db:
            running = self._running_counts(db)
            held = self._buckets(db)
            for type_, limit in sorted(self._limits.items()):
                queued = db.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE {_STARTABLE} AND type = ?", (now, type_)
                ).fetchone()[0]
                left = None
                if limit.rate is not None:
                    left = whole(tokens(limit, held.get(type_), now))
                found.append(LimitState(type_, limit, running.get(type_, 0), left, int(queued)))
        return found

    def expire(self, now: float) -> builtins.list[JobRecord]:
        found: list[JobRecord] = []
        with self._write() as db:
            found += self._records(
                db,
                f"{_SELECT} INDEXED BY jobs_expires WHERE {_EXPIRING} AND expires <= ? "
                "AND state IN ('queued', 'scheduled') AND attempts = 0",
                (now,),
            )
            chain, cancelled = self._cancel_found(db, found, now, EXPIRED)
        self._chain(chain, cancelled)
        return sorted(found, key=lambda job: (job.expires or 0.0, job.id))

    def next_expiry(self) -> float | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT MIN(expires) FROM jobs INDEXED BY jobs_expires WHERE {_EXPIRING} "
                "AND state IN ('queued', 'scheduled') AND attempts = 0"
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def promote_due(self, now: float) -> int:
        with self._write() as db:
            return db.execute(
                "UPDATE jobs SET state = 'queued' WHERE state = 'scheduled' AND due <= ?",
                (now,),
            ).rowcount

    def next_due(self) -> float | None:
        with self._read() as db:
            row = db.execute(
                "SELECT MIN(due) FROM jobs WHERE state = 'scheduled' AND due < ?", (chains.HELD,)
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def mark_worker(self, job_id: str, pid: int) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET worker_pid = ? WHERE id = ?", (pid, job_id))

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
        written: list[str] = []
        chain = chains.Chain()
        cancelled: list[JobRecord] = []
        try:
            with self._write() as db:
                outcome = Outcome(job_id, ok, finished, result_kind, data, error, captured)
                changed = self._finish(db, outcome, written, chain)
                if changed:
                    cancelled = self._follow(db, chain, finished)
        except BaseException:
            self._blobs.remove(written)  # not committed: no row names them
            raise
        self._chain(chain, cancelled)
        return changed

    def _finish(
        self,
        db: sqlite3.Connection,
        outcome: Outcome,
        written: builtins.list[str],
        chain: chains.Chain,
    ) -> bool:
        """:meth:`finish` in the caller's write transaction; a result file it writes is
        added to ``written``, for the caller to remove should the transaction fail.  The
        job, once final, is added to ``chain.ended``: the caller settles what follows it
        (:meth:`_follow`) before it claims."""
        data = outcome.data
        state = State.DONE if outcome.ok else State.FAILED
        params: list[Any] = [_TEXT[state], outcome.finished, outcome.result_kind]
        params.append(None if data is None else len(data))
        # One statement: the outcome and the result kept in the row (replacing any earlier
        # one), or none. A large result is a file, written first: the row names it (an
        # earlier one's goes by the schema's trigger); the caller removes it should the
        # transaction fail. NULLs are in the text, not Nones bound (see _insert).
        kept: bytes | None = None
        file: str | None = None
        if data is not None and len(data) <= self._max_result:
            kept, file = self._keep(outcome.job_id, data, written)
            if file is not None:
                self._settle(written)
        for value in (kept, file, outcome.error):
            if value is not None:
                params.append(value)
        params.append(outcome.job_id)
        sql = _FINISHES[kept is not None, file is not None, outcome.error is not None]
        if db.execute(sql, params).rowcount != 1:
            self._unwrite(written, file)
            return False
        chain.ended.append((outcome.job_id, state))
        if outcome.captured is not None:
            self._keep_output(db, outcome.job_id, outcome.captured, written)
        return True

    def _keep_output(
        self, db: sqlite3.Connection, job_id: str, captured: Captured, written: builtins.list[str]
    ) -> None:
        """A finished job's output and progress (replacing an earlier run's), a large
        output as a file like a large result.  Only jobs that wrote or reported something
        come here: an outcome without costs no statement.  (A job run again after
        ``retry`` has its earlier row removed there, so none outlives its run.)"""
        kept, file = self._keep(job_id, captured.output, written)
        self._settle(written)
        db.execute(
            "INSERT INTO outputs (job_id, data, file, size, fraction, message) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (job_id) DO UPDATE SET "
            "data = excluded.data, file = excluded.file, size = excluded.size, "
            "fraction = excluded.fraction, message = excluded.message",
            # outputs.data is NOT NULL: empty beside a file.
            (job_id, kept or b"", file, captured.size, captured.fraction, captured.message),
        )

    def requeue(self, job_id: str, *, due: float, attempts: int | None = None) -> bool:
        # The protocol gives no clock here: a due time not later than now means queued.
        state = State.QUEUED if due <= time.time() else State.SCHEDULED
        with self._write() as db:
            return (
                db.execute(
                    "UPDATE jobs SET state = ?, due = ?, attempts = COALESCE(?, attempts), "
                    "worker_pid = NULL WHERE id = ? AND state IN (?, ?, ?)",
                    (state.value, due, attempts, job_id, *_values(_NOT_FINAL)),
                ).rowcount
                == 1
            )

    # -- the operator's commands --------------------------------------------------------

    def cancel(
        self,
        ids: Sequence[str] = (),
        *,
        types: Sequence[int] = (),
        states: Sequence[State] = (State.QUEUED, State.SCHEDULED),
        running: bool = False,
        now: float,
    ) -> builtins.list[JobRecord]:
        wanted = [s for s in _distinct(states) if s in WAITING]
        if running:
            wanted.append(State.RUNNING)
        # Neither ids nor types: nothing, so that an empty selection never cancels all.
        if not wanted or (not ids and not types):
            return []
        where = f"state IN ({_marks(wanted)})"
        found: list[JobRecord] = []
        with self._write() as db:
            if ids:
                type_filter = f" AND type IN ({_marks(types)})" if types else ""
                for chunk in _chunks(_distinct(ids)):
                    found += self._records(
                        db,
                        f"{_SELECT} WHERE {where} AND id IN ({_marks(chunk)}){type_filter}",
                        (*_values(wanted), *chunk, *types),
                    )
            else:
                for type_ in _distinct(types):
                    found += self._records(
                        db, f"{_SELECT} WHERE type = ? AND {where}", (type_, *_values(wanted))
                    )
            chain, cancelled = self._cancel_found(db, found, now)
        self._chain(chain, cancelled)
        return sorted(found, key=lambda job: (job.accepted, job.id))

    def _cancel_found(
        self,
        db: sqlite3.Connection,
        found: Sequence[JobRecord],
        now: float,
        error: str | None = None,
    ) -> tuple[chains.Chain, builtins.list[JobRecord]]:
        """``found`` CANCELLED in the caller's write transaction (with ``error`` when
        given: ``expired``), however they end: a held job's own due time restored and
        what it waited for forgotten, and the jobs waiting for them cancelled in turn
        (ipcd.store.chains).  Returns the chain for :meth:`_chain` and those dependents."""
        for chunk in _chunks([job.id for job in found]):
            db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ?, error = COALESCE(?, error), "
                f"due = CASE WHEN due >= ? THEN held_due ELSE due END "
                f"WHERE id IN ({_marks(chunk)})",
                (now, error, chains.HELD, *chunk),
            )
        chains.forget(db, [job.id for job in found if job.after])
        chain = chains.Chain(ended=[(job.id, State.CANCELLED) for job in found])
        return chain, self._follow(db, chain, now)

    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as db:
            return self._get(db, job_id)

    def records(self, ids: Sequence[str]) -> dict[str, JobRecord]:
        found: dict[str, JobRecord] = {}
        with self._read() as db:
            for chunk in _chunks(_distinct(ids)):
                for record in self._records(db, f"{_SELECT} WHERE id IN ({_marks(chunk)})", chunk):
                    found[record.id] = record
        return found

    def body(self, job_id: str) -> bytes | None:
        with self._read() as db:
            row = db.execute(f"SELECT {_BODY} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._bytes(row[0])

    def output(self, job_id: str) -> Captured | None:
        with self._read() as db:
            row = db.execute(
                "SELECT COALESCE(file, data), size, fraction, message FROM outputs "
                "WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        data = self._bytes(row[0])
        return Captured(data or b"", int(row[1]), row[2], str(row[3]))

    def result(self, job_id: str) -> tuple[int, bytes] | None:
        with self._read() as db:
            row = db.execute(
                "SELECT COALESCE(result_kind, 0), COALESCE(result_file, result_data) FROM jobs "
                "WHERE id = ? AND (result_file IS NOT NULL OR result_data IS NOT NULL)",
                (job_id,),
            ).fetchone()
        data = None if row is None else self._bytes(row[1])
        return None if row is None or data is None else (int(row[0]), data)

    def list(
        self,
        *,
        states: Sequence[State] = (),
        types: Sequence[int] = (),
        unique: str | None = None,
        limit: int = 50,
    ) -> builtins.list[JobRecord]:
        """Each query below reads one index range in the order wanted, at most ``limit``
        rows; several ranges (states, types) are merged here. No query sorts or scans the
        whole table, whatever the store holds."""
        if limit <= 0:
            return []
        states = _distinct(states)
        types = _distinct(types)
        dispatch = states == [State.QUEUED]
        with self._read() as db:
            if unique is not None:
                where = ["unique_key = ?"]
                params: list[object] = [unique]
                if states:
                    where.append(f"state IN ({_marks(states)})")
                    params += _values(states)
                if types:
                    where.append(f"type IN ({_marks(types)})")
                    params += types
                order = f"{_DISPATCH} LIMIT ?" if dispatch else _NEWEST
                sql = f"{_SELECT} WHERE {' AND '.join(where)} {order}"
                return self._records(db, sql, (*params, limit))
            if dispatch and not types:
                sql = f"{_SELECT} WHERE state = 'queued' {_DISPATCH} LIMIT ?"
                return self._records(db, sql, (limit,))
            if dispatch:
                found: list[JobRecord] = []
                for type_ in sorted(types):
                    sql = f"{_SELECT} WHERE state = 'queued' AND type = ? {_DISPATCH} LIMIT ?"
                    found += self._records(db, sql, (type_, limit - len(found)))
                    if len(found) >= limit:
                        break
                return found
            ranges: list[list[JobRecord]] = []
            for state in _values(states or State):
                if not types:
                    sql = f"{_SELECT} WHERE state = ? {_NEWEST}"
                    ranges.append(self._records(db, sql, (state, limit)))
                for type_ in types:
                    sql = f"{_SELECT} WHERE type = ? AND state = ? {_NEWEST}"
                    ranges.append(self._records(db, sql, (type_, state, limit)))
        newest = heapq.merge(*ranges, key=lambda job: (job.accepted, job.id), reverse=True)
        return builtins.list(itertools.islice(newest, limit))

    def retry(self, job_id: str, now: float) -> JobRecord | None:
        with self._write() as db:
            changed = db.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, accepted = ?, started = NULL, "
                "finished = NULL, worker_pid = NULL, error = NULL, result_kind = NULL, "
                "result_size = NULL, result_data = NULL, result_file = NULL, expires = NULL "
                "WHERE id = ? AND state IN ('failed', 'cancelled')",
                (now, job_id),
            ).rowcount
            if changed != 1:
                return None
            db.execute("DELETE FROM outputs WHERE job_id = ?", (job_id,))
            found = self._get(db, job_id)
            gone = self._drop_unlinked(db)
        self._blobs.remove(gone)
        return found

    def pause(self, types: Sequence[int], now: float) -> None:
        with self._write() as db:
            for type_ in _distinct(types) or [ALL_TYPES]:
                db.execute(
                    "INSERT INTO paused (type, since) VALUES (?, ?) ON CONFLICT (type) DO NOTHING",
                    (type_, now),
                )

    def resume(self, types: Sequence[int]) -> None:
        with self._write() as db:
            if not types:
                db.execute("DELETE FROM paused")
            for type_ in _distinct(types):
                db.execute("DELETE FROM paused WHERE type = ?", (type_,))

    def paused(self) -> dict[int, float]:
        with self._read() as db:
            return {int(t): float(s) for t, s in db.execute("SELECT type, since FROM paused")}

    def running(self, types: Sequence[int] = ()) -> builtins.list[JobRecord]:
        type_filter = f" AND type IN ({_marks(types)})" if types else ""
        with self._read() as db:
            return self._records(
                db,
                f"{_SELECT} WHERE state = 'running'{type_filter} ORDER BY started, id",
                tuple(types),
            )

    def counts(self) -> dict[State, int]:
        with self._read() as db:
            found = {State(s): int(n) for s, n in db.execute("SELECT state, jobs FROM tally")}
        return {state: found.get(state, 0) for state in State}

    def backlog(self) -> Backlog:
        with self._read() as db:
            return self._backlog(db)

    @staticmethod
    def _backlog(db: sqlite3.Connection) -> Backlog:
        jobs, size = db.execute(_BACKLOG).fetchone()
        return Backlog(int(jobs), int(size))

    # -- keeping the store bounded ------------------------------------------------------

    def purge(self, states: Sequence[State], older_than: float | None, now: float) -> int:
        waiting = [s.value for s in states if s not in FINAL]
        if waiting:
            raise UsageError(
                f"purge removes done, failed or cancelled jobs, not {', '.join(waiting)} "
                "ones (cancel them first)"
            )
        removed = 0
        with self._write() as db:
            for state in _values(_distinct(states)):
                if older_than is None:
                    cursor = db.execute("DELETE FROM jobs WHERE state = ?", (state,))
                else:
                    cursor = db.execute(
                        "DELETE FROM jobs WHERE state = ? AND finished < ?",
                        (state, now - older_than),
                    )
                removed += cursor.rowcount
            gone = self._drop_unlinked(db)
        self._blobs.remove(gone)
        return removed

    def retain(self, policy: Retention, now: float) -> int:
        limits = (
            (State.DONE, policy.keep_done, policy.keep_done_age),
            (State.FAILED, policy.keep_failed, policy.keep_failed_age),
            (State.CANCELLED, policy.keep_failed, policy.keep_failed_age),
        )
        removed = 0
        with self._write() as db:
            for state, keep, age in limits:
                if age > 0:
                    removed += db.execute(
                        "DELETE FROM jobs WHERE state = ? AND finished < ?",
                        (state.value, now - age),
                    ).rowcount
                # The newest job beyond the first ``keep``: it and every older one go.
                edge = db.execute(
                    "SELECT finished, id FROM jobs WHERE state = ? AND finished IS NOT NULL "
                    "ORDER BY finished DESC, id DESC LIMIT 1 OFFSET ?",
                    (state.value, max(keep, 0)),
                ).fetchone()
                if edge is not None:
                    removed += db.execute(
                        "DELETE FROM jobs WHERE state = ? AND finished IS NOT NULL "
                        "AND (finished < ? OR (finished = ? AND id <= ?))",
                        (state.value, edge[0], edge[0], edge[1]),
                    ).rowcount
            gone = self._drop_unlinked(db)
        self._blobs.remove(gone)
        return removed

    # -- recurring schedules ------------------------------------------------------------

    def schedules(self) -> builtins.list[ScheduleState]:
        with self._read() as db:
            return [
                ScheduleState._make(row) for row in db.execute(f"{_SCHEDULE_SELECT} ORDER BY name")
            ]

    def save_schedules(
        self, states: Sequence[ScheduleState], *, only: Sequence[str] | None = None
    ) -> None:
        with self._write() as db:
            if only is not None:
                kept = set(only)
                gone = [str(r[0]) for r in db.execute("SELECT name FROM schedules")]
                for name in gone:
                    if name not in kept:
                        db.execute("DELETE FROM schedules WHERE name = ?", (name,))
            for state in states:
                db.execute(_SCHEDULE_SAVE, tuple(state))

    def fire_schedule(self, state: ScheduleState, job: NewJob, due: float) -> str | None:
        written: list[str] = []
        try:
            with self._write() as db:
                # Served by the index jobs_unique: the key's few jobs, not the table.
                row = db.execute(
                    "SELECT id FROM jobs WHERE unique_key = ? AND state IN (?, ?, ?) LIMIT 1",
                    (job.unique, *_values(_NOT_FINAL)),
                ).fetchone()
                if row is not None:
                    state = state._replace(overlaps=state.overlaps + 1)
                else:
                    self._add(db, [job], [], written)
                    state = state._replace(last_due=due, last_fired=job.accepted, last_job=job.id)
                db.execute(_SCHEDULE_SAVE, tuple(state))
        except BaseException:
            self._blobs.remove(written)  # not committed: no row names them
            raise
        return None if row is None else str(row[0])

    # -- start-up and health ------------------------------------------------------------

    def reset_running(self) -> builtins.list[JobRecord]:
        """Also, in the same transaction (the write lock held, so that no file of a
        transaction under way is taken): the files no row names are removed, those a
        process killed between writing a file and its commit, or between a commit and
        the removal, left behind (ipcd.store.blobs)."""
        with self._write() as db:
            found = self._records(db, f"{_SELECT} WHERE state = 'running' ORDER BY started, id", ())
            db.execute(
                "UPDATE jobs SET state = 'queued', worker_pid = NULL WHERE state = 'running'"
            )
            self._drop_unlinked(db)
            try:
                self._blobs.sweep(self._files(db))
            except OSError as exc:
                raise _os_error(self._blobs.path, exc) from exc
        return found

    @staticmethod
    def _files(db: sqlite3.Connection) -> set[str]:
        """The names of every file a row names (read from the partial indexes only)."""
        return {
            str(row[0])
            for table, column in (
                ("jobs", "body_file"),
                ("jobs", "result_file"),
                ("outputs", "file"),
            )
            for row in db.execute(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL")
        }

    def schema(self) -> tuple[int, int]:
        with self._read() as db:
            return schema.version(db), schema.VERSION

    def check(self) -> builtins.list[str]:
        """In order: the schema version, SQLite's ``quick_check`` of every page, rows
        without their job (``PRAGMA foreign_key_check``), the files of bodies and results
        that rows name and are missing, and the counters against the jobs they count.  A
        file of an older version (opened without migrating, ``ipcd check``; version 0: a
        file a failed first start left empty) gets SQLite's own checks only: the rest
        reads this version's tables and columns, which the next start makes."""
        where = f"job store {self._path}"
        problems: list[str] = []
        try:
            with self._read() as db:
                found = schema.version(db)
                if found > schema.VERSION:
                    problems.append(
                        f"{where}: schema version {found}, this ipcd knows {schema.VERSION}"
                    )
                checked = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
                if checked != ["ok"]:
                    problems += [f"{where}: {line}" for line in checked]
                orphans = db.execute("PRAGMA foreign_key_check").fetchall()
                if orphans:
                    problems.append(f"{where}: {len(orphans)} rows without their job")
                if found != schema.VERSION:
                    return problems
                missing = sorted(f for f in self._files(db) if not self._blobs.exists(f))
                if missing:
                    problems.append(
                        f"{where}: {len(missing)} files of bodies or results are missing from "
                        f"{self._blobs.path} ({', '.join(missing[:3])})"
                    )
                tally = {s: (j, b) for s, j, b in db.execute("SELECT * FROM tally")}
                held = {
                    s: (j, b)
                    for s, j, b in db.execute(
                        "SELECT state, COUNT(*), COALESCE(SUM(body_size), 0) FROM jobs "
                        "GROUP BY state"
                    )
                }
                for state in State:
                    said, real = tally.get(state.value), held.get(state.value, (0, 0))
                    if said != real:
                        problems.append(
                            f"{where}: the counters say {said} {state} jobs and bytes, "
                            f"the jobs table holds {real}"
                        )
        except StoreError as exc:
            problems.append(str(exc))
        return problems

    def close(self) -> None:
        """Close this process's connection (SQLite then checkpoints the WAL when it is the
        last one open)."""
        if os.getpid() == self._pid:
            self._conn.close()
            if self._lock >= 0:
                os.close(self._lock)
                self._lock = -1


class _Transaction:
    """One transaction of a store's connection, as a ``with`` block: ``begin`` ...
    ``COMMIT``, rolled back on any error; sqlite3 errors become StoreErrors.  (SQLite may
    have rolled back already, after SQLITE_FULL say.)

    With ``locked`` (the write transactions), the writer first queues on an advisory lock
    of the store's own (``flock`` on ``PATH.lock``), which the kernel hands to the next
    waiter the moment it is released: SQLite's own wait for a busy database sleeps 1, 2,
    5 ... ms between tries, which would cost the daemon's processes (intake, master,
    workers, all writing) milliseconds per job.  A killed process's lock goes with it.

    A class made once per store, not a ``contextlib.contextmanager``: a generator's
    context manager is made anew for every transaction, and two of them nested cost
    some 20,000 instructions a commit, a tenth of a lone job's in the intake.  It holds
    no state of its own between ``__enter__`` and ``__exit__`` (transactions never nest).
    """

    __slots__ = ("_begin", "_cursor", "_locked", "_store")

    def __init__(self, store: SqliteStore, begin: str, *, locked: bool) -> None:
        self._store = store
        self._begin = begin
        self._locked = locked
        #: For ``begin``, COMMIT and ROLLBACK, which read nothing: ``Connection.execute``
        #: makes a cursor for every statement.
        self._cursor = store._conn.cursor()

    def __enter__(self) -> sqlite3.Connection:
        store = self._store
        if self._locked:
            fcntl.flock(store._lock_fd(), fcntl.LOCK_EX)
        try:
            conn = store._own()
            self._cursor.execute(self._begin)
        except BaseException as exc:
            self._unlock()
            if isinstance(exc, sqlite3.Error):
                raise store_error(store._path, exc) from exc
            raise
        return conn

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Commit, or roll back after ``exc``; then unlock.  ``exc`` goes on (a sqlite3
        error as a StoreError), as does an error of the commit or the rollback."""
        store = self._store
        conn, cursor = store._conn, self._cursor
        try:
            try:
                if exc is None:
                    cursor.execute("COMMIT")
                    return
            except BaseException:
                if conn.in_transaction:
                    cursor.execute("ROLLBACK")
                raise
            if conn.in_transaction:
                cursor.execute("ROLLBACK")
        except sqlite3.Error as error:
            raise store_error(store._path, error) from error
        finally:
            self._unlock()
        if isinstance(exc, sqlite3.Error):
            raise store_error(store._path, exc) from exc

    def _unlock(self) -> None:
        if self._locked:
            fcntl.flock(self._store._lock, fcntl.LOCK_UN)


_NOT_FINAL = (State.QUEUED, State.SCHEDULED, State.RUNNING)
#: A job not final (_NOT_FINAL), as a test of the row a statement found by its key:
#: ``state IN (...)`` builds a temporary index of its list on every run, some 30,000
#: instructions more on every job a worker finishes.
_UNFINISHED = "(" + " OR ".join(f"state = '{state.value}'" for state in _NOT_FINAL) + ")"
#: A job's outcome: its state, when, its result's kind and size, then the result kept
#: (its bytes, or the file holding them) and the error, each ``?`` or NULL as the key
#: (bytes?, file?, error?) says, and its id. The result's columns replace an earlier
#: result's (a file of it goes by the trigger jobs_unlink_result).
_FINISHES = {
    (data, file, error): (
        "UPDATE jobs SET state = ?, finished = ?, result_kind = ?, result_size = ?, "
        f"worker_pid = NULL, result_data = {'?' if data else 'NULL'}, "
        f"result_file = {'?' if file else 'NULL'}, error = {'?' if error else 'NULL'} "
        f"WHERE id = ? AND {_UNFINISHED}"
    )
    for data in (False, True)
    for file in (False, True)
    for error in (False, True)
}
#: A state's text as the store records it, and back, looked up: the enum's ``value`` is a
#: property, and ``State(text)`` a call of the enum class (ValueError for a text that is
#: no state's), each several times a dict's look-up.
_TEXT = {state: state.value for state in State}
_STATE_OF = {state.value: state for state in State}
#: The states a new job can have, and those of them it ends in at once.
_NEW = frozenset({State.QUEUED, State.SCHEDULED, State.FAILED, State.CANCELLED})
_ENDED_NEW = frozenset({State.FAILED, State.CANCELLED})


def _distinct(values: Iterable[Any]) -> builtins.list[Any]:
    """``values`` once each, in their first order."""
    return builtins.list(dict.fromkeys(values))


def _values(states: Iterable[State]) -> builtins.list[str]:
    return [state.value for state in states]
