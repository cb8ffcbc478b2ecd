"""Schedules under the real daemon: an ``every = "1s"`` schedule's jobs run, ``ipcctl
schedules`` shows them, a stop and start neither queues one period twice nor misses the
catch-up, and a reload that removes the schedule stops it."""

from __future__ import annotations

import json
import math
import time

from conftest import Instance

SCHEDULE = """
[schedules.tick]
handler = "echo"
every = "1s"
payload = { say = "tick" }
"""


def _jobs(instance: Instance) -> list[dict[str, object]]:
    listed = instance.ipcctl("list", "--unique", "schedule:tick", "--limit", "1000", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs: list[dict[str, object]] = json.loads(listed.stdout)["jobs"]
    return jobs


def _fired(instance: Instance, count: int) -> list[dict[str, object]]:
    found = instance.wait_events(lambda e: e.get("event") == "schedule.fired", count)
    assert len(found) >= count
    return found


def test_an_every_second_schedule_runs_its_jobs_once_per_period_across_a_restart(
    instance: Instance,
) -> None:
    instance.write(SCHEDULE)
    assert instance.ipcd("start").returncode == 0
    try:
        _fired(instance, 3)
        done = instance.wait_events(lambda e: e.get("event") == "job.done", 2)
        assert len(done) >= 2
        shown = instance.ipcctl("schedules", "--json")
        assert shown.returncode == 0, shown.stderr
        (tick,) = json.loads(shown.stdout)["schedules"]
        assert (tick["name"], tick["handler"], tick["spec"]) == ("tick", "echo", "every 1s")
        assert tick["last_job"] and tick["next_due"] > tick["last_due"]
        text = instance.ipcctl("schedules")
        assert text.returncode == 0 and text.stdout.splitlines()[1].split()[:4] == [
            "tick", "echo", "every", "1s",
        ]  # fmt: skip
        stopping = time.time()
        assert instance.ipcd("stop").returncode == 0
        before = len(instance.log_events())
        time.sleep(3)  # three periods pass with the daemon down
        assert instance.ipcd("start").returncode == 0
        deadline = time.monotonic() + 20
        after: list[dict[str, object]] = []
        while len(after) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
            after = [
                e for e in instance.log_events()[before:] if e.get("event") == "schedule.fired"
            ]
        listed = _jobs(instance)
    finally:
        instance.ipcd("stop")
    periods = [math.floor(float(str(j["submitted"]))) for j in listed]
    # One catch-up for the periods missed while down, not one per missed period: the
    # restarted master's first run is the catch-up, and any other run whose time had
    # already passed by the master's clock when it decided on the catch-up (its job's
    # submitted time) would be a second one.  (Not "due before `ipcd start` returned",
    # nor before the catch-up's log line: the next period may come before either.)
    decided = {str(j["id"]): float(str(j["submitted"])) for j in listed}
    first = decided[str(after[0]["job_id"])]
    missed = [e for e in after if float(str(e["due"])) <= first]
    assert len(missed) == 1, after
    assert float(str(missed[0]["due"])) > stopping - 1
    # Never two runs for one period, across the restart.
    fired = [e for e in instance.log_events() if e.get("event") == "schedule.fired"]
    dues = [float(str(e["due"])) for e in fired]
    assert len(dues) == len(set(dues)) and len(periods) == len(set(periods)) >= 4


def test_a_reload_without_the_schedule_stops_it(instance: Instance) -> None:
    instance.write(SCHEDULE)
    assert instance.ipcd("start").returncode == 0
    try:
        _fired(instance, 1)
        instance.write()
        assert instance.ipcd("reload").returncode == 0
        removed = instance.wait_events(lambda e: e.get("event") == "schedule.removed", 1)
        assert len(removed) == 1
        shown = instance.ipcctl("schedules", "--json")
        assert json.loads(shown.stdout) == {"schedules": []}
        count = len(_jobs(instance))
        time.sleep(2.5)
        assert len(_jobs(instance)) == count
    finally:
        instance.ipcd("stop")


def test_a_bad_cron_expression_stops_the_start_with_a_clear_error(instance: Instance) -> None:
    instance.write('[schedules.bad]\nhandler = "echo"\ncron = "0 25 * * *"\n')
    started = instance.ipcd("start")
    assert started.returncode == 78, started.stderr
    assert "schedules.bad.cron '0 25 * * *': Bad hour" in started.stderr
