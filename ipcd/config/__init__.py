"""The configuration: a TOML file read into frozen dataclasses.

Both the daemon and the clients read the same file, so that a handler name typed at
``ipcctl submit`` means the same type number the daemon dispatches on, and both derive the
same IPC key.  The loader is a pure function of the file's text: it validates every key
(unknown keys are typos and are refused), resolves relative paths against the file's own
directory (so a development config works from any working directory) and never touches
the kernel.  ``tomllib`` is in the standard library, which keeps the cron-facing client
path free of third-party imports.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ipcd.config.tomlreader import TableReader
from ipcd.errors import ConfigError, UsageError

DEFAULT_PATH = Path("/etc/ipcd/ipcd.toml")
ENV_VAR = "IPCD_CONFIG"

#: Smallest message type: the kernel's (msgsnd refuses mtype < 1).  Type 1 is an ordinary
#: job type, the one the PHP article's first msg_send uses; ipcd wakes its workers with
#: signals, not messages (see ipcd.daemon.signals).
MIN_TYPE = 1
#: Largest message type ipcctl sends: sysv_ipc passes types as C ints.  (The daemon
#: receives any positive C long, which is what PHP may send.)
MAX_TYPE = 2**31 - 1


class IpcConfig(NamedTuple):
    """Where the kernel objects live and who may use them."""

    key_path: Path | None
    proj_id: int
    key: int | None
    mode: int
    send_timeout: float
    #: Raise the job queue's msg_qbytes to this at start (needs CAP_SYS_RESOURCE).
    queue_bytes: int | None = None
    #: Group that owns the IPC objects (with mode 0o660: the group that may submit).
    group: str | None = None


class DaemonConfig(NamedTuple):
    """How the daemon process runs."""

    pid_file: Path
    workdir: Path
    umask: int
    stop_timeout: float
    workers: int = 2
    max_jobs_per_worker: int = 0
    graceful_timeout: float = 20.0
    #: Started as root: the user and group to switch to before handling any job.
    user: str | None = None
    group: str | None = None


class LogConfig(NamedTuple):
    """Where the JSON event log goes."""

    file: Path | None
    level: str


class ResultsConfig(NamedTuple):
    """The shared-memory result segment."""

    size: int
    slot_size: int
    #: The largest result kept (in its own segment when larger than a slot).
    max_result: int = 256 << 20
    #: The most data spilled results hold together; the oldest are evicted beyond it.
    spill_bytes: int = 1 << 30
    #: Entries of the spill table large payloads may not take: kept for large results,
    #: so that queued payloads never make a result fail (a quarter of [jobs] spill_slots).
    spill_reserved: int = 16
    #: Segments of evicted large results kept to hold the next ones (their pages stay
    #: allocated, so the next result skips the kernel's zeroing): at most this many bytes,
    #: counted within spill_bytes; 0 turns the pool off (ipcd.tables.spill.table).
    pool_bytes: int = 64 << 20


class JobsConfig(NamedTuple):
    """What happens to jobs that fail or whose worker dies."""

    max_attempts: int = 3
    retry_delay: float = 1.0
    failed_size: int = 256
    parked: int = 64
    #: Entries of the spill table: large payloads and results that may exist at once.
    spill_slots: int = 64
    #: The largest payload accepted (in its own segment when larger than a message).
    max_payload: int = 256 << 20
    #: The most bytes of a job's stdout and stderr kept with it (the last ones); 0: none
    #: captured, the handlers' output goes where the daemon's own stdout goes
    #: (ipcd.daemon.capture).
    max_output: int = 64 << 10


class ExecConfig(NamedTuple):
    """The ``exec`` handler: which commands cron users may have ipcd run, and limits."""

    enabled: bool = False
    commands: Mapping[str, tuple[str, ...]] = {}
    allow_args: bool = False
    timeout: float = 60.0
    #: Below the default result slot's 4032 bytes, with room for the JSON around it.
    max_output: int = 3072
    #: The command of ``commands`` the ``notify`` handler runs (None: none).
    notify: str | None = None


class StoreConfig(NamedTuple):
    """[store]: the job store (ipcd.store), where every accepted job is recorded."""

    path: Path = Path("/var/lib/ipcd/jobs.db")
    #: "normal": a committed batch survives a crash of ipcd or of the kernel's processes;
    #: "full": also a power cut (fsync per committed batch).
    sync: str = "normal"
    #: Past these the intake stops draining the kernel queue: submitters get its
    #: backpressure (exit 75), never an unbounded database.
    max_queued: int = 100_000
    max_queued_bytes: int = 1 << 30
    keep_done: int = 1000
    keep_done_age: float = 7 * 86400.0
    keep_failed: int = 1000
    keep_failed_age: float = 30 * 86400.0
    #: Largest result kept in the store (larger ones: their size only).
    max_result: int = 1 << 20
    #: The control socket (ipcctl list, cancel, pause, ...); None: beside the PID file.
    socket: Path | None = None


class HandlerConfig(NamedTuple):
    """One handler: the name users type, the message type it serves, where its code is."""

    name: str
    type: int
    target: str | None
    #: Seconds a job may run before it is killed with its worker (None: no limit).
    timeout: float | None = None
    #: Overrides [jobs] max_attempts and retry_delay for this handler.
    max_attempts: int | None = None
    retry_delay: float | None = None
    #: At most this many of its jobs run at once across the pool (None: the pool's size).
    concurrency: int | None = None
    #: Its starts as written (``"10/s"``, ``"30/min"``, ``"100/h"``): a token bucket.
    rate: str | None = None
    #: Starts that may follow each other at once (None: one second's worth, at least 1).
    burst: int | None = None
    #: Completion hooks: the handler that gets a follow-up job, with the outcome as its
    #: payload, when one of this handler's jobs ends done or failed for good.
    on_success: str | None = None
    on_failure: str | None = None

    @property
    def rate_per_second(self) -> float | None:
        """``rate`` in starts per second (None: no rate limit)."""
        return None if self.rate is None else parse_rate(self.rate)

    @property
    def burst_size(self) -> int:
        """The bucket's size: ``burst``, else one second's worth of starts, at least 1."""
        if self.burst is not None:
            return self.burst
        per_second = self.rate_per_second
        return max(1, math.ceil(per_second)) if per_second is not None else 1


#: ``[scheduler] timezone`` by default: the host's own zone ($TZ, else /etc/localtime),
#: as cron's.
LOCAL_ZONE = "local"
#: The shortest ``every`` (the master looks at its schedules about once a second).
MIN_EVERY = 1.0
#: The most ``[schedules.NAME]`` tables one file may have.
MAX_SCHEDULES = 1000
#: What a schedule does with runs whose time passed while the daemon was down.
MISSED = ("run-once", "skip")


class ScheduleConfig(NamedTuple):
    """``[schedules.NAME]``: a job the daemon's scheduler queues on a recurring time.

    The cron expression and the time zone are checked where they are used, by the
    daemon (ipcd.daemon.schedules, before it detaches and at a reload), so that reading
    the configuration (ipcctl submit does, from cron) loads no cron library and no zone
    files."""

    name: str
    handler: str
    #: A five-field cron expression, or None (then ``every``).
    cron: str | None
    #: Seconds between runs, counted from the Unix epoch, or None (then ``cron``).
    every: float | None
    #: The job's payload: a string, or a JSON value (from a TOML table, array, number).
    payload: Any = None
    priority: int = 0
    #: The job's own time limit (None: the handler's).
    timeout: float | None = None
    #: The zone ``cron`` is read in (None: ``[scheduler] timezone``).
    timezone: str | None = None
    #: "run-once": after downtime, one run at once; "skip": none, wait for the next time.
    missed: str = "run-once"


class SchedulerConfig(NamedTuple):
    """``[scheduler]``: what every schedule shares."""

    #: The zone cron expressions are read in: an IANA name, "UTC", or "local".
    timezone: str = LOCAL_ZONE


class Config(NamedTuple):
    """The whole configuration, as read from one file."""

    path: Path
    ipc: IpcConfig
    daemon: DaemonConfig
    log: LogConfig
    results: ResultsConfig
    handlers: tuple[HandlerConfig, ...]
    jobs: JobsConfig = JobsConfig()
    exec: ExecConfig = ExecConfig()
    store: StoreConfig = StoreConfig()
    schedules: tuple[ScheduleConfig, ...] = ()
    scheduler: SchedulerConfig = SchedulerConfig()

    def handler_type(self, name_or_number: str) -> int:
        """Turn what a user typed (a handler name or a type number) into a message type."""
        for handler in self.handlers:
            if handler.name == name_or_number:
                return handler.type
        try:
            number = int(name_or_number, 0)
        except ValueError:
            names = ", ".join(h.name for h in self.handlers) or "none configured"
            raise UsageError(f"unknown handler {name_or_number!r} (configured: {names})") from None
        if not MIN_TYPE <= number <= MAX_TYPE:
            raise UsageError(f"message type {number} is out of range {MIN_TYPE}..{MAX_TYPE}")
        return number

    def handler_for_type(self, type_: int) -> HandlerConfig | None:
        """The handler configured for a message type, if any."""
        for handler in self.handlers:
            if handler.type == type_:
                return handler
        return None

    @property
    def control_socket(self) -> Path:
        """Where the daemon serves ipcctl's operator commands: ``[store] socket``, else
        the PID file's path ending in ``.sock`` (``ipcd.pid``: ``ipcd.sock``)."""
        return self.store.socket or self.daemon.pid_file.with_suffix(".sock")


