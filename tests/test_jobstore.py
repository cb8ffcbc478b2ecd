"""The job store under the real daemon: every accepted job recorded, confirmed
submission, delays and priorities kept by the store, jobs kept across kill -9.

These drive ``ipcd start`` and ``ipcctl`` as processes and read the store file with
ipcd.store (the tests run as root, which may read the daemon's database).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from conftest import Instance

from ipcd.client import Client
from ipcd.store import JobRecord, JobStore, State, open_store


@contextmanager
def store_of(inst: Instance) -> Iterator[JobStore]:
    jobs = open_store(str(inst.dir / "jobs.db"), sync="normal")
    try:
        yield jobs
    finally:
        jobs.close()


def wait_state(inst: Instance, job_id: str, state: State, timeout: float = 15.0) -> JobRecord:
    deadline = time.monotonic() + timeout
    with store_of(inst) as jobs:
        while True:
            record = jobs.get(job_id)
            if record is not None and record.state is state:
                return record
            assert time.monotonic() < deadline, f"job {job_id} is {record and record.state}"
            time.sleep(0.02)


def test_submit_confirms_and_the_store_records_the_job(daemon: Instance) -> None:
    """`ipcctl submit` exits 0 once the job is in the store; the record then follows the
    job to `done` with its result, its submitter's pid and its handler."""
    submitted = daemon.ipcctl("submit", "echo", "stored")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    record = wait_state(daemon, job_id, State.DONE)
    assert record.handler == "echo" and record.type == 2
    assert record.attempts == 1 and record.sender_pid > 0
    assert record.started is not None and record.finished is not None
    assert record.preview == "stored"
    with store_of(daemon) as jobs:
        result = jobs.result(job_id)
    assert result is not None and result[1] == b"stored"


def test_unconfirmed_when_the_daemon_is_down_then_run_at_the_next_start(
    daemon: Instance,
) -> None:
    """With the daemon stopped the job still goes to the kernel queue; `ipcctl` says it
    is not confirmed (exit 5), and the next start stores and runs it."""
    assert daemon.ipcd("stop").returncode == 0
    waiting = daemon.ipcctl("submit", "echo", "later")
    assert waiting.returncode == 5, waiting.stderr
    assert "not confirmed" in waiting.stderr and "not running" in waiting.stderr
    job_id = waiting.stdout.strip()
    assert daemon.ipcd("start").returncode == 0
    assert wait_state(daemon, job_id, State.DONE).attempts == 1


def test_delayed_job_is_scheduled_in_the_store_until_due(daemon: Instance) -> None:
    before = time.time()
    submitted = daemon.ipcctl("submit", "echo", "soon", "--delay", "1.5")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    with store_of(daemon) as jobs:
        record = jobs.get(job_id)
    assert record is not None and record.state is State.SCHEDULED
    assert record.due >= before + 1.5
    done = wait_state(daemon, job_id, State.DONE)
    assert done.started is not None and done.started >= before + 1.5


def test_priority_orders_queued_jobs_of_one_type(instance: Instance) -> None:
    """One worker, held busy: jobs queued meanwhile run highest priority first, then
    oldest first."""
    instance.write(extra="")
    text = instance.config_path.read_text().replace("workers = 2", "workers = 1")
    instance.config_path.write_text(text)
    assert instance.ipcd("start").returncode == 0
    client = Client(instance.config)
    blocker = client.submit("sleep", 1.0, confirm=True)
    wait_state(instance, blocker, State.RUNNING)
    low = client.submit("echo", "low", confirm=True, priority=-5)
    plain = client.submit("echo", "plain", confirm=True)
    high = client.submit("echo", "high", confirm=True, priority=50)
    done = instance.wait_events(lambda e: e.get("event") == "job.done", 4)
    order = [e["job_id"] for e in done]
    assert order == [blocker, high, plain, low]


def test_queued_jobs_survive_kill_9_of_the_whole_daemon(instance: Instance) -> None:
    """Confirmed jobs waiting behind a busy worker are in the store: after SIGKILL of the
    master and every child, the next start runs each exactly once; the job that was
    running runs again as its next attempt."""
    text = instance.config_path.read_text().replace("workers = 2", "workers = 1")
    instance.config_path.write_text(text)
    assert instance.ipcd("start").returncode == 0
    client = Client(instance.config)
    running = client.submit("sleep", 30.0, confirm=True)
    wait_state(instance, running, State.RUNNING)
    queued = [client.submit("echo", f"kept {n}", confirm=True) for n in range(20)]
    master = instance.pid()
    _kill_tree(master)
    assert instance.ipcd("start").returncode == 0
    for job_id in queued:
        assert wait_state(instance, job_id, State.DONE).attempts == 1
    with store_of(instance) as jobs:
        again = jobs.get(running)
    assert again is not None and again.attempts == 2 and again.state is State.RUNNING
    ran = [e["job_id"] for e in instance.log_events() if e.get("event") == "job.done"]
    assert sorted(map(str, ran)) == sorted(queued)  # each once


def _kill_tree(master: int) -> None:
    """SIGKILL the master and its children (workers, intake) at once, as a crash would."""
    pids = [master]
    try:
        with open(f"/proc/{master}/task/{master}/children") as fh:
            pids += [int(p) for p in fh.read().split()]
    except OSError:
        pass
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        states = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    states.append(fh.read().rsplit(")", 1)[1].split()[0])
            except OSError:
                continue
        if all(s == "Z" for s in states):
            return
        time.sleep(0.02)


def test_a_message_with_no_handler_is_failed_at_intake(daemon: Instance) -> None:
    """Validation happens once, at intake: a type no handler has is recorded failed,
    with why, and the confirmed submitter hears it at once (exit 1)."""
    submitted = daemon.ipcctl("submit", "77", "nobody")
    assert submitted.returncode == 1, submitted.stderr
    assert "no handler for message type 77" in submitted.stderr
    with store_of(daemon) as jobs:
        failed = jobs.list(states=[State.FAILED])
    assert [r.error for r in failed] == ["no handler for message type 77"]


def test_a_malformed_envelope_is_recorded_failed_and_the_daemon_serves_on(
    daemon: Instance,
) -> None:
    client = Client(daemon.config)
    client.queue.send(b'{"ipcd":1,"id":"bad1","payload":1,"pid":"x"}', 2, timeout=1)
    record = wait_state(daemon, "bad1", State.FAILED)
    assert record.error is not None and "'pid'" in record.error
    assert json.loads(daemon.ipcctl("submit", "echo", "{}", "--json", "--wait").stdout) == {}


def test_the_python_client_retries_a_failed_job_through_the_store(daemon: Instance) -> None:
    """Client.retry asks the daemon to queue the failed job again under its id: it runs a
    second time (a message re-sent under the same id would be skipped at intake as
    already stored), with fresh attempts."""
    client = Client(daemon.config)
    job_id = client.submit("fail", "again", confirm=True)
    wait_state(daemon, job_id, State.FAILED)
    assert client.retry(job_id) == job_id

    def ended(event: dict[str, object]) -> bool:
        return event.get("event") == "job.done" and event.get("job_id") == job_id

    assert len(daemon.wait_events(ended, 2)) == 2
    record = wait_state(daemon, job_id, State.FAILED)
    assert record.attempts == 1
