"""The kernel border, part one: message queues, and bounding every blocking call.

Three small modules own the kernel objects and are the only ones to import ``sysv_ipc``:
this one (queues), ipcd.shm (the shared-memory segments and semaphores) and ipcd.vetting
(checking, adopting and removing objects at ipcd's keys).  They turn sysv_ipc's
exceptions into ipcd's and bound every blocking call (``msgrcv``, ``msgsnd`` on a full
queue, ``semop``).

Receiving into shared memory: the daemon's workers call ``msgrcv(2)`` through ctypes with
the destination buffer inside their in-flight slot (ipcd.inflight), so the kernel itself
copies each job into memory that outlives the worker.  No Python code runs between the
kernel taking the message off the queue and the job being recorded, which is what lets
ipcd promise that a worker killed at any instant loses nothing (sysv_ipc only receives
into a private bytes object).

Bounding blocking calls: sysv_ipc's ``receive()`` and blocking ``send()`` take no timeout,
and the PyPI wheel of sysv_ipc is built without ``semtimedop``.  A blocking call is
bounded with a one-shot ``ITIMER_REAL`` whose SIGALRM interrupts the system call (Linux
never restarts ``msgrcv``/``msgsnd``/``semop`` after a handler, see signal(7)); sysv_ipc
then raises its base ``Error``.  Signals can only be handled in the main thread, so in
any other thread the call falls back to non-blocking attempts with a capped back-off.
"""

from __future__ import annotations

import _signal
import contextlib
import errno
import os
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, NamedTuple, TypeVar

import sysv_ipc

from ipcd.errors import (
    IpcdError,
    IpcPermissionError,
    NotRunningError,
    PayloadError,
    QueueFullError,
    WaitTimeoutError,
)
from ipcd.keys import as_key_t
from ipcd.vetting import ObjectInfo, check_safe, open_or_create, refuse_world_writable

T = TypeVar("T")

MSGMAX_PATH = "/proc/sys/kernel/msgmax"
SYSVIPC_MSG = "/proc/sysvipc/msg"


class Interrupted(IpcdError, InterruptedError):
    """A blocking call was interrupted by a signal other than ipcd's own deadline."""


class TooBigError(IpcdError, OSError):
    """The message at the head of the queue is larger than the buffer (E2BIG)."""


#: msgrcv's type for "lowest type first, any type": the most negative C long.  Lower
#: types are served first, so control messages (type 1) and urgent job types overtake.
ANY_BY_PRIORITY = -(2**63 - 1)


class _Libc:
    """libc's msgrcv through ctypes, loaded on first use: only workers receive into memory,
    and the cron-facing client path should not pay for ctypes."""

    _msgrcv: Any = None

    @classmethod
    def msgrcv(cls) -> Any:
        if cls._msgrcv is None:
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).msgrcv
            fn.argtypes = [
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.c_long,
                ctypes.c_int,
            ]
            fn.restype = ctypes.c_ssize_t
            cls._msgrcv = fn
        return cls._msgrcv

    @staticmethod
    def errno() -> int:
        import ctypes

        return ctypes.get_errno()


def receive_function() -> Any:
    """libc's msgrcv, loaded now (see _Libc)."""
    return _Libc.msgrcv()


def msgmax() -> int:
    """The kernel's largest message, in bytes: the receive buffer must be this large."""
    try:
        with open(MSGMAX_PATH, "rb") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 8192  # Linux's default since 2.6; only reached without /proc


class QueueStats(NamedTuple):
    """What the kernel knows about a queue (``msqid_ds``)."""

    key: int
    messages: int
    bytes: int
    max_bytes: int
    mode: int
    uid: int
    gid: int
    last_send_pid: int
    last_receive_pid: int


# --- bounding blocking calls -------------------------------------------------------------


class _Alarm:
    """A one-shot SIGALRM for bounding one system call; records whether it fired."""

    fired = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.fired = True