def locate(explicit: str | os.PathLike[str] | None) -> Path:
    """The config path: ``-c PATH``, else ``$IPCD_CONFIG``, else ``/etc/ipcd/ipcd.toml``."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return Path(from_env)
    return DEFAULT_PATH


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the configuration file at ``path``."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading configuration") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return parse(raw, path)


def parse(raw: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document; ``path`` anchors relative paths."""
    reader = TableReader(path)
    sections = {"ipc", "daemon", "log", "results", "jobs", "exec", "handlers", "store"}
    reader.allow(raw, "", sections | {"schedules", "scheduler"})
    base = path.parent.absolute()

    ipc = reader.table(raw, "ipc")
    reader.allow(
        ipc, "ipc", {"key_path", "proj_id", "key", "mode", "send_timeout", "queue_bytes", "group"}
    )
    key = reader.optional(ipc, "ipc.key", int)
    key_path = reader.optional(ipc, "ipc.key_path", str)
    if key is None and key_path is None:
        raise reader.error("[ipc] needs key_path (for ftok) or an explicit numeric key")
    if key is not None and not 0 < key <= 0xFFFFFFFF:
        raise reader.error("ipc.key must be between 1 and 0xffffffff")
    proj_id = reader.get(ipc, "ipc.proj_id", int, 0x49)
    if not 1 <= proj_id <= 246:
        # ftok uses only the low 8 bits, and ipcd also uses proj_id + 1 to + 9 (ipcd.kernel.keys).
        raise reader.error("ipc.proj_id must be between 1 and 246")
    mode = reader.get(ipc, "ipc.mode", int, 0o660)
    if not 0 <= mode <= 0o777:
        raise reader.error("ipc.mode must be a permission mode such as 0o660")
    if mode & 0o002:
        raise reader.error(f"ipc.mode {mode:#o} is world-writable: anyone could forge jobs")
    ipc_config = IpcConfig(
        key_path=_resolve(base, key_path) if key_path is not None else None,
        proj_id=proj_id,
        key=key,
        mode=mode,
        send_timeout=reader.positive(ipc, "ipc.send_timeout", 5.0),
        queue_bytes=reader.bounded(ipc, "ipc.queue_bytes", None, 1, 1 << 31),
        group=reader.optional(ipc, "ipc.group", str),
    )

    daemon = reader.table(raw, "daemon")
    reader.allow(
        daemon,
        "daemon",
        {
            "pid_file",
            "workdir",
            "umask",
            "stop_timeout",
            "workers",
            "max_jobs_per_worker",
            "graceful_timeout",
            "user",
            "group",
        },
    )
    umask = reader.get(daemon, "daemon.umask", int, 0o027)
    if not 0 <= umask <= 0o777:
        raise reader.error("daemon.umask must be a mode such as 0o027")
    daemon_config = DaemonConfig(
        pid_file=_resolve(base, reader.get(daemon, "daemon.pid_file", str, "/run/ipcd/ipcd.pid")),
        workdir=_resolve(base, reader.get(daemon, "daemon.workdir", str, "/")),
        umask=umask,
        stop_timeout=reader.positive(daemon, "daemon.stop_timeout", 30.0),
        workers=reader.bounded(daemon, "daemon.workers", 2, 1, 256),
        max_jobs_per_worker=reader.bounded(daemon, "daemon.max_jobs_per_worker", 0, 0, 2**31),
        graceful_timeout=reader.positive(daemon, "daemon.graceful_timeout", 20.0),
        user=reader.optional(daemon, "daemon.user", str),
        group=reader.optional(daemon, "daemon.group", str),
    )

    log = reader.table(raw, "log")
    reader.allow(log, "log", {"file", "level"})
    log_file = reader.optional(log, "log.file", str)
    level = reader.get(log, "log.level", str, "info").lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise reader.error("log.level must be one of debug, info, warning, error")
    log_config = LogConfig(file=_resolve(base, log_file) if log_file else None, level=level)

    results = reader.table(raw, "results")
    reader.allow(
        results,
        "results",
        {"size", "slot_size", "max_result", "spill_bytes", "spill_reserved", "pool_bytes"},
    )
    slot_size = reader.get(results, "results.slot_size", int, 4096)
    size = reader.get(results, "results.size", int, 1 << 20)
    if not 256 <= slot_size <= 1 << 24:
        raise reader.error("results.slot_size must be between 256 bytes and 16 MiB")
    if size < 64 + 2 * slot_size:
        raise reader.error("results.size must hold at least two slots (64 + 2 * slot_size)")
    results_config = ResultsConfig(
        size=size,
        slot_size=slot_size,
        max_result=reader.bounded(results, "results.max_result", 256 << 20, 0, 1 << 40),
        spill_bytes=reader.bounded(results, "results.spill_bytes", 1 << 30, 0, 1 << 44),
    )
    spill_bytes = results_config.spill_bytes
    pool_bytes = reader.bounded(
        results, "results.pool_bytes", min(64 << 20, spill_bytes), 0, 1 << 44
    )
    if pool_bytes > spill_bytes:
        raise reader.error(
            f"results.pool_bytes ({pool_bytes}) must not exceed results.spill_bytes "
            f"({spill_bytes}): the pool's segments count within it"
        )
    results_config = results_config._replace(pool_bytes=pool_bytes)

    jobs = reader.table(raw, "jobs")
    reader.allow(
        jobs,
        "jobs",
        {
            "max_attempts",
            "retry_delay",
            "failed_size",
            "parked",
            "spill_slots",
            "max_payload",
            "max_output",
        },
    )
    jobs_config = JobsConfig(
        max_attempts=reader.bounded(jobs, "jobs.max_attempts", 3, 1, 1000),
        retry_delay=reader.non_negative(jobs, "jobs.retry_delay", 1.0),
        failed_size=reader.bounded(jobs, "jobs.failed_size", 256, 1, 65536),
        parked=reader.bounded(jobs, "jobs.parked", 64, 1, 65536),
        spill_slots=reader.bounded(jobs, "jobs.spill_slots", 64, 2, 65536),
        max_payload=reader.bounded(jobs, "jobs.max_payload", 256 << 20, 0, 1 << 40),
        max_output=reader.bounded(jobs, "jobs.max_output", 64 << 10, 0, 16 << 20),
    )
    slots = jobs_config.spill_slots
    results_config = results_config._replace(
        spill_reserved=reader.bounded(
            results, "results.spill_reserved", max(1, slots // 4), 1, slots - 1
        )
    )

    handlers = _handlers(reader, reader.table(raw, "handlers"))
    scheduler = reader.table(raw, "scheduler")
    reader.allow(scheduler, "scheduler", {"timezone"})
    return Config(
        store=_store(reader, reader.table(raw, "store"), base),
        exec=_exec(reader, reader.table(raw, "exec")),
        path=_resolve(Path.cwd(), path),
        ipc=ipc_config,
        daemon=daemon_config,
        log=log_config,
        results=results_config,
        handlers=handlers,
        jobs=jobs_config,
        schedules=_schedules(reader, reader.table(raw, "schedules"), handlers),
        scheduler=SchedulerConfig(
            timezone=_zone_name(reader, scheduler, "scheduler.timezone") or LOCAL_ZONE
        ),
    )


def _handlers(reader: TableReader, table: Mapping[str, Any]) -> tuple[HandlerConfig, ...]:
    handlers: list[HandlerConfig] = []
    seen: dict[int, str] = {}
    for name, entry in table.items():
        where = f"handlers.{name}"
        if not isinstance(entry, Mapping):
            raise reader.error(f"[{where}] must be a table")
        reader.allow(
            entry,
            where,
            {
                "type", "target", "timeout", "max_attempts", "retry_delay", "concurrency",
                "rate", "burst", "on_success", "on_failure",
            },
        )  # fmt: skip
        type_ = reader.get(entry, f"{where}.type", int, None)
        if type_ is None:
            raise reader.error(f"[{where}] needs a message type: type = N")
        if not MIN_TYPE <= type_ <= MAX_TYPE:
            raise reader.error(f"{where}.type must be between {MIN_TYPE} and {MAX_TYPE}")
        if type_ in seen:
            raise reader.error(f"{where}.type {type_} is already used by handler {seen[type_]!r}")
        seen[type_] = name
        target = reader.optional(entry, f"{where}.target", str)
        if target is not None and ":" not in target:
            raise reader.error(f"{where}.target must look like 'package.module:function'")
        timeout = _timeout(reader, entry, where)
        rate = reader.optional(entry, f"{where}.rate", str)
        if rate is not None:
            try:
                parse_rate(rate)
            except ValueError as exc:
                raise reader.error(f"{where}.rate: {exc}") from None
        burst = reader.bounded(entry, f"{where}.burst", None, 1, MAX_BURST)
        if burst is not None and rate is None:
            raise reader.error(f'{where}.burst needs a rate (rate = "N/s")')
        handlers.append(
            HandlerConfig(
                name=name,
                type=type_,
                target=target,
                timeout=timeout,
                max_attempts=reader.bounded(entry, f"{where}.max_attempts", None, 1, 1000),
                retry_delay=(
                    reader.non_negative(entry, f"{where}.retry_delay", 0.0)
                    if "retry_delay" in entry
                    else None
                ),
                concurrency=reader.bounded(entry, f"{where}.concurrency", None, 1, MAX_CONCURRENCY),
                rate=rate,
                burst=burst,
                on_success=reader.optional(entry, f"{where}.on_success", str),
                on_failure=reader.optional(entry, f"{where}.on_failure", str),
            )
        )
    _check_hooks(reader, handlers)
    return tuple(handlers)


def _schedules(
    reader: TableReader, table: Mapping[str, Any], handlers: tuple[HandlerConfig, ...]
) -> tuple[ScheduleConfig, ...]:
    """``[schedules.NAME]`` tables; the cron expression and the zone are the daemon's
    to check (:class:`ScheduleConfig`)."""
    if len(table) > MAX_SCHEDULES:
        raise reader.error(f"at most {MAX_SCHEDULES} [schedules.NAME] tables, not {len(table)}")
    known = {h.name for h in handlers}
    schedules: list[ScheduleConfig] = []
    for name, entry in table.items():
        where = f"schedules.{name}"
        if not isinstance(entry, Mapping):
            raise reader.error(f"[{where}] must be a table")
        if not name or len(name.encode()) > 100 or not name.isprintable():
            raise reader.error(f"[{where}]: a schedule's name is 1 to 100 printable bytes")
        reader.allow(
            entry,
            where,
            {"handler", "cron", "every", "payload", "priority", "timeout", "timezone", "missed"},
        )
        handler = reader.get(entry, f"{where}.handler", str, None)
        if handler is None:
            raise reader.error(f'[{where}] needs the handler its jobs go to: handler = "NAME"')
        if handler not in known:
            names = ", ".join(sorted(known)) or "none configured"
            raise reader.error(
                f"{where}.handler: unknown handler {handler!r} (configured: {names})"
            )
        cron = reader.optional(entry, f"{where}.cron", str)
        every = _every(reader, entry, where)
        if (cron is None) == (every is None):
            raise reader.error(
                f'[{where}] needs either cron = "MIN HOUR DOM MON DOW" or every = "5m", '
                f"{'not both' if cron is not None else 'and has neither'}"
            )
        if cron is not None and len(cron.split()) != 5:
            raise reader.error(
                f"{where}.cron {cron!r} must have five fields: minute hour day-of-month "
                "month day-of-week"
            )
        missed = reader.get(entry, f"{where}.missed", str, "run-once")
        if missed not in MISSED:
            raise reader.error(f'{where}.missed must be "run-once" or "skip", not {missed!r}')
        timeout = _timeout(reader, entry, where)
        schedules.append(
            ScheduleConfig(
                name=name,
                handler=handler,
                cron=cron,
                every=every,
                payload=_payload(reader, entry, f"{where}.payload"),
                priority=reader.bounded(entry, f"{where}.priority", 0, -100, 100),
                timeout=timeout,
                timezone=_zone_name(reader, entry, f"{where}.timezone"),
                missed=missed,
            )
        )
    return tuple(schedules)


def _timeout(reader: TableReader, entry: Mapping[str, Any], where: str) -> float | None:
    """A job's time limit (``[handlers.NAME]``, ``[schedules.NAME]``): None, or seconds."""
    timeout: float | None = reader.get(entry, f"{where}.timeout", float, None)
    if timeout is not None and not 0 < timeout < math.inf:
        raise reader.error(f"{where}.timeout must be a positive number of seconds")
    return timeout


def _every(reader: TableReader, entry: Mapping[str, Any], where: str) -> float | None:
    if "every" not in entry:
        return None
    try:
        seconds = parse_duration(entry["every"])
    except ValueError as exc:
        raise reader.error(f"{where}.every: {exc}") from None
    if seconds < MIN_EVERY:
        raise reader.error(f"{where}.every must be at least {MIN_EVERY:g} second")
    return seconds


def _payload(reader: TableReader, entry: Mapping[str, Any], dotted: str) -> Any:
    """A schedule's payload as JSON would carry it: TOML dates and times are refused."""
    value = entry.get("payload")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise reader.error(
            f"{dotted} must be a string or a table of strings, numbers, booleans, arrays and "
            "tables (no dates or times: write them as strings)"
        ) from None
    return value


def _zone_name(reader: TableReader, table: Mapping[str, Any], dotted: str) -> str | None:
    name = reader.optional(table, dotted, str)
    if name is not None and not name:
        raise reader.error(f'{dotted} must name a zone ("Europe/Berlin", "UTC" or "local")')
    return name


def _check_hooks(reader: TableReader, handlers: list[HandlerConfig]) -> None:
    """Each hook names a configured handler, and no hook's handler has hooks of its own:
    a follow-up job never has a follow-up, so no chain of hooks can loop or grow."""
    names = {h.name for h in handlers}
    targets: dict[str, str] = {}
    for handler in handlers:
        for key in ("on_success", "on_failure"):
            hook = getattr(handler, key)
            if hook is None:
                continue
            if hook not in names:
                raise reader.error(
                    f"handlers.{handler.name}.{key}: no handler {hook!r} is configured "
                    f"(configured: {', '.join(sorted(names))})"
                )
            targets.setdefault(hook, f"handlers.{handler.name}.{key}")
    for handler in handlers:
        if handler.name in targets and (handler.on_success or handler.on_failure):
            raise reader.error(
                f"handlers.{handler.name} is a completion hook ({targets[handler.name]}) and "
                "cannot have on_success or on_failure of its own: a follow-up job never "
                "has a follow-up"
            )


def _exec(reader: TableReader, table: Mapping[str, Any]) -> ExecConfig:
    reader.allow(
        table, "exec", {"enabled", "commands", "allow_args", "timeout", "max_output", "notify"}
    )
    commands: dict[str, tuple[str, ...]] = {}
    for name, argv in reader.table(table, "commands").items():
        if (
            not isinstance(argv, list)
            or not argv
            or not all(isinstance(a, str) for a in argv)
            or not argv[0].startswith("/")
        ):
            raise reader.error(
                f"exec.commands.{name} must be an argv list starting with an absolute path, "
                'such as ["/usr/local/bin/report", "--daily"]'
            )
        commands[name] = tuple(argv)
    return ExecConfig(
        enabled=reader.get(table, "exec.enabled", bool, False),
        commands=commands,
        allow_args=reader.get(table, "exec.allow_args", bool, False),
        timeout=reader.positive(table, "exec.timeout", 60.0),
        max_output=reader.bounded(table, "exec.max_output", 3072, 0, 1 << 24),
        notify=_notify(reader, table, commands),
    )


def _notify(
    reader: TableReader, table: Mapping[str, Any], commands: Mapping[str, tuple[str, ...]]
) -> str | None:
    """``[exec] notify``: the name of one of ``[exec.commands]``."""
    name: str | None = reader.optional(table, "exec.notify", str)
    if name is not None and name not in commands:
        known = ", ".join(sorted(commands)) or "none"
        raise reader.error(f"exec.notify {name!r} is not in [exec.commands] (listed: {known})")
    return name


def _resolve(base: Path, value: str | os.PathLike[str]) -> Path:
    """``value`` as an absolute path without ``..`` or ``.`` in it, for use and for every
    message that shows it (``/srv/app/.run/ipcd.key``, not ``etc/ipcd/../../.run/ipcd.key``).

    A path with ``..`` in it has its directories resolved as the kernel walks them
    (symlinks, then ``..``), so that it names the same file; its last component is kept
    as written, so a symlinked log or key file stays the link the administrator made.
    Any other path is kept as written (``/var/run/ipcd.pid`` is not made ``/run/…``).
    """
    path = Path(value).expanduser()  # Path drops "." components itself
    if not path.is_absolute():
        path = base / path
    if ".." not in path.parts:
        return path
    if path.name == "..":
        return path.resolve()
    return path.parent.resolve() / path.name


_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: The units of ``[handlers.NAME] rate``, in seconds.
_RATE_UNITS = {"s": 1, "min": 60, "h": 3600}
#: Bounds of ``[handlers.NAME] rate`` (starts per second) and ``burst``, ``concurrency``.
MAX_RATE = 100_000.0
MAX_BURST = 100_000
MAX_CONCURRENCY = 65_536


def parse_rate(text: str) -> float:
    """A rate as a user writes it, ``N/s``, ``N/min`` or ``N/h`` (N a positive number),
    in starts per second.  Raises ValueError with the reason."""
    number, _, unit = text.strip().partition("/")
    seconds = _RATE_UNITS.get(unit.strip())
    try:
        count = float(number)
    except ValueError:
        count = math.nan
    if seconds is None or not math.isfinite(count) or count <= 0:
        raise ValueError(f'{text!r} is not a rate (e.g. "10/s", "30/min", "100/h")')
    per_second = count / seconds
    if per_second > MAX_RATE:
        raise ValueError(f"{text!r} is over {MAX_RATE:.0f}/s")
    return per_second


def parse_duration(text: str | float | int) -> float:
    """A duration as a user writes it: plain seconds, or ``30s``, ``10m``, ``2h``, ``7d``.

    Raises ValueError with the reason."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        value = str(text).strip()
        unit = _DURATION.get(value[-1:].lower())
        number = value[:-1] if unit else value
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            raise ValueError(f"{text!r} is not a duration (e.g. 30s, 10m, 2h, 7d)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 10m, 2h, 7d)")
    return seconds


def _store(reader: TableReader, store: Mapping[str, Any], base: Path) -> StoreConfig:
    reader.allow(
        store,
        "store",
        {
            "path", "sync", "max_queued", "max_queued_bytes", "keep_done", "keep_done_age",
            "keep_failed", "keep_failed_age", "max_result", "socket",
        },
    )  # fmt: skip
    default = StoreConfig()
    sync = reader.get(store, "store.sync", str, default.sync)
    if sync not in {"normal", "full"}:
        raise reader.error('store.sync must be "normal" or "full"')

    def age(name: str, fallback: float) -> float:
        raw = store.get(name, fallback)
        try:
            return parse_duration(raw)
        except ValueError as exc:
            raise reader.error(f"store.{name}: {exc}") from None

    socket = reader.optional(store, "store.socket", str)
    return StoreConfig(
        path=_resolve(base, reader.get(store, "store.path", str, str(default.path))),
        sync=sync,
        max_queued=reader.bounded(store, "store.max_queued", default.max_queued, 1, 1 << 40),
        max_queued_bytes=reader.bounded(
            store, "store.max_queued_bytes", default.max_queued_bytes, 1, 1 << 50
        ),
        keep_done=reader.bounded(store, "store.keep_done", default.keep_done, 0, 1 << 40),
        keep_done_age=age("keep_done_age", default.keep_done_age),
        keep_failed=reader.bounded(store, "store.keep_failed", default.keep_failed, 0, 1 << 40),
        keep_failed_age=age("keep_failed_age", default.keep_failed_age),
        max_result=reader.bounded(store, "store.max_result", default.max_result, 0, 1 << 40),
        socket=_resolve(base, socket) if socket else None,
    )
