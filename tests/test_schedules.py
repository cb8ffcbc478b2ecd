"""The scheduler's decisions (ipcd.daemon.schedules), in-process, with an injected clock
and a real SQLite job store: one run per period, none while the last one waits or runs,
one catch-up after downtime (or none with ``missed = "skip"``), daylight-saving changes,
restarts (a new Scheduler on the same file), and the configuration's errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
from fakes import FakeLog

from ipcd import config as config_mod
from ipcd.daemon.log import Logger
from ipcd.daemon.schedules import Scheduler, compile_schedules, decide
from ipcd.errors import ConfigError
from ipcd.store import JobStore, NewJob, State, open_store
from ipcd.wire import protocol

#: 2023-11-14 22:13:20 UTC; whole minutes are multiples of 60 from here on.
T0 = 1_700_000_000.0
MINUTE = 60.0


def _config(tmp_path: Path, **schedule: Any) -> config_mod.Config:
    raw = {
        "ipc": {"key": 0x1234},
        "handlers": {"report": {"type": 5}},
        "schedules": {"nightly": {"handler": "report", **schedule}},
    }
    return config_mod.parse(raw, tmp_path / "ipcd.toml")


class Clock:
    """The scheduler's clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    jobs = open_store(str(tmp_path / "jobs.db"))
    yield jobs
    jobs.close()


def _scheduler(
    store: JobStore, config: config_mod.Config, clock: Clock, log: FakeLog | None = None
) -> Scheduler:
    """A scheduler as the master makes one at start: synced with the store."""
    scheduler = Scheduler(
        store, compile_schedules(config), cast(Logger, log or FakeLog()), clock=clock, pid=1
    )
    scheduler.sync()
    return scheduler


def _runs(store: JobStore) -> list[str]:
    """The ids of the schedule's jobs, oldest first."""
    jobs = store.list(unique="schedule:nightly", limit=10_000)
    return [j.id for j in sorted(jobs, key=lambda j: (j.accepted, j.id))]


def _finish_all(store: JobStore, now: float) -> None:
    """Every job of the schedule that waits is run and done (as a worker would)."""
    for job, _ in store.claim(1000, now):
        store.finish(job.id, ok=True, finished=now, result_kind=None, data=None, error=None)


def test_every_minute_runs_once_a_minute_across_a_restart(store: JobStore, tmp_path: Path) -> None:
    """Ticking every 5 s for 10 minutes, with a restart (a new scheduler on the same
    store) in the middle of a minute, queues exactly one run per minute boundary."""
    config = _config(tmp_path, cron="* * * * *", timezone="UTC")
    clock = Clock(T0 + 10)
    scheduler = _scheduler(store, config, clock)
    fired_at: list[float] = []
    while clock.now < T0 + 10 * MINUTE:
        if clock.now == T0 + 5 * MINUTE + 30:
            scheduler = _scheduler(store, config, clock)  # the daemon restarted
        if scheduler.tick():
            fired_at.append(clock.now)
        _finish_all(store, clock.now)
        clock.now += 5
    # T0 is 20 s into a minute: boundaries at T0 + 40, + 100, ... + 580.
    boundaries = [T0 + 40 + n * MINUTE for n in range(10)]
    assert fired_at == boundaries
    assert len(_runs(store)) == len(boundaries)


def test_a_run_still_queued_or_running_blocks_the_next(store: JobStore, tmp_path: Path) -> None:
    """While the last run is queued, then running, the next periods queue nothing (one
    overlap counted each); once it is done, the next period runs again."""
    config = _config(tmp_path, every="1m")
    clock = Clock(T0)
    log = FakeLog()
    scheduler = _scheduler(store, config, clock, log)
    clock.now = T0 + 40  # the first minute boundary after T0 (T0 is 20 s into one)
    assert scheduler.tick() == 1
    first = _runs(store)
    clock.now += MINUTE  # still queued
    assert scheduler.tick() == 0
    store.claim(1, clock.now)  # now running
    clock.now += MINUTE
    assert scheduler.tick() == 0
    assert _runs(store) == first
    (state,) = store.schedules()
    assert state.overlaps == 2 and state.last_job == first[0]
    assert [e for _, e, f in log.events if e == "schedule.overlap"] == ["schedule.overlap"] * 2
    store.finish(first[0], ok=True, finished=clock.now, result_kind=None, data=None, error=None)
    clock.now += MINUTE
    assert scheduler.tick() == 1
    assert len(_runs(store)) == 2