def bounded(call: Callable[[bool], T], timeout: float | None) -> T:
    """Run ``call(block)`` for at most ``timeout`` seconds; ``None`` waits forever.

    ``call(False)`` must raise ``sysv_ipc.BusyError`` when it would block.  Raises
    ``TimeoutError`` when the time runs out and :class:`Interrupted` for any other signal.
    """
    if timeout is None:
        try:
            return call(True)
        except sysv_ipc.BusyError:
            raise
        except sysv_ipc.Error as exc:
            if type(exc) is sysv_ipc.Error:
                raise Interrupted(str(exc)) from None
            raise
    if timeout <= 0:
        try:
            return call(False)
        except sysv_ipc.BusyError:
            raise TimeoutError from None
    try:
        return call(False)  # the common case costs no timer
    except sysv_ipc.BusyError:
        pass
    alarm = _Alarm()
    started = time.monotonic()
    # _signal, not signal: signal.signal's enum conversions cost ~7 us a call, twice per
    # wait, and the client never imports the signal module (1.3 ms of its start-up).
    try:
        previous = _signal.signal(_signal.SIGALRM, alarm._handler)
    except ValueError:  # not the main thread: no signal handlers here
        return _bounded_by_backoff(call, timeout)
    outer_delay, outer_interval = _signal.setitimer(_signal.ITIMER_REAL, timeout)
    try:
        return call(True)
    except sysv_ipc.BusyError:  # pragma: no cover - blocking calls do not raise it
        raise TimeoutError from None
    except sysv_ipc.Error as exc:
        if type(exc) is not sysv_ipc.Error:
            raise
        # The Python-level handler may not have run yet when sysv_ipc raises, so the
        # clock, not only the flag, tells our alarm from another signal.
        if alarm.fired or time.monotonic() - started >= timeout * 0.999:
            raise TimeoutError from None
        raise Interrupted(str(exc)) from None
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, previous)
        if outer_delay > 0:
            # Someone else's timer (a test runner's, an application's) was running: give it
            # back what is left of it, firing at once if it fell due meanwhile.
            left = outer_delay - (time.monotonic() - started)
            _signal.setitimer(_signal.ITIMER_REAL, max(left, 1e-6), outer_interval)


def spin_wait(poll: Callable[[], T | None], seconds: float) -> T | None:
    """Call ``poll`` until it returns something or ``seconds`` have passed, giving the CPU
    away between calls.

    Why: a process that blocks in msgrcv is put to sleep, and on a virtual machine waking
    it (an IPI to a halted vCPU) costs more than the whole exchange it waits for.  When
    the answer is due within microseconds, as a worker's reply is, polling for a moment
    first halves a round trip.  sched_yield lets the peer run first when both share a CPU.
    """
    end = time.monotonic() + seconds
    while True:
        got = poll()
        if got is not None or time.monotonic() >= end:
            return got
        os.sched_yield()


def _bounded_by_backoff(call: Callable[[bool], T], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        try:
            return call(False)
        except sysv_ipc.BusyError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)


# --- message queues -------------------------------------------------------------------------


