"""Reloads during a steady stream of jobs: no job lost, none run twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import IPCD, Instance

from ipcd.client import Client
from ipcd.tables.results import ResultStore

from .load import Load
from .processes import configure, start, wait_running, wait_workers, workers
from .tally import settled_events, tally

HANDLERS = """
[handlers.busy]
type = 2
target = "ipcd_test_plugins:busy"
"""
RELOADS = 6


def test_reloads_during_a_stream_lose_and_duplicate_nothing(instance: Instance) -> None:
    """Six reloads (`ipcd reload` and SIGHUP, alternately) while 4 submitters stream jobs:
    each job has exactly one result and one job.done event, at its first attempt."""
    configure(instance, HANDLERS, result_slots=32768)  # room for a fast machine's stream
    master = start(instance)
    first = set(workers(master))
    began = time.monotonic()
    load = Load(instance, "busy", "2", submitters=4, count=5000, pause=0.005).start()
    try:
        time.sleep(0.5)
        for n in range(RELOADS):
            if n % 2:
                os.kill(master, signal.SIGHUP)
            else:
                reloaded = instance.ipcd("reload")
                assert reloaded.returncode == 0, reloaded.stderr
            time.sleep(0.6)
        load.stop()
        accepted, refused = load.join()
    finally:
        load.kill()
    ids = set(load.accepted())
    result = tally(instance, ids, timeout=30)
    last = set(wait_workers(master, 4))
    reloads = [e for e in result.events if e["event"] == "daemon.reloaded"]
    generations = {e["generation"] for e in result.events if e["event"] == "worker.started"}
    print(
        result.figures(
            "reload during a stream",
            time.monotonic() - began,
            reloads=len(reloads),
            worker_generations=len(generations),
            refused_queue_full=refused,
        )
    )
    assert accepted == len(ids) > 500
    assert len(reloads) == RELOADS and generations == set(range(RELOADS + 1))
    assert not first & last, "the first generation of workers is gone"
    assert result.missing == [] and result.duplicate_results == []
    assert result.done_not_once == {}, result.story(result.done_not_once)
    assert result.requeued == 0
    assert all(result.results[j].ok and result.results[j].attempt == 1 for j in ids)


@pytest.mark.parametrize("command", ["reload", "stop"])
def test_sigterm_reaching_a_worker_that_waits_for_the_result_semaphore(
    instance: Instance, command: str
) -> None:
    """A reload or stop that reaches a worker waiting to store its result lets it store it:
    the job ran once, ends at attempt 1, and the worker exits as stopped, not crashed."""
    configure(instance, "[handlers.echo]\ntype = 2\n", workers=1)
    start(instance)
    client = Client(instance.config)
    store = ResultStore.open(instance.keys.results)
    with store.lock.held(5):  # the worker's result write must wait for us
        job_id = client.submit("echo", "once", notify=True)
        wait_running(instance, job_id)
        time.sleep(0.3)  # the handler is done; the worker now waits in semtimedop
        signalled = subprocess.Popen(
            [IPCD, "-c", str(instance.config_path), command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.3)
    _, err = signalled.communicate(timeout=30)
    assert signalled.returncode == 0, err
    if command == "stop":
        start(instance)  # what a stop left in the in-flight table runs now
    outcome = client.wait_submitted(job_id, timeout=10)
    events = settled_events(instance, {job_id})
    crashed = [e for e in events if e["event"] == "worker.crashed"]
    requeued = [e for e in events if e["event"] == "job.requeued"]
    print(
        f"\n[{command} vs result semaphore] submitted 1, result {outcome.value()!r} at "
        f"attempt {outcome.attempt}, worker crashes {len(crashed)}, requeued {len(requeued)}"
    )
    assert (outcome.ok, outcome.value()) == (True, "once")
    assert crashed == [] and requeued == []
    assert outcome.attempt == 1
