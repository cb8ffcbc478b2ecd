"""A handler asking for retries: it succeeds within max_attempts, or the job fails for good."""

from __future__ import annotations

import contextlib
import time

import sysv_ipc
from conftest import Instance

from ipcd.client import Client
from ipcd.errors import WaitTimeoutError
from ipcd.kernel.keys import as_key_t
from ipcd.kernel.queues import Queue

from .processes import (
    alive,
    configure,
    crash_report,
    start,
    wait_parked,
    wait_running,
    wait_workers,
)
from .tally import failed_list, settled_events

HANDLERS = """
[handlers.flaky3]
type = 30
target = "ipcd_test_plugins:flaky"
max_attempts = 3

[handlers.flaky2]
type = 31
target = "ipcd_test_plugins:flaky"
max_attempts = 2
"""


def test_retry_until_success_then_give_up(instance: Instance) -> None:
    """A job that succeeds on attempt 3 succeeds under max_attempts 3 after two job.retry
    events, and fails with "gave up after 2 attempts" under max_attempts 2."""
    configure(instance, HANDLERS)
    start(instance)
    client = Client(instance.config)
    began = time.monotonic()
    succeeded = client.call("flaky3", "3", timeout=10)
    gave_up = client.call("flaky2", "3", timeout=10)
    seconds = time.monotonic() - began
    events = settled_events(instance, {succeeded.job_id, gave_up.job_id})
    retries = {
        job_id: [
            e["attempt"] for e in events if e["event"] == "job.retry" and e["job_id"] == job_id
        ]
        for job_id in (succeeded.job_id, gave_up.job_id)
    }
    done = [e for e in events if e["event"] == "job.done"]
    failed = failed_list(instance)
    print(
        f"\n[retries] submitted 2, completed ok {int(succeeded.ok)}, failed {int(not gave_up.ok)}, "
        f"retried {sum(map(len, retries.values()))}, missing 0; {seconds:.2f}s; "
        f"{succeeded.value()!r}, {gave_up.error!r}"
    )
    assert (succeeded.ok, succeeded.value(), succeeded.attempt) == (True, "ok on attempt 3", 3)
    assert retries[succeeded.job_id] == [1, 2]
    assert (gave_up.ok, gave_up.attempt) == (False, 2)
    assert gave_up.error == "gave up after 2 attempts: not yet (attempt 2)"
    assert retries[gave_up.job_id] == [1]
    assert sorted((e["job_id"], e["attempt"], e["outcome"]) for e in done) == sorted(
        [(succeeded.job_id, 3, "ok"), (gave_up.job_id, 2, "error")]
    )
    assert list(failed) == [gave_up.job_id] and failed[gave_up.job_id]["attempts"] == 2


#: Lower types are served first: the sleep, then the retrying job.
RETRY_ON_A_FULL_QUEUE = """
[handlers.sleep]
type = 2

[handlers.flaky]
type = 5
target = "ipcd_test_plugins:flaky"

[handlers.exit_hard]
type = 21
target = "ipcd_test_plugins:exit_hard"
"""


def test_retry_meeting_a_full_queue_and_full_parking(instance: Instance) -> None:
    """A job asking for a retry when the one parked slot is taken and the queue is full
    does not bring the daemon down; it succeeds at attempt 2 once the queue has room."""
    configure(instance, RETRY_ON_A_FULL_QUEUE, workers=1, jobs="parked = 1\nretry_delay = 60")
    master = start(instance)
    client = Client(instance.config)
    client.submit("exit_hard")  # its worker dies: the job is parked for 60 s
    wait_parked(instance, 1)
    wait_workers(master, 1)
    wait_running(instance, client.submit("sleep", 1.0))
    retrying = client.submit("flaky", "2")
    # Full: msg_qbytes down to what the queue holds now (the retrying job), so the job,
    # once taken off, cannot go back at attempt 2 (a longer envelope) until it is raised.
    mq = sysv_ipc.MessageQueue(as_key_t(instance.keys.jobs))
    room = mq.max_size
    mq.max_size = Queue.open(instance.keys.jobs).stats().bytes
    try:
        time.sleep(6)  # the sleep ends at 1 s; the retry then meets the full queue
        alive_under_load = alive(master)
    finally:
        mq.max_size = room
    outcome: object = None
    if alive(master):
        with contextlib.suppress(WaitTimeoutError):
            outcome = client.wait(retrying, timeout=5).value()
    events = instance.log_events()
    crashes = [e["event"] for e in events if e["event"] in {"worker.crashed", "daemon.crashed"}]
    print(
        f"\n[retry meets full parking and a full queue] master alive {alive_under_load}, "
        f"crashes {crashes}, outcome {outcome!r}"
    )
    assert alive_under_load and crashes == [], crash_report(instance)
    assert outcome == "ok on attempt 2"
