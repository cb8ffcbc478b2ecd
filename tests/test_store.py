"""The job store (ipcd.store) on real SQLite files: what it keeps, in which order it hands
jobs out, how it stays bounded, and how a missing, read-only, corrupt or full file is
reported.

Every test works on its own file under tmp_path; the concurrency and permission tests
fork real processes (the permission ones drop root for nobody, since root ignores file
modes). Nothing is mocked: SQLite's own errors are provoked for real (``max_page_count``
for a full disk, ``query_only`` for a read-only connection, garbage for a corrupt file).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ipcd.errors import (
    ConfigError,
    InternalError,
    StoreCorruptError,
    StoreFullError,
    StoreUnavailableError,
    UsageError,
)
from ipcd.store import JobRecord, JobStore, NewJob, Retention, State, open_store, schema
from ipcd.store.sqlite import PAGE_SIZE, SqliteStore, connect

NOW = 1_700_000_000.0
NOBODY = 65534


def _job(job_id: str, type_: int = 1, accepted: float = NOW, **fields: Any) -> NewJob:
    """A job of ``type_`` accepted at ``accepted``; ``fields`` replace NewJob's others."""
    body = f"body of {job_id}".encode()
    job = NewJob(job_id, type_, "echo", body, False, accepted, len(body), job_id)
    return job._replace(**fields)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "jobs.db")


@pytest.fixture
def store(path: str) -> Iterator[JobStore]:
    opened = open_store(path, max_result=64)
    yield opened
    opened.close()


def _raw(path: str) -> sqlite3.Connection:
    """A connection of the test's own, to look at the file behind the store's back."""
    return sqlite3.connect(path, isolation_level=None)


def _ids(records: Sequence[JobRecord]) -> list[str]:
    return [record.id for record in records]


# -- opening: files, modes, pragmas, schema -----------------------------------------------


def test_a_new_store_is_0600_with_its_wal_and_shm_whatever_the_umask(path: str) -> None:
    """Even under umask 0 the file, its -wal and its -shm are made readable by their owner
    only: jobs are the daemon's to show."""
    umask = os.umask(0)
    try:
        store = open_store(path)
        store.add([_job("a")])
        modes = {
            suffix: stat.S_IMODE(os.stat(path + suffix).st_mode) for suffix in ("", "-wal", "-shm")
        }
        store.close()
    finally:
        os.umask(umask)
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


@pytest.mark.parametrize(("sync", "level"), [("normal", 1), ("full", 2)])
def test_the_connection_is_wal_with_the_sync_asked_for(path: str, sync: str, level: int) -> None:
    """WAL, synchronous NORMAL or FULL from ``sync``, foreign keys on, the busy timeout
    given, and the schema at this ipcd's version."""
    conn = connect(path, sync=sync, busy_timeout=1234)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (level,)
        assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
        assert conn.execute("PRAGMA busy_timeout").fetchone() == (1234,)
        assert conn.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
        assert conn.isolation_level is None
    finally:
        conn.close()
    with pytest.raises(ConfigError, match="'normal' or 'full'"):
        connect(path, sync="sometimes")


def test_a_new_file_has_small_pages_and_an_older_one_keeps_its_own(path: str) -> None:
    """A new store is made with PAGE_SIZE pages (a lone job's commit writes fewer bytes);
    a file made with SQLite's default 4 KiB pages (by an earlier ipcd) opens and serves
    as it is: the page size of a WAL file cannot change in place."""
    store = open_store(path)
    store.add([_job("a")])
    store.close()
    with contextlib.closing(_raw(path)) as raw:
        assert raw.execute("PRAGMA page_size").fetchone() == (PAGE_SIZE,)
    assert PAGE_SIZE < 4096
    older = path + ".old"
    with contextlib.closing(sqlite3.connect(older)) as raw:
        raw.execute("PRAGMA journal_mode = WAL")  # the default page size, 4096
        raw.execute("CREATE TABLE t (x)")
    store = open_store(older)
    store.add([_job("b")])
    assert _ids(store.list()) == ["b"]
    store.close()
    with contextlib.closing(_raw(older)) as raw:
        assert raw.execute("PRAGMA page_size").fetchone() == (4096,)


