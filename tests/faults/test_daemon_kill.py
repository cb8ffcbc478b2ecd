"""The whole daemon SIGKILLed under load and started again: no accepted job is lost."""

from __future__ import annotations

import time

from conftest import Instance

from .harness import Load, configure, kill_daemon, start, tally

HANDLERS = """
[handlers.busy]
type = 2
target = "ipcd_test_plugins:busy"
"""


def test_sigkill_whole_daemon_and_restart(instance: Instance) -> None:
    """After SIGKILL of the master and all 4 workers mid-load and `ipcd start`, every job
    accepted before the kill (and after) ends with exactly one result; none is missing."""
    configure(instance, HANDLERS, jobs="max_attempts = 3\nretry_delay = 0.05")
    master = start(instance)
    began = time.monotonic()
    load = Load(instance, "busy", "3", submitters=4, count=800, pause=0.002).start()
    try:
        time.sleep(2.5)
        killed_at = time.time()
        killed = kill_daemon(master)
        down = time.monotonic()
        time.sleep(2.5)  # the submitters keep going: the queue fills, then refuses
        master = start(instance)
        restarted_in = time.monotonic() - down
        accepted, refused = load.join()
    finally:
        load.kill()
    submitted = load.accepted()
    before = {job_id for job_id, when in submitted.items() if when < killed_at}
    result = tally(instance, set(submitted), timeout=40)
    recovered = [
        e
        for e in result.events
        if e["event"] == "job.requeued" and e.get("cause") == "the daemon was killed"
    ]
    print(
        result.figures(
            "SIGKILL whole daemon",
            time.monotonic() - began,
            accepted_before_kill=len(before),
            processes_killed=len(killed),
            held_at_kill_and_rerun=len(recovered),
            refused_queue_full=refused,
            down_s=round(restarted_in, 2),
        )
    )
    assert accepted == len(submitted)
    assert 0 < len(before) < len(submitted), "the kill did not land mid-load"
    assert result.missing == [] and result.duplicate_results == []
    assert all(result.results[job_id].ok for job_id in submitted), [
        result.results[j].error for j in submitted if not result.results[j].ok
    ]
    assert recovered, "no worker held a job at the kill: nothing was tested"
    assert result.done_not_once == {}, result.story(result.done_not_once)
    started = [e for e in result.events if e["event"] == "daemon.started"]
    assert len(started) == 2
