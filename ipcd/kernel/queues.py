"""The kernel border, part one: message queues.

Three small modules own the kernel objects and, with ipcd.kernel.waits (which bounds every
blocking call: ``msgrcv``, ``msgsnd`` on a full queue, ``semop``), are the only ones to
import ``sysv_ipc``: this one (queues), ipcd.kernel.segments (the shared-memory segments and
semaphores) and ipcd.kernel.vetting (checking, adopting and removing objects at ipcd's keys).
They turn sysv_ipc's exceptions into ipcd's.

Receiving into shared memory: the daemon's workers call ``msgrcv(2)`` through ctypes with
the destination buffer inside their in-flight slot (ipcd.tables.inflight), so the kernel itself
copies each job into memory that outlives the worker.  No Python code runs between the
kernel taking the message off the queue and the job being recorded, which is what lets
ipcd promise that a worker killed at any instant loses nothing (sysv_ipc only receives
into a private bytes object).

Every blocking call here is bounded by ipcd.kernel.waits.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Collection
from typing import Any, NamedTuple

import sysv_ipc

from ipcd.errors import (
    IpcdError,
    IpcPermissionError,
    NotRunningError,
    PayloadError,
    QueueFullError,
    WaitTimeoutError,
)
from ipcd.kernel.keys import as_key_t
from ipcd.kernel.vetting import ObjectInfo, check_safe, describe, open_existing, open_or_create
from ipcd.kernel.waits import Interrupted, bounded, spin_wait

MSGMAX_PATH = "/proc/sys/kernel/msgmax"
SYSVIPC_MSG = "/proc/sysvipc/msg"


#: Room for a doorbell message (ipcd.daemon.doorbell sends one byte).
DOORBELL_ROOM = 64
#: msgrcv's flags: return ENOMSG at once rather than wait; cut a message too long for
#: the buffer rather than refuse it.
IPC_NOWAIT = 0o4000
MSG_NOERROR = 0o10000


class TooBigError(IpcdError, OSError):
    """The message at the head of the queue is larger than the buffer (E2BIG)."""


#: msgrcv's type for "lowest type first, any type": the most negative C long.  Lower
#: types are served first, so urgent job types overtake.  Every type is a job type: no
#: type is reserved for ipcd (see ipcd.daemon.signals for how workers are woken).
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


# --- message queues -------------------------------------------------------------------------


class Queue:
    """A SysV message queue: the job queue or the reply queue."""

    def __init__(self, mq: sysv_ipc.MessageQueue, key: int, limit: int | None = None) -> None:
        self._mq = mq
        self.key = key
        self._limit = msgmax() if limit is None else limit

    @classmethod
    def open(cls, key: int, *, what: str = "queue") -> Queue:
        """Open an existing queue; a missing one means the daemon never ran here, a
        planted one is refused (vetting.refuse_untrusted)."""
        limit = msgmax()
        mq = open_existing(
            lambda: sysv_ipc.MessageQueue(as_key_t(key), 0, max_message_size=limit), what, key
        )
        return cls(mq, key, limit)

    @classmethod
    def create(
        cls, key: int, mode: int, *, what: str = "queue", trusted: Collection[int] = ()
    ) -> Queue:
        """Create the queue, or open and vet the one already there (the daemon's side);
        ``trusted``: uids besides ours that may own it (vetting.check_safe)."""
        mq = open_or_create(
            lambda flags: sysv_ipc.MessageQueue(
                as_key_t(key), flags, mode, max_message_size=msgmax()
            ),
            what,
            key,
        )
        queue = cls(mq, key)
        check_safe(queue.info(what), mode, trusted)
        return queue

    @property
    def id(self) -> int:
        """The kernel's id of the queue (``msqid``): another one at the same key has another."""
        return int(self._mq.id)

    def info(self, kind: str = "queue") -> ObjectInfo:
        """Owner, creator and mode, as the kernel reports them now."""
        return describe(self._mq, kind, self.key)

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
        except sysv_ipc.ExistentialError:
            raise NotRunningError(f"queue {self.key:#010x} was removed") from None
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
        n = self._msgrcv_into(address, size, type_, 0)
        assert n is not None  # only IPC_NOWAIT returns without a message
        return n

    def receive_into_nowait(
        self, address: int, size: int, type_: int = ANY_BY_PRIORITY
    ) -> int | None:
        """:meth:`receive_into` without waiting: None when no message waits."""
        return self._msgrcv_into(address, size, type_, IPC_NOWAIT)

    def wait_any(self) -> None:
        """Take one message of any type and drop it: a doorbell, whose arrival is all it
        says (ipcd.daemon.doorbell).  Raises :class:`Interrupted` on a signal."""
        import ctypes

        buf = ctypes.create_string_buffer(8 + DOORBELL_ROOM)
        self._msgrcv_into(ctypes.addressof(buf), DOORBELL_ROOM, 0, MSG_NOERROR)

    def _msgrcv_into(self, address: int, size: int, type_: int, flags: int) -> int | None:
        n = _Libc.msgrcv()(self._mq.id, address, size, type_, flags)
        if n >= 0:
            return int(n)
        err = _Libc.errno()
        if err == errno.EINTR:
            raise Interrupted("msgrcv interrupted by a signal")
        if err == errno.ENOMSG and flags & IPC_NOWAIT:
            return None
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

    def depth(self) -> int:
        """How many messages wait (``msg_qnum``, one ``msgctl``; no /proc read)."""
        return int(self._mq.current_messages)

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
