"""One master per configuration: a kernel lock on a file beside the PID file.

A PID file alone cannot exclude a second daemon.  It is written a moment after it is
created, so a second start that reads it meanwhile finds it empty; it can be edited or
removed by hand; and a killed daemon's file names a PID another process may get.  So
``ipcd start`` first takes an exclusive lock on ``PID_FILE.lock`` (``ipcd.pid.lock``),
before it reads a handler or touches an IPC object, and the daemon holds it until it
exits.  The kernel is the judge: it drops the lock when the last holder is gone, however
it ended, and a lock held by nobody means no daemon, whatever the files say.

The lock is an open file description lock (``fcntl F_OFD_SETLK``, Linux 3.15):

- it belongs to the open file, not to a process, so it survives the fork to the final
  daemon process as long as that process keeps the descriptor (``files_preserve``); a
  classic POSIX lock (``lockf``) belongs to the process that took it and would not;
- anyone can test it without taking it (``F_OFD_GETLK``), so ``ipcd status`` never makes a
  concurrent start fail, as testing a ``flock(2)`` lock by taking it would.

The lock file holds the daemon's PID once the daemon knows it (empty while a start is in
progress, which is not "stale") and is never removed: removing a locked file would let the
next start lock a new file of the same name.  The PID file is written for systemd's
``PIDFile=`` and for people; nothing trusts it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from pathlib import Path

from ipcd.errors import AlreadyRunningError, IpcPermissionError, StartupError

#: struct flock (fcntl(2)): l_type, l_whence, l_start, l_len, l_pid, padding.
_FLOCK = struct.Struct("@hhqqi4x")
_WHOLE_FILE = (0, 0, 0)  # l_whence SEEK_SET, l_start 0, l_len 0 (to the end)


def lock_path(pid_file: Path) -> Path:
    return pid_file.with_name(pid_file.name + ".lock")


class PidLock:
    """The held lock: its descriptor, and the files it speaks for."""

    def __init__(self, fd: int, pid_file: Path) -> None:
        self.fd = fd
        self.pid_file = pid_file
        self.path = lock_path(pid_file)

    @classmethod
    def acquire(cls, pid_file: Path) -> PidLock:
        """Take the lock, or raise AlreadyRunningError naming the daemon that holds it.

        A PID file left by a daemon that is gone (the lock was free) is removed.
        """
        path = lock_path(pid_file)
        if not pid_file.parent.is_dir():
            raise StartupError(f"PID file directory {pid_file.parent} does not exist")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except PermissionError:
            raise IpcPermissionError(
                f"cannot open the lock file {path}: permission denied"
            ) from None
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, *_WHOLE_FILE, 0))
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise AlreadyRunningError(_held_message(pid_file)) from None
        with contextlib.suppress(OSError):  # (what cannot be removed fails record())
            pid_file.unlink()  # a dead daemon's: the lock was free
        return cls(fd, pid_file)

    def record(self, pid: int) -> None:
        """Say which process is the daemon: in the lock file, then in the PID file.

        The PID file is replaced (write, then rename), so that nobody reads half of it.
        """
        text = f"{pid}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)
        temporary = self.pid_file.with_name(f".{self.pid_file.name}.{pid}")
        try:
            temporary.write_bytes(text)
            os.replace(temporary, self.pid_file)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise StartupError(
                f"cannot write the PID file {self.pid_file}: {exc.strerror}"
            ) from None

    def release(self) -> None:
        """The daemon's last act: remove the PID file, empty the lock file, drop the lock."""
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        self.close()

    def close(self) -> None:
        """Close this descriptor; the lock stays while another process keeps its copy."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


def held(pid_file: Path) -> bool:
    """Whether a daemon (or a start in progress) holds the configuration's lock."""
    try:
        fd = os.open(lock_path(pid_file), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise IpcPermissionError(
            f"cannot read the lock file {lock_path(pid_file)}: permission denied"
        ) from None
    try:
        probe = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, *_WHOLE_FILE, 0))
    finally:
        os.close(fd)
    return int(_FLOCK.unpack(probe)[0]) != fcntl.F_UNLCK


def holder(pid_file: Path) -> int | None:
    """The PID of the daemon that holds the lock; None when nobody holds it, or while a
    start is in progress (the PID is not recorded yet)."""
    if not held(pid_file):
        return None
    return recorded_pid(pid_file)


def recorded_pid(pid_file: Path) -> int | None:
    """The PID the lock file names, if it names one."""
    try:
        text = lock_path(pid_file).read_text()
    except OSError:
        return None
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def _held_message(pid_file: Path) -> str:
    pid = recorded_pid(pid_file)
    if pid is None:
        return (
            f"another ipcd is starting with this configuration (it holds "
            f"{lock_path(pid_file)}; no PID recorded yet)"
        )
    return f"ipcd is already running (pid {pid}, lock {lock_path(pid_file)})"
