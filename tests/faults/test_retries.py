"""A handler asking for retries: it succeeds within max_attempts, or the job fails for good."""

from __future__ import annotations

import time

from conftest import Instance

from ipcd.client import Client

from .harness import configure, failed_list, start

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
    events = instance.log_events()
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