def test_a_manual_job_with_the_schedules_key_counts_as_its_run(
    store: JobStore, tmp_path: Path
) -> None:
    """``ipcctl submit --unique schedule:NAME`` holds the schedule's key like a run of it:
    the period due meanwhile is not queued."""
    config = _config(tmp_path, every="1m")
    clock = Clock(T0)
    scheduler = _scheduler(store, config, clock)
    body = protocol.encode("by hand", job_id="manual", unique="schedule:nightly")
    store.add([_manual(body)])
    clock.now = T0 + 40
    assert scheduler.tick() == 0
    assert _runs(store) == ["manual"]


def _manual(body: bytes) -> NewJob:
    return NewJob(
        id="manual", type=5, handler="report", body=body, bare=False, accepted=T0, size=7,
        preview="by hand", unique="schedule:nightly",
    )  # fmt: skip


@pytest.mark.parametrize("downtime_minutes", [5, 60 * 24 * 3])
def test_after_downtime_run_once_catches_up_once(
    store: JobStore, tmp_path: Path, downtime_minutes: int
) -> None:
    """An every-minute schedule whose daemon was down for 5 minutes (or 3 days) runs
    once at the restart, not once per missed minute, then on the next minute again."""
    config = _config(tmp_path, cron="* * * * *", timezone="UTC")
    clock = Clock(T0 + 40)  # on a minute boundary
    scheduler = _scheduler(store, config, clock)
    clock.now += MINUTE
    assert scheduler.tick() == 1
    _finish_all(store, clock.now)
    clock.now += downtime_minutes * MINUTE + 30  # down, and back half a minute late
    log = FakeLog()
    scheduler = _scheduler(store, config, clock, log)
    assert scheduler.tick() == 1
    _finish_all(store, clock.now)
    fired = [f for _, e, f in log.events if e == "schedule.fired"]
    assert len(fired) == 1 and fired[0]["late"] is True
    for _ in range(5):  # the rest of that minute: nothing more
        clock.now += 5
        assert scheduler.tick() == 0
    clock.now += 5  # the next minute
    assert scheduler.tick() == 1
    assert len(_runs(store)) == 3


def test_after_downtime_skip_runs_nothing_until_the_next_time(
    store: JobStore, tmp_path: Path
) -> None:
    """``missed = "skip"``: after 5 minutes down, nothing runs at the restart; the next
    minute runs as usual."""
    config = _config(tmp_path, cron="* * * * *", timezone="UTC", missed="skip")
    clock = Clock(T0 + 40)
    scheduler = _scheduler(store, config, clock)
    clock.now += MINUTE
    assert scheduler.tick() == 1
    _finish_all(store, clock.now)
    clock.now += 5 * MINUTE + 10
    log = FakeLog()
    scheduler = _scheduler(store, config, clock, log)
    assert scheduler.tick() == 0
    assert [e for _, e, _ in log.events if e.startswith("schedule.")] == ["schedule.missed"]
    clock.now += 50
    assert scheduler.tick() == 1
    assert len(_runs(store)) == 2


def test_a_late_tick_within_a_minute_is_on_time_even_with_skip(
    store: JobStore, tmp_path: Path
) -> None:
    """A master busy for 30 s (not down) still runs a ``skip`` schedule's period."""
    config = _config(tmp_path, every="1h", missed="skip")
    clock = Clock(T0)
    scheduler = _scheduler(store, config, clock)
    (state,) = store.schedules()
    clock.now = state.next_due + 30
    assert scheduler.tick() == 1


def _nights(store: JobStore, config: config_mod.Config, start: datetime, days: int) -> list[str]:
    """Tick once a minute for ``days`` days from ``start``; the local times of the runs."""
    zone = start.tzinfo
    clock = Clock(start.timestamp())
    scheduler = _scheduler(store, config, clock)
    fired = []
    end = clock.now + days * 86400
    while clock.now < end:
        if scheduler.tick():
            fired.append(datetime.fromtimestamp(clock.now, zone).strftime("%m-%d %H:%M %Z"))
        _finish_all(store, clock.now)
        clock.now += MINUTE
    return fired