def test_migrations_reach_the_version_once_and_keep_the_jobs(path: str) -> None:
    """One migration per version; a second open of a current file changes nothing."""
    assert len(schema.MIGRATIONS) == schema.VERSION
    first = open_store(path)
    first.add([_job("a")])
    first.close()
    again = open_store(path)
    assert _ids(again.list()) == ["a"]
    again.close()
    with contextlib.closing(_raw(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)


def test_a_newer_schema_is_refused(path: str) -> None:
    """A file written by a newer ipcd is not read with this one's idea of its columns."""
    open_store(path).close()
    with contextlib.closing(_raw(path)) as raw:
        raw.execute(f"PRAGMA user_version = {schema.VERSION + 1}")
    with pytest.raises(StoreCorruptError) as caught:
        open_store(path)
    message = str(caught.value)
    assert path in message
    assert f"schema version {schema.VERSION + 1} is newer" in message
    assert caught.value.exit_code == 74


def test_a_missing_directory_is_unavailable_and_nothing_is_made(tmp_path: Path) -> None:
    """The daemon never makes the store's directory: its owner and mode are the operator's."""
    missing = tmp_path / "no-such-dir"
    with pytest.raises(StoreUnavailableError) as caught:
        open_store(str(missing / "jobs.db"))
    assert str(missing / "jobs.db") in str(caught.value)
    assert "does not exist" in str(caught.value)
    assert caught.value.exit_code == 74
    assert not missing.exists()


def test_a_file_of_garbage_is_corrupt(path: str) -> None:
    """Not a database: the message names the path, the cause and what to do."""
    Path(path).write_bytes(random.Random(1).randbytes(16384))
    with pytest.raises(StoreCorruptError) as caught:
        open_store(path)
    message = str(caught.value)
    assert message.startswith(f"job store {path}: file is not a database")
    assert "move it aside" in message


def test_damaged_pages_are_found_by_check_and_refused_on_use(path: str) -> None:
    """Garbage over every page the jobs added (not the schema's, nor the tables' first
    pages): check() lists the damage, and reading the jobs raises StoreCorruptError
    instead of returning nonsense."""
    open_store(path).close()
    schema_size = os.path.getsize(path)  # the empty store, checkpointed at its close
    store = open_store(path)
    store.add([_job(f"j{i}", body=bytes(300)) for i in range(200)])
    store.close()
    with open(path, "r+b") as file:
        size = file.seek(0, os.SEEK_END)
        page = 4096
        assert size > schema_size + 4 * page
        file.seek(schema_size)
        file.write(b"\xa5" * (size - schema_size))
    damaged = open_store(path)
    try:
        problems = damaged.check()
        assert problems
        assert all(problem.startswith(f"job store {path}: ") for problem in problems)
        with pytest.raises(StoreCorruptError, match="restore from a backup"):
            damaged.list(limit=1000)
    finally:
        damaged.close()


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory nobody may enter (tmp_path's parents are root's alone)."""
    made = Path(tempfile.mkdtemp(prefix="ipcd-store-"))
    made.chmod(0o755)
    os.chown(made, NOBODY, NOBODY)
    yield made
    shutil.rmtree(made)


def _in_child(action: Callable[[], object], *, nobody: bool = False) -> tuple[int, str]:
    """Run ``action`` in a forked child (as nobody, having dropped root, with ``nobody``):
    the child's pid and what it raised ("ClassName: message"), or "ok"."""
    if nobody and os.geteuid() != 0:
        pytest.skip("needs root to act as an unprivileged user")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        outcome = "ok"
        try:
            os.close(read)
            if nobody:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            action()
        except BaseException as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write, outcome.encode())
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return pid, outcome


def _as_nobody(action: Callable[[], object]) -> str:
    return _in_child(action, nobody=True)[1]


def _open_and_add(path: str) -> Callable[[], None]:
    def action() -> None:
        store = open_store(path)
        store.add([_job("b")])
        store.close()

    return action


def test_a_read_only_file_is_unavailable_for_its_owner(nobody_dir: Path) -> None:
    """nobody's own store made read-only (0400) cannot be opened for writing: refused at
    open, naming the path, the cause and the remedy."""
    path = str(nobody_dir / "jobs.db")
    assert _as_nobody(_open_and_add(path)) == "ok"
    os.chmod(path, 0o400)
    outcome = _as_nobody(_open_and_add(path))
    assert outcome.startswith(f"StoreUnavailableError: job store {path}: Permission denied")
    assert "writable by the daemon's user" in outcome


def test_a_read_only_directory_is_unavailable(nobody_dir: Path) -> None:
    """A new store cannot be made in a directory nobody may not write; nor can an
    existing one be opened there, since WAL needs its -wal and -shm files beside it."""
    path = str(nobody_dir / "jobs.db")
    made = str(nobody_dir / "made.db")
    assert _as_nobody(_open_and_add(made)) == "ok"
    # The store and the lock file its writers queue on (SqliteStore._write).
    assert sorted(os.listdir(nobody_dir)) == ["made.db", "made.db.lock"]
    nobody_dir.chmod(0o555)
    outcome = _as_nobody(_open_and_add(path))
    assert outcome.startswith(f"StoreUnavailableError: job store {path}: Permission denied")
    assert not os.path.exists(path)
    outcome = _as_nobody(_open_and_add(made))
    # SQLite says SQLITE_READONLY (cannot make the -shm) or SQLITE_CANTOPEN, by version.
    cause = "(attempt to write a readonly database|unable to open database file)"
    assert re.match(rf"StoreUnavailableError: job store {re.escape(made)}: {cause} ", outcome)
    assert "its directory readable and writable by the daemon's user" in outcome


