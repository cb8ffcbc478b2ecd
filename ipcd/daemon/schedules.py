"""Recurring schedules (``[schedules.NAME]``): the master queues their jobs when due.

The master calls :meth:`Scheduler.sync` at start and after a reload, and
:meth:`Scheduler.tick` on every turn of its loop; ``tick`` returns when it wants to be
called next, which the master's ``select()`` honours.  Everything the scheduler knows
between turns is in the job store (table ``schedules``, ipcd.store.ScheduleState), so a
restart carries on where the last master stopped.

The decisions, in the order :meth:`Scheduler.tick` takes them for each schedule:

1. Not due (``now`` before its ``next_due``): nothing.
2. Due on time, or late by at most :data:`ON_TIME` (the daemon was busy, not down): one
   run.
3. Late by more (the daemon was down at its time): ``missed = "run-once"`` makes one run
   now, however many times were missed; ``"skip"`` makes none.
4. Either way ``next_due`` becomes the first time of the schedule after ``now``: missed
   times are never queued one by one.

A run is one job of the schedule's handler whose unique key is ``schedule:NAME``.  It is
added in the same store transaction that moves ``next_due`` on
(ipcd.store.JobStore.fire_schedule), and only when no job with that key is queued,
scheduled or running, so that a schedule never overlaps itself (a run skipped that way is
counted in ``overlaps``), and a crash of the master either did both or neither: it never
loses a run nor queues one twice.

Times: ``every`` counts whole periods from the Unix epoch (``every = "5m"`` runs at :00,
:05, ...; a day is a UTC day); ``cron`` is read in the schedule's zone with cronsim, which
follows Debian's cron across daylight-saving changes: a time that does not exist (spring
forward) runs at the first minute after the gap, and a time that happens twice (fall back)
runs once, at its first occurrence.  cronsim is imported here only: ipcctl and the
configuration loader never load it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ipcd.config import LOCAL_ZONE, Config, ScheduleConfig
from ipcd.daemon.log import Logger
from ipcd.errors import ConfigError
from ipcd.store import JobStore, NewJob, ScheduleState, own_job

#: A run found due later than this many seconds after its time was missed (the daemon was
#: down); one found sooner is on time (the master was only busy).
ON_TIME = 60.0
#: The prefix of a schedule's unique key: ``schedule:NAME``.
KEY_PREFIX = "schedule:"
#: The host's zone file, for ``timezone = "local"`` without $TZ.
LOCALTIME = "/etc/localtime"


class Timing:
    """When a schedule runs: :meth:`after` gives its first time after a moment."""

    def __init__(self, cron: str | None, every: float | None, zone: tzinfo, zone_name: str):
        self.cron = cron
        self.every = every
        self.zone = zone
        #: The timing as the store records it: a change of it starts the count anew.
        self.spec = f"cron {cron} {zone_name}" if cron is not None else f"every {every:g}s"

    def after(self, moment: float) -> float:
        """The first time of the schedule strictly after ``moment`` (Unix time)."""
        if self.every is not None:
            return (math.floor(moment / self.every) + 1) * self.every
        assert self.cron is not None
        # cronsim starts at the whole second and steps one second first: strictly after.
        start = datetime.fromtimestamp(math.floor(moment), self.zone)
        try:
            return next(CronSim(self.cron, start)).timestamp()
        except StopIteration:  # no time in the next 50 years (30 February, say)
            return math.inf


@dataclass(frozen=True, slots=True)
class Schedule:
    """One ``[schedules.NAME]`` ready to run: its configuration, timing and job type."""

    config: ScheduleConfig
    timing: Timing
    type: int

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def key(self) -> str:
        return KEY_PREFIX + self.config.name


class Decision(NamedTuple):
    """What :func:`decide` says about one schedule at one moment."""

    #: True: queue a run now.
    run: bool
    #: The schedule's next time after this decision.
    next_due: float
    #: Why (for the log): "new", "changed", "due", "late", "missed", "waiting".
    why: str


def decide(
    schedule: Schedule, state: ScheduleState | None, now: float, *, on_time: float = ON_TIME
) -> Decision:
    """The scheduler's decision for ``schedule`` at ``now`` given its stored ``state``
    (None: never seen).  Pure: the order of the steps is the module's docstring's."""
    timing = schedule.timing
    if state is None or state.spec != timing.spec:
        return Decision(False, timing.after(now), "new" if state is None else "changed")
    if now < state.next_due:
        return Decision(False, state.next_due, "waiting")
    late = now - state.next_due
    if late <= on_time:
        return Decision(True, timing.after(now), "due")
    if schedule.config.missed == "run-once":
        return Decision(True, timing.after(now), "late")
    return Decision(False, timing.after(now), "missed")


def zone(name: str, environ: Mapping[str, str] | None = None) -> tuple[tzinfo, str]:
    """The zone named ``name`` and the name to record: an IANA name, "UTC", or "local"
    ($TZ when it names a zone, else /etc/localtime, else UTC).  ConfigError when the
    name is unknown."""
    if name == "UTC":
        return UTC, "UTC"
    if name == LOCAL_ZONE:
        given = (os.environ if environ is None else environ).get("TZ", "").lstrip(":")
        if given and not given.startswith("/"):
            try:
                return ZoneInfo(given), given
            except (ZoneInfoNotFoundError, ValueError):
                pass
        try:
            with open(given or LOCALTIME, "rb") as fh:
                return ZoneInfo.from_file(fh, key=LOCAL_ZONE), LOCAL_ZONE
        except (OSError, ValueError):
            return UTC, "UTC"
    try:
        return ZoneInfo(name), name
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin', 'UTC' or 'local')"
        ) from None


def compile_schedules(config: Config) -> tuple[Schedule, ...]:
    """Every ``[schedules.NAME]`` of ``config`` with its cron expression and zone
    checked; ConfigError naming the file, the schedule and what is wrong.  Called before
    the daemon detaches and at a reload (a failed reload keeps the running ones)."""
    types = {h.name: h.type for h in config.handlers}
    compiled = []
    for entry in config.schedules:
        where = f"{config.path}: schedules.{entry.name}"
        zone_name = entry.timezone or config.scheduler.timezone
        try:
            tz, recorded = zone(zone_name)
        except ConfigError as exc:
            raise ConfigError(f"{where}.timezone: {exc}") from None
        if entry.cron is not None:
            try:
                CronSim(entry.cron, datetime.now(tz))
            except CronSimError as exc:
                raise ConfigError(f"{where}.cron {entry.cron!r}: {exc}") from None
        timing = Timing(entry.cron, entry.every, tz, recorded)
        if timing.after(time.time()) == math.inf:
            raise ConfigError(f"{where}.cron {entry.cron!r}: matches no time in 50 years")
        compiled.append(Schedule(entry, timing, types[entry.handler]))
    return tuple(compiled)


class Scheduler:
    """Queues the schedules' runs in the store: the master's one scheduler.

    ``store``: the master's job store; ``clock``: Unix time now (tests pass their own);
    ``pid``: recorded as the jobs' sender (the master's)."""

    def __init__(
        self,
        store: JobStore,
        schedules: Sequence[Schedule],
        log: Logger,
        *,
        clock: Callable[[], float] = time.time,
        pid: int | None = None,
    ) -> None:
        self.store = store
        self.schedules = tuple(schedules)
        self.log = log
        self.clock = clock
        self.pid = os.getpid() if pid is None else pid
        self._states: dict[str, ScheduleState] = {}

    def sync(self, schedules: Sequence[Schedule] | None = None) -> None:
        """At start, and with the reloaded ``schedules`` after a reload: read the stored
        states, forget the schedules no longer configured (their rows go; jobs they
        queued stay), and take the new and changed ones into the store."""
        if schedules is not None:
            self.schedules = tuple(schedules)
        self._states = {s.name: s for s in self.store.schedules()}
        names = [s.name for s in self.schedules]
        for name in set(self._states) - set(names):
            del self._states[name]
            self.log.info("schedule.removed", schedule=name)
        self.store.save_schedules(self._fresh(self.clock()), only=names)

    def tick(self, now: float | None = None) -> int:
        """Queue every schedule that is due; returns how many were queued.  StoreError
        propagates (the master logs it and tries again at its next turn)."""
        now = self.clock() if now is None else now
        fired = 0
        fresh = self._fresh(now)
        if fresh:
            self.store.save_schedules(fresh)
        for schedule in self.schedules:
            state = self._states[schedule.name]
            decision = decide(schedule, state, now)
            if decision.run:
                fired += self._fire(schedule, state, decision, now)
            elif decision.why == "missed":
                self._save(state._replace(next_due=decision.next_due))
                self.log.info(
                    "schedule.missed", schedule=schedule.name, due=state.next_due,
                    next_due=decision.next_due,
                )  # fmt: skip
        return fired

    def next_due(self) -> float | None:
        """The earliest time a schedule is due; None without schedules."""
        return min((s.next_due for s in self._states.values()), default=None)

    def _fresh(self, now: float) -> list[ScheduleState]:
        """The states of schedules new or whose timing changed, started anew at ``now``
        (the last run's record kept); kept in memory, returned for the caller to store."""
        fresh = []
        for schedule in self.schedules:
            state = self._states.get(schedule.name)
            decision = decide(schedule, state, now)
            if decision.why not in ("new", "changed"):
                continue
            started = ScheduleState(
                schedule.name, schedule.timing.spec, schedule.config.handler, decision.next_due
            )
            if state is not None:
                started = started._replace(
                    last_due=state.last_due, last_fired=state.last_fired,
                    last_job=state.last_job, overlaps=state.overlaps,
                )  # fmt: skip
            self._states[schedule.name] = started
            fresh.append(started)
            self.log.info(
                f"schedule.{decision.why}", schedule=schedule.name, spec=schedule.timing.spec,
                next_due=decision.next_due,
            )  # fmt: skip
        return fresh

    def _fire(
        self, schedule: Schedule, state: ScheduleState, decision: Decision, now: float
    ) -> int:
        """One run: its job and the moved ``next_due`` in one transaction; 1 when the job
        was added, 0 when the last run still holds the key."""
        moved = state._replace(next_due=decision.next_due, handler=schedule.config.handler)
        job = self._job(schedule, now)
        holder = self.store.fire_schedule(moved, job, state.next_due)
        if holder is None:
            moved = moved._replace(last_due=state.next_due, last_fired=now, last_job=job.id)
            self.log.info(
                "schedule.fired", schedule=schedule.name, job_id=job.id, due=state.next_due,
                late=decision.why == "late", next_due=decision.next_due,
            )  # fmt: skip
        else:
            moved = moved._replace(overlaps=state.overlaps + 1)
            self.log.warning(
                "schedule.overlap", schedule=schedule.name, held_by=holder, due=state.next_due,
                next_due=decision.next_due,
            )  # fmt: skip
        self._states[schedule.name] = moved
        return 1 if holder is None else 0

    def _save(self, state: ScheduleState) -> None:
        self.store.save_schedules([state])
        self._states[state.name] = state

    def _job(self, schedule: Schedule, now: float) -> NewJob:
        """The run's job, its body the envelope ``ipcctl submit`` would send."""
        entry = schedule.config
        return own_job(
            entry.handler, schedule.type, entry.payload, now, pid=self.pid, uid=os.getuid(),
            unique=schedule.key, priority=entry.priority, timeout=entry.timeout,
        )  # fmt: skip
