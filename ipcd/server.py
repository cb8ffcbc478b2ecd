"""The daemon process: prepare everything, then serve until stopped.

Start-up is split in two so that ``ipcd start`` can fail while the operator still sees
stderr: :func:`prepare` does everything that can go wrong (config, key file, kernel
objects and their safety check, handler imports, the log file) and holds no state that a
fork would break; :meth:`Server.serve` runs in the final daemon process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ipcd import config as config_mod
from ipcd import keys as keys_mod
from ipcd import log as log_mod
from ipcd import registry as registry_mod
from ipcd.config import CONTROL_TYPE, Config
from ipcd.errors import IpcdError
from ipcd.ipc import Queue
from ipcd.keys import Keys
from ipcd.registry import Registry
from ipcd.resultstore import ResultStore
from ipcd.signals import Flags, Waker, wake_message
from ipcd.worker import Worker


@dataclass
class Prepared:
    """Everything the daemon needs, made before detaching."""

    config: Config
    keys: Keys
    queue: Queue
    replies: Queue
    store: ResultStore
    registry: Registry
    sink: log_mod.Sink


def prepare(config: Config, *, console: TextIO | None) -> Prepared:
    """Validate and open everything; any failure raises an IpcdError for the CLI."""
    registry = registry_mod.build(config)
    keys = keys_mod.derive(config.ipc, create_key_file=True)
    mode = config.ipc.mode
    queue = Queue.create(keys.jobs, mode, what="job queue")
    replies = Queue.create(keys.replies, mode, what="reply queue")
    store = ResultStore.create(
        keys.results, keys.gate, mode, config.results.size, config.results.slot_size
    )
    if config.log.file is not None:
        _check_writable_dir(config.log.file)
    try:
        sink = log_mod.configure(config.log, console=console)
    except OSError as exc:
        raise IpcdError(f"cannot open log file {config.log.file}: {exc.strerror}") from None
    return Prepared(config, keys, queue, replies, store, registry, sink)


def _check_writable_dir(path: Path) -> None:
    if not path.parent.is_dir():
        raise IpcdError(f"log directory {path.parent} does not exist")


class Server:
    """Runs the worker loop in this process and handles reloads."""

    def __init__(self, prepared: Prepared, flags: Flags) -> None:
        self.p = prepared
        self.flags = flags
        self.log = log_mod.get_logger()
        self.started = time.time()

    def serve(self, ready: Callable[[], None] = lambda: None) -> None:
        """Serve until a stop signal; ``ready`` is called once the daemon takes jobs."""
        p = self.p
        waker = Waker(lambda: p.queue.send_nowait(*wake_message()))
        self.flags.install()
        waker.start()
        p.store.set_daemon(os.getpid(), self.started)
        worker = Worker(
            queue=p.queue,
            replies=p.replies,
            store=p.store,
            registry=p.registry,
            flags=self.flags,
            log=self.log,
            on_reload=self.reload,
        )
        self.log.info(
            "daemon.started",
            pid=os.getpid(),
            config=str(p.config.path),
            key=f"{p.keys.jobs:#010x}",
            key_from=p.keys.how,
            handlers={r.name: r.type for r in p.registry.by_type.values()},
        )
        ready()
        try:
            worker.serve()
        except Exception:
            self.log.critical("daemon.crashed", exc_info=True)
            raise
        finally:
            waker.close()
            # Drop our own wake-ups so that the queue holds only jobs for the next start.
            while p.queue.receive_nowait(CONTROL_TYPE) is not None:
                pass
            try:
                p.store.set_daemon(0, 0.0)
            except IpcdError as exc:
                self.log.warning("daemon.segment_unavailable", error=str(exc))
            self.log.info(
                "daemon.stopped",
                pid=os.getpid(),
                signal=self.flags.signal,
                jobs=worker.jobs_done,
                uptime_s=round(time.time() - self.started, 3),
            )
            p.sink.close()

    def reload(self) -> Registry:
        """SIGHUP: reopen the log, re-read the config, re-import the handlers.

        A config that fails to load or import is logged and the running one kept, the way
        nginx and sshd treat a bad reload.  Settings that name kernel objects (keys, mode,
        result-segment size) take effect at the next start.
        """
        p = self.p
        p.sink.reopen()
        try:
            fresh = config_mod.load(p.config.path)
            registry = registry_mod.build(fresh)
        except IpcdError as exc:
            self.log.error("daemon.reload_failed", error=str(exc), config=str(p.config.path))
            return p.registry
        restart_needed = [
            name
            for name, old, new in (
                ("ipc", p.config.ipc, fresh.ipc),
                ("results", p.config.results, fresh.results),
                ("log", p.config.log, fresh.log),
            )
            if old != new
        ]
        p.registry = registry
        p.config = fresh
        self.log.info(
            "daemon.reloaded",
            handlers={r.name: r.type for r in registry.by_type.values()},
            restart_needed=restart_needed or None,
        )
        return registry