def test_another_users_store_is_unavailable(nobody_dir: Path) -> None:
    """A store made by root (0600) gives nobody nothing: not even a read."""
    path = str(nobody_dir / "jobs.db")
    open_store(path).close()

    def read() -> None:
        open_store(path).list()

    outcome = _as_nobody(read)
    assert outcome.startswith(f"StoreUnavailableError: job store {path}: Permission denied")


def test_a_directory_nobody_may_not_enter_is_permission_denied(tmp_path: Path) -> None:
    """tmp_path's parents are root's alone: for nobody the store's directory is not
    missing but out of reach, and the message says so."""
    path = str(tmp_path / "jobs.db")
    outcome = _as_nobody(_open_and_add(path))
    assert outcome.startswith(f"StoreUnavailableError: job store {path}: Permission denied")


def test_a_write_refused_as_read_only_is_unavailable_until_writable(path: str) -> None:
    """SQLite's own "attempt to write a readonly database" (here: ``query_only``) is
    StoreUnavailableError; the store works again once writes are allowed."""
    conn = connect(path)
    store = SqliteStore(conn, path)
    try:
        conn.execute("PRAGMA query_only = ON")
        with pytest.raises(StoreUnavailableError) as caught:
            store.add([_job("a")])
        assert str(caught.value).startswith(
            f"job store {path}: attempt to write a readonly database"
        )
        conn.execute("PRAGMA query_only = OFF")
        assert store.add([_job("a")]) == ["a"]
    finally:
        store.close()


def test_a_full_store_raises_store_full_and_keeps_what_it_had(path: str) -> None:
    """SQLITE_FULL (a page limit here, a full disk in life) is StoreFullError; the batch
    that did not fit is not half-added, and the store takes jobs again once it has room."""
    conn = connect(path)
    store = SqliteStore(conn, path)
    try:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        room = 32 * 1024 // conn.execute("PRAGMA page_size").fetchone()[0]  # 32 KiB more
        conn.execute(f"PRAGMA max_page_count = {pages + room}")
        added = 0
        with pytest.raises(StoreFullError) as caught:
            for batch in range(100):
                jobs = [_job(f"b{batch}-{i}", body=bytes(2000)) for i in range(5)]
                assert store.add(jobs) == [job.id for job in jobs]
                added += len(jobs)
        assert str(caught.value).startswith(f"job store {path}: database or disk is full")
        assert caught.value.exit_code == 74
        assert added > 0
        assert store.backlog().jobs == added
        assert store.counts()[State.QUEUED] == added
        conn.execute("PRAGMA max_page_count = 1000000")
        assert store.add([_job("later", body=bytes(2000))]) == ["later"]
        assert store.check() == []
    finally:
        store.close()


def test_a_store_locked_longer_than_the_busy_timeout_is_unavailable(path: str) -> None:
    """A writer that waits past busy_timeout gives up with StoreUnavailableError."""
    store = open_store(path, busy_timeout=50)
    holder = _raw(path)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailableError, match="database is locked"):
            store.add([_job("a")])
        holder.execute("ROLLBACK")
        assert store.add([_job("a")]) == ["a"]
    finally:
        holder.close()
        store.close()


def test_a_store_used_in_a_forked_child_refuses(store: JobStore) -> None:
    """A connection copied by fork is never used: the child gets InternalError, the
    parent's store goes on working."""
    store.add([_job("a")])
    pid, outcome = _in_child(store.counts)
    assert outcome.startswith(f"{InternalError.__name__}: job store ")
    assert outcome.endswith(f"used in process {pid}; each process opens its own after fork")
    assert store.counts()[State.QUEUED] == 1


# -- adding and dispatching ----------------------------------------------------------------


def test_add_skips_ids_already_present(store: JobStore) -> None:
    """Recovery may add a job again: the first copy stays, only new ids are inserted."""
    assert store.add([_job("a"), _job("b")]) == ["a", "b"]
    assert store.add([_job("b", body=b"other"), _job("c"), _job("c")]) == ["c"]
    assert store.body("b") == b"body of b"
    assert store.counts()[State.QUEUED] == 3


def test_add_schedules_later_jobs_and_records_rejected_ones(store: JobStore) -> None:
    """A due time after acceptance makes a job SCHEDULED until promoted; a rejected
    message is added FAILED with its error, finished when accepted."""
    store.add(
        [
            _job("now"),
            _job("later", due=NOW + 60),
            _job("sooner", due=NOW + 30),
            _job("bad", state=State.FAILED, error="no handler for type 1"),
        ]
    )
    assert [job.id for job in store.list(states=[State.SCHEDULED])] == ["sooner", "later"]
    bad = store.get("bad")
    assert bad is not None
    assert (bad.state, bad.error, bad.finished) == (State.FAILED, "no handler for type 1", NOW)
    assert store.next_due() == NOW + 30
    assert store.promote_due(NOW + 29) == 0
    assert store.promote_due(NOW + 30) == 1
    assert store.next_due() == NOW + 60
    assert _ids(store.list(states=[State.QUEUED])) == ["now", "sooner"]
    assert store.get("nope") is None
    assert store.body("nope") is None


