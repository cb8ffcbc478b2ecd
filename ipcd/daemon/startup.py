"""Everything the daemon opens before it serves, made while stderr still reaches the user.

Start-up is split in two so that ``ipcd start`` can fail while the operator still sees
stderr: :func:`prepare` does everything that can go wrong (config, key file, kernel
objects and their safety check, handler imports, the log file) and holds no state that a
fork would break; ipcd.daemon.arbiter then runs in the final daemon process.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

from ipcd.config import Config
from ipcd.daemon import control, identity, schedules, uniquerelease
from ipcd.daemon import log as log_mod
from ipcd.daemon.capture import RunDir
from ipcd.daemon.schedules import Schedule
from ipcd.errors import ConfigError, StoreCorruptError, StoreError, StoreUnavailableError
from ipcd.handlers import registry as registry_mod
from ipcd.handlers.registry import Registry
from ipcd.kernel import keys as keys_mod
from ipcd.kernel import vetting
from ipcd.kernel.keys import Keys
from ipcd.kernel.queues import Queue, msgmax
from ipcd.kernel.segments import Lock
from ipcd.store import Hook, Hooks, JobStore, State, open_store
from ipcd.store.model import limits_of
from ipcd.tables.failed import FailedList
from ipcd.tables.inflight import InflightTable
from ipcd.tables.results import ResultStore
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.stats import StatsSegment
from ipcd.tables.unique import State as UniqueState
from ipcd.tables.unique import UniqueTable

#: The states of a job not yet finished.
UNFINISHED = (State.QUEUED, State.SCHEDULED, State.RUNNING)

#: Messages the intake takes per batch (ipcd.daemon.intake).
INTAKE_SLOTS = 64


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
    #: The master's private queue to its workers (mode 0600; ipcd.wire.handoff).
    handoff: Queue
    #: The intake's slots: messages taken off the job queue, not yet committed.
    intake: InflightTable

    def locks(self) -> dict[str, Lock]:
        """The locks of the shared tables, by the name a ``lock.timeout`` event gives them
        (ipcd.daemon.lockwaits)."""
        return {
            "result segment": self.store.lock,
            "failed list": self.failed.store.lock,
            "in-flight table": self.table.lock,
            "unique-key table": self.unique.lock,
            "spill table": self.spills.lock,
            "intake slots": self.intake.lock,
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
    #: The control socket, listening (ipcd.daemon.control): bound before detaching, so
    #: that ``ipcd start`` reports a path it cannot use.
    listener: socket.socket
    stats: StatsSegment
    unique: UniqueTable
    spills: SpillTable
    handoff: Queue
    intake: InflightTable
    #: ``[schedules.NAME]`` checked (cron expressions, zones): ipcd.daemon.schedules.
    schedules: tuple[Schedule, ...] = ()

    def objects(self) -> Objects:
        """The kernel objects alone."""
        return Objects(
            self.queue, self.replies, self.store, self.table, self.failed, self.stats,
            self.unique, self.spills, self.handoff, self.intake,
        )  # fmt: skip

    def open_jobs(self) -> JobStore:
        """A connection to the job store for the calling process: each process opens its
        own after the fork (a SQLite connection must never cross one)."""
        return open_jobs(self.config)


def prepare(config: Config, *, console: TextIO | None) -> Prepared:
    """Validate and open everything; any failure raises an IpcdError for the CLI.

    What can fail without touching the kernel (handler imports, the log file) comes first,
    so that a failed start leaves no new IPC objects behind.
    """
    registry = registry_mod.build(config)
    compiled = schedules.compile_schedules(config)
    who = identity.resolve(config)
    if config.log.file is not None:
        _check_writable_dir(config.log.file)
    try:
        sink = log_mod.configure(config.log, console=console)
    except OSError as exc:
        raise ConfigError(f"cannot open log file {config.log.file}: {exc.strerror}") from None
    check_store(config, who)
    keys = keys_mod.derive(config.ipc, create_key_file=True)
    objects = _objects(config, keys, who, registry)
    listener = control.bind_socket(
        config.control_socket, control.socket_mode(config.ipc.mode), who.object_gid
    )
    run_dir = RunDir.beside(config.store.path)
    try:
        run_dir.prepare()
    except OSError as exc:
        raise StoreUnavailableError(
            f"job store's run directory {run_dir.path}: {exc.strerror or exc}"
        ) from None
    handed = [config.store.path, config.control_socket, run_dir.path]
    handed += [
        p for suffix in ("-wal", "-shm", ".bodies") if (p := _beside(config.store.path, suffix))
    ]
    if config.log.file is not None:
        handed.append(config.log.file)
    identity.hand_over(who, handed)
    return Prepared(
        config=config, keys=keys, registry=registry, sink=sink, identity=who,
        listener=listener, **objects._asdict(), schedules=compiled,
    )  # fmt: skip


def reopen(p: Prepared, made_with: Config) -> Prepared:
    """The daemon's objects made or opened again, as at start (vetted, adopted), with the
    same configuration, registry and log: the master calls it when one was removed or
    overwritten (ipcd.daemon.objectwatch).  Objects still in place are opened, not remade.
    Their mode and sizes are ``made_with``'s, the configuration the daemon started with:
    a reload takes those settings only at a restart (ipcd.daemon.reloading)."""
    objects = _objects(made_with, p.keys, p.identity, p.registry, again=True)
    return Prepared(
        config=p.config, keys=p.keys, registry=p.registry, sink=p.sink, identity=p.identity,
        listener=p.listener, **objects._asdict(), schedules=p.schedules,
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
        pool_bytes=config.results.pool_bytes,
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
        else _unique_table(config, keys.unique, queue, table, trusted)
    )
    intake, _ = InflightTable.create(keys.intake, mode, INTAKE_SLOTS, 0, text_size, trusted=trusted)
    # The hand-off queue is the daemon's alone: no client may put a job on it.
    handoff = Queue.create(keys.handoff, 0o600, what="hand-off queue", trusted=trusted)
    stats = StatsSegment.create(
        keys.stats,
        mode,
        # One record per worker slot, then the intake's and the control process's.
        table.workers + 2,
        [(r.name, r.type) for r in registry.by_type.values()],
        keep_counts=again,
        trusted=trusted,
    )
    _load_lazy_modules()
    uid = who.uid if who.drops else None
    gid = who.object_gid if who.object_gid is not None else (who.gid if who.drops else None)
    shared = tuple(key for key in keys.all() if key != keys.handoff)
    vetting.adopt_all(shared, mode, uid=uid, gid=gid)
    vetting.adopt_all((keys.handoff,), 0o600, uid=uid, gid=gid)
    return Objects(queue, replies, store, table, failed, stats, unique, spills, handoff, intake)


def _unique_table(
    config: Config, key: int, queue: Queue, table: InflightTable, trusted: tuple[int, ...]
) -> UniqueTable:
    """The unique-key table, without the keys of jobs that are gone
    (ipcd.daemon.uniquerelease), made the one this daemon's outcomes release keys in."""
    unique = UniqueTable.create(key, config.ipc.mode, trusted=trusted)
    jobs = open_jobs(config)  # closed before the daemon forks
    try:
        free_lost_keys(unique, queue, table, jobs)
    finally:
        jobs.close()
    return unique


