"""What became of the submitted jobs, read the way a user would read it.

Results come from the shared segment, events from the JSON log, failures from
``ipcctl failed``; the figures each fault test prints come from here.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from conftest import Instance

from ipcd.layout.results import Result
from ipcd.tables.results import ResultStore


@dataclass
class Tally:
    """What became of a set of submitted jobs."""

    submitted: int
    ok: int
    failed: int
    missing: list[str]
    #: Job ids with more than one record in the result segment.
    duplicate_results: list[str]
    #: Job ids whose ``job.done`` event was logged other than exactly once.
    done_not_once: dict[str, int]
    requeued: int
    retried: int
    results: dict[str, Result]
    events: list[dict[str, object]]

    def figures(self, name: str, seconds: float, **more: object) -> str:
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in more.items())
        return (
            f"\n[{name}] submitted {self.submitted}, completed ok {self.ok}, "
            f"failed {self.failed}, requeued {self.requeued}, retried {self.retried}, "
            f"missing {len(self.missing)}, duplicated {len(self.duplicate_results)}, "
            f"job.done not exactly once {len(self.done_not_once)}{extra}; {seconds:.1f}s"
        )

    def longest_requeue_wait(self) -> float:
        """Seconds from a job's (last) job.requeued event to its job.done, at most."""
        requeued: dict[str, float] = {}
        longest = 0.0
        for e in self.events:
            if e["event"] == "job.requeued":
                requeued[str(e["job_id"])] = _when(e)
            elif e["event"] == "job.done" and e["job_id"] in requeued:
                longest = max(longest, _when(e) - requeued.pop(str(e["job_id"])))
        return round(longest, 2)

    def story(self, job_ids: Iterable[str]) -> str:
        """For a failure: each job's result record, its log events, and the worker exits
        logged within 0.2 s after its result was stored."""
        lines = []
        for job_id in sorted(job_ids):
            record = self.results.get(job_id)
            stored = record.finished if record else 0.0
            lines.append(
                f"{job_id}: result {record and record.status.name} attempt "
                f"{record and record.attempt} stored at {stored:.6f}"
            )
            lines += [
                "    " + json.dumps(e)
                for e in self.events
                if e.get("job_id") == job_id
                or (e["event"] == "worker.exited" and 0 <= _when(e) - stored < 0.2)
            ]
        return "\n" + "\n".join(lines)


def _when(event: dict[str, object]) -> float:
    stamp = str(event["timestamp"]).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def results_by_id(inst: Instance) -> tuple[dict[str, Result], list[str]]:
    """Every record in the result segment by job id, and the ids found more than once.

    Asserts that the ring never wrapped, so that a missing record means a missing result
    and not an evicted one.
    """
    store = ResultStore.open(inst.keys.results)
    try:
        header = store.header()
        assert header.next_seq <= header.slot_count, "results were evicted: enlarge the ring"
        records = store.all()
    finally:
        store.close()
    counts = Counter(r.job_id for r in records)
    return {r.job_id: r for r in records}, sorted(j for j, n in counts.items() if n > 1)


def wait_results(inst: Instance, ids: set[str], timeout: float) -> None:
    """Return once every job in ``ids`` has a result, or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        found, _ = results_by_id(inst)
        if ids <= found.keys() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def settled_events(inst: Instance, ids: set[str], grace: float = 2.0) -> list[dict[str, object]]:
    """The log, once every job in ``ids`` has its job.done event or ``grace`` has passed.

    A job's event is logged after its result is stored and its waiter notified, so a test
    that has just read a result must give the event a moment before counting events.
    """
    deadline = time.monotonic() + grace
    while True:
        events = inst.log_events()
        done = {e["job_id"] for e in events if e["event"] == "job.done"}
        if ids <= done or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def tally(inst: Instance, ids: set[str], *, timeout: float = 30.0) -> Tally:
    """Wait (up to ``timeout``) for every job to have a result, then count what happened."""
    wait_results(inst, ids, timeout)
    results, duplicates = results_by_id(inst)
    events = settled_events(inst, ids)
    done = Counter(str(e["job_id"]) for e in events if e["event"] == "job.done")
    mine = [r for job_id, r in results.items() if job_id in ids]
    return Tally(
        submitted=len(ids),
        ok=sum(r.ok for r in mine),
        failed=sum(not r.ok for r in mine),
        missing=sorted(ids - results.keys()),
        duplicate_results=[j for j in duplicates if j in ids],
        done_not_once={j: done[j] for j in ids if done[j] != 1},
        requeued=sum(e["event"] == "job.requeued" and e["job_id"] in ids for e in events),
        retried=sum(e["event"] == "job.retry" and e["job_id"] in ids for e in events),
        results=results,
        events=events,
    )


def failed_list(inst: Instance) -> dict[str, dict[str, object]]:
    """``ipcctl failed --json`` by job id (the job store's failed jobs, which only its
    retention drops)."""
    shown = inst.ipcctl("failed", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    return {str(entry["id"]): entry for entry in doc["failed"]}