def test_claim_hands_out_jobs_in_dispatch_order(store: JobStore) -> None:
    """Type ascending, then priority descending, then oldest first; each claimed job is
    RUNNING, one attempt more, started now, returned with its body."""
    store.add(
        [
            _job("t2-old", 2, NOW),
            _job("t1-low", 1, NOW + 1, priority=-5),
            _job("t1-high", 1, NOW + 3, priority=9),
            _job("t1-a", 1, NOW + 2),
            _job("t1-b", 1, NOW + 2, attempts=2),
        ]
    )
    first = store.claim(3, NOW + 10)
    assert [record.id for record, _ in first] == ["t1-high", "t1-a", "t1-b"]
    high, body = first[0]
    assert (high.state, high.attempts, high.started, body) == (
        State.RUNNING,
        1,
        NOW + 10,
        b"body of t1-high",
    )
    assert first[2][0].attempts == 3
    assert [record.id for record, _ in store.claim(5, NOW + 11)] == ["t1-low", "t2-old"]
    assert store.claim(5, NOW + 12) == []
    assert store.claim(0, NOW + 12) == []
    assert _ids(store.running()) == ["t1-a", "t1-b", "t1-high", "t1-low", "t2-old"]
    assert _ids(store.running([2])) == ["t2-old"]


def test_claim_skips_paused_types_and_everything_when_all_are_paused(store: JobStore) -> None:
    """pause([1]) holds type 1 back while 2 and 3 run; pause(()) holds everything until
    resume(()) lifts every pause."""
    store.add([_job(f"t{t}-{i}", t, NOW + i) for t in (1, 2, 3) for i in range(2)])
    store.pause([1], NOW)
    assert store.paused() == {1: NOW}
    assert [r.id for r, _ in store.claim(3, NOW)] == ["t2-0", "t2-1", "t3-0"]
    store.pause((), NOW + 5)
    store.pause([1], NOW + 5)  # already paused: keeps its first time
    assert store.paused() == {0: NOW + 5, 1: NOW}
    assert store.claim(3, NOW) == []
    store.resume([1])
    assert store.claim(3, NOW) == []  # everything is still paused
    store.resume(())
    assert store.paused() == {}
    assert [r.id for r, _ in store.claim(3, NOW)] == ["t1-0", "t1-1", "t3-1"]


def _claim_all(path: str, out: Path, start: int) -> None:
    """A child: open its own store, wait for the start, claim in small random batches
    until nothing is left, and write the ids it got. The pause after each claim is the
    dispatcher's work; without it the busy process takes the lock again at once while
    the other sleeps in SQLite's busy handler, and the race the test is for never runs."""
    got: list[str] = []
    store = open_store(path)
    os.read(start, 1)
    rng = random.Random(os.getpid())
    while batch := store.claim(rng.randint(1, 4), time.time()):
        got += [record.id for record, _ in batch]
        time.sleep(0.0005)
    store.close()
    out.write_text("\n".join(got))


def test_two_processes_claiming_at_once_share_no_job_and_lose_none(
    path: str, tmp_path: Path
) -> None:
    """Two processes claim from one file at the same time: every job is claimed exactly
    once, by one of them, with one attempt."""
    total = 3000
    store = open_store(path)
    store.add([_job(f"j{i}", 1 + i % 3, NOW + i) for i in range(total)])
    start_read, start_write = os.pipe()
    children = {}
    for name in ("first", "second"):
        out = tmp_path / f"{name}.ids"
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                _claim_all(path, out, start_read)
                code = 0
            finally:
                os._exit(code)
        children[pid] = out
    os.write(start_write, b"go")  # one byte each
    statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
    os.close(start_read)
    os.close(start_write)
    assert statuses == [0, 0]
    claimed = [[line for line in out.read_text().split("\n") if line] for out in children.values()]
    both = claimed[0] + claimed[1]
    assert all(claimed), "each process claimed some jobs"
    assert len(both) == len(set(both)) == total
    assert set(both) == {f"j{i}" for i in range(total)}
    counts = store.counts()
    assert (counts[State.RUNNING], counts[State.QUEUED]) == (total, 0)
    assert {record.attempts for record in store.running()} == {1}
    store.close()


