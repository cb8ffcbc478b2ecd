"""The kernel border of ipcctl's lean path (ipcd.lean): the few system calls a cron job's
``ipcctl submit`` makes, with nothing imported but ``sysv_ipc`` and built-in modules.

The full border (ipcd.kernel.queues, .segments, .vetting, .waits) turns every kernel
error into one of ipcd's exceptions with a message; that costs imports (enum, typing,
ipcd.errors) worth a third of an interpreter's start-up.  Here nothing is explained:
each function answers ``None`` (or ``False``) whenever anything is not as it should be
(an object missing, planted, locked, removed; a queue full; a signal), and the lean path
then hands the whole command to the full CLI, which meets the same situation again and
says what ipcd always says about it.  So these functions may only *look* and *send*
before the job is queued, and after it only receive what the full path would receive
next (ipcd.lean.ipcctl puts back anything it took and does not handle).

The result ring's layout is ipcd.layout.results' (read here with ``int.from_bytes``
rather than its NamedTuples and enums); tests/test_lean.py checks that both read the
same records.
"""

from __future__ import annotations

import _signal
import binascii
import os
import time

import sysv_ipc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

#: The queue type the lean path holds (for its annotations).
MessageQueue = sysv_ipc.MessageQueue

#: The result ring's header and record, as ipcd.layout.results lays them out.
MAGIC = b"IPCDRES\0"
HEADER_SIZE = RECORD_SIZE = 64
VALID = 2
SPILLED_FLAG = 0x80
#: How long a reader waits for the ring's semaphore (ipcd.tables.results.LOCK_TIMEOUT).
LOCK_TIMEOUT = 5.0


def _key_t(key: int) -> int:
    """The signed ``key_t`` for an unsigned key (ipcd.kernel.keys.as_key_t)."""
    return key - (1 << 32) if key >= 1 << 31 else key


def _trusted(obj: sysv_ipc.MessageQueue | sysv_ipc.SharedMemory | sysv_ipc.Semaphore) -> bool:
    """ipcd.kernel.vetting.refuse_untrusted's test: not world-writable, and created by
    root or by its owner."""
    return not obj.mode & 0o002 and obj.cuid in (0, obj.uid)


def msgmax() -> int:
    """The kernel's largest message (ipcd.kernel.queues.msgmax)."""
    try:
        with open("/proc/sys/kernel/msgmax", "rb") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 8192


def open_queue(key: int, limit: int) -> sysv_ipc.MessageQueue | None:
    """The existing, trusted queue at ``key``, able to receive ``limit``-byte messages."""
    try:
        mq = sysv_ipc.MessageQueue(_key_t(key), 0, max_message_size=limit)
    except sysv_ipc.Error:
        return None
    return mq if _trusted(mq) else None


def send_nowait(mq: sysv_ipc.MessageQueue, body: bytes, type_: int) -> bool:
    """Send without waiting; False when the queue is full or anything else refuses it
    (then nothing was sent)."""
    try:
        mq.send(body, False, type_)
    except (sysv_ipc.Error, ValueError, OSError):
        return False
    return True


def receive(mq: sysv_ipc.MessageQueue, type_: int, deadline: float, spin: float) -> bytes | None:
    """A message of ``type_`` that comes before the monotonic ``deadline``, polling for
    ``spin`` seconds first (ipcd.kernel.waits.spin_wait); None when none came, or when
    a signal other than our own alarm, or anything else, interrupted the wait."""
    end = time.monotonic() + spin
    while True:
        got = _receive_nowait(mq, type_)
        if got is not None or time.monotonic() >= end:
            break
        os.sched_yield()
    if got is not None:
        return got
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    # A one-shot SIGALRM interrupts the blocking msgrcv (ipcd.kernel.waits.bounded); a
    # fresh ipcctl process has no timer of its own to restore.
    previous = _signal.signal(_signal.SIGALRM, _ignore)
    _signal.setitimer(_signal.ITIMER_REAL, left)
    try:
        body, _ = mq.receive(True, type_)
        return bytes(body)
    except sysv_ipc.Error:
        return None
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, previous)


