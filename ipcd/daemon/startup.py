"""Everything the daemon opens before it serves, made while stderr still reaches the user.

Start-up is split in two so that ``ipcd start`` can fail while the operator still sees
stderr: :func:`prepare` does everything that can go wrong (config, key file, kernel
objects and their safety check, handler imports, the log file) and holds no state that a
fork would break; ipcd.daemon.arbiter then runs in the final daemon process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

from ipcd.config import Config
from ipcd.daemon import identity, uniquerelease
from ipcd.daemon import log as log_mod
from ipcd.errors import ConfigError
from ipcd.handlers import registry as registry_mod
from ipcd.handlers.registry import Registry
from ipcd.kernel import keys as keys_mod
from ipcd.kernel import vetting
from ipcd.kernel.keys import Keys
from ipcd.kernel.queues import Queue, msgmax
from ipcd.kernel.segments import Lock
from ipcd.tables.failed import FailedList
from ipcd.tables.inflight import InflightTable
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.stats import StatsSegment
from ipcd.tables.unique import UniqueTable


class Objects(NamedTuple):
    """The daemon's kernel objects: what ipcd.daemon.objectwatch checks, copies and closes."""

    queue: Queue
    replies: Queue
    store: ResultStore
    table: InflightTable
    failed: FailedList
    stats: StatsSegment
    unique: UniqueTable
    spills: SpillTable

    def locks(self) -> dict[str, Lock]:
        """The locks of the shared tables, by the name a ``lock.timeout`` event gives them
        (ipcd.daemon.lockwaits)."""
        return {
            "result segment": self.store.lock,
            "failed list": self.failed.store.lock,
            "in-flight table": self.table.lock,
            "unique-key table": self.unique.lock,
            "spill table": self.spills.lock,
        }


@dataclass
class Prepared:
    """Everything the daemon needs, made before detaching.

    Only the composition roots open this bag: the master's (ipcd.daemon.arbiter.Arbiter,
    which binds its parts anew after a reload or when objects are made anew) and a
    worker's, right after the fork (ipcd.daemon.worker.worker_process).  Everything
    below them receives the few collaborators it uses.
    """

    config: Config
    keys: Keys
    queue: Queue
    replies: Queue
    store: ResultStore
    table: InflightTable
    failed: FailedList
    registry: Registry
    sink: log_mod.Sink
    identity: identity.Identity
    stats: StatsSegment
    unique: UniqueTable
    spills: SpillTable

    def objects(self) -> Objects:
        """The kernel objects alone."""
        return Objects(
            self.queue, self.replies, self.store, self.table, self.failed, self.stats,
            self.unique, self.spills,
        )  # fmt: skip


def prepare(config: Config, *, console: TextIO | None) -> Prepared:
    """Validate and open everything; any failure raises an IpcdError for the CLI.

    What can fail without touching the kernel (handler imports, the log file) comes first,
    so that a failed start leaves no new IPC objects behind.
    """
    registry = registry_mod.build(config)
    who = identity.resolve(config)
    if config.log.file is not None:
        _check_writable_dir(config.log.file)
    try:
        sink = log_mod.configure(config.log, console=console)
    except OSError as exc:
        raise ConfigError(f"cannot open log file {config.log.file}: {exc.strerror}") from None
    keys = keys_mod.derive(config.ipc, create_key_file=True)
    objects = _objects(config, keys, who, registry)
    if config.log.file is not None:
        identity.hand_over(who, [config.log.file])
    return Prepared(
        config=config, keys=keys, registry=registry, sink=sink, identity=who, **objects._asdict()
    )


def reopen(p: Prepared, made_with: Config) -> Prepared:
    """The daemon's objects made or opened again, as at start (vetted, adopted), with the
    same configuration, registry and log: the master calls it when one was removed or
    overwritten (ipcd.daemon.objectwatch).  Objects still in place are opened, not remade.
    Their mode and sizes are ``made_with``'s, the configuration the daemon started with:
    a reload takes those settings only at a restart (ipcd.daemon.reloading)."""
    objects = _objects(made_with, p.keys, p.identity, p.registry, again=True)
    return Prepared(
        config=p.config, keys=p.keys, registry=p.registry, sink=p.sink, identity=p.identity,
        **objects._asdict(),
    )  # fmt: skip