class Queue:
    """A SysV message queue: the job queue or the reply queue."""

    def __init__(self, mq: sysv_ipc.MessageQueue, key: int, limit: int | None = None) -> None:
        self._mq = mq
        self.key = key
        self._limit = msgmax() if limit is None else limit

    @classmethod
    def open(cls, key: int, *, what: str = "queue") -> Queue:
        """Open an existing queue; a missing one means the daemon never ran here."""
        limit = msgmax()
        try:
            mq = sysv_ipc.MessageQueue(as_key_t(key), 0, max_message_size=limit)
        except sysv_ipc.ExistentialError:
            raise NotRunningError(
                f"no {what} at key {key:#010x}: is ipcd running with this configuration?"
            ) from None
        except sysv_ipc.PermissionsError:
            raise IpcPermissionError(
                f"permission denied opening the {what} at key {key:#010x} "
                "(are you in the daemon's group?)"
            ) from None
        queue = cls(mq, key, limit)
        refuse_world_writable(queue.info(what))
        return queue

    @classmethod
    def create(cls, key: int, mode: int, *, what: str = "queue") -> Queue:
        """Create the queue, or open and vet the one already there (the daemon's side)."""
        mq = open_or_create(
            lambda flags: sysv_ipc.MessageQueue(
                as_key_t(key), flags, mode, max_message_size=msgmax()
            ),
            what,
            key,
        )
        queue = cls(mq, key)
        check_safe(queue.info(what), mode)
        return queue

    def info(self, kind: str = "queue") -> ObjectInfo:
        """Owner and mode, as the kernel reports them now."""
        return ObjectInfo(kind, self.key, self._mq.uid, self._mq.gid, self._mq.mode & 0o777)

    def fits(self, size: int) -> bool:
        """Whether a message of ``size`` bytes is within the kernel's msgmax (read again
        only when a message looks too large for the value known)."""
        if size > self._limit:
            self._limit = msgmax()
        return size <= self._limit

    def send(self, body: bytes, type_: int, *, timeout: float | None) -> None:
        """Send one message, waiting at most ``timeout`` seconds while the queue is full."""

        def call(block: bool) -> None:
            self._mq.send(body, block, type_)

        if not self.fits(len(body)):
            raise PayloadError(
                f"message of {len(body)} bytes exceeds the kernel's msgmax of {self._limit} bytes"
            )
        try:
            bounded(call, timeout)
        except TimeoutError:
            raise QueueFullError(
                f"queue {self.key:#010x} stayed full for {timeout:g}s; the job was not accepted"
            ) from None
        except sysv_ipc.ExistentialError:
            raise NotRunningError(f"queue {self.key:#010x} was removed") from None
        except sysv_ipc.PermissionsError:
            raise IpcPermissionError(
                f"permission denied writing to queue {self.key:#010x}"
            ) from None
        except ValueError as exc:  # sysv_ipc's own size check, should msgmax have shrunk
            raise PayloadError(f"message refused: {exc}") from None

    def send_nowait(self, body: bytes, type_: int) -> bool:
        """Send without waiting; ``False`` when the queue is full."""
        try:
            self._mq.send(body, False, type_)
        except sysv_ipc.BusyError:
            return False
        return True

    def receive(self, type_: int = 0, *, timeout: float | None = None) -> tuple[bytes, int]:
        """Take one message (``msgrcv``); ``type_`` follows msgrcv(2) (0: any, -N: lowest <= N).

        Raises :class:`Interrupted` when a signal arrives while blocked, ``WaitTimeoutError``
        when ``timeout`` runs out.
        """

        def call(block: bool) -> tuple[bytes, int]:
            return self._receive(block, type_)

        try:
            return bounded(call, timeout)
        except TimeoutError:
            raise WaitTimeoutError(f"nothing arrived within {timeout:g}s") from None
        except sysv_ipc.ExistentialError:
            raise NotRunningError(f"queue {self.key:#010x} was removed") from None

    def receive_nowait(self, type_: int = 0) -> tuple[bytes, int] | None:
        """Take one message if there is one."""
        try:
            return self._receive(False, type_)
        except sysv_ipc.BusyError:
            return None

    def _receive(self, block: bool, type_: int) -> tuple[bytes, int]:
        try:
            body, got = self._mq.receive(block, type_)
        except OSError as exc:
            if exc.errno != errno.E2BIG:
                raise
            # msgmax was raised after we opened the queue: a larger message now sits at
            # the head and would jam it.  Reopen with the new maximum and take it.
            self._mq = sysv_ipc.MessageQueue(
                as_key_t(self.key), 0, max_message_size=max(msgmax(), 1 << 16)
            )
            body, got = self._mq.receive(block, type_)
        return body, got

    def receive_into(self, address: int, size: int, type_: int = ANY_BY_PRIORITY) -> int:
        """``msgrcv`` straight into memory at ``address`` (a ``struct msgbuf``: the C long
        type, then up to ``size`` bytes of text); returns the text's length.

        Blocks until a message comes.  Raises :class:`Interrupted` on a signal and
        :class:`TooBigError` when the head message exceeds ``size`` (it stays queued).
        """
        n = _Libc.msgrcv()(self._mq.id, address, size, type_, 0)
        if n >= 0:
            return int(n)
        err = _Libc.errno()
        if err == errno.EINTR:
            raise Interrupted("msgrcv interrupted by a signal")
        if err == errno.E2BIG:
            raise TooBigError(err, "message larger than the receive buffer")
        if err in (errno.EIDRM, errno.EINVAL):
            raise NotRunningError(f"queue {self.key:#010x} was removed")
        raise OSError(err, os.strerror(err))

    def receive_spinning(self, type_: int, spin: float) -> tuple[bytes, int] | None:
        """A message of ``type_`` if one comes within ``spin`` seconds (see spin_wait)."""
        try:
            return spin_wait(lambda: self.receive_nowait(type_), spin)
        except sysv_ipc.ExistentialError:
            raise NotRunningError(f"queue {self.key:#010x} was removed") from None

    def set_max_bytes(self, max_bytes: int) -> bool:
        """Raise ``msg_qbytes``; False when the kernel refuses (no CAP_SYS_RESOURCE)."""
        if self._mq.max_size >= max_bytes:
            return True
        try:
            self._mq.max_size = max_bytes
        except (sysv_ipc.PermissionsError, ValueError, OSError):
            return False
        return self._mq.max_size >= max_bytes

    def stats(self) -> QueueStats:
        """Depth and bytes from /proc (sysv_ipc does not expose ``msg_cbytes``)."""
        messages, cbytes = _proc_queue_counts(self._mq.id)
        return QueueStats(
            key=self.key,
            messages=messages if messages >= 0 else self._mq.current_messages,
            bytes=cbytes,
            max_bytes=self._mq.max_size,
            mode=self._mq.mode & 0o777,
            uid=self._mq.uid,
            gid=self._mq.gid,
            last_send_pid=self._mq.last_send_pid,
            last_receive_pid=self._mq.last_receive_pid,
        )

    def remove(self) -> None:
        """Remove the queue and every message in it."""
        with contextlib.suppress(sysv_ipc.ExistentialError):
            self._mq.remove()


def _proc_queue_counts(msqid: int) -> tuple[int, int]:
    try:
        with open(SYSVIPC_MSG) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if int(fields[1]) == msqid:
                    return int(fields[4]), int(fields[3])
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    return -1, -1
