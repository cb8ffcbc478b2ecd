"""The job store alone (``ipcd.store``), with no daemon: how fast ``list`` answers over a
full store, and how large the file stays while jobs pass through it under retention.

Everything goes through the JobStore interface, as the daemon's processes use it:
``add`` in batches (the intake), ``claim`` (the dispatcher), ``finish`` one job at a time
(the workers), ``retain`` every RETAIN_EVERY jobs. ``python -m bench.store`` runs both
parts on their own and prints the figures as JSON; ``make bench`` runs them as one step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from ipcd.layout.results import Kind
from ipcd.store import JobStore, NewJob, Retention, State, open_store
from ipcd.wire import protocol

DAY = 86400.0
#: The defaults of ``[store] keep_done``, ``keep_done_age``, ``keep_failed`` and
#: ``keep_failed_age`` (issue 12's design).
DEFAULT_RETENTION = Retention(
    keep_done=1000, keep_done_age=7 * DAY, keep_failed=1000, keep_failed_age=30 * DAY
)
#: How often (in jobs) the daemon applies retention; the file's high-water mark follows it.
RETAIN_EVERY = 10_000
#: The issue's figures: list over this many jobs, size after this many passed through.
LIST_JOBS = 100_000
THROUGH_JOBS = 1_000_000
#: Message types of the bench's jobs: a few handlers, as a real configuration has.
TYPES = (2, 3, 4, 5, 6)
PAYLOAD = "p" * 64
#: Seconds between two jobs' acceptance: the intake stamps each message with the time it
#: vets it, so a batch's jobs are in the indexes on ``accepted`` in the order they came.
#: (Jobs all stamped alike sort by their random ids there, each insert on a page of its
#: own: that made bench.floors' batched add, claim and finish about a third dearer.)
ARRIVAL = 1e-6
RESULT = b"r" * 64


#: The other forms of ``ipcctl list -n 50`` timed over the filled store (fill): each
#: state alone, a type, a type with no jobs, a unique key, and combinations.  Keyword
#: arguments of JobStore.list by name.
LIST_FORMS: dict[str, dict[str, Any]] = {
    **{f"--state {state}": {"states": (state,)} for state in State if state is not State.QUEUED},
    "--type 4": {"types": (4,)},
    "--type 9 (no jobs)": {"types": (9,)},
    "--unique u3": {"unique": "u3"},
    "--state done --type 3": {"states": (State.DONE,), "types": (3,)},
    "--state queued --type 5": {"states": (State.QUEUED,), "types": (5,)},
    "--state failed,cancelled --type 2,3": {
        "states": (State.FAILED, State.CANCELLED),
        "types": (2, 3),
    },
    "--state queued,scheduled,running": {"states": (State.QUEUED, State.SCHEDULED, State.RUNNING)},
}


class ListTimes(NamedTuple):
    """Seconds per ``list`` call over a store of ``jobs`` jobs, and the states they had;
    ``forms``: those of each of LIST_FORMS."""

    jobs: int
    states: dict[str, int]
    newest: list[float]
    queued: list[float]
    forms: dict[str, list[float]]


class Size(NamedTuple):
    """The store's files after ``jobs`` jobs had passed through it."""

    jobs: int
    kept: int
    db: int
    wal: int
    shm: int

    @property
    def total(self) -> int:
        return self.db + self.wal + self.shm


class Through(NamedTuple):
    """Jobs passed through the store with retention: the sizes on the way, the last one
    at the end, and jobs per second through add + claim + finish in one process."""

    sizes: list[Size]
    rate: float


def new_jobs(
    count: int,
    now: float,
    *,
    scheduled_every: int = 0,
    types: Sequence[int] = TYPES,
    unique_every: int = 0,
) -> list[NewJob]:
    """``count`` jobs as the intake makes them, with real ids and envelopes, of ``types``
    in turn, accepted ARRIVAL apart from ``now`` on; every ``scheduled_every``-th one is
    due an hour from ``now``, and every ``unique_every``-th one has a unique key of ten
    (``u0`` to ``u9``)."""
    jobs = []
    for index in range(count):
        job_id = protocol.new_job_id()
        body = protocol.encode(PAYLOAD, job_id=job_id)
        later = scheduled_every and index % scheduled_every == 0
        accepted = now + index * ARRIVAL
        jobs.append(
            NewJob(
                id=job_id,
                type=types[index % len(types)],
                handler="echo",
                body=body,
                bare=False,
                accepted=accepted,
                size=len(PAYLOAD),
                preview=PAYLOAD,
                submitted=accepted,
                due=now + 3600 if later else 0.0,
                priority=index % 7 - 3,
                sender_pid=os.getpid(),
                unique=f"u{index // unique_every % 10}"
                if unique_every and index % unique_every == 0
                else None,
            )
        )
    return jobs


def finish(store: JobStore, job_id: str, now: float, *, ok: bool) -> None:
    if ok:
        store.finish(job_id, ok=True, finished=now, result_kind=Kind.BYTES, data=RESULT, error=None)
    else:
        store.finish(job_id, ok=False, finished=now, result_kind=None, data=None, error="boom")


