"""What a reload (SIGHUP) may change, what only a restart applies, and how the outcome
reaches ``ipcd reload``.

A reload reads the configuration again and starts a new generation of workers with it.
Settings the running daemon's IPC objects, log file or process were made with only take
effect at a restart: the reload names those that changed in its ``daemon.reloaded``
event (``restart_needed``), so the operator knows a restart is due.

A signal carries no answer, and only the daemon knows whether its reload worked (a
handler module may import in the shell and fail in the daemon).  So after each reload
the master publishes the outcome in ``PID_FILE.reload``, beside its PID file: its PID,
how many reloads it has attempted, when (``time.monotonic()``, one clock for every
process on the host) it began this one, and the error if it failed.  ``ipcd reload``
(and so ``systemctl reload``) sends SIGHUP and waits for an outcome of a reload that
began after its signal.  The file is replaced by rename, so a reader never sees half.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from ipcd.config import Config

#: How often ``ipcd reload`` looks for the outcome while it waits.
POLL = 0.02


def apply(running: Config, fresh: Config, *, max_workers: int) -> tuple[Config, tuple[str, ...]]:
    """The configuration to run with after a reload, and the settings it could not take.

    ``max_workers`` is how many workers the in-flight table has slots for (it is sized at
    start): more needs a restart, and the running count is kept.
    """
    needed = [
        name
        for name, old, new in (
            ("ipc", running.ipc, fresh.ipc),
            ("results", running.results, fresh.results),
            ("log", running.log, fresh.log),
            ("daemon.pid_file", running.daemon.pid_file, fresh.daemon.pid_file),
            ("daemon.workdir", running.daemon.workdir, fresh.daemon.workdir),
            ("daemon.umask", running.daemon.umask, fresh.daemon.umask),
            ("jobs.failed_size", running.jobs.failed_size, fresh.jobs.failed_size),
            ("jobs.parked", running.jobs.parked, fresh.jobs.parked),
            ("jobs.spill_slots", running.jobs.spill_slots, fresh.jobs.spill_slots),
        )
        if old != new
    ]
    if fresh.daemon.workers > max_workers:
        needed.append("daemon.workers")
        fresh = fresh._replace(daemon=fresh.daemon._replace(workers=running.daemon.workers))
    # The job store every process opens, and the socket the control process serves: the
    # master keeps its own connection and socket, so the running ones stay (else the new
    # workers and intake would write a store the master never reads), named at every
    # reload until the restart.
    store = running.store
    needed += [
        f"store.{name}"
        for name, old, new in (
            ("path", store.path, fresh.store.path),
            ("sync", store.sync, fresh.store.sync),
            ("socket", store.socket, fresh.store.socket),
        )
        if old != new
    ]
    fresh = fresh._replace(
        store=fresh.store._replace(path=store.path, sync=store.sync, socket=store.socket)
    )
    return fresh, tuple(needed)


class Outcome(NamedTuple):
    """One reload's outcome, as the master publishes it."""

    pid: int
    #: Reloads this daemon attempted, this one included.
    attempt: int
    #: ``time.monotonic()`` when the master began this reload.
    began: float
    #: Empty when the reload worked.
    error: str = ""
    #: The exit status the error maps to (0 when it worked).
    exit_code: int = 0


def outcome_path(pid_file: Path) -> Path:
    return pid_file.with_name(pid_file.name + ".reload")


def publish(pid_file: Path, outcome: Outcome) -> None:
    """Write the outcome (the master, after each reload); raises OSError."""
    path = outcome_path(pid_file)
    temporary = path.with_name(f".{path.name}.{outcome.pid}")
    temporary.write_text(json.dumps(outcome._asdict()))
    os.replace(temporary, path)


def forget(pid_file: Path) -> None:
    """Remove the outcome (the master, as it exits)."""
    with contextlib.suppress(OSError):
        outcome_path(pid_file).unlink()


def read(pid_file: Path) -> Outcome | None:
    """The last outcome published, or None when there is none (or none readable)."""
    try:
        fields = json.loads(outcome_path(pid_file).read_text())
        return Outcome(**fields)
    except (OSError, ValueError, TypeError):
        return None


def wait(
    pid_file: Path, pid: int, *, after: Outcome | None, sent: float, timeout: float,
    running: Callable[[], bool],
) -> Outcome | None:  # fmt: skip
    """The outcome of daemon ``pid``'s first reload that began at or after ``sent``
    (``after`` is what was published before the signal); None when none came within
    ``timeout`` or the daemon is gone (``running`` says whether it still is)."""
    seen = after.attempt if after is not None and after.pid == pid else 0
    deadline = time.monotonic() + timeout
    while True:
        outcome = read(pid_file)
        if outcome is not None and outcome.pid == pid and outcome.attempt > seen:
            if outcome.began >= sent:
                return outcome
            seen = outcome.attempt  # one that began before our signal: ours comes next
        if time.monotonic() >= deadline or not running():
            return None
        time.sleep(POLL)
