"""Waiting for several jobs from one process: each waiter is woken by its own result."""

from __future__ import annotations

import time

from conftest import Instance

from ipcd.client import Client

from .processes import configure, start


def test_two_jobs_waited_for_in_turn_from_one_process(instance: Instance) -> None:
    """Two jobs submitted with notify=True by one process, then waited for in turn, both
    come back as soon as they are done, not at the wait's timeout."""
    configure(instance, "[handlers.echo]\ntype = 2\n", workers=1)
    start(instance)
    client = Client(instance.config)
    first = client.submit("echo", "first", notify=True)
    second = client.submit("echo", "second", notify=True)
    began = time.monotonic()
    waited = []
    for job_id in (second, first):  # the first job's notification arrives first
        result = client.wait_submitted(job_id, timeout=5)
        waited.append(time.monotonic() - began)
        assert result.ok
    print(
        f"\n[two waits in one process] submitted 2, completed ok 2, missing 0; woken after "
        f"{waited[0]:.2f}s and {waited[1]:.2f}s (timeout 5s)"
    )
    assert waited[1] < 2.0
