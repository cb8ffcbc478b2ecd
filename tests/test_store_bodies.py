"""Large bodies and results kept as files beside the job store (ipcd.store.blobs), on real
SQLite files and real directories under tmp_path.

What is checked: a large body or result comes back whole and is not in the database; its
file and directory are the daemon's alone; the file goes with its row (purge, retain,
retry, a failed add) and an orphan goes at the next start; ``check`` names a missing file;
a version 1 file is migrated with its bodies and results kept.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipcd.errors import InternalError
from ipcd.store import JobStore, NewJob, Retention, State, open_store, schema
from ipcd.store.blobs import SUFFIX, THRESHOLD
from ipcd.store.sqlite import INLINE_BODY

NOW = 1_700_000_000.0
BIG = THRESHOLD + 1


def _job(job_id: str, body: bytes, **fields: Any) -> NewJob:
    job = NewJob(job_id, 1, "echo", body, False, NOW, len(body), job_id)
    return job._replace(**fields)


def _big(seed: int) -> bytes:
    """BIG bytes that differ from job to job."""
    return bytes([seed]) * BIG


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "jobs.db")


@pytest.fixture
def store(path: str) -> Iterator[JobStore]:
    opened = open_store(path, max_result=4 * THRESHOLD)
    yield opened
    opened.close()


def _files(path: str) -> list[str]:
    """The files in the store's directory of large bodies and results."""
    try:
        return sorted(os.listdir(path + SUFFIX))
    except FileNotFoundError:
        return []


def _rows(path: str, kept: str) -> list[tuple[str, int, str | None]]:
    """(job id, length of the bytes held in the row, file) of each job holding a ``kept``
    (``body`` or ``result``)."""
    data, file = ("body", "body_file") if kept == "body" else ("result_data", "result_file")
    if kept == "body":  # in the row, or (above INLINE_BODY) in bodies
        data = "COALESCE(jobs.body, bodies.body)"
    with contextlib.closing(sqlite3.connect(path)) as raw:
        rows = raw.execute(
            f"SELECT id, COALESCE(length({data}), 0), {file} FROM jobs "
            f"LEFT JOIN bodies ON job_id = id WHERE {data} IS NOT NULL OR {file} IS NOT NULL "
            "ORDER BY id"
        )
        return [(str(i), int(n), f) for i, n, f in rows]


def test_a_large_body_is_a_file_and_comes_back_whole(path: str, store: JobStore) -> None:
    """A body above THRESHOLD is a file its row names, a body of THRESHOLD bytes stays in
    the row; claim and body give both back byte for byte."""
    store.add([_job("big", _big(1)), _job("edge", _big(2)[:THRESHOLD])])
    (name,) = _files(path)
    assert name.startswith("big~")
    assert _rows(path, "body") == [("big", 0, name), ("edge", THRESHOLD, None)]
    with open(os.path.join(path + SUFFIX, name), "rb") as file:
        assert file.read() == _big(1)
    claimed = {record.id: body for record, body in store.claim(2, NOW)}
    assert claimed == {"big": _big(1), "edge": _big(2)[:THRESHOLD]}
    assert store.body("big") == _big(1)
    assert store.get("big") is not None
    assert store.backlog().bytes == 0  # both running: the tally counts the bodies' sizes
    assert store.counts()[State.RUNNING] == 2


def test_a_body_up_to_inline_body_is_in_its_row_and_a_larger_one_in_bodies(
    path: str, store: JobStore
) -> None:
    """A body of INLINE_BODY bytes is held in the job's row, one byte more in a row of
    bodies (a claim and an outcome rewrite the job's row); both come back whole."""
    row, apart = b"r" * INLINE_BODY, b"a" * (INLINE_BODY + 1)
    store.add([_job("row", row), _job("apart", apart)])
    with contextlib.closing(sqlite3.connect(path)) as raw:
        held = raw.execute("SELECT id, length(body) FROM jobs ORDER BY id").fetchall()
        assert held == [("apart", None), ("row", INLINE_BODY)]
        assert raw.execute("SELECT job_id FROM bodies").fetchall() == [("apart",)]
    assert {record.id: body for record, body in store.claim(2, NOW)} == {"row": row, "apart": apart}
    assert (store.body("row"), store.body("apart")) == (row, apart)
    assert store.purge([State.DONE], None, NOW) == 0
    for job_id in ("row", "apart"):
        store.finish(job_id, ok=True, finished=NOW, result_kind=1, data=b"r", error=None)
    assert store.purge([State.DONE], None, NOW) == 2
    assert _rows(path, "body") == []


@pytest.mark.parametrize("sync", ["normal", "full"])
def test_the_directory_is_0700_and_its_files_0600_whatever_the_umask(path: str, sync: str) -> None:
    """Even under umask 0: bodies are the daemon's to read, as the database is (with
    either ``sync``: "full" flushes the file and the directories too)."""
    umask = os.umask(0)
    try:
        store = open_store(path, sync=sync)
        store.add([_job("big", _big(1))])
        assert store.body("big") == _big(1)
        store.close()
    finally:
        os.umask(umask)
    directory = path + SUFFIX
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    (name,) = _files(path)
    assert stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode) == 0o600


