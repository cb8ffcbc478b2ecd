"""``ipcctl wait ID…``: waiting for several jobs to end (issue 13, item 6).

The waiter's decisions (ipcd.client.waiting.Waiting) are tested in-process with an
injected store lookup, clock and sleep; the command is tested against the real daemon.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import pytest
from conftest import Instance

from ipcd.client import waiting
from ipcd.client.waiting import Waiting
from ipcd.wire.control import JobInfo


def _job(job_id: str, state: str, error: str | None = None) -> JobInfo:
    return JobInfo(
        job_id, 2, "echo", state, 1, 0, None, 0.0, 0.0, 0.0, None, None, 1, 0, None, None,
        False, 1, "x", None, error, None, None,
    )  # fmt: skip


class FakeStore:
    """What the store says of each job at each look: a script of states per job, one
    entry per look (the last repeats); None: not known yet."""

    def __init__(self, script: dict[str, list[str | None]]) -> None:
        self.script = script
        self.looks: list[list[str]] = []

    def look(self, ids: Sequence[str]) -> list[JobInfo | None]:
        self.looks.append(list(ids))
        found: list[JobInfo | None] = []
        for job_id in ids:
            states = self.script[job_id]
            state = states.pop(0) if len(states) > 1 else states[0]
            found.append(None if state is None else _job(job_id, state))
        return found


class FakeTime:
    """A clock that moves only when slept on: ``pause`` (news or the recheck) takes
    ``news_after`` seconds at most, ``sleep`` what it is asked."""

    def __init__(self, news_after: float = 1.0) -> None:
        self.now = 100.0
        self.news_after = news_after

    def clock(self) -> float:
        return self.now

    def pause(self, timeout: float) -> None:
        self.now += min(timeout, self.news_after)

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


def _waiting(store: FakeStore, clock: FakeTime, ids: Sequence[str]) -> Waiting:
    return Waiting(ids, store.look, clock.pause, clock=clock.clock, sleep=clock.sleep)


def test_jobs_are_yielded_as_they_end_and_only_pending_ones_are_asked_for() -> None:
    store = FakeStore(
        {"a": ["running", "running", "done"], "b": ["failed"], "c": ["queued", "cancelled"]}
    )
    clock = FakeTime()
    wait = _waiting(store, clock, ["a", "b", "c", "a"])
    ended = [(job.id, job.state) for job in wait.ended(None)]
    assert ended == [("b", "failed"), ("c", "cancelled"), ("a", "done")]
    assert store.looks == [["a", "b", "c"], ["a", "c"], ["a"]]
    assert wait.pending == [] and wait.unknown == []


def test_a_retrying_job_is_not_ended_until_it_is_final() -> None:
    """A job waiting for its next attempt is scheduled, not failed: keep waiting."""
    store = FakeStore({"a": ["running", "scheduled", "queued", "done"]})
    wait = _waiting(store, FakeTime(), ["a"])
    assert [job.state for job in wait.ended(None)] == ["done"]
    assert len(store.looks) == 4


def test_the_deadline_stops_the_wait_with_the_rest_pending() -> None:
    store = FakeStore({"a": ["done"], "b": ["running"]})
    clock = FakeTime()
    wait = _waiting(store, clock, ["a", "b"])
    assert [job.id for job in wait.ended(clock.now + 3.0)] == ["a"]
    assert wait.pending == ["b"]
    assert wait.last["b"] is not None and wait.last["b"].state == "running"
    assert 103.0 <= clock.now < 103.0 + waiting.RECHECK


def test_a_job_unknown_for_the_grace_period_stops_the_wait() -> None:
    store = FakeStore({"a": ["running"], "typo": [None]})
    clock = FakeTime()
    wait = _waiting(store, clock, ["a", "typo"])
    assert list(wait.ended(None)) == []
    assert wait.unknown == ["typo"]
    assert clock.now - 100.0 >= waiting.GRACE


def test_a_job_the_store_learns_of_within_the_grace_period_is_waited_for() -> None:
    """An unconfirmed submission may still be in the kernel's queue at the first look."""
    store = FakeStore({"a": [None, None, "queued", "done"]})
    wait = _waiting(store, FakeTime(), ["a"])
    assert [job.id for job in wait.ended(None)] == ["a"]
    assert wait.unknown == []