def _ignore(signum: int, frame: object) -> None:
    """The alarm's handler: its only job is to make msgrcv return (EINTR)."""


def _receive_nowait(mq: sysv_ipc.MessageQueue, type_: int) -> bytes | None:
    try:
        body, _ = mq.receive(False, type_)
    except sysv_ipc.BusyError:
        return None
    return bytes(body)


class Ring:
    """The result segment at a key, attached read-only in spirit: its daemon's PID and
    one job's record."""

    def __init__(self, shm: sysv_ipc.SharedMemory, key: int) -> None:
        self.shm = shm
        self.key = key

    @classmethod
    def open(cls, key: int) -> Ring | None:
        """The existing, trusted result segment at ``key`` with ipcd's header."""
        try:
            shm = sysv_ipc.SharedMemory(_key_t(key), 0)
        except sysv_ipc.Error:
            return None
        if not _trusted(shm) or shm.read(16, 0)[:12] != MAGIC + b"\1\0\0\0":
            return None
        return cls(shm, key)

    def daemon_pid(self) -> int:
        """The serving master's PID from the header (0: none)."""
        return int.from_bytes(self.shm.read(4, 32), "little")

    def find(self, job_id: str) -> tuple[int, int, int, bytes] | None:
        """(type, status, kind, data) of the newest valid record of ``job_id``, read under
        the ring's semaphore as ipcd.layout.results.find_result reads it; None when there
        is none, it is spilled (kind has SPILLED_FLAG: the full path copies it out), or the
        lock cannot be had."""
        if not sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:
            return None  # the full path bounds the wait with its alarm
        try:
            sem = sysv_ipc.Semaphore(_key_t(self.key), 0)
        except sysv_ipc.Error:
            return None
        if not _trusted(sem):
            return None
        sem.undo = True
        try:
            sem.acquire(LOCK_TIMEOUT)
        except sysv_ipc.Error:
            return None
        try:
            return self._find(job_id)
        finally:
            sem.release()

    def _find(self, job_id: str) -> tuple[int, int, int, bytes] | None:
        read: Callable[[int, int], bytes] = self.shm.read
        header = read(HEADER_SIZE, 0)
        count = int.from_bytes(header[16:20], "little")
        size = int.from_bytes(header[20:24], "little")
        newest = int.from_bytes(header[24:32], "little")
        if (
            header[:8] != MAGIC
            or header[8:16] != b"\1\0\0\0\x40\0\0\0"
            or size < RECORD_SIZE
            or count < 1
            or HEADER_SIZE + count * size > self.shm.size
        ):
            return None
        wanted = job_id.encode("ascii", "replace")[:16].ljust(16, b"\0")
        for seq in range(newest - 1, max(newest - count, 0) - 1, -1):
            offset = HEADER_SIZE + (seq % count) * size
            if read(16, offset + 16) != wanted:
                continue
            record = read(RECORD_SIZE, offset)
            length = int.from_bytes(record[44:48], "little")
            if int.from_bytes(record[0:4], "little") != VALID or length > size - RECORD_SIZE:
                continue
            data = read(length, offset + RECORD_SIZE) if length else b""
            crc = binascii.crc32(data, binascii.crc32(record[8:]))
            if crc != int.from_bytes(record[4:8], "little"):
                continue
            status, kind = record[40], record[41]
            if status > 1 or kind & ~SPILLED_FLAG > 2:
                continue
            return int.from_bytes(record[32:40], "little", signed=True), status, kind, data
        return None

    def close(self) -> None:
        # Not contextlib.suppress: the lean path does not import contextlib.
        try:  # noqa: SIM105
            self.shm.detach()
        except sysv_ipc.Error:
            pass
