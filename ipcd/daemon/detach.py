"""Detaching (python-daemon) and the one-master lock: the ``Type=forking`` contract.

``ipcd start`` must return only once the daemon takes jobs, and fail with the reason on
stderr when it cannot, because systemd (``Type=forking``) and init scripts treat the exit
of the starting process as "ready".  python-daemon's ``DaemonContext.open()`` ends the
calling process at its first fork, so the starting process forks once itself: the child
calls ``open()`` (double fork, ``setsid``, chdir, umask, descriptors closed but the lock's,
stdio to /dev/null), and the final daemon process records its PID (ipcd.daemon.pidlock) and
writes ``ok`` or ``error: …`` into a pipe the starting process reads.  The ``daemon``
package is imported only here.

Whether a daemon runs is the kernel's lock on ``PID_FILE.lock`` (ipcd.daemon.pidlock), taken by
the starting process before anything else and kept by the daemon until it exits, never
what the PID file says.
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

from ipcd.daemon import pidlock, reloading
from ipcd.daemon.pidlock import PidLock
from ipcd.daemon.signals import Flags
from ipcd.errors import (
    IpcdError,
    NotRunningError,
    ReloadFailedError,
    StartupError,
    WaitTimeoutError,
)

READY = b"ok\n"
#: How long ``ipcd reload`` waits for the daemon's outcome (a reload imports handlers).
RELOAD_TIMEOUT = 30.0


def running_pid(pid_file: Path) -> int | None:
    """The PID of the live ipcd that holds the configuration's lock, or None (a PID file
    with no lock held is a dead daemon's, whatever PID it names)."""
    return pidlock.holder(pid_file)


def start_detached(
    *,
    lock: PidLock,
    workdir: Path,
    umask: int,
    flags: Flags,
    keep_fds: list[int],
    run: Callable[[Callable[[], None]], None],
    drop_privileges: Callable[[], None] = lambda: None,
    timeout: float = 30.0,
) -> int:
    """Detach and run ``run(ready)`` in the daemon; returns the daemon's PID once ready.

    ``lock`` (taken by the caller before anything else) goes with the daemon, which holds
    it until it exits.  Raises StartupError with the daemon's own message when it fails
    before ``ready()``.
    """
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the detached processes
        os.close(read_fd)
        _become_daemon(
            lock, workdir, umask, flags, [*keep_fds, write_fd], write_fd, run, drop_privileges
        )
    os.close(write_fd)
    lock.close()  # the daemon's copy holds the lock from here on
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
    pid = pidlock.recorded_pid(lock.pid_file)
    if pid is None:
        raise StartupError(f"the daemon reported ready but recorded no PID in {lock.path}")
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
    lock: PidLock,
    workdir: Path,
    umask: int,
    flags: Flags,
    keep_fds: list[int],
    status_fd: int,
    run: Callable[[Callable[[], None]], None],
    drop_privileges: Callable[[], None],
) -> None:
    """The child's path: detach, record the PID, serve, release the lock; never returns."""
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
        files_preserve=[*keep_fds, lock.fd],  # it closes every other descriptor
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
        lock.record(os.getpid())
        run(ready)
    except IpcdError as exc:
        code = exc.exit_code
        if not reported:
            _report(status_fd, str(exc))
    except BaseException as exc:  # the daemon's top level: report whatever ended it
        code = 70
        if not reported:
            _report(status_fd, f"{type(exc).__name__}: {exc}")
    finally:
        lock.release()
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


def stop(
    pid_file: Path,
    timeout: float,
    *,
    waiting: Callable[[int], None] | None = None,
    quiet_for: float = 1.0,
) -> int:
    """SIGTERM the daemon and wait until it is gone; returns its PID.

    A daemon whose workers are busy takes up to ``graceful_timeout`` to stop: when it is
    not gone after ``quiet_for`` seconds, ``waiting(pid)`` is called once (the CLI says on
    stderr what it waits for), and the wait goes on up to ``timeout`` in all.
    """
    pid = running_pid(pid_file)
    if pid is None:
        raise NotRunningError(_not_running(pid_file))
    os.kill(pid, signal.SIGTERM)
    started = time.monotonic()
    if waiting is not None and quiet_for < timeout and not wait_gone(pid, quiet_for):
        waiting(pid)
    if not wait_gone(pid, max(timeout - (time.monotonic() - started), 0.0)):
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


def reload(pid_file: Path, timeout: float) -> int:
    """SIGHUP the daemon and wait for the outcome of the reload it starts; returns its PID.

    Raises ReloadFailedError with the daemon's own error when it could not reload (it
    keeps its old configuration), WaitTimeoutError when no outcome came within
    ``timeout`` (see ipcd.daemon.reloading).
    """
    pid = running_pid(pid_file)
    if pid is None:
        raise NotRunningError(_not_running(pid_file))
    before = reloading.read(pid_file)
    sent = time.monotonic()
    os.kill(pid, signal.SIGHUP)
    outcome = reloading.wait(
        pid_file, pid, after=before, sent=sent, timeout=timeout,
        running=lambda: running_pid(pid_file) == pid,
    )  # fmt: skip
    if outcome is None:
        if running_pid(pid_file) != pid:
            raise StartupError(f"ipcd (pid {pid}) exited during the reload (see its log)")
        raise WaitTimeoutError(
            f"ipcd (pid {pid}) did not report the reload's outcome within {timeout:g}s "
            "(see its log)"
        )
    if outcome.error:
        raise ReloadFailedError(
            f"reload failed, ipcd (pid {pid}) keeps its old configuration: {outcome.error}",
            outcome.exit_code,
        )
    return pid


def _not_running(pid_file: Path) -> str:
    return f"ipcd is not running (nothing holds {pidlock.lock_path(pid_file)})"
