"""The kernel border, part two: shared-memory segments and semaphores.

The result ring, the in-flight table, the failed list and the spill table each live in a
segment guarded by a semaphore used as a lock (SEM_UNDO, so a holder that dies releases
it); one more semaphore, the result gate, announces new results to waiting clients.
Large payloads and results live in segments of their own, made with IPC_PRIVATE (key 0)
and known by their id (see ipcd.tables.spill.table).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Collection, Iterator
from typing import TypeVar

import sysv_ipc

from ipcd.errors import IpcPermissionError, LockTimeoutError, NotRunningError, PayloadError
from ipcd.kernel.keys import as_key_t
from ipcd.kernel.vetting import ObjectInfo, check_safe, describe, open_existing, open_or_create
from ipcd.kernel.waits import bounded

_MADV_POPULATE_READ = 22
_MADV_POPULATE_WRITE = 23
#: Segments this large are read after one madvise, smaller ones page by page.
_POPULATE_FROM = 1 << 20


class Segment:
    """A SysV shared-memory segment, attached, with a memoryview over it."""

    def __init__(self, shm: sysv_ipc.SharedMemory, key: int, *, what: str) -> None:
        self._shm = shm
        self.key = key
        self.what = what
        self.buf = memoryview(shm)
        self.size = shm.size
        #: Where the segment is attached in this process (for receive_into).
        self.address: int = shm.address

    @classmethod
    def open(cls, key: int, *, what: str) -> Segment:
        """Attach the segment at ``key``; ``what`` names it in errors ("failed list")."""
        shm = open_existing(lambda: sysv_ipc.SharedMemory(as_key_t(key), 0), what, key)
        return cls(shm, key, what=what)

    @classmethod
    def create(
        cls, key: int, mode: int, size: int, *, what: str, trusted: Collection[int] = ()
    ) -> tuple[Segment, bool]:
        """Create the segment (zero-filled) or open the existing one; says whether it is new.

        ``what`` names it in errors and in the vetting of an existing one; ``trusted``: uids
        besides ours that may own it (vetting.check_safe).
        """
        try:
            shm = sysv_ipc.SharedMemory(as_key_t(key), sysv_ipc.IPC_CREX, mode, size)
            created = True
        except sysv_ipc.ExistentialError:
            shm = open_or_create(lambda flags: sysv_ipc.SharedMemory(as_key_t(key), 0), what, key)
            created = False
        except sysv_ipc.PermissionsError:
            raise IpcPermissionError(
                f"permission denied creating the {what} at key {key:#010x}"
            ) from None
        segment = cls(shm, key, what=what)
        check_safe(segment.info(), mode, trusted)
        return segment, created

    @classmethod
    def create_private(cls, size: int, mode: int, written: int | None = None) -> Segment:
        """A new IPC_PRIVATE segment (key 0), attached; only its id names it.  ``written``:
        the bytes about to be written, when fewer than ``size`` (a pooled segment's size
        class is larger than its first result).

        Made with libc's shmget, not sysv_ipc's constructor: that one fills a new segment
        with a space character, a memset that faults in every page (some 15 ms for
        16 MiB) only for the data to overwrite it; the kernel's pages are zeros already.
        """
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        shmid = libc.shmget(sysv_ipc.IPC_PRIVATE, size, sysv_ipc.IPC_CREX | mode)
        if shmid < 0:
            err = ctypes.get_errno()
            if err in (errno.EACCES, errno.EPERM):
                raise IpcPermissionError("permission denied creating a spill segment")
            raise PayloadError(f"cannot create a spill segment of {size} bytes: {os.strerror(err)}")
        try:
            shm = sysv_ipc.attach(shmid)
        except BaseException:
            remove_id(shmid)
            raise
        # The whole segment is about to be written: fault its pages in with one call
        # (MADV_POPULATE_WRITE, Linux 5.14) rather than one page fault per 4 KiB, about
        # a fifth faster for 16 MiB; older kernels refuse it and the writes fault instead.
        segment = cls(shm, 0, what="spill segment")
        segment.populate(size if written is None else written)
        return segment

    @classmethod
    def attach_id(
        cls, shmid: int, *, readonly: bool = False, whole: bool = False
    ) -> Segment | None:
        """Attach the segment with this id; None when there is none (or it is not ours to
        attach).  ``whole``: the caller is about to read all of it (not just a header)."""
        try:
            shm = sysv_ipc.attach(shmid, None, sysv_ipc.SHM_RDONLY if readonly else 0)
        except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError, ValueError, OSError):
            return None
        if whole and shm.size >= _POPULATE_FROM:
            # About to be read whole: map its pages with one call (MADV_POPULATE_READ,
            # Linux 5.14) rather than one fault per 4 KiB: 16 MiB read in 4 ms, not 11.
            _madvise(shm.address, shm.size, _MADV_POPULATE_READ)
        return cls(shm, shm.key & 0xFFFFFFFF, what="spill segment")

    @property
    def id(self) -> int:
        return int(self._shm.id)

    def populate(self, length: int) -> None:
        """Map the first ``length`` bytes for writing with one call (MADV_POPULATE_WRITE,
        Linux 5.14) rather than one page fault per 4 KiB; an older kernel refuses it and
        the writes fault instead.  For a reused segment the pages exist already: this
        only maps them."""
        _madvise(self.address, min(length, self.size), _MADV_POPULATE_WRITE)

    def give_to(self, uid: int | None, gid: int | None = None) -> None:
        """Make ``uid`` the owner and ``gid`` the group (IPC_SET; the creator or owner may,
        whatever the ids), so that the daemon's workers may attach and remove what a
        client made, and the clients of ``[ipc] group`` may read what a worker made."""
        try:
            if gid is not None and self._shm.gid != gid:
                self._shm.gid = gid
            if uid is not None and self._shm.uid != uid:
                self._shm.uid = uid
        except (sysv_ipc.PermissionsError, OSError):
            raise IpcPermissionError(f"cannot hand spill segment {self.id} to uid {uid}") from None

    def info(self) -> ObjectInfo:
        return describe(self._shm, self.what, self.key)

    def close(self) -> None:
        self.buf.release()
        with contextlib.suppress(sysv_ipc.Error):
            self._shm.detach()

    def remove(self) -> None:
        """Mark the segment for removal; the kernel frees it when the last process detaches."""
        with contextlib.suppress(sysv_ipc.Error):
            self._shm.remove()
        self.close()


def _madvise(address: int, size: int, advice: int) -> None:
    """madvise(2), ignoring a refusal (an older kernel): the pages then fault one by one."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise(address, size, advice)