def fill(
    store: JobStore, jobs: int, *, batch: int = 1000, types: Sequence[int] = TYPES
) -> dict[str, int]:
    """Add ``jobs`` jobs of ``types`` in mixed states, per batch of 1000: 450 done, 50
    failed, 50 cancelled, 100 scheduled and the rest queued; one in a hundred with a
    unique key. Returns the store's counts."""
    for start in range(0, jobs, batch):
        now = time.time()
        added = new_jobs(
            min(batch, jobs - start), now, scheduled_every=10, types=types, unique_every=100
        )
        store.add(added)
        claimed = store.claim(len(added) // 2, now)
        for index, (record, _) in enumerate(claimed):
            finish(store, record.id, time.time(), ok=index % 10 != 0)
        taken = {record.id for record, _ in claimed}
        waiting = [job.id for job in added if job.id not in taken and not job.due]
        store.cancel(waiting[: len(added) // 20], now=now)
    return {str(state): count for state, count in store.counts().items()}


def list_times(store: JobStore, jobs: int, rounds: int) -> ListTimes:
    """Fill ``store`` with ``jobs`` jobs (fill), then time ``rounds`` calls each of the
    two lists ``ipcctl list -n 50`` makes by default: newest first, and the queued ones
    in dispatch order; and of LIST_FORMS."""
    states = fill(store, jobs)
    newest: list[float] = []
    queued: list[float] = []
    for _ in range(rounds):
        for times, states_asked in ((newest, ()), (queued, (State.QUEUED,))):
            started = time.perf_counter()
            found = store.list(states=states_asked, limit=50)
            times.append(time.perf_counter() - started)
            if len(found) != 50:
                raise RuntimeError(f"store.list(states={states_asked}) gave {len(found)} jobs")
    forms: dict[str, list[float]] = {name: [] for name in LIST_FORMS}
    for _ in range(rounds):
        for name, asked in LIST_FORMS.items():
            started = time.perf_counter()
            store.list(**asked, limit=50)
            forms[name].append(time.perf_counter() - started)
    return ListTimes(jobs, states, newest, queued, forms)


def through(
    store: JobStore,
    path: Path,
    jobs: int,
    *,
    policy: Retention = DEFAULT_RETENTION,
    retain_every: int = RETAIN_EVERY,
    batch: int = 100,
    sizes_every: int = 100_000,
) -> Through:
    """Pass ``jobs`` jobs through ``store`` (at ``path``) as the daemon does: add a batch,
    claim it, finish each (one in a hundred fails), ``retain`` every ``retain_every``
    jobs; the files' sizes every ``sizes_every`` jobs and at the end."""
    sizes: list[Size] = []
    done = 0
    started = time.perf_counter()
    while done < jobs:
        now = time.time()
        count = min(batch, jobs - done)
        store.add(new_jobs(count, now))
        for record, _ in store.claim(count, now):
            finish(store, record.id, time.time(), ok=done % 100 != 0)
            done += 1
        if _crossed(done, count, retain_every):
            store.retain(policy, now)
        if _crossed(done, count, sizes_every) or done == jobs:
            sizes.append(size_of(store, path, done))
    rate = jobs / (time.perf_counter() - started)
    return Through(sizes, rate)


def _crossed(done: int, step: int, every: int) -> bool:
    """Whether the last ``step`` of ``done`` passed a multiple of ``every``."""
    return done // every > (done - step) // every


def size_of(store: JobStore, path: Path, jobs: int) -> Size:
    def bytes_of(file: Path) -> int:
        try:
            return file.stat().st_size
        except FileNotFoundError:
            return 0

    kept = sum(store.counts().values())
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    return Size(jobs, kept, bytes_of(path), bytes_of(wal), bytes_of(shm))


@contextmanager
def scratch_store(name: str) -> Iterator[tuple[JobStore, Path]]:
    """A new store in a temporary directory, removed with it afterwards."""
    with tempfile.TemporaryDirectory(prefix="ipcd-bench-store-") as tmp:
        path = Path(tmp) / name
        store = open_store(str(path), sync="normal", busy_timeout=10_000)
        try:
            yield store, path
        finally:
            store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--list-jobs", type=int, default=LIST_JOBS)
    parser.add_argument("--through-jobs", type=int, default=THROUGH_JOBS)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    with scratch_store("list.db") as (store, _):
        listed = list_times(store, args.list_jobs, args.rounds)
    with scratch_store("through.db") as (store, path):
        passed = through(store, path, args.through_jobs)
    doc = {
        "list": {
            **listed._asdict(),
            "newest_median": statistics.median(listed.newest),
            "queued_median": statistics.median(listed.queued),
            "forms_median": {name: statistics.median(t) for name, t in listed.forms.items()},
        },
        "through": {"rate": passed.rate, "sizes": [s._asdict() for s in passed.sizes]},
    }
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
