"""A daemon for the benchmark: ``ipcd start`` on a private configuration, and back out.

Each daemon gets its own directory (key file, PID file, log) and so its own keys.  It is
stopped with ``ipcd stop`` and every object at its keys is removed with
``ipcd.tables.purge.remove_all``, whatever happened in between.

A daemon can also run an older commit's ``ipcd`` (:func:`export`), for a baseline measured
in the same run as today's code: its ``ipcd/`` comes first on the daemon's PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from ipcd import config as config_mod
from ipcd.client import Client
from ipcd.kernel.keys import Keys, derive
from ipcd.tables import purge

#: The repository root: the daemon imports bench.handlers from it.
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IPCD = str(BIN / "ipcd")
IPCCTL = str(BIN / "ipcctl")

#: Message types of the handlers every bench daemon has.
HANDLERS = """
[handlers.echo]
type = 2

[handlers.busy]
type = 3
target = "bench.handlers:busy"

[handlers.big]
type = 4
target = "bench.handlers:big"

[handlers.length]
type = 5
target = "bench.handlers:length"
"""


#: The ``[store]`` section of the bench's daemons (none before the job store, issue 12);
#: a daemon from an older commit gets none, as its configuration would refuse it.
STORE_SECTION = '\n[store]\npath = "jobs.db"\n'


def child_env(source: Path | None = None) -> dict[str, str]:
    """The environment for ipcd, ipcctl and python children: bytecode caching on (or each
    start recompiles ipcd), and the repository importable for bench.handlers; ``source``,
    a directory holding an older ``ipcd/``, ahead of it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    path = [str(source) if source else "", str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    return env


def export(rev: str, into: Path) -> str:
    """Write commit ``rev``'s ``ipcd/`` package under ``into``; its short hash.

    Raises RuntimeError with git's words when ``rev`` is unknown or this is no git
    checkout.
    """
    try:
        short = _git("rev-parse", "--short", f"{rev}^{{commit}}").decode().strip()
        tar = _git("archive", "--format=tar", short, "ipcd")
    except (OSError, subprocess.CalledProcessError) as exc:
        said = getattr(exc, "stderr", b"") or b""
        raise RuntimeError(
            f"cannot export ipcd at {rev!r}: {said.decode().strip() or exc}"
        ) from exc
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    return short


def compile_bytecode(source: Path | None) -> None:
    """Compile the bytecode of the ipcd of ``source`` (None: this checkout's), as an
    installed copy has it: a daemon that compiles its modules at start does so in the
    master before it forks, and the compiler's memory stays in every process's RSS
    (some 2.5 MiB more, idle, measured), and its first jobs pay for it."""
    where = (source or ROOT) / "ipcd"
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(where)], check=True)


def has_store(source: Path | None) -> bool:
    """Whether the ipcd of ``source`` (None: this checkout's) has a job store, whose
    ``[store]`` section the bench's daemons then get (an older one would refuse it)."""
    return source is None or (source / "ipcd" / "store").is_dir()


def _git(*args: str) -> bytes:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=True)
    return done.stdout


def role_pid(log: Path, role: str) -> int:
    """The pid of a daemon's helper ``role`` (``intake``, ``control``), from the last
    ``ROLE.started`` event in its JSON log ``log``."""
    found = 0
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == f"{role}.started":
            found = int(event["pid"])
    if not found:
        raise RuntimeError(f"no {role}.started event in {log}")
    return found


class BenchDaemon:
    """One running ipcd with ``workers`` workers, on a private configuration."""

    def __init__(
        self,
        name: str,
        *,
        workers: int,
        results_size: int = 1 << 20,
        slot_size: int = 4096,
        log_level: str = "info",
        source: Path | None = None,
        store: str = "",
        extra: str = "",
    ) -> None:
        """``source``: a directory with another commit's ``ipcd/`` for the daemon (export);
        ``store``: more ``[store]`` settings, TOML lines; ``extra``: more sections."""
        self.name = name
        self.workers = workers
        self.source = source
        self.dir = Path(tempfile.mkdtemp(prefix=f"ipcd-bench-{name}-"))
        self.config_path = self.dir / "ipcd.toml"
        self.config_path.write_text(
            textwrap.dedent(
                f"""
                [ipc]
                key_path = "ipcd.key"
                mode = 0o600

                [daemon]
                pid_file = "ipcd.pid"
                workdir = "."
                workers = {workers}
                graceful_timeout = 5.0
                stop_timeout = 10.0

                [log]
                file = "ipcd.log"
                level = "{log_level}"

                [results]
                size = {results_size}
                slot_size = {slot_size}
                """
            )
            + (STORE_SECTION + store if has_store(source) else "")
            + HANDLERS
            + extra
        )
        self.config = config_mod.load(self.config_path)
        self.keys: Keys | None = None
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.config)
        return self._client

    def start(self) -> BenchDaemon:
        """``ipcd start``, then wait until every worker is there and has served a job."""
        done = self.ipcd("start")
        self.keys = derive(self.config.ipc)  # the key file exists once start has run
        if done.returncode != 0:
            raise RuntimeError(f"ipcd start ({self.name}) failed: {done.stderr.strip()}")
        deadline = time.monotonic() + 10.0
        while len(self.worker_pids()) < self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: workers did not come up")
            time.sleep(0.01)
        for _ in range(self.workers * 4):
            result = self.client.call("echo", "warm-up", timeout=10.0)
            assert result.ok and result.value() == "warm-up", result
        return self

    def ipcd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [IPCD, "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            env=child_env(self.source),
            timeout=60,
            check=False,
        )

    def master_pid(self) -> int:
        return int((self.dir / "ipcd.pid").read_text())

    def worker_pids(self) -> list[int]:
        """The master's children, from /proc."""
        try:
            master = self.master_pid()
        except (OSError, ValueError):
            return []
        return children(master)

    def pids(self) -> list[int]:
        return [self.master_pid(), *self.worker_pids()]

    def role_pid(self, role: str) -> int:
        return role_pid(self.dir / "ipcd.log", role)

    def stop(self) -> None:
        """``ipcd stop``, remove every object at the daemon's keys, delete the directory."""
        try:
            if (self.dir / "ipcd.pid").exists():
                stopped = self.ipcd("stop")
                if stopped.returncode != 0:
                    print(
                        f"bench: ipcd stop ({self.name}): {stopped.stderr.strip()}", file=sys.stderr
                    )
            if self.keys is None and (self.dir / "ipcd.key").exists():
                self.keys = derive(self.config.ipc)
        finally:
            if self.keys is not None:
                purge.remove_all(self.keys.all())
            if self._client is not None:
                self._client.store.close()
                self._client = None
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join((self.dir / "ipcd.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""


def children(parent: int) -> list[int]:
    """PIDs whose parent is ``parent`` (zombies excluded)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != b"Z":
            found.append(int(entry.name))
    return sorted(found)