def create_formatted(
    key: int,
    mode: int,
    size: int,
    *,
    keep: Callable[[Segment], bool],
    format: Callable[[Segment], None],
    lock: Lock | None,
    lock_timeout: float = 5.0,
    what: str,
    trusted: Collection[int] = (),
) -> Segment:
    """The daemon's segment at ``key``: the one a previous daemon left when ``keep`` says
    its contents still serve, else a freshly formatted one.

    In order: create the segment, or open and vet the one there; if it is old and
    ``keep(segment)`` (a look at its header, without the lock) says so, return it as it
    is; if it is old and does not serve, remove it and make it anew, unless it has
    ``size`` bytes already (then it is reused: a segment cannot be resized, but need not
    be); then ``format(segment)`` holding ``lock``, so that no client reads a half-made
    header.  ``format`` receives a segment of at least ``size`` bytes.
    """
    segment, created = Segment.create(key, mode, size, what=what, trusted=trusted)
    if not created:
        if keep(segment):
            return segment
        if segment.size != size:
            segment.remove()
            segment, _ = Segment.create(key, mode, size, what=what, trusted=trusted)
    if lock is None:
        format(segment)
    else:
        with lock.held(lock_timeout):
            format(segment)
    return segment


def remove_id(shmid: int) -> bool:
    """IPC_RMID the segment with this id; False when it is gone or not ours to remove."""
    try:
        sysv_ipc.remove_shared_memory(shmid)
    except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError, OSError):
        return False
    return True


_S = TypeVar("_S", bound="_Semaphore")


