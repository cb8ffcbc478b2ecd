"""Hand-written fakes of ipcd's own seams shared by the in-process tests of the daemon's
classes (test_worker_unit.py, test_outcomes.py)."""

from __future__ import annotations

import builtins
from typing import Any


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


class FakeStore:
    """The job store (ipcd.store.JobStore) in memory, for the control server's tests
    until they run against the real store: the few methods the server calls, with the
    protocol's meaning (dispatch order and retention aside)."""

    def __init__(self) -> None:
        from ipcd.store import JobRecord

        self.jobs: dict[str, JobRecord] = {}
        self.results: dict[str, tuple[int, bytes]] = {}
        self.paused_types: dict[int, float] = {}

    def add(self, jobs: Any) -> list[str]:
        from ipcd.store import JobRecord, State

        added = []
        for job in jobs:
            if job.id in self.jobs:
                continue
            state = State.SCHEDULED if job.due > job.accepted else job.state
            self.jobs[job.id] = JobRecord(
                job.id, job.type, job.handler, state, job.attempts, job.priority, job.unique,
                job.submitted or job.accepted, job.accepted, job.due, None, None,
                job.sender_pid, job.sender_uid, job.reply_to, job.timeout, job.bare, job.size,
                job.preview, None, job.error, None, None,
            )  # fmt: skip
            added.append(job.id)
        return added

    def claim(self, n: int, now: float) -> list[tuple[Any, bytes]]:
        from ipcd.store import State

        out: builtins.list[Any] = []
        for job in sorted(self.jobs.values(), key=lambda j: (j.type, -j.priority, j.accepted)):
            if len(out) == n:
                break
            if job.state is State.QUEUED and not ({0, job.type} & set(self.paused_types)):
                job = job._replace(state=State.RUNNING, attempts=job.attempts + 1, started=now)
                self.jobs[job.id] = job
                out.append((job, b""))
        return out

    def finish(
        self, job_id: str, *, ok: bool, finished: float, result_kind: int | None,
        data: bytes | None, error: str | None,
    ) -> bool:  # fmt: skip
        from ipcd.store import FINAL, State

        job = self.jobs[job_id]
        if job.state in FINAL:
            return False
        state = State.DONE if ok else State.FAILED
        self.jobs[job_id] = job._replace(state=state, finished=finished, error=error)
        if data is not None and result_kind is not None:
            self.results[job_id] = (result_kind, data)
        return True

    def cancel(
        self, ids: Any = (), *, types: Any = (), states: Any = (), running: bool = False,
        now: float,
    ) -> list[Any]:  # fmt: skip
        from ipcd.store import State

        wanted = set(states) | ({State.RUNNING} if running else set())
        out = []
        for job in list(self.jobs.values()):
            if (ids and job.id not in ids) or (types and job.type not in types):
                continue
            if job.state in wanted:
                out.append(job)
                self.jobs[job.id] = job._replace(state=State.CANCELLED, finished=now)
        return out

    def get(self, job_id: str) -> Any:
        return self.jobs.get(job_id)

    def result(self, job_id: str) -> tuple[int, bytes] | None:
        return self.results.get(job_id)

    def list(
        self, *, states: Any = (), types: Any = (), unique: str | None = None, limit: int = 50
    ) -> list[Any]:
        found = [
            j
            for j in sorted(self.jobs.values(), key=lambda j: j.accepted, reverse=True)
            if (not states or j.state in states)
            and (not types or j.type in types)
            and (unique is None or j.unique == unique)
        ]
        return found[:limit]

    def retry(self, job_id: str, now: float) -> Any:
        from ipcd.store import State

        job = self.jobs.get(job_id)
        if job is None or job.state not in (State.FAILED, State.CANCELLED):
            return None
        job = job._replace(state=State.QUEUED, attempts=0, accepted=now, error=None)
        self.jobs[job_id] = job
        self.results.pop(job_id, None)
        return job

    def pause(self, types: Any, now: float) -> None:
        for type_ in types or (0,):
            self.paused_types.setdefault(type_, now)

    def resume(self, types: Any) -> None:
        if not types:
            self.paused_types.clear()
        for type_ in types:
            self.paused_types.pop(type_, None)

    def paused(self) -> dict[int, float]:
        return dict(self.paused_types)

    def running(self, types: Any = ()) -> builtins.list[Any]:
        from ipcd.store import State

        return [
            j for j in self.jobs.values()
            if j.state is State.RUNNING and (not types or j.type in types)
        ]  # fmt: skip

    def counts(self) -> dict[Any, int]:
        from ipcd.store import State

        return {s: sum(j.state is s for j in self.jobs.values()) for s in State}

    def purge(self, states: Any, older_than: float | None, now: float) -> int:
        gone = [
            j.id for j in self.jobs.values()
            if j.state in states
            and (older_than is None or (j.finished or 0) < now - older_than)
        ]  # fmt: skip
        for job_id in gone:
            del self.jobs[job_id]
        return len(gone)
