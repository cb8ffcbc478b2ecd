"""The per-job events: ``job.started`` (debug) while a job runs, ``job.done`` when it ends."""

from __future__ import annotations

import time

from conftest import Instance


def _events_of(inst: Instance, job_id: str) -> list[dict[str, object]]:
    return [e for e in inst.log_events() if e.get("job_id") == job_id]


def test_a_long_job_is_seen_starting_before_it_ends(daemon: Instance) -> None:
    """At level debug, a job's start is in the log while it runs, then its end."""
    job_id = daemon.ipcctl("submit", "sleep", "1.5", check=True).stdout.strip()
    started = daemon.wait_events(
        lambda e: e.get("event") == "job.started" and e.get("job_id") == job_id, 1, timeout=10
    )
    assert started, "no job.started event while the job ran"
    assert not [e for e in _events_of(daemon, job_id) if e["event"] == "job.done"]
    event = started[0]
    assert event["level"] == "debug" and event["handler"] == "sleep" and event["attempt"] == 1
    assert event["role"] == "worker" and event["type"] == 3
    daemon.wait_events(lambda e: e.get("event") == "job.done" and e.get("job_id") == job_id, 1)
    names = [e["event"] for e in _events_of(daemon, job_id)]
    assert names == ["job.started", "job.done"]


def test_no_start_events_above_debug(instance: Instance) -> None:
    """At level info (the default), only the one job.done event per job is written."""
    instance.write()
    instance.config_path.write_text(
        instance.config_path.read_text().replace('level = "debug"', 'level = "info"')
    )
    assert instance.ipcd("start").returncode == 0
    done = instance.ipcctl("submit", "echo", "hello", "--wait", check=True)
    assert done.stdout == "hello\n"
    deadline = time.monotonic() + 10
    while not [e for e in instance.log_events() if e.get("event") == "job.done"]:
        assert time.monotonic() < deadline, "no job.done event"
        time.sleep(0.02)
    events = [e for e in instance.log_events() if str(e.get("event", "")).startswith("job.")]
    assert [e["event"] for e in events] == ["job.done"]
    assert all(e["level"] != "debug" for e in instance.log_events())
