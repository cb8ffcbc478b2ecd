"""What a job store in the path costs at the least: the floors under issue 14's targets.

Issue 14's round-trip and fire-and-forget targets are ratios to a raw ``sysv_ipc`` pair
that does nothing but move messages: 5.9 us per round trip and 1.1 us per one-way
message pinned on this kind of machine.  Issue 12 puts the job store in every job's
path (a job is committed before it is confirmed, claimed from the store, and its outcome
recorded there).  Whatever ipcd's own code costs, each job then costs at least what
SQLite needs for those writes, and these measure that, with nothing of ipcd around it:

- ``write_transaction``: one SQLite write transaction with the store's settings (WAL,
  ``synchronous = NORMAL``, 1 KiB pages) that changes one integer: ``BEGIN IMMEDIATE``,
  one ``UPDATE``, ``COMMIT``.  A job that must be recorded before its client hears of it
  (a confirmation, a reply that means "recorded") pays at least one of these.
- ``minimal_table``: the least a job table can do per job, in batches of 1,000 in one
  process: ``executemany`` of an ``INSERT`` (integer key, state, body), a claim
  (``SELECT`` of the queued by a partial index, ``UPDATE`` of their state) and a finish
  (``UPDATE`` of the state), three transactions per batch.
- ``file_write``: a large result as the store keeps it, a file of its own beside the
  database, written and (later, by retention) removed: with a segment's write and read,
  the least a recorded 16 MiB result costs (make bench's 16 MiB step).
- ``store_steps``: ipcd's own store (``ipcd.store``, the real schema and code) for one job
  per transaction, each step alone (``add``, ``claim``, ``finish``), and in batches of
  1,000 (``add``, ``claim`` and one ``exchange`` that finishes them all).

Every figure is wall time per job (``time.perf_counter``), the median of ``rounds``
repetitions, with this process pinned to one CPU (``make bench`` pins it; ``python -m
bench.floors`` pins itself).  Wall time, as the raw rates the ceilings are made of are:
CPU time would leave out what the machine's hypervisor takes (steal) and what the
writes wait for, which slow the raw pair and a job's path alike; a slowed run read its
ceilings a quarter high that way.  ``python -m bench.floors`` prints them as JSON;
``make bench`` turns them into the ceilings its table shows beside the targets
(bench.run).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from bench import store as job_store
from ipcd.layout.results import Kind
from ipcd.store import Outcome, open_store
from ipcd.store.sqlite import connect

#: Jobs per batch in the batched floors, and how many batches one repetition passes.
BATCH = 1000
BATCHES = 10
#: Single transactions per repetition.
SINGLE = 2000
#: Jobs in ipcd's store before the steps are timed: a store in use is never empty.
WARM_JOBS = 2000


class Floors(NamedTuple):
    """Microseconds per job, wall time pinned (per transaction for ``write_transaction``)."""

    write_transaction: float
    minimal_table: float
    add: float
    claim: float
    finish: float
    store_batched: float


def _per(run: Callable[[], int], rounds: int) -> float:
    """Median microseconds per item of ``run``, which returns how many it did."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        done = run()
        samples.append(_since(start, done))
    return statistics.median(samples)


def _since(start: float, jobs: int) -> float:
    """Microseconds per job since ``start`` (``time.perf_counter``)."""
    return (time.perf_counter() - start) / jobs * 1e6


def _connect(path: Path) -> sqlite3.Connection:
    """A connection with the job store's own settings (page size, WAL, ``synchronous``),
    made by the store's own code, but none of its tables (the schema is not applied)."""
    return connect(str(path), migrate=False)


def write_transaction(tmp: Path, rounds: int) -> float:
    conn = _connect(tmp / "txn.db")
    try:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        conn.execute("INSERT INTO t VALUES (1, 0)")
        cursor = conn.cursor()

        def run() -> int:
            for _ in range(SINGLE):
                cursor.execute("BEGIN IMMEDIATE")
                cursor.execute("UPDATE t SET n = n + 1 WHERE id = 1")
                cursor.execute("COMMIT")
            return SINGLE

        run()  # the WAL file grown to its size
        return _per(run, rounds)
    finally:
        conn.close()


