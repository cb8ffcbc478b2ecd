"""``ipcd``: start, run, stop, reload and query the daemon."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ipcd import config as config_mod
from ipcd.cli import parser as cli_parser
from ipcd.cli import run
from ipcd.daemon import identity
from ipcd.errors import ExitCode

EPILOG = """exit status:
  0 success, 1 the daemon failed to start (reason on stderr), or runs but cannot serve
  (status), 3 not running (status),
  64 usage error, 69 not running (stop, reload), 73 already running, 77 permission denied,
  70 internal error (a bug: please report), 78 bad configuration (also a reload the
  daemon refused: it keeps the old one), 124 the daemon did not report a reload's outcome
"""


#: Every subcommand and its line in ``ipcd --help`` (also its description in ``ipcd CMD -h``).
_COMMANDS = {
    "start": "detach and run in the background; returns once ready",
    "run": "run in the foreground, logging to the terminal too",
    "stop": "stop the daemon; waits until the job in progress is done",
    "reload": "re-read the configuration and reopen the log (SIGHUP); waits for the outcome",
    "status": "say whether the daemon runs (LSB: 0 running, 3 not)",
    "check": "validate the configuration, import every handler, open the job store",
}


def build_parser() -> argparse.ArgumentParser:
    parser, sub, common = cli_parser("ipcd", "The ipcd job-queue daemon.", EPILOG)
    for name, help_text in _COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, parents=[common])
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    config = config_mod.load(config_mod.locate(args.config))
    pid_file = config.daemon.pid_file
    # python-daemon is imported only by the commands that need it.
    from ipcd.daemon import detach

    if args.command == "start":
        return _start(config)
    if args.command == "run":
        return _run(config)
    if args.command == "stop":
        graceful = config.daemon.graceful_timeout

        def waiting(pid: int) -> None:
            print(
                f"ipcd: waiting for the daemon (pid {pid}) to stop: its workers finish their "
                f"jobs for up to [daemon] graceful_timeout ({graceful:g}s)",
                file=sys.stderr,
                flush=True,
            )

        detach.stop(pid_file, config.daemon.stop_timeout, waiting=waiting)
        return 0
    if args.command == "reload":
        detach.reload(pid_file, detach.RELOAD_TIMEOUT)
        return 0
    if args.command == "check":
        from ipcd.daemon import identity, startup
        from ipcd.handlers import registry

        registry.build(config)
        store = startup.check_store(config, identity.resolve(config), create=False)
        print(f"{config.path}: ok\n{store}")
        return 0
    pid = detach.running_pid(pid_file)
    if pid is None:
        print(f"ipcd is not running ({pid_file})")
        return int(ExitCode.NOT_RUNNING)
    problem = _cannot_serve(config, pid)
    if problem is not None:
        print(f"ipcd is running (pid {pid}) but cannot serve: {problem}")
        return int(ExitCode.JOB_FAILED)
    print(f"ipcd is running (pid {pid}, up {_uptime(pid)})")
    return 0


def _cannot_serve(config: config_mod.Config, pid: int) -> str | None:
    """Why the daemon with this PID cannot serve its clients, or None: its job queue and
    result segment must be there, and the segment must name it as the serving daemon
    (it writes its PID there once it serves, and again when it made the segment anew)."""
    from ipcd.client import Client
    from ipcd.errors import IpcdError, IpcPermissionError

    client = Client(config)
    try:
        client.queue.stats()
        header = client.store.header()
    except IpcPermissionError:
        return None  # not ours to look at: the PID is all this user can check
    except IpcdError as exc:
        return str(exc)
    finally:
        client.close()
    if header.daemon_pid != pid:
        return f"the result segment names pid {header.daemon_pid} as its daemon, not {pid}"
    return None


def _start(config: config_mod.Config) -> int:
    from ipcd.daemon import detach, sdnotify, startup
    from ipcd.daemon.arbiter import Arbiter
    from ipcd.daemon.pidlock import PidLock
    from ipcd.daemon.signals import Flags

    lock = PidLock.acquire(config.daemon.pid_file)  # before anything else: one master
    # systemd names this process in WATCHDOG_PID; the master it starts answers for it.
    watchdog = sdnotify.from_process_environment()
    prepared = startup.prepare(config, console=None)
    identity.hand_over(prepared.identity, [lock.path])
    flags = Flags()
    log_fd = prepared.sink.fileno()
    detach.start_detached(
        lock=lock,
        workdir=config.daemon.workdir,
        umask=config.daemon.umask,
        flags=flags,
        keep_fds=[prepared.listener.fileno()] + ([] if log_fd is None else [log_fd]),
        run=lambda ready: Arbiter(prepared, flags, lock=lock, watchdog=watchdog).run(ready),
        drop_privileges=lambda: identity.drop(prepared.identity),
    )
    return 0


def _run(config: config_mod.Config) -> int:
    from ipcd.daemon import sdnotify, startup
    from ipcd.daemon.arbiter import Arbiter
    from ipcd.daemon.pidlock import PidLock
    from ipcd.daemon.signals import Flags

    lock = PidLock.acquire(config.daemon.pid_file)  # before anything else: one master
    watchdog = sdnotify.from_process_environment()
    try:
        prepared = startup.prepare(config, console=sys.stderr)
        identity.hand_over(prepared.identity, [lock.path])
        identity.drop(prepared.identity)
        lock.record(os.getpid())
        Arbiter(prepared, Flags(), lock=lock, watchdog=watchdog).run()
    finally:
        lock.release()
    return 0


def _uptime(pid: int) -> str:
    """From /proc: the process's start (field 22 of stat, in clock ticks since boot)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return "unknown"
    started = boot + ticks / os.sysconf("SC_CLK_TCK")
    return f"{time.time() - started:.0f}s"


def entry() -> None:
    """Console-script entry point."""
    sys.exit(run("ipcd", main))