def test_finish_keeps_results_up_to_max_result_and_only_the_size_beyond(
    store: JobStore,
) -> None:
    """The fixture's max_result is 64 bytes: 64 are kept, 65 only counted; a failure keeps
    its error. Finishing twice changes nothing."""
    store.add([_job("small"), _job("big"), _job("bad")])
    store.claim(3, NOW)
    assert store.finish(
        "small", ok=True, finished=NOW + 1, result_kind=2, data=bytes(64), error=None
    )
    assert store.finish("big", ok=True, finished=NOW + 1, result_kind=2, data=bytes(65), error=None)
    assert store.finish("bad", ok=False, finished=NOW + 2, result_kind=3, data=b"e", error="boom")
    assert store.result("small") == (2, bytes(64))
    assert store.result("big") is None
    big = store.get("big")
    assert big is not None
    assert (big.state, big.result_kind, big.result_size, big.finished) == (
        State.DONE,
        2,
        65,
        NOW + 1,
    )
    bad = store.get("bad")
    assert bad is not None
    assert (bad.state, bad.error) == (State.FAILED, "boom")
    assert not store.finish("bad", ok=True, finished=NOW + 3, result_kind=1, data=b"", error=None)
    assert store.get("bad") == bad
    assert not store.finish("gone", ok=True, finished=NOW, result_kind=1, data=b"", error=None)


def test_finish_leaves_a_cancelled_job_cancelled(store: JobStore) -> None:
    """An operator cancelled the running job (cancel --kill): its worker's late finish
    changes nothing and says so."""
    store.add([_job("a")])
    store.claim(1, NOW)
    store.mark_worker("a", 4242)
    cancelled = store.cancel(["a"], running=True, now=NOW + 1)
    assert [(job.id, job.state, job.worker_pid) for job in cancelled] == [
        ("a", State.RUNNING, 4242)
    ]
    assert not store.finish("a", ok=True, finished=NOW + 2, result_kind=1, data=b"x", error=None)
    after = store.get("a")
    assert after is not None
    assert (after.state, after.finished, after.result_size) == (State.CANCELLED, NOW + 1, None)
    assert store.result("a") is None


def test_requeue_sends_a_job_back_or_schedules_it(store: JobStore) -> None:
    """Back to QUEUED when due, SCHEDULED when later; attempts only when given; a final
    job is not requeued."""
    store.add([_job("a"), _job("b")])
    store.claim(2, NOW)
    assert store.requeue("a", due=NOW)
    a = store.get("a")
    assert a is not None
    assert (a.state, a.attempts) == (State.QUEUED, 1)
    later = time.time() + 3600
    assert store.requeue("b", due=later, attempts=5)
    b = store.get("b")
    assert b is not None
    assert (b.state, b.attempts, b.due) == (State.SCHEDULED, 5, later)
    store.cancel(["a"], now=NOW)
    assert not store.requeue("a", due=NOW)
    assert not store.requeue("gone", due=NOW)


def test_reset_running_queues_every_running_job_with_its_attempts(store: JobStore) -> None:
    """At start, jobs left RUNNING by a dead daemon are queued again, attempts kept."""
    store.add([_job("a"), _job("b"), _job("c")])
    store.claim(2, NOW)
    reset = store.reset_running()
    assert [(job.id, job.state, job.attempts) for job in reset] == [
        ("a", State.RUNNING, 1),
        ("b", State.RUNNING, 1),
    ]
    assert store.running() == []
    assert [(job.id, job.attempts) for job in store.list(states=[State.QUEUED])] == [
        ("a", 1),
        ("b", 1),
        ("c", 0),
    ]


# -- the operator's commands ---------------------------------------------------------------


def test_cancel_by_id_or_type_takes_only_waiting_jobs_unless_running(store: JobStore) -> None:
    """Queued and scheduled jobs are cancelled; running ones only with running=True;
    finished ones never; no ids and no types cancel nothing."""
    store.add([_job("q1"), _job("q2", 2), _job("s1", due=NOW + 9), _job("r1"), _job("d1")])
    store.claim(2, NOW)  # d1 and q1 run (type 1, oldest first: ids break the tie)
    store.finish("d1", ok=True, finished=NOW, result_kind=1, data=b"", error=None)
    assert store.cancel(now=NOW) == []
    gone = store.cancel(["q1", "s1", "d1", "r1", "nope"], now=NOW + 1)
    assert [(job.id, job.state) for job in gone] == [("r1", State.QUEUED), ("s1", State.SCHEDULED)]
    assert store.cancel(types=[1], running=True, now=NOW + 2)[0].id == "q1"
    assert store.cancel(types=[2], states=[State.SCHEDULED], now=NOW + 3) == []
    assert _ids(store.cancel(types=[2], now=NOW + 3)) == ["q2"]
    states = {job.id: (job.state, job.finished) for job in store.list()}
    assert states == {
        "q1": (State.CANCELLED, NOW + 2),
        "q2": (State.CANCELLED, NOW + 3),
        "s1": (State.CANCELLED, NOW + 1),
        "r1": (State.CANCELLED, NOW + 1),
        "d1": (State.DONE, NOW),
    }
    assert store.backlog() == (0, 0)


