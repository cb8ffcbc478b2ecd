"""Detaching (python-daemon) and the PID file (lockfile): the ``Type=forking`` contract.

``ipcd start`` must return only once the daemon takes jobs, and fail with the reason on
stderr when it cannot, because systemd (``Type=forking``) and init scripts treat the exit
of the starting process as "ready".  python-daemon's ``DaemonContext.open()`` ends the
calling process at its first fork, so the starting process forks once itself: the child
calls ``open()`` (double fork, ``setsid``, chdir, umask, descriptors closed, stdio to
/dev/null, PID file), and the final daemon process writes ``ok`` or ``error: …`` into a
pipe the starting process reads.  The ``daemon`` and ``lockfile`` packages are imported
only here.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import daemon
import daemon.pidfile
import lockfile
import lockfile.pidlockfile

from ipcd.errors import AlreadyRunningError, IpcdError, NotRunningError, StartupError
from ipcd.procs import alive
from ipcd.signals import Flags

READY = b"ok\n"


def read_pid(pid_file: Path) -> int | None:
    """The PID recorded in the file, or None when there is no readable PID in it."""
    try:
        text = pid_file.read_text()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        return None
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def running_pid(pid_file: Path) -> int | None:
    """The PID of the live ipcd that owns ``pid_file``, or None."""
    pid = read_pid(pid_file)
    if pid is None or not _is_ipcd(pid):
        return None
    return pid


def _is_ipcd(pid: int) -> bool:
    """Alive and an ipcd, so that a PID reused by another program does not block a start."""
    if not alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # alive; without /proc, assume it is ours
    return b"ipcd" in cmdline


def claim_pid_file(pid_file: Path) -> None:
    """Refuse when another instance runs; remove a stale file left by a killed one."""
    pid = running_pid(pid_file)
    if pid is not None:
        raise AlreadyRunningError(f"ipcd is already running (pid {pid}, PID file {pid_file})")
    if pid_file.exists():
        lockfile.pidlockfile.PIDLockFile(str(pid_file)).break_lock()
    if not pid_file.parent.is_dir():
        raise StartupError(f"PID file directory {pid_file.parent} does not exist")


def start_detached(
    *,
    pid_file: Path,
    workdir: Path,
    umask: int,
    flags: Flags,
    keep_fds: list[int],
    run: Callable[[Callable[[], None]], None],
    drop_privileges: Callable[[], None] = lambda: None,
    timeout: float = 30.0,
) -> int:
    """Detach and run ``run(ready)`` in the daemon; returns the daemon's PID once ready.

    Raises StartupError with the daemon's own message when it fails before ``ready()``.
    """
    claim_pid_file(pid_file)
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the detached processes
        os.close(read_fd)
        _become_daemon(
            pid_file, workdir, umask, flags, [*keep_fds, write_fd], write_fd, run, drop_privileges
        )
    os.close(write_fd)
    os.waitpid(child, 0)  # exits at python-daemon's first fork
    try:
        message = _read_status(read_fd, timeout)
    finally:
        os.close(read_fd)
    if message != READY:
        text = message.decode("utf-8", "replace").strip()
        if text.startswith("error: "):
            raise StartupError(text.removeprefix("error: "))
        raise StartupError(text or "the daemon exited during start-up (see its log)")
    pid = read_pid(pid_file)
    if pid is None:
        raise StartupError(f"the daemon reported ready but wrote no PID to {pid_file}")
    return pid


def _read_status(fd: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"error: the daemon did not become ready within %g seconds" % timeout
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        chunks.append(chunk)
        if not chunk or b"\n" in chunk:
            # One line says it all; the daemon's children may hold the pipe open.
            return b"".join(chunks)


def _become_daemon(  # pragma: no cover - runs in the detached processes
    pid_file: Path,
    workdir: Path,
    umask: int,
    flags: Flags,
    keep_fds: list[int],
    status_fd: int,
    run: Callable[[Callable[[], None]], None],
    drop_privileges: Callable[[], None],
) -> None:
    """The child's path: detach, take the PID file, serve; never returns."""
    code = 0
    try:
        # Before the PID file, so the daemon's own user owns (and can remove) it; and
        # before DaemonContext, which records the ids it will set again in open().
        drop_privileges()
    except OSError as exc:
        _report(status_fd, f"cannot switch to the configured user: {exc.strerror}")
        os._exit(77)
    context = daemon.DaemonContext(
        detach_process=True,
        working_directory=str(workdir),
        umask=umask,
        pidfile=daemon.pidfile.TimeoutPIDLockFile(str(pid_file), acquire_timeout=0),
        files_preserve=keep_fds,
        signal_map=flags.signal_map(),
        stdin=None,
        stdout=None,
        stderr=sys.stderr if journal_stderr() else None,
    )
    reported = False

    def ready() -> None:
        nonlocal reported
        os.write(status_fd, READY)
        os.close(status_fd)
        reported = True

    try:
        context.open()
        run(ready)
    except lockfile.AlreadyLocked:
        code = 1
        _report(status_fd, f"another ipcd took the PID file {pid_file} meanwhile")
    except IpcdError as exc:
        code = exc.exit_code
        if not reported:
            _report(status_fd, str(exc))
    except BaseException as exc:  # the daemon's top level: report whatever ended it
        code = 70
        if not reported:
            _report(status_fd, f"{type(exc).__name__}: {exc}")
    finally:
        context.close()
    os._exit(code)


def journal_stderr() -> bool:
    """Whether stderr is systemd's journal stream (``$JOURNAL_STREAM`` names its device
    and inode, see systemd.exec(5)): the daemon then keeps it, for what it can say
    nowhere else (its log file refusing lines); any other stderr, a terminal, it closes."""
    try:
        dev, ino = (int(n) for n in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(2)
    except (KeyError, ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _report(fd: int, message: str) -> None:
    try:
        os.write(fd, f"error: {message}\n".encode())
        os.close(fd)
    except OSError:
        pass


def stop(pid_file: Path, timeout: float) -> int:
    """SIGTERM the daemon and wait until it is gone; returns its PID."""
    pid = running_pid(pid_file)
    if pid is None:
        raise NotRunningError(f"ipcd is not running (no live PID in {pid_file})")
    os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, timeout):
        raise StartupError(f"ipcd (pid {pid}) did not stop within {timeout:g}s")
    return pid


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that is not our child to exit, with a pidfd (no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def signal_daemon(pid_file: Path, signum: int) -> int:
    pid = running_pid(pid_file)
    if pid is None:
        raise NotRunningError(f"ipcd is not running (no live PID in {pid_file})")
    os.kill(pid, signum)
    return pid