def test_a_flood_of_news_does_not_become_a_flood_of_looks() -> None:
    """Results of other jobs wake the waiter at once (news after 0 s): it still looks at
    most once per MIN_GAP."""
    store = FakeStore({"a": ["running"]})
    clock = FakeTime(news_after=0.0)
    wait = _waiting(store, clock, ["a"])
    list(wait.ended(clock.now + 10.0))
    assert len(store.looks) <= 10.0 / waiting.MIN_GAP + 2  # float steps: one more
    assert len(store.looks) >= 10.0 / waiting.MIN_GAP - 1


# --- the command, against the real daemon ---------------------------------------------------


def _submit(inst: Instance, *args: str) -> str:
    done = inst.ipcctl("submit", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_wait_returns_1_when_one_of_three_failed(daemon: Instance) -> None:
    """The issue's case: `ipcctl wait A B C` returns 1 when B failed, after A and C
    ended; one line per job."""
    a = _submit(daemon, "sleep", "0.3")
    b = _submit(daemon, "fail", "broken on purpose")
    c = _submit(daemon, "echo", "fine")
    done = daemon.ipcctl("wait", a, b, c, "--timeout", "30")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted([a, b, c])
    assert f"{a} sleep done" in lines and f"{c} echo done" in lines
    (failed,) = [line for line in lines if line.startswith(b)]
    assert failed.startswith(f"{b} fail failed: ") and "broken on purpose" in failed


def test_wait_returns_0_when_all_succeeded(daemon: Instance) -> None:
    ids = [_submit(daemon, "echo", str(n)) for n in range(3)]
    done = daemon.ipcctl("wait", *ids)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()[0::3]) == sorted(ids)


def test_a_cancelled_job_counts_as_not_succeeded(daemon: Instance) -> None:
    delayed = _submit(daemon, "echo", "never", "--delay", "600")
    assert daemon.ipcctl("cancel", delayed).returncode == 0
    done = daemon.ipcctl("wait", delayed)
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith(f"{delayed} echo cancelled")


def test_any_returns_when_the_first_ends(daemon: Instance) -> None:
    slow = _submit(daemon, "sleep", "600")
    quick = _submit(daemon, "echo", "first")
    started = time.monotonic()
    done = daemon.ipcctl("wait", slow, quick, "--any", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{quick} echo done"]
    assert time.monotonic() - started < 60
    daemon.ipcctl("cancel", "--kill", slow)


def test_timeout_exits_124_and_names_the_jobs_still_waiting(daemon: Instance) -> None:
    slow = _submit(daemon, "sleep", "600")
    quick = _submit(daemon, "echo", "x")
    done = daemon.ipcctl("wait", quick, slow, "--timeout", "1.5", "--json")
    assert done.returncode == 124, done.stderr
    assert "timed out after 1.5 s" in done.stderr
    doc = json.loads(done.stdout)
    assert doc["ended"] == [quick] and doc["pending"] == [slow] and doc["status"] == 124
    states = {job["id"]: job["state"] for job in doc["jobs"]}
    assert states[quick] == "done" and states[slow] in ("queued", "running")
    text = daemon.ipcctl("wait", slow, "--timeout", "0.2")
    assert text.returncode == 124
    assert text.stdout.startswith(f"{slow} sleep ") and "(still waiting)" in text.stdout
    daemon.ipcctl("cancel", "--kill", slow)


def test_an_unknown_job_is_an_error_after_the_grace_period(daemon: Instance) -> None:
    known = _submit(daemon, "echo", "x")
    done = daemon.ipcctl("wait", known, "nosuchjob")
    assert done.returncode == 66, done.stderr
    assert "no job nosuchjob in the job store" in done.stderr


@pytest.mark.parametrize("argv", [["wait"], ["wait", "bad id!"], ["wait", "a", "--timeout", "-1"]])
def test_wait_usage_errors(daemon: Instance, argv: list[str]) -> None:
    done = daemon.ipcctl(*argv)
    assert done.returncode == 64, done.stderr


def test_wait_without_a_daemon_says_so(instance: Instance) -> None:
    done = instance.ipcctl("wait", "abc")
    assert done.returncode == 69, done.stderr
    assert "not running" in done.stderr