def test_list_is_newest_first_and_queued_alone_in_dispatch_order(store: JobStore) -> None:
    """Newest first across states and types, filtered by state, type and unique key and
    cut at the limit; QUEUED alone lists in the order jobs will be dispatched."""
    store.add(
        [
            _job("a", 2, NOW + 1),
            _job("b", 1, NOW + 2, priority=-1),
            _job("c", 1, NOW + 3, unique="k"),
            _job("d", 3, NOW + 4, due=NOW + 100),
            _job("e", 1, NOW + 5, unique="k", state=State.FAILED, error="x"),
        ]
    )
    assert _ids(store.list()) == ["e", "d", "c", "b", "a"]
    assert _ids(store.list(limit=2)) == ["e", "d"]
    assert _ids(store.list(limit=0)) == []
    assert _ids(store.list(types=[1])) == ["e", "c", "b"]
    assert _ids(store.list(types=[1, 2], states=[State.QUEUED, State.FAILED])) == [
        "e",
        "c",
        "b",
        "a",
    ]
    assert _ids(store.list(states=[State.QUEUED, State.SCHEDULED])) == ["d", "c", "b", "a"]
    assert _ids(store.list(states=[State.QUEUED])) == ["c", "b", "a"]
    assert _ids(store.list(states=[State.QUEUED], types=[2, 1])) == ["c", "b", "a"]
    assert _ids(store.list(states=[State.QUEUED], types=[2, 1], limit=2)) == ["c", "b"]
    assert _ids(store.list(unique="k")) == ["e", "c"]
    assert _ids(store.list(unique="k", states=[State.QUEUED])) == ["c"]
    assert _ids(store.list(unique="k", types=[2])) == []


def test_retry_queues_a_failed_or_cancelled_job_afresh(store: JobStore) -> None:
    """attempts 0, error and result gone, accepted now; a done or queued job is not
    retried."""
    store.add([_job("f"), _job("c"), _job("d"), _job("q", 2)])
    store.claim(3, NOW)
    store.finish("f", ok=False, finished=NOW, result_kind=3, data=b"err", error="boom")
    store.finish("d", ok=True, finished=NOW, result_kind=1, data=b"ok", error=None)
    store.cancel(["c"], running=True, now=NOW)
    again = store.retry("f", NOW + 50)
    assert again is not None
    assert (again.state, again.attempts, again.error, again.result_size, again.accepted) == (
        State.QUEUED,
        0,
        None,
        None,
        NOW + 50,
    )
    assert store.result("f") is None
    assert store.retry("c", NOW + 51) is not None
    assert store.retry("d", NOW) is None
    assert store.retry("q", NOW) is None
    assert store.retry("gone", NOW) is None
    assert _ids(store.list(states=[State.QUEUED])) == ["f", "c", "q"]


def _finished(store: JobStore, state: State, ids_and_times: list[tuple[str, float]]) -> None:
    """Jobs that ended in ``state`` at the given times."""
    store.add([_job(job_id) for job_id, _ in ids_and_times])
    store.claim(len(ids_and_times), NOW)
    for job_id, when in ids_and_times:
        if state is State.CANCELLED:
            store.cancel([job_id], running=True, now=when)
        else:
            ok = state is State.DONE
            store.finish(job_id, ok=ok, finished=when, result_kind=1, data=b"r", error=None)


def test_retain_keeps_the_newest_and_none_too_old(path: str, store: JobStore) -> None:
    """keep_done newest done jobs, keep_failed newest failed and cancelled ones each, and
    with an age limit none finished longer ago; their bodies and results go with them,
    and waiting jobs are never touched."""
    _finished(store, State.DONE, [(f"d{i}", NOW - i) for i in range(10)])
    _finished(store, State.FAILED, [(f"f{i}", NOW - i) for i in range(5)])
    _finished(store, State.CANCELLED, [(f"c{i}", NOW - i) for i in range(5)])
    _finished(store, State.DONE, [("tie-a", NOW - 20), ("tie-b", NOW - 20)])
    store.add([_job("waiting")])
    removed = store.retain(Retention(4, 0, 2, 0), NOW)
    assert removed == (12 - 4) + (5 - 2) + (5 - 2)
    assert sorted(_ids(store.list(states=[State.DONE]))) == ["d0", "d1", "d2", "d3"]
    assert sorted(_ids(store.list(states=[State.FAILED]))) == ["f0", "f1"]
    assert sorted(_ids(store.list(states=[State.CANCELLED]))) == ["c0", "c1"]
    assert _ids(store.list(states=[State.QUEUED])) == ["waiting"]
    assert store.retain(Retention(100, 2.5, 100, 0.5), NOW) == 1 + 1 + 1
    assert sorted(_ids(store.list(states=[State.DONE]))) == ["d0", "d1", "d2"]
    assert sorted(_ids(store.list(states=[State.FAILED, State.CANCELLED]))) == ["c0", "f0"]
    with contextlib.closing(_raw(path)) as raw:
        kept = raw.execute("SELECT COUNT(*), COUNT(body), COUNT(result_data) FROM jobs")
        assert kept.fetchone() == (6, 6, 4)