def free_lost_keys(unique: UniqueTable, queue: Queue, table: InflightTable, jobs: JobStore) -> None:
    """Free the keys of jobs that are gone (ipcd.daemon.uniquerelease.sweep_lost), logged;
    then hold again the keys of the jobs the store holds unfinished (after a reboot the
    table starts empty, and a cron job's next copy must still find its key taken)."""
    log = log_mod.get_logger(role="master")
    pending = {
        record.id: record.unique
        for record in jobs.list(states=UNFINISHED, limit=1 << 30)
        if record.unique is not None
    }
    lost = uniquerelease.sweep_lost(
        unique, queue=queue, inflight=table, stored=lambda job_id: job_id in pending
    )
    for entry, reason in lost:
        log.warning("unique.freed", unique=entry.key, job_id=entry.job_id, reason=reason)
    for job_id, key in pending.items():
        held = unique.lookup(key)
        if held is None:
            unique.claim(key, job_id, 0, UniqueState.QUEUED)


def open_jobs(config: Config, *, migrate: bool = True) -> JobStore:
    """A connection to the configuration's job store (ipcd.store), its claims held to
    the handlers' limits, which queues the configuration's completion hooks; ``migrate``
    as ipcd.store.open_store's."""
    return open_store(
        str(config.store.path), sync=config.store.sync, max_result=config.store.max_result,
        limits=limits_of(config.handlers), hooks=hooks_of(config), migrate=migrate,
    )  # fmt: skip