def test_a_time_in_the_spring_forward_gap_runs_once_right_after_it(
    store: JobStore, tmp_path: Path
) -> None:
    """02:30 does not exist in Berlin on 30 March 2025: that night's run is at 03:00
    CEST, and every other night at 02:30, once each."""
    config = _config(tmp_path, cron="30 2 * * *", timezone="Europe/Berlin")
    start = datetime(2025, 3, 29, 0, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    assert _nights(store, config, start, 3) == [
        "03-29 02:30 CET",
        "03-30 03:00 CEST",
        "03-31 02:30 CEST",
    ]


def test_a_time_in_the_fall_back_overlap_runs_once(store: JobStore, tmp_path: Path) -> None:
    """02:30 happens twice in Berlin on 26 October 2025: it runs once, at the first."""
    config = _config(tmp_path, cron="30 2 * * *", timezone="Europe/Berlin")
    start = datetime(2025, 10, 25, 0, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    assert _nights(store, config, start, 3) == [
        "10-25 02:30 CEST",
        "10-26 02:30 CEST",
        "10-27 02:30 CET",
    ]


def test_every_counts_whole_periods_from_the_epoch(tmp_path: Path) -> None:
    """``every = "5m"``: a new schedule's first run is the next multiple of 300 s."""
    (schedule,) = compile_schedules(_config(tmp_path, every="5m"))
    decision = decide(schedule, None, 1000.0)
    assert decision == (False, 1200.0, "new")


def test_a_changed_timing_starts_anew_and_a_removed_schedule_goes(
    store: JobStore, tmp_path: Path
) -> None:
    """After a reload with a new ``every``, the next run counts from the new period (the
    last run kept for ``ipcctl schedules``); a schedule no longer configured loses its
    row."""
    clock = Clock(T0)
    scheduler = _scheduler(store, _config(tmp_path, every="1h"), clock)
    (state,) = store.schedules()
    clock.now = state.next_due
    assert scheduler.tick() == 1
    last_job = store.schedules()[0].last_job
    clock.now += 10
    scheduler.sync(compile_schedules(_config(tmp_path, every="1m")))
    (state,) = store.schedules()
    assert state.spec == "every 60s" and state.last_job == last_job
    assert state.next_due == (clock.now // 60 + 1) * 60
    removed = config_mod.parse(
        {"ipc": {"key": 0x1234}, "handlers": {"report": {"type": 5}}}, tmp_path / "ipcd.toml"
    )
    scheduler.sync(compile_schedules(removed))
    assert store.schedules() == []
    assert scheduler.tick() == 0


def test_a_runs_job_is_an_ordinary_job_of_its_handler(store: JobStore, tmp_path: Path) -> None:
    """The job carries the payload (a TOML table as JSON), priority, timeout and the
    schedule's unique key, in an envelope a worker decodes."""
    config = _config(
        tmp_path, every="1m", payload={"day": "today", "n": 3}, priority=7, timeout=30.0
    )
    clock = Clock(T0 + 40)
    scheduler = _scheduler(store, config, clock)
    clock.now += MINUTE
    scheduler.tick()
    ((job, body),) = store.claim(1, clock.now)
    assert (job.type, job.handler, job.priority, job.timeout) == (5, "report", 7, 30.0)
    assert job.state is State.RUNNING and job.unique == "schedule:nightly"
    assert body is not None
    decoded = protocol.decode(body, job.type)
    assert decoded.payload == {"day": "today", "n": 3}
    assert (decoded.id, decoded.unique, decoded.priority) == (job.id, "schedule:nightly", 7)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"cron": "* * * * *", "every": "5m"}, "either cron"),
        ({}, "has neither"),
        ({"cron": "* * *"}, "must have five fields"),
        ({"every": "0.5s"}, "every must be at least 1 second"),
        ({"every": "soon"}, "is not a duration"),
        ({"every": "1m", "missed": "always"}, 'missed must be "run-once" or "skip"'),
        ({"every": "1m", "handler": "nobody"}, "unknown handler 'nobody'"),
        ({"every": "1m", "colour": "red"}, "unknown setting schedules.nightly.colour"),
        ({"every": "1m", "priority": 101}, "priority must be between -100 and 100"),
    ],
)
def test_the_loader_refuses_a_bad_schedule(
    tmp_path: Path, schedule: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        _config(tmp_path, **schedule)
    assert "schedules.nightly" in str(caught.value)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"cron": "61 * * * *"}, "schedules.nightly.cron '61 \\* \\* \\* \\*': Bad minute"),
        ({"cron": "0 0 30 2 *"}, "Bad day-of-month"),
        ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ],
)
def test_the_daemon_refuses_a_bad_cron_expression_or_zone(
    tmp_path: Path, schedule: dict[str, Any], message: str
) -> None:
    """What the loader leaves to the daemon (so ipcctl never loads the cron library) is
    refused before the daemon detaches, naming the file and the schedule."""
    with pytest.raises(ConfigError, match=message) as caught:
        compile_schedules(_config(tmp_path, **schedule))
    assert str(tmp_path / "ipcd.toml") in str(caught.value)


def test_the_default_zone_is_the_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a timezone anywhere, cron times are the host's local time ($TZ here)."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    (schedule,) = compile_schedules(_config(tmp_path, cron="0 9 * * *"))
    assert schedule.timing.spec == "cron 0 9 * * * Asia/Tokyo"
    start = datetime(2024, 12, 31, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()
    assert schedule.timing.after(start) == datetime(2025, 1, 1, tzinfo=ZoneInfo("UTC")).timestamp()