def test_retain_breaks_ties_of_finish_time_exactly(store: JobStore) -> None:
    """Jobs that finished at the same instant: keep_done still keeps exactly that many."""
    _finished(store, State.DONE, [(f"t{i}", NOW) for i in range(5)])
    assert store.retain(Retention(2, 0, 0, 0), NOW) == 3
    assert store.counts()[State.DONE] == 2
    assert store.retain(Retention(0, 0, 0, 0), NOW) == 2
    assert store.counts()[State.DONE] == 0


def test_purge_removes_finished_jobs_by_state_and_age(store: JobStore) -> None:
    """purge deletes done, failed or cancelled jobs (older than a limit when given) and
    refuses waiting states: those are cancelled, not purged."""
    _finished(store, State.DONE, [(f"d{i}", NOW - 10 * i) for i in range(4)])
    _finished(store, State.FAILED, [("f0", NOW)])
    store.add([_job("q")])
    assert store.purge([State.DONE], 15, NOW) == 2
    assert sorted(_ids(store.list(states=[State.DONE]))) == ["d0", "d1"]
    assert store.purge([State.DONE, State.FAILED], None, NOW) == 3
    with pytest.raises(UsageError, match="not queued"):
        store.purge([State.QUEUED], None, NOW)
    assert _ids(store.list()) == ["q"]


# -- counters, indexes, health -------------------------------------------------------------


def _truth(path: str) -> tuple[dict[str, int], tuple[int, int]]:
    """Counts per state and the backlog, counted row by row on a connection of our own."""
    with contextlib.closing(_raw(path)) as raw:
        counts = dict(raw.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        backlog = raw.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM jobs "
            "WHERE state IN ('queued', 'scheduled')"
        ).fetchone()
    return counts, (backlog[0], backlog[1])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_backlog_and_counts_match_the_jobs_after_any_mix_of_changes(
    path: str, store: JobStore, seed: int
) -> None:
    """Whatever happens to the jobs, the constant-time counters equal a count of the rows."""
    rng = random.Random(seed)
    clock = NOW
    serial = 0
    for step in range(400):
        clock += 1
        ids = [job.id for job in store.list(limit=10_000)]
        pick = rng.choice(ids) if ids else "none"
        action = rng.randrange(11)
        if action <= 2:
            jobs = []
            for _ in range(rng.randint(1, 5)):
                serial += 1
                due = clock + rng.choice([0, 0, 5])
                body = bytes(rng.randint(0, 300))
                jobs.append(_job(f"j{serial}", rng.randint(1, 3), clock, due=due, body=body))
            store.add([*jobs, _job(pick)] if ids else jobs)
        elif action == 3:
            store.claim(rng.randint(1, 4), clock)
        elif action == 4:
            data = bytes(rng.randint(0, 100))
            ok = rng.random() < 0.5
            store.finish(pick, ok=ok, finished=clock, result_kind=1, data=data, error=None)
        elif action == 5:
            store.cancel([pick], running=rng.random() < 0.5, now=clock)
        elif action == 6:
            store.requeue(pick, due=rng.choice([0.0, time.time() + 60]))
        elif action == 7:
            store.retry(pick, clock)
        elif action == 8:
            store.promote_due(clock)
        elif action == 9:
            store.retain(Retention(rng.randint(0, 5), 0, rng.randint(0, 5), 30), clock)
        else:
            state = rng.choice([State.DONE, State.FAILED, State.CANCELLED])
            store.purge([state], rng.choice([None, 10.0]), clock)
        if step % 20 == 0 or step == 399:
            counts, backlog = _truth(path)
            assert store.counts() == {state: counts.get(state.value, 0) for state in State}
            assert tuple(store.backlog()) == backlog
    assert store.check() == []


def test_check_reports_counters_that_disagree_with_the_jobs(path: str, store: JobStore) -> None:
    """A sound store has no problems; counters changed behind its back are one."""
    store.add([_job("a"), _job("b")])
    assert store.check() == []
    with contextlib.closing(_raw(path)) as raw:
        raw.execute("UPDATE tally SET jobs = 7 WHERE state = 'queued'")
    problems = store.check()
    assert len(problems) == 1
    assert problems[0].startswith(f"job store {path}: the counters say (7, ")
    assert "queued" in problems[0]


def _plans(path: str, statements: list[str]) -> dict[str, list[str]]:
    """EXPLAIN QUERY PLAN of each statement that reads or changes jobs, on a connection of
    our own (the statements come from the trace with their values in place)."""
    plans = {}
    with contextlib.closing(_raw(path)) as raw:
        for sql in statements:
            words = sql.split()
            if words[0] not in ("SELECT", "UPDATE", "DELETE") or "jobs" not in words:
                continue
            plans[sql] = [row[3] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}")]
    return plans