class _Semaphore:
    """One SysV semaphore at a key: what the lock and the gate share."""

    what = "semaphore"

    def __init__(self, sem: sysv_ipc.Semaphore, key: int) -> None:
        self._sem = sem
        self.key = key

    @classmethod
    def open(cls: type[_S], key: int) -> _S:
        return cls(open_existing(lambda: sysv_ipc.Semaphore(as_key_t(key), 0), cls.what, key), key)

    @classmethod
    def create(cls: type[_S], key: int, mode: int, *, trusted: Collection[int] = ()) -> _S:
        """Create the semaphore with value 1, or open and vet the existing one."""
        try:
            sem = sysv_ipc.Semaphore(as_key_t(key), sysv_ipc.IPC_CREX, mode, 1)
        except sysv_ipc.ExistentialError:
            sem = open_or_create(lambda flags: sysv_ipc.Semaphore(as_key_t(key), 0), cls.what, key)
        except sysv_ipc.PermissionsError:
            raise IpcPermissionError(
                f"permission denied creating the {cls.what} at key {key:#010x}"
            ) from None
        made = cls(sem, key)
        check_safe(made.info(), mode, trusted)
        return made

    @property
    def id(self) -> int:
        return int(self._sem.id)

    def info(self) -> ObjectInfo:
        return describe(self._sem, self.what, self.key)

    def _wait(self, op: Callable[[float | None], None], timeout: float) -> bool:
        """Run a blocking semop (``op(None)`` blocks, ``op(0)`` does not) for at most
        ``timeout`` seconds, by semtimedop where sysv_ipc has it, else by ipcd's alarm."""

        def call(block: bool) -> None:
            op(timeout if sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED else None) if block else op(0)

        try:
            if sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:
                call(True)
            else:
                bounded(call, timeout)
        except (TimeoutError, sysv_ipc.BusyError):
            return False
        except sysv_ipc.ExistentialError:
            raise NotRunningError(f"{self.what} {self.key:#010x} was removed") from None
        return True

    def remove(self) -> None:
        with contextlib.suppress(sysv_ipc.ExistentialError):
            self._sem.remove()


class Lock(_Semaphore):
    """A SysV semaphore used as a mutex, with SEM_UNDO so that a dead holder releases it."""

    what = "lock semaphore"

    def __init__(self, sem: sysv_ipc.Semaphore, key: int) -> None:
        sem.undo = True
        super().__init__(sem, key)
        #: Asked, each time a wait of ``timeout`` seconds ran out, whether to wait again;
        #: it receives the lock and the seconds waited so far.  None (clients) gives up
        #: at once; the daemon's processes log and wait on (ipcd.daemon.lockwaits).
        self.on_timeout: Callable[[Lock, float], bool] | None = None

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting at most ``timeout`` seconds (the hot path: two per job),
        or as many times that as ``on_timeout`` allows; raises LockTimeoutError."""
        waited = 0.0
        while not self._acquire(timeout):
            waited += timeout
            if self.on_timeout is None or not self.on_timeout(self, waited):
                raise LockTimeoutError(
                    f"{self.what} {self.key:#010x} stayed taken for {waited:g}s (a process "
                    "holds it: a stopped client, or a semctl that set it to 0)",
                    key=self.key,
                    waited=waited,
                )

    def _acquire(self, timeout: float) -> bool:
        if sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED:
            try:
                self._sem.acquire(timeout)
                return True
            except sysv_ipc.BusyError:
                return False
            except sysv_ipc.ExistentialError:
                raise NotRunningError(f"{self.what} {self.key:#010x} was removed") from None
            except sysv_ipc.Error:  # interrupted by a signal: finish the wait the slow way
                return self._wait(self._sem.acquire, timeout)
        return self._wait(self._sem.acquire, timeout)

    def release(self) -> None:
        self._sem.release()

    @contextlib.contextmanager
    def held(self, timeout: float) -> Iterator[None]:
        """Hold the lock for the ``with`` block, waiting at most ``timeout`` seconds."""
        self.acquire(timeout)
        try:
            yield
        finally:
            self._sem.release()

    def reset(self) -> None:
        """Set the value back to 1 (the daemon does this only before anyone else may hold it)."""
        self._sem.value = 1


class Gate(_Semaphore):
    """A semaphore that announces "a new result is stored" to every waiting client.

    It rests at 1; the daemon pulses it to 0 and back after each result.  Setting it to 0
    completes every pending wait-for-zero at that moment (semctl(2) SETVAL updates the
    queue of waiters), so all waiters wake and look for their job in the segment.
    """

    what = "result gate"

    @classmethod
    def create(cls, key: int, mode: int, *, trusted: Collection[int] = ()) -> Gate:
        gate = super().create(key, mode, trusted=trusted)
        gate._sem.value = 1
        return gate

    def pulse(self) -> None:
        """Wake every waiter: two semctls.  The daemon asks first whether anyone waits
        (the result segment's ``waiting_until``, ipcd.layout.results), not the kernel.

        A waiter that starts waiting just after the pulse misses it, as one always did:
        waiters look again every 0.25 s.
        """
        self._sem.value = 0
        self._sem.value = 1

    def wait(self, timeout: float) -> bool:
        """Wait for the next pulse, at most ``timeout`` seconds; False when none came."""
        return self._wait(self._sem.Z, timeout)