def hooks_of(config: Config) -> dict[str, Hooks]:
    """The handlers' completion hooks (``on_success``, ``on_failure``) as the store
    takes them, by handler name (the configuration checked that each names a handler)."""
    types = {handler.name: handler.type for handler in config.handlers}

    def hook(name: str | None) -> Hook | None:
        return None if name is None else Hook(name, types[name])

    return {
        h.name: Hooks(hook(h.on_success), hook(h.on_failure))
        for h in config.handlers
        if h.on_success or h.on_failure
    }


def check_store(
    config: Config, who: identity.Identity | None = None, *, create: bool = True
) -> str:
    """Open the job store once before detaching: made if missing (its directory must
    exist), migrated, checked; StoreError (exit 74) when it cannot serve.  Without
    ``create`` (``ipcd check``) a missing store is only said to be made at the first
    start, and a store of an older schema version is checked as it is and said to be
    brought up to date at the next start: ``ipcd check`` runs beside a daemon (``ipcd
    check && systemctl reload ipcd``), and converting the file under a running daemon of
    the older version would have it write rows the new schema no longer reads.  Returns
    what was found, for ``ipcd check``.

    A daemon that drops privileges (``who``) gets the file handed to its user, and the
    store is opened once more as that user, in a child process: SQLite makes its ``-wal``
    and ``-shm`` files beside the database at each first open, so a directory that user
    cannot write fails here, with the path and the cause, not after detaching.
    """
    path = config.store.path
    if not path.parent.is_dir():
        raise StoreUnavailableError(f"job store {path}: directory {path.parent} does not exist")
    if not create and not path.exists():
        return f"job store {path}: none yet, made at the first start"
    jobs = open_jobs(config, migrate=create)
    try:
        problems = jobs.check()
        found, known = jobs.schema()
    finally:
        jobs.close()
    if problems:
        raise StoreCorruptError(
            f"job store {config.store.path}: {'; '.join(problems[:3])} (restore it from a "
            "backup, or move it aside and ipcd makes a new, empty one)"
        )
    if who is not None and who.drops:
        identity.hand_over(who, [path])
        _open_as(who, config, migrate=create)
    if found < known:
        return (
            f"job store {path}: ok, schema version {found}: ipcd start brings it to "
            f"version {known} (a daemon running now is left its version)"
        )
    return f"job store {path}: ok"


def _open_as(who: identity.Identity, config: Config, *, migrate: bool) -> None:
    """Open the job store in a child process that became ``who``; StoreUnavailableError
    with the child's reason when it could not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; coverage does not follow the fork
        code = 70
        try:
            os.close(read_end)
            identity.drop(who)
            open_jobs(config, migrate=migrate).close()
            code = 0
        except StoreError as exc:
            os.write(write_end, str(exc).encode("utf-8", "replace"))
            code = int(exc.exit_code)
        except BaseException as exc:  # the child's boundary: the parent reports it
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode("utf-8", "replace"))
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        reason = fh.read().decode("utf-8", "replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        user = who.user or f"uid {os.geteuid()}, gid {who.gid}"
        raise StoreUnavailableError(
            f"{reason or f'job store {config.store.path}: cannot be opened'} "
            f"[as the daemon's user {user}]"
        )


def _beside(path: Path, suffix: str) -> Path | None:
    """SQLite's ``-wal`` or ``-shm`` file, or the directory of large bodies
    (ipcd.store.blobs), of the store at ``path``, when it exists."""
    other = path.with_name(path.name + suffix)
    return other if other.exists() else None


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
