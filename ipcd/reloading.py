"""What a reload (SIGHUP) may change, and what only a restart applies.

A reload reads the configuration again and starts a new generation of workers with it.
Settings the running daemon's IPC objects, log file or process were made with only take
effect at a restart: the reload names those that changed in its ``daemon.reloaded``
event (``restart_needed``), so the operator knows a restart is due.
"""

from __future__ import annotations

from ipcd.config import Config


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
    return fresh, tuple(needed)
