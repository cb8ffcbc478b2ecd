"""Shared fixtures: a private configuration per test, real daemons, and IPC hygiene.

Every test that touches the kernel gets its own key (from its own key file's inode) and
every queue, segment and semaphore made at that key is removed when the test ends; at
the end of the session the suite fails if any object made during the run is still there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipcd import config as config_mod
from ipcd.kernel import keys, vetting
from ipcd.tables import purge

BIN = Path(sys.executable).parent
IPCD = str(BIN / "ipcd")
IPCCTL = str(BIN / "ipcctl")
TESTS = Path(__file__).parent
#: Keys the fixtures made objects at: the only ones the end-of-session check may remove.
TEST_KEYS: set[int] = set()


@dataclass
class Instance:
    """One test's ipcd configuration and the paths it uses."""

    dir: Path
    config_path: Path

    @property
    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path)

    @property
    def keys(self) -> keys.Keys:
        return keys.derive(self.config.ipc, create_key_file=True)

    @property
    def pid_file(self) -> Path:
        return self.dir / "ipcd.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "ipcd.log"

    def write(self, extra: str = "", *, results: str = "", handlers: str | None = None) -> None:
        """(Re)write the config; ``handlers`` replaces the default echo/sleep/fail set."""
        if handlers is None:
            handlers = DEFAULT_HANDLERS
        self.config_path.write_text(
            textwrap.dedent(
                f"""
                [ipc]
                key_path = "ipcd.key"
                mode = 0o660
                send_timeout = 2.0

                [daemon]
                pid_file = "ipcd.pid"
                workdir = "."
                stop_timeout = 20.0
                workers = 2

                [log]
                file = "ipcd.log"
                level = "debug"

                [results]
                size = 262144
                slot_size = 2048
                {results}
                """
            )
            + textwrap.dedent(handlers)
            + textwrap.dedent(extra)
            # The job store beside the rest, unless the test configures [store] itself.
            + ("" if "[store]" in extra else '\n[store]\npath = "jobs.db"\n')
        )

    def ipcd(
        self, *args: str, check: bool = False, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return run([IPCD, "-c", str(self.config_path), *args], check=check, **kw)

    def ipcctl(
        self, *args: str, check: bool = False, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        return run([IPCCTL, "-c", str(self.config_path), *args], check=check, **kw)

    def pid(self) -> int:
        return int(self.pid_file.read_text())

    def wait_events(
        self, match: Callable[[dict[str, object]], bool], count: int, timeout: float = 20.0
    ) -> list[dict[str, object]]:
        """The log events that ``match``, once there are at least ``count`` of them.

        With several workers, jobs finish in any order: tests wait for the events they
        expect instead of assuming that a later job ends last.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.log_events() if match(e)]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def log_events(self) -> list[dict[str, object]]:
        import json

        if not self.log_file.exists():
            return []
        text = self.log_file.read_text()
        # A line being written may be read half-way: only whole lines count.
        whole = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in whole.splitlines() if line]


DEFAULT_HANDLERS = """
[handlers.echo]
type = 2

[handlers.sleep]
type = 3

[handlers.fail]
type = 4
"""


def run(argv: list[str], *, check: bool = False, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(TESTS / "plugins")}
    kw.setdefault("timeout", 60)
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, capture_output=True, text=True, check=check, env=env, **kw
    )


def remove_objects(instance: Instance) -> None:
    key_file = instance.dir / "ipcd.key"
    if not key_file.exists():
        return
    jobs = keys.ftok(key_file, 0x49)  # not from the config, which a test may have broken
    # n = 0 to 9: every key ipcd derives (ipcd.kernel.keys).
    made = tuple((jobs + n * keys.REPLY_KEY_OFFSET) & 0xFFFFFFFF for n in range(10))
    TEST_KEYS.update(made)
    purge.remove_all(made)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[Instance]:
    """A private configuration; its kernel objects are removed afterwards."""
    inst = Instance(tmp_path, tmp_path / "ipcd.toml")
    inst.write()
    yield inst
    _kill_leftover(inst)
    remove_objects(inst)


@pytest.fixture
def daemon(instance: Instance) -> Iterator[Instance]:
    """A daemon started with ``ipcd start`` on the private configuration."""
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    yield instance
    _kill_leftover(instance)


def _kill_leftover(inst: Instance) -> None:
    """SIGTERM (then SIGKILL) a daemon the test left running, without reading the config."""
    try:
        pid = inst.pid()
    except (OSError, ValueError):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(250):
            if not _running(pid):
                return
            time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _sysv_objects() -> set[tuple[str, int, int]]:
    """Every SysV object but removed segments still attached by an exiting process (key 0;
    ipcd never makes IPC_PRIVATE objects)."""
    return {o for o in vetting.sysv_objects() if not (o[0] == "shm" and o[1] == 0)}


def spill_segments() -> set[int]:
    """Ids of the spill segments on the host (key 0, no process attached, ipcd's spill
    header): the one kind of IPC_PRIVATE object ipcd makes, which a leak would leave."""
    import sysv_ipc

    from ipcd.tables.spill.segment import MAGIC as SEGMENT_MAGIC

    found = set()
    with open("/proc/sysvipc/shm") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            if int(fields[0]) != 0 or int(fields[6]) != 0:
                continue
            try:
                shm = sysv_ipc.attach(int(fields[1]), None, sysv_ipc.SHM_RDONLY)
            except (sysv_ipc.Error, OSError, ValueError):
                continue
            try:
                if shm.size >= 8 and shm.read(8, 0) == SEGMENT_MAGIC:
                    found.add(int(fields[1]))
            finally:
                shm.detach()
    return found


_BEFORE: set[tuple[str, int, int]] = set()
_SPILL_BEFORE: set[int] = set()


def _private_ipc_namespace() -> bool:
    """Whether pytest got an IPC namespace of its own (``unshare --ipc pytest``, as ``make
    test`` runs the suite where it can): then every object in it is the suite's.

    unshare execs pytest in the new namespace, so pytest's parent (make, a shell) is still
    in the one it left; PID 1's namespace may be unreadable in a sandbox.
    """
    try:
        own = os.stat("/proc/self/ns/ipc").st_ino
        return own != os.stat(f"/proc/{os.getppid()}/ns/ipc").st_ino
    except OSError:  # the parent's is unreadable: assume the namespace is shared
        return False


PRIVATE_IPC = _private_ipc_namespace()


def _ignore(signum: int, frame: object) -> None:
    """Stands in for SIG_IGN in the test process: a handled signal is reset to its
    default action at exec, an ignored one stays ignored in every child."""


def pytest_configure(config: pytest.Config) -> None:
    """Give the processes the tests start default signal dispositions, however the suite
    was started.

    A shell starts a background job (``make test &``) with SIGINT and SIGQUIT ignored,
    and ``nohup`` ignores SIGHUP; an ignored signal stays ignored across fork and exec, so
    an ``ipcctl logs -f`` that a test stops with SIGINT, as Ctrl-C would, would never
    end.  Replacing SIG_IGN by a handler here keeps this process's behaviour (SIGINT
    still interrupts pytest) while every child starts with SIG_DFL.
    """
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
        if signal.getsignal(signum) == signal.SIG_IGN:
            handler = signal.default_int_handler if signum == signal.SIGINT else _ignore
            signal.signal(signum, handler)


def pytest_sessionstart(session: pytest.Session) -> None:
    # ipcctl's compiled configurations (ipcd.lean.cache) go to a directory of the run's
    # own, removed at its end, not to the user's ~/.cache.
    _CACHE_DIR.append(tempfile.mkdtemp(prefix="ipcd-test-cache-"))
    os.environ["XDG_CACHE_HOME"] = _CACHE_DIR[0]
    _BEFORE.update(_sysv_objects())
    _SPILL_BEFORE.update(spill_segments())


_CACHE_DIR: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if the suite left any queue, segment or semaphore behind.

    In a private IPC namespace every object is the suite's, so anything new is a leak.
    In the host's namespace another suite or program may make objects meanwhile, so only
    objects at the keys the fixtures used count, and key-0 spill segments, which cannot
    be told apart from another daemon's, are not checked (a line says so).  Leaked
    objects at the fixtures' keys are removed; others are only reported.
    """
    for cache_dir in _CACHE_DIR:
        shutil.rmtree(cache_dir, ignore_errors=True)
    left = sorted(o for o in _sysv_objects() - _BEFORE if PRIVATE_IPC or o[1] in TEST_KEYS)
    if left:
        listing = ", ".join(f"{kind} key {key:#010x} id {id_}" for kind, key, id_ in left)
        print(f"\nIPC objects made during the test run remain: {listing}", file=sys.stderr)
        purge.remove_all(tuple({key for _, key, _ in left if key in TEST_KEYS}))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if not PRIVATE_IPC:
        print(
            "\nspill-segment leak check not run: the suite shares the host's IPC namespace "
            "(run it as root under `unshare --ipc`, as `make test` does, to check them)",
            file=sys.stderr,
        )
        return
    leaked = sorted(spill_segments() - _SPILL_BEFORE)
    if leaked:
        # Key 0 hides them from the check above; their header names them as ipcd's.
        print(f"\nspill segments leaked during the test run: ids {leaked}", file=sys.stderr)
        import sysv_ipc

        for shmid in leaked:
            with contextlib.suppress(sysv_ipc.Error):
                sysv_ipc.remove_shared_memory(shmid)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
