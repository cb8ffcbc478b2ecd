"""Workers SIGKILLed at random while thousands of jobs flow: every job still ends exactly once."""

from __future__ import annotations

import os
import random
import signal
import time

from conftest import Instance

from ipcd.client import Client
from ipcd.daemon.arbiter import YOUNG
from ipcd.store import State, open_store

from .load import Load
from .processes import (
    age,
    alive,
    configure,
    crash_report,
    stall_report,
    start,
    wait_workers,
    workers,
)
from .tally import settled_events, tally

HANDLERS = """
[handlers.busy]
type = 2
target = "ipcd_test_plugins:busy"
"""


def test_sigkill_random_workers_under_load(instance: Instance) -> None:
    """4,000 jobs from 4 submitters while a random worker is SIGKILLed every 0.1-0.3 s each
    end with exactly one result and one job.done event; none is missing."""
    configure(instance, HANDLERS, jobs="max_attempts = 5\nretry_delay = 0.05")
    master = start(instance)
    rng = random.Random(20240611)
    began = time.monotonic()
    load = Load(instance, "busy", "3", submitters=4, count=1000).start()
    killed: list[int] = []
    try:
        # The store takes the submitters' jobs faster than workers run them: go on
        # killing while jobs are left, not only while they are being submitted.
        while load.running() or (len(killed) < 12 and _unfinished(instance)):
            time.sleep(rng.uniform(0.1, 0.3))
            assert alive(master), crash_report(instance)
            assert time.monotonic() - began < 60, stall_report(instance, master)
            # Only workers past the arbiter's "died young" age: younger deaths back off
            # the respawn on purpose, which would starve the pool instead of testing it.
            grown = [pid for pid in workers(master) if age(pid) > YOUNG + 0.1]
            if grown:
                victim = rng.choice(grown)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
        accepted, refused = load.join()
    finally:
        load.kill()
    ids = set(load.accepted())
    result = tally(instance, ids, timeout=40)
    seconds = time.monotonic() - began
    hit = [
        e
        for e in result.events
        if e["event"] == "job.requeued" and e.get("cause") == "killed by SIGKILL"
    ]
    print(
        result.figures(
            "SIGKILL random workers",
            seconds,
            workers_killed=len(killed),
            kills_that_held_a_job=len(hit),
            longest_requeue_to_done_s=result.longest_requeue_wait(),
            refused_queue_full=refused,
        )
    )
    assert accepted == len(ids) == 4000 - refused
    assert result.missing == [] and result.duplicate_results == []
    # A kill in the few microseconds between a worker's job.done line and its release of
    # the slot makes the master announce the job once more: never a missing event, at
    # most one extra per kill that held a job (the result itself is stored once).
    assert all(n == 2 for n in result.done_not_once.values()), result.story(result.done_not_once)
    assert len(result.done_not_once) <= len(hit)
    assert len(killed) >= 10 and hit, "the kills never hit a running job: nothing was tested"
    for job_id in ids:
        outcome = result.results[job_id]
        assert outcome.ok or "killed by SIGKILL" in outcome.error, (job_id, outcome.error)
    wait_workers(master, 4)  # every killed worker was replaced
    exited = [e for e in result.events if e["event"] == "worker.exited"]
    assert {int(str(e["pid"])) for e in exited} >= set(killed)


def _unfinished(inst: Instance) -> int:
    """Jobs the store holds queued or running."""
    jobs = open_store(str(inst.config.store.path))
    try:
        counts = jobs.counts()
    finally:
        jobs.close()
    return counts.get(State.QUEUED, 0) + counts.get(State.RUNNING, 0)


def test_worker_killed_right_after_storing_a_result(instance: Instance) -> None:
    """A worker SIGKILLed after storing a job's result and before finishing the job still
    leaves exactly one job.done event, and the waiting submitter is woken at once."""
    configure(
        instance,
        '[handlers.store_then_die]\ntype = 40\ntarget = "ipcd_test_plugins:store_then_die"\n',
    )
    start(instance)
    client = Client(instance.config)
    began = time.monotonic()
    outcome = client.call("store_then_die", instance.keys.results, timeout=5)
    waited = time.monotonic() - began
    events = settled_events(instance, {outcome.job_id})
    done = [e for e in events if e["event"] == "job.done" and e["job_id"] == outcome.job_id]
    print(
        f"\n[killed after storing] submitted 1, result {outcome.value()!r} at attempt "
        f"{outcome.attempt}, job.done events {len(done)}, the waiter woke after {waited:.2f}s"
    )
    assert (outcome.ok, outcome.value(), outcome.attempt) == (True, "stored", 1)
    assert len(done) == 1
    assert waited < 2.0


def test_worker_killed_right_after_storing_frees_the_unique_key(instance: Instance) -> None:
    """The master finishes what such a worker left: the job's --unique key is free as
    soon as the job is announced, not only once a later submit finds it stale."""
    from ipcd.tables.unique import UniqueTable

    configure(
        instance,
        '[handlers.store_then_die]\ntype = 40\ntarget = "ipcd_test_plugins:store_then_die"\n',
    )
    start(instance)
    client = Client(instance.config)
    job_id = client.submit(
        "store_then_die", str(instance.keys.results), notify=True, unique="stored-then-died"
    )
    outcome = client.wait_submitted(job_id, 10)
    assert (outcome.ok, outcome.value()) == (True, "stored")
    settled_events(instance, {job_id})
    assert UniqueTable.open(instance.keys.unique).lookup("stored-then-died") is None
