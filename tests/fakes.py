"""Hand-written fakes of ipcd's own seams shared by the in-process tests of the daemon's
classes (test_worker_unit.py, test_recovery.py, test_outcomes.py, test_intake.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ipcd.errors import StoreError
from ipcd.store import (
    FINAL,
    WAITING,
    Admission,
    Admitted,
    Backlog,
    Captured,
    Chained,
    JobRecord,
    NewJob,
    Outcome,
    State,
)


class FakeLog:
    """The daemon's structlog logger: every event with its level and fields, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _say(level: str) -> Any:  # type: ignore[misc]  # a factory used in the class body
        def say(self: FakeLog, event: str, **fields: Any) -> None:
            self.events.append((level, event, fields))

        return say

    info = _say("info")
    warning = _say("warning")
    error = _say("error")

    def names(self) -> list[tuple[str, str]]:
        """(level, event) of each event, in order."""
        return [(level, event) for level, event, _ in self.events]


class FakeJobStore:
    """ipcd's job store (ipcd.store.JobStore) in memory, for the methods the daemon's
    processes call on it: add, claim, requeue, finish, get, body and backlog, each as the
    protocol describes it (claim in dispatch order, add skipping ids it holds, requeue
    and finish leaving a final job alone).

    ``errors`` maps a method's name to the StoreErrors its next calls raise, in order;
    ``before`` is called with the method's name at the start of every call, a test's way
    to act (or look) between the steps of the code under test."""

    def __init__(self) -> None:
        self.records: dict[str, JobRecord] = {}
        self.bodies: dict[str, bytes] = {}
        #: Each batch add() committed, as given.
        self.batches: list[list[NewJob]] = []
        #: Each requeue call: (job id, due, attempts).
        self.requeued: list[tuple[str, float, int | None]] = []
        #: Each claim call's worker_pid.
        self.claimers: list[int] = []
        self.errors: dict[str, list[StoreError]] = {}
        self.before: Callable[[str], None] | None = None

    def _enter(self, method: str) -> None:
        if self.before is not None:
            self.before(method)
        if self.errors.get(method):
            raise self.errors[method].pop(0)

    def put(self, job: NewJob, *, state: State | None = None) -> None:
        """Hold ``job`` (as the intake would have added it), in ``state`` if given."""
        self.records[job.id] = _record(job)
        if state is not None:
            self.records[job.id] = self.records[job.id]._replace(state=state)
        self.bodies[job.id] = job.body

    def state(self, job_id: str) -> State:
        return self.records[job_id].state

    # --- the protocol's methods ---------------------------------------------------------

    def add(self, jobs: Sequence[NewJob]) -> list[str]:
        self._enter("add")
        self.batches.append(list(jobs))
        inserted = []
        for job in jobs:
            if job.id not in self.records:
                self.put(job)
                inserted.append(job.id)
        return inserted

    def admit(self, jobs: Sequence[NewJob]) -> Admission:
        """add, each job as asked (no dependencies are decided here: tests/test_chains.py
        tests the real store's), and the backlog after it."""
        added = [Admitted(job_id, self.records[job_id].state) for job_id in self.add(jobs)]
        return Admission(added, self._backlog())

    def take_chained(self) -> Chained:
        return Chained()

    def waits(self, ids: Sequence[str]) -> dict[str, list[str]]:
        return {}

    def claim(
        self, n: int, now: float, *, worker_pid: int = 0
    ) -> list[tuple[JobRecord, bytes | None]]:
        self._enter("claim")
        return self._claim(n, now, worker_pid)

    def exchange(
        self,
        finished: Sequence[Outcome],
        n: int,
        now: float,
        *,
        worker_pid: int = 0,
        batches: Mapping[int, int] | None = None,
    ) -> list[tuple[JobRecord, bytes | None]]:
        """finish and claim in one: an error given for either fails the whole call
        before anything changes."""
        if finished:
            self._enter("finish")
        if n > 0:
            self._enter("claim")
        for outcome in finished:
            self._finish(outcome)
        return self._claim(n, now, worker_pid, batches) if n > 0 else []

    def _claim(
        self, n: int, now: float, worker_pid: int, batches: Mapping[int, int] | None = None
    ) -> list[tuple[JobRecord, bytes | None]]:
        self.claimers.append(worker_pid)
        queued = sorted(
            (r for r in self.records.values() if r.state is State.QUEUED),
            key=lambda r: (r.type, -r.priority, r.accepted, r.id),
        )
        if batches is not None and queued:
            type_ = queued[0].type
            n = min(n, batches.get(type_, 1))
            queued = [r for r in queued if r.type == type_]
        claimed: list[tuple[JobRecord, bytes | None]] = []
        for record in queued[:n]:
            record = record._replace(
                state=State.RUNNING, attempts=record.attempts + 1, started=now,
                worker_pid=worker_pid or None,
            )  # fmt: skip
            self.records[record.id] = record
            claimed.append((record, self.bodies[record.id]))
        return claimed

    def requeue(self, job_id: str, *, due: float, attempts: int | None = None) -> bool:
        self._enter("requeue")
        self.requeued.append((job_id, due, attempts))
        record = self.records.get(job_id)
        if record is None or record.state in FINAL:
            return False
        self.records[job_id] = record._replace(
            state=State.QUEUED if due <= time.time() else State.SCHEDULED, due=due,
            attempts=record.attempts if attempts is None else attempts,
        )  # fmt: skip
        return True

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
        self._enter("finish")
        return self._finish(Outcome(job_id, ok, finished, result_kind, data, error, captured))

    def _finish(self, outcome: Outcome) -> bool:
        record = self.records.get(outcome.job_id)
        if record is None or record.state in FINAL:
            return False
        data = outcome.data
        self.records[outcome.job_id] = record._replace(
            state=State.DONE if outcome.ok else State.FAILED, finished=outcome.finished,
            error=outcome.error, result_kind=outcome.result_kind,
            result_size=None if data is None else len(data),
        )  # fmt: skip
        return True

    def get(self, job_id: str) -> JobRecord | None:
        self._enter("get")
        return self.records.get(job_id)

    def body(self, job_id: str) -> bytes | None:
        self._enter("body")
        return self.bodies.get(job_id)

    def backlog(self) -> Backlog:
        self._enter("backlog")
        return self._backlog()

    def _backlog(self) -> Backlog:
        waiting = [r.id for r in self.records.values() if r.state in WAITING]
        return Backlog(len(waiting), sum(len(self.bodies[i]) for i in waiting))


def _record(job: NewJob) -> JobRecord:
    """The record the store makes of a job added."""
    return JobRecord(
        id=job.id, type=job.type, handler=job.handler, state=job.state, attempts=job.attempts,
        priority=job.priority, unique=job.unique, submitted=job.submitted or job.accepted,
        accepted=job.accepted, due=job.due, started=None, finished=None,
        sender_pid=job.sender_pid, sender_uid=job.sender_uid, reply_to=job.reply_to,
        timeout=job.timeout, bare=job.bare, size=job.size, preview=job.preview,
        worker_pid=None, error=job.error, result_kind=None, result_size=None,
    )  # fmt: skip


def new_job(
    job_id: str, type_: int, body: bytes, *, attempts: int = 0, accepted: float = 0.0, **fields: Any
) -> NewJob:
    """A job as the intake adds it: ``body`` the client's message as received."""
    return NewJob(
        id=job_id, type=type_, handler="h", body=body, bare=False,
        accepted=accepted or time.time(), size=len(body), preview="", attempts=attempts,
        **fields,
    )  # fmt: skip