def test_list_claim_and_retention_read_index_ranges_never_the_whole_table(path: str) -> None:
    """Every query behind list (by state, by type, both, unique, queued in dispatch
    order), claim, promotion and retention searches an index and sorts nothing: ``list -n
    50`` costs the same with 100,000 jobs as with 100."""
    conn = connect(path)
    store = SqliteStore(conn, path)
    store.add([_job(f"j{i}", 1 + i % 5, NOW + i, unique=f"k{i % 7}") for i in range(600)])
    store.claim(100, NOW)
    for i in range(0, 100, 2):
        store.finish(f"j{i}", ok=True, finished=NOW + i, result_kind=1, data=b"", error=None)
    store.pause([2], NOW)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    store.list()
    store.list(states=[State.FAILED], limit=50)
    store.list(states=[State.QUEUED, State.DONE])
    store.list(types=[3])
    store.list(types=[3, 4], states=[State.RUNNING])
    store.list(states=[State.QUEUED])
    store.list(states=[State.QUEUED], types=[4])
    store.list(unique="k3")
    store.claim(5, NOW + 1)
    store.promote_due(NOW)
    store.next_due()
    store.running()
    store.retain(Retention(10, 60, 10, 60), NOW + 100)
    store.cancel(types=[5], now=NOW)
    conn.set_trace_callback(None)
    plans = _plans(path, statements)
    assert len(plans) >= 20
    scans = {
        sql: plan for sql, plan in plans.items() if any(s.startswith("SCAN jobs") for s in plan)
    }
    assert scans == {}
    # running() sorts its rows: at most one per worker.
    sorts = {
        sql: plan
        for sql, plan in plans.items()
        if "ORDER BY started" not in sql and any("TEMP B-TREE" in s for s in plan)
    }
    assert sorts == {}
    claim = next(plan for sql, plan in plans.items() if "type BETWEEN" in sql)
    assert claim == [
        "SEARCH jobs USING INDEX jobs_claim (state=? AND type>? AND type<?)",
        # Run only for a body neither in the row nor in a file (above INLINE_BODY).
        "CORRELATED SCALAR SUBQUERY 1",
        "SEARCH bodies USING INDEX sqlite_autoindex_bodies_1 (job_id=?)",
    ]
    store.close()


def test_a_job_is_claimed_in_five_statements_and_finished_in_four(path: str) -> None:
    """A worker's claim of one job reads its record and body in one SELECT and marks it
    running in one UPDATE; its outcome is one UPDATE (its result kept in it) and one probe
    of the dependencies' primary key (ipcd.store.chains: who waits for it); and the
    claimed record, made without reading the row back, is the row as stored."""
    conn = connect(path)
    store = SqliteStore(conn, path)
    store.add([_job("j1"), _job("j2")])
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    [(record, body)] = store.claim(1, NOW + 1, worker_pid=4242)
    claimed = list(dict.fromkeys(statements))  # a trigger's steps repeat their statement
    statements.clear()
    store.finish("j1", ok=True, finished=NOW + 2, result_kind=1, data=b"r", error=None)
    finished = list(dict.fromkeys(statements))
    conn.set_trace_callback(None)
    assert [s.split()[0] for s in claimed] == ["BEGIN", "SELECT", "SELECT", "UPDATE", "COMMIT"]
    assert [s.split()[0] for s in finished] == ["BEGIN", "UPDATE", "SELECT", "COMMIT"]
    assert "FROM waits WHERE dependency IN" in finished[2]
    assert body == b"body of j1"
    assert record == store.get("j1")._replace(  # type: ignore[union-attr]
        state=State.RUNNING, finished=None, error=None, result_kind=None, result_size=None,
        worker_pid=4242,
    )  # fmt: skip
    assert record.attempts == 1 and record.started == NOW + 1
    assert store.result("j1") == (1, b"r")
    store.close()


def test_a_store_opened_without_migrating_is_left_at_its_version(path: str) -> None:
    """open_store(migrate=False), as ``ipcd check`` opens: an empty file (a failed first
    start's) and a file of the version before stay at their versions, pass SQLite's own
    checks, and say what they are; opened as the daemon opens, they are brought up to
    date.  A newer file is refused either way."""
    open(path, "wb").close()
    bare = open_store(path, migrate=False)
    try:
        assert bare.schema() == (0, schema.VERSION)
        assert bare.check() == []
    finally:
        bare.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        for steps in schema.MIGRATIONS[: schema.VERSION - 1]:
            for statement in steps:
                raw.execute(statement)
        raw.execute(f"PRAGMA user_version = {schema.VERSION - 1:d}")
    older = open_store(path, migrate=False)
    try:
        assert older.schema() == (schema.VERSION - 1, schema.VERSION)
        assert older.check() == []
    finally:
        older.close()
    current = open_store(path)
    try:
        assert current.schema() == (schema.VERSION, schema.VERSION)
        assert current.check() == []
    finally:
        current.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        raw.execute(f"PRAGMA user_version = {schema.VERSION + 1:d}")
    with pytest.raises(StoreCorruptError, match="is newer than this ipcd knows"):
        open_store(path, migrate=False)