def minimal_table(tmp: Path, rounds: int) -> float:
    conn = _connect(tmp / "minimal.db")
    body = b'{"ipcd":1,"id":"0123456789abcdef","p":"' + b"p" * 64 + b'"}'
    next_id = 0
    try:
        conn.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY, state INTEGER, body BLOB)")
        conn.execute("CREATE INDEX queued ON jobs (id) WHERE state = 0")

        def run() -> int:
            nonlocal next_id
            for _ in range(BATCHES):
                rows = [(next_id + i, 0, body) for i in range(BATCH)]
                next_id += BATCH
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO jobs VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
                conn.execute("BEGIN IMMEDIATE")
                claimed = conn.execute(
                    "SELECT id FROM jobs WHERE state = 0 ORDER BY id LIMIT ?", (BATCH,)
                ).fetchall()
                if len(claimed) != BATCH:
                    raise RuntimeError(f"minimal table: claimed {len(claimed)} of {BATCH}")
                conn.executemany("UPDATE jobs SET state = 1 WHERE id = ?", claimed)
                conn.execute("COMMIT")
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("UPDATE jobs SET state = 2 WHERE id = ?", claimed)
                conn.execute("COMMIT")
            return BATCHES * BATCH

        run()
        return _per(run, rounds)
    finally:
        conn.close()


def store_steps(tmp: Path, rounds: int) -> tuple[float, float, float, float]:
    """ipcd's store: time per job of add, claim and finish one job per transaction, and
    of the three in batches.  The jobs are made before the clock starts."""
    store = open_store(str(tmp / "jobs.db"), sync="normal", busy_timeout=10_000)
    now = time.time()
    try:
        store.add(job_store.new_jobs(WARM_JOBS, now))
        for record, _ in store.claim(WARM_JOBS, now):
            job_store.finish(store, record.id, time.time(), ok=True)
        add, claim, finish, batched = [], [], [], []
        for _ in range(rounds):  # in this order: each step takes what the one before left
            jobs = job_store.new_jobs(SINGLE, time.time())
            start = time.perf_counter()
            for job in jobs:
                store.add([job])
            add.append(_since(start, SINGLE))
            start = time.perf_counter()
            claimed = [record.id for _ in range(SINGLE) for record, _ in store.claim(1, now)]
            claim.append(_since(start, SINGLE))
            if len(claimed) != SINGLE:
                raise RuntimeError(f"ipcd store: claimed {len(claimed)} of {SINGLE}")
            start = time.perf_counter()
            for job_id in claimed:  # finished at the time, as a worker's outcome is
                job_store.finish(store, job_id, time.time(), ok=True)
            finish.append(_since(start, SINGLE))
            made = [job_store.new_jobs(BATCH, time.time()) for _ in range(BATCHES)]
            start = time.perf_counter()
            for jobs in made:
                store.add(jobs)
                outcomes = [
                    Outcome(record.id, True, time.time(), Kind.BYTES, job_store.RESULT, None, None)
                    for record, _ in store.claim(BATCH, now)
                ]
                if len(outcomes) != BATCH:
                    raise RuntimeError(f"ipcd store: claimed {len(outcomes)} of {BATCH}")
                store.exchange(outcomes, 0, now)
            batched.append(_since(start, BATCHES * BATCH))
        return (
            statistics.median(add),
            statistics.median(claim),
            statistics.median(finish),
            statistics.median(batched),
        )
    finally:
        store.close()


def file_write(data: bytes, directory: Path) -> float:
    """Seconds to write ``data`` to a new file in ``directory``, as the job store keeps a
    result above 64 KiB (ipcd.store.blobs, ``sync = "normal"``: no fsync); the file is
    removed afterwards, its pages with it, as retention removes a result's file."""
    path = directory / "result.blob"
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def measure(rounds: int) -> Floors:
    with tempfile.TemporaryDirectory(prefix="ipcd-bench-floors-") as name:
        tmp = Path(name)
        txn = write_transaction(tmp, rounds)
        minimal = minimal_table(tmp, rounds)
        add, claim, finish, batched = store_steps(tmp, rounds)
    return Floors(txn, minimal, add, claim, finish, batched)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    print(json.dumps(measure(args.rounds)._asdict(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