def _objects(
    config: Config, keys: Keys, who: identity.Identity, registry: Registry, *, again: bool = False
) -> Objects:
    """Create, or open and vet, every kernel object at the configuration's keys; the
    counts start again unless this is ``again`` (the master's renewal)."""
    mode = config.ipc.mode
    # A root-started daemon drops to its user, who owns the objects of its earlier runs.
    trusted = (who.uid,) if who.drops and who.uid is not None else ()
    queue = Queue.create(keys.jobs, mode, what="job queue", trusted=trusted)
    replies = Queue.create(keys.replies, mode, what="reply queue", trusted=trusted)
    spills = SpillTable.create(
        keys.spill,
        mode,
        config.jobs.spill_slots,
        config.results.spill_reserved,
        trusted=trusted,
        max_result=config.results.max_result,
        gid=who.object_gid,
        spill_bytes=config.results.spill_bytes,
    )
    store = ResultStore.create(
        keys.results,
        keys.gate,
        mode,
        config.results.size,
        config.results.slot_size,
        trusted=trusted,
        spills=spills,
    )
    text_size = msgmax()
    failed = FailedList.create(
        keys.failed, mode, config.jobs.failed_size, text_size, spills, trusted=trusted
    )
    # Twice the workers: a reload starts the new generation before the old one has left.
    table, carried = InflightTable.create(
        keys.inflight,
        mode,
        2 * config.daemon.workers,
        config.jobs.parked,
        text_size,
        trusted=trusted,
    )
    for held in carried:  # the table changed shape: keep what the old one held
        if not table.park(held.type, held.body, held.job_id, held.attempt, time.time()):
            queue.send_nowait(held.body, held.type)
    # Not ``again``: workers run then, and an in-flight table made anew is empty until
    # objectwatch.carry_over fills it; the master frees lost keys after that (arbiter).
    unique = (
        UniqueTable.create(keys.unique, mode, trusted=trusted)
        if again
        else _unique_table(keys.unique, mode, queue, table, trusted)
    )
    stats = StatsSegment.create(
        keys.stats,
        mode,
        table.workers,
        [(r.name, r.type) for r in registry.by_type.values()],
        keep_counts=again,
        trusted=trusted,
    )
    _load_lazy_modules()
    vetting.adopt_all(
        keys.all(),
        mode,
        uid=who.uid if who.drops else None,
        gid=who.object_gid if who.object_gid is not None else (who.gid if who.drops else None),
    )
    return Objects(queue, replies, store, table, failed, stats, unique, spills)


def _unique_table(
    key: int, mode: int, queue: Queue, table: InflightTable, trusted: tuple[int, ...]
) -> UniqueTable:
    """The unique-key table, without the keys of jobs that are gone
    (ipcd.daemon.uniquerelease), made the one this daemon's outcomes release keys in."""
    unique = UniqueTable.create(key, mode, trusted=trusted)
    free_lost_keys(unique, queue, table)
    return unique


def free_lost_keys(unique: UniqueTable, queue: Queue, table: InflightTable) -> None:
    """Free the keys of jobs that are gone (ipcd.daemon.uniquerelease.sweep_lost), logged."""
    log = log_mod.get_logger(role="master")
    for entry, reason in uniquerelease.sweep_lost(unique, queue=queue, inflight=table):
        log.warning("unique.freed", unique=entry.key, job_id=entry.job_id, reason=reason)


def _load_lazy_modules() -> None:
    """Import now what the daemon otherwise imports on first use (the PHP parser, ctypes
    for msgrcv and prctl): a daemon that drops privileges may no longer be able to read
    its own installation (a Python under /root, say) when a worker first needs them."""
    import ctypes  # noqa: F401

    from ipcd.kernel.queues import receive_function
    from ipcd.wire import phpserial  # noqa: F401

    receive_function()


def _check_writable_dir(path: Path) -> None:
    if not path.parent.is_dir():
        raise ConfigError(f"log directory {path.parent} does not exist")