def test_a_large_result_is_a_file_and_goes_when_retried_or_replaced(
    path: str, store: JobStore
) -> None:
    """A result above THRESHOLD (within max_result) is a file; a retry forgets it, file
    and all, and a job finished again keeps only its new result."""
    store.add([_job("r", b"small")])
    store.claim(1, NOW)
    assert store.finish("r", ok=False, finished=NOW, result_kind=2, data=_big(3), error="x")
    (name,) = _files(path)
    assert _rows(path, "result") == [("r", 0, name)]
    assert store.result("r") == (2, _big(3))
    assert store.retry("r", NOW + 1) is not None
    assert store.result("r") is None
    assert _files(path) == []
    store.claim(1, NOW + 2)
    assert store.finish("r", ok=True, finished=NOW + 3, result_kind=1, data=_big(4), error=None)
    assert store.result("r") == (1, _big(4))
    assert len(_files(path)) == 1


def test_purge_and_retain_remove_the_files_of_the_jobs_they_delete(
    path: str, store: JobStore
) -> None:
    """The bodies' and results' files of deleted jobs go with them; a waiting job's and a
    kept job's stay."""
    store.add([_job(f"d{i}", _big(i)) for i in range(4)])
    store.claim(4, NOW)
    for i in range(4):
        store.finish(
            f"d{i}", ok=True, finished=NOW + i, result_kind=1, data=_big(10 + i), error=None
        )
    store.add([_job("waiting", _big(9))])
    assert len(_files(path)) == 4 + 4 + 1
    assert store.retain(Retention(1, 0, 0, 0), NOW + 10) == 3
    assert len(_files(path)) == 2 + 1
    assert store.purge([State.DONE], None, NOW + 10) == 1
    (left,) = _files(path)
    assert left.startswith("waiting~")
    assert store.body("waiting") == _big(9)
    assert store.check() == []


def test_an_add_that_fails_leaves_no_file(path: str, store: JobStore) -> None:
    """A batch rolled back after a large body's file was written: the file goes too."""
    with pytest.raises(InternalError, match="cannot be running"):
        store.add([_job("big", _big(1)), _job("bad", b"x", state=State.RUNNING)])
    assert store.get("big") is None
    assert _files(path) == []


def test_an_orphan_file_is_swept_at_start_and_the_named_ones_kept(
    path: str, store: JobStore
) -> None:
    """A file no row names (its writer killed before its commit) goes when the daemon
    starts (reset_running); the files rows name stay, and check() finds nothing wrong."""
    store.add([_job("kept", _big(1))])
    (kept,) = _files(path)
    orphan = os.path.join(path + SUFFIX, "lost~0123456789abcdef")
    with open(orphan, "wb") as file:
        file.write(_big(2))
    assert store.check() == []  # an orphan costs space, it is no damage
    store.reset_running()
    assert _files(path) == [kept]
    assert store.body("kept") == _big(1)


def test_check_reports_a_missing_file_and_body_says_it_is_gone(path: str, store: JobStore) -> None:
    """A file a row names that is missing: check() names it; body() is None, as for a
    job no longer held."""
    store.add([_job("big", _big(1))])
    (name,) = _files(path)
    os.unlink(os.path.join(path + SUFFIX, name))
    problems = store.check()
    assert problems == [
        f"job store {path}: 1 files of bodies or results are missing from {path}{SUFFIX} ({name})"
    ]
    assert store.body("big") is None


def test_a_version_1_file_is_migrated_with_its_bodies_and_results(path: str) -> None:
    """A store written by the ipcd before large bodies were files: its bodies (large ones
    included) and results are read as they were, and new large bodies become files."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        for statement in schema.MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute("PRAGMA user_version = 1")
        for job_id, body in (("old", _big(1)), ("small", b"s")):
            raw.execute(
                "INSERT INTO jobs (id, type, handler, state, submitted, accepted, size, "
                "body_size) VALUES (?, 1, 'echo', 'queued', ?, ?, ?, ?)",
                (job_id, NOW, NOW, len(body), len(body)),
            )
            raw.execute("INSERT INTO bodies (job_id, body) VALUES (?, ?)", (job_id, body))
        raw.execute("INSERT INTO results (job_id, kind, data) VALUES ('small', 1, X'6f6b')")
    store = open_store(path)
    try:
        assert store.body("old") == _big(1)
        assert store.result("small") == (1, b"ok")
        store.add([_job("new", _big(2))])
        assert [name.split("~")[0] for name in _files(path)] == ["new"]
        assert {record.id: body for record, body in store.claim(3, NOW)} == {
            "old": _big(1),
            "small": b"s",
            "new": _big(2),
        }
        assert store.check() == []
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)


def _before_inline() -> int:
    """The schema version just before results moved into the jobs row."""
    return next(i for i, steps in enumerate(schema.MIGRATIONS) if "DROP TABLE results" in steps)


def _old_file(path: str, name: str, data: bytes) -> None:
    os.makedirs(path + SUFFIX, mode=0o700, exist_ok=True)
    with open(os.path.join(path + SUFFIX, name), "wb") as file:
        file.write(data)


def _body(job_id: str) -> bytes:
    """The body of a job of the migration's test, its size told by its name."""
    sizes = {"small": len(job_id), "1k": 1024, "medium": THRESHOLD // 4, "big": BIG}
    size = next(n for suffix, n in sizes.items() if job_id.endswith(suffix))
    return (job_id.encode() * size)[:size]


def test_a_file_with_bodies_and_results_tables_is_migrated_into_the_jobs_rows(
    path: str,
) -> None:
    """A store whose bodies and results were rows of their own tables: every job's body and
    result (small ones in the row, large ones in files, a body between in bodies, a result
    too large to keep, one kept without result_kind) reads as before; results is gone and
    bodies holds only the bodies above INLINE_BODY; the files stay named (check and the
    sweep keep them, an orphan goes), and a deleted or retried job's files go."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        for steps in schema.MIGRATIONS[: _before_inline()]:
            for statement in steps:
                raw.execute(statement)
        raw.execute(f"PRAGMA user_version = {_before_inline():d}")
        jobs = (  # id, state, result_kind, result_size
            ("queued-small", "queued", None, None),
            ("queued-1k", "queued", None, None),
            ("queued-medium", "queued", None, None),
            ("queued-big", "queued", None, None),
            ("done-small", "done", 1, 2),
            ("done-big", "done", 2, BIG),
            ("done-unkept-big", "done", 1, 10 * BIG),
            ("done-kindless-small", "done", None, 3),
            ("failed-big", "failed", 3, BIG),
        )
        for job_id, state, kind, size in jobs:
            body = _body(job_id)
            file = f"{job_id}~b0dy" if len(body) > THRESHOLD else None
            raw.execute(
                "INSERT INTO jobs (id, type, handler, state, submitted, accepted, size, "
                "body_size, finished, result_kind, result_size) "
                "VALUES (?, 1, 'echo', ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, state, NOW, NOW, len(body), len(body), NOW, kind, size),
            )
            if file is not None:
                _old_file(path, file, body)
            raw.execute(
                "INSERT INTO bodies (job_id, body, file) VALUES (?, ?, ?)",
                (job_id, b"" if file else body, file),
            )
        for job_id, kind, data in (("done-small", 1, b"ok"), ("done-kindless-small", 0, b"kl")):
            raw.execute(
                "INSERT INTO results (job_id, kind, data) VALUES (?, ?, ?)", (job_id, kind, data)
            )
        for job_id, kind in (("done-big", 2), ("failed-big", 3)):
            _old_file(path, f"{job_id}~re5ult", _big(kind))
            raw.execute(
                "INSERT INTO results (job_id, kind, data, file) VALUES (?, ?, X'', ?)",
                (job_id, kind, f"{job_id}~re5ult"),
            )
    _old_file(path, "lost~0123456789abcdef", b"orphan")
    ids = [job_id for job_id, *_ in jobs]
    store = open_store(path)
    try:
        assert {job_id: store.body(job_id) for job_id in ids} == {
            job_id: _body(job_id) for job_id in ids
        }
        assert {job_id: store.result(job_id) for job_id in ids} == {
            "queued-small": None,
            "queued-1k": None,
            "queued-medium": None,
            "queued-big": None,
            "done-small": (1, b"ok"),
            "done-big": (2, _big(2)),
            "done-unkept-big": None,
            "done-kindless-small": (0, b"kl"),
            "failed-big": (3, _big(3)),
        }
        done = store.get("done-unkept-big")
        assert done is not None and (done.result_kind, done.result_size) == (1, 10 * BIG)
        kindless = store.get("done-kindless-small")  # version 6 wrote its NULL kind as 0
        assert kindless is not None and kindless.result_kind is None
        assert store.check() == []
        store.reset_running()
        assert "lost~0123456789abcdef" not in _files(path)
        assert len(_files(path)) == 4 + 2  # the large bodies and results
        assert store.retry("failed-big", NOW + 1) is not None
        assert "failed-big~re5ult" not in _files(path)
        assert store.purge([State.DONE], None, NOW + 1) == 4
        assert _files(path) == ["failed-big~b0dy", "queued-big~b0dy"]
        waiting = [job_id for job_id in ids if job_id.startswith(("queued", "failed"))]
        claimed = {record.id: body for record, body in store.claim(9, NOW + 2)}
        assert claimed == {job_id: _body(job_id) for job_id in waiting}
        assert store.check() == []
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone() == (schema.VERSION,)
        names = {row[0] for row in raw.execute("SELECT name FROM sqlite_schema")}
        assert names.isdisjoint({"results", "bodies_file", "bodies_unlink", "results_unlink"})
        kept = raw.execute("SELECT job_id, file FROM bodies").fetchall()
        assert kept == [("queued-medium", None)]
