"""The kernel border, part three: which objects at ipcd's keys may be trusted.

SysV messages carry no sender identity, so an object's owner and permission bits are the
only access control: an object another user pre-created at ipcd's key with mode 0666
would let anyone read or forge jobs.  The daemon vets every object it finds (squatting
defence), gives them the configured mode and group, and tests and ``ipcrm``-like clean-up
remove them here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import NamedTuple, Protocol, TypeVar

import sysv_ipc

from ipcd.errors import IpcPermissionError, NotRunningError, UnsafeObjectError
from ipcd.kernel.keys import as_key_t


class ObjectInfo(NamedTuple):
    """Owner, creator and mode of an IPC object, for the squatting checks."""

    kind: str
    key: int
    uid: int
    gid: int
    mode: int
    #: Who created it: the kernel lets the creator, like the owner, change owner, group
    #: and mode at any time (IPC_SET), so the creator is as much in control as the owner.
    cuid: int
    cgid: int

    def who(self) -> str:
        return (
            f"created by uid {self.cuid} (gid {self.cgid}), "
            f"owned by uid {self.uid} (gid {self.gid})"
        )


class KernelObject(Protocol):
    """What a sysv_ipc queue, segment or semaphore tells about itself (each attribute
    is one IPC_STAT, well under a microsecond)."""

    @property
    def uid(self) -> int: ...
    @property
    def gid(self) -> int: ...
    @property
    def cuid(self) -> int: ...
    @property
    def cgid(self) -> int: ...
    @property
    def mode(self) -> int: ...


def describe(obj: KernelObject, kind: str, key: int) -> ObjectInfo:
    """The object's owner, creator and permission bits, as the kernel reports them now."""
    return ObjectInfo(kind, key, obj.uid, obj.gid, obj.mode & 0o777, obj.cuid, obj.cgid)


_O = TypeVar("_O", bound=KernelObject)


def open_existing(attach: Callable[[], _O], what: str, key: int) -> _O:
    """Open an object a client needs and the daemon makes, and vet it (refuse_untrusted).

    A missing one means the daemon never ran with this configuration, a refused one that
    the caller is not in its group.
    """
    try:
        obj = attach()
    except sysv_ipc.ExistentialError:
        raise NotRunningError(
            f"no {what} at key {key:#010x}: is ipcd running with this configuration?"
        ) from None
    except sysv_ipc.PermissionsError:
        raise IpcPermissionError(
            f"permission denied opening the {what} at key {key:#010x} "
            "(are you in the daemon's group?)"
        ) from None
    refuse_untrusted(describe(obj, what, key))
    return obj


def open_or_create(open_existing: Callable[[int], _O], what: str, key: int) -> _O:
    try:
        return open_existing(sysv_ipc.IPC_CREAT)
    except sysv_ipc.PermissionsError:
        raise IpcPermissionError(
            f"permission denied opening the {what} at key {key:#010x}"
        ) from None


def check_safe(info: ObjectInfo, mode: int, trusted: Collection[int] = ()) -> None:
    """Refuse an object not made and owned by us, or more open than ``mode`` (squatting
    defence).

    SysV messages carry no sender identity, so the object's permission bits are the only
    access control: one pre-created by another user with 0666 would let anyone read or
    forge jobs.  The owner alone is not enough: the creator may change owner and mode at
    any time (IPC_SET, ipc/util.c ipcctl_obtain_check), so another user could make the
    object, give it to ipcd's uid for the check, and take it back later.  The creator
    must therefore be ipcd's uid, one of ``trusted`` (the uid a root-started daemon drops
    to, which owns the objects of its earlier runs), or root.  (The creator's group grants
    nothing, so ``cgid`` is only reported.)
    """
    euid = os.geteuid()
    trusted = {euid, *trusted}
    if info.uid not in trusted:
        raise UnsafeObjectError(
            f"the {info.kind} at key {info.key:#010x} is owned by uid {info.uid}, not by "
            f"ipcd's uid {euid} ({info.who()}): refusing to use an object another user "
            f"may have planted (remove it with ipcrm after checking who made it)"
        )
    if info.cuid not in trusted and info.cuid != 0:
        raise UnsafeObjectError(
            f"the {info.kind} at key {info.key:#010x} is {info.who()}, not created by "
            f"ipcd's uid {euid}: its creator can take it back at any time, so refusing "
            f"an object another user may have planted (remove it with ipcrm after checking "
            f"who made it)"
        )
    if info.mode & ~mode & 0o777:
        raise UnsafeObjectError(
            f"the {info.kind} at key {info.key:#010x} has mode {info.mode:#o}, more open than "
            f"the configured {mode:#o}: refusing to use it (remove it with ipcrm, or fix "
            f"ipc.mode)"
        )


def refuse_untrusted(info: ObjectInfo) -> None:
    """The client's side of the squatting defence, before it sends or reads anything.

    Clients cannot know the daemon's uid, so they check what ipcd never does: an object
    anyone may write, and one whose creator is neither root nor its owner (the daemon
    makes its objects itself, or as root before it drops to their owner).  Such an
    object was planted: its creator can take it back (IPC_SET) and read or forge the
    jobs and results in it.
    """
    if info.mode & 0o002:
        raise UnsafeObjectError(
            f"the {info.kind} at key {info.key:#010x} is world-writable (mode {info.mode:#o}) "
            "and ipcd never makes such objects: refusing to use it (see docs/security.md)"
        )
    if info.cuid not in (0, info.uid):
        raise UnsafeObjectError(
            f"the {info.kind} at key {info.key:#010x} is {info.who()}: ipcd makes its "
            "objects itself, so another user planted it and can take it back; refusing "
            "to use it (see docs/security.md)"
        )


def adopt_all(keys: tuple[int, ...], mode: int, uid: int | None, gid: int | None) -> None:
    """Give every object at these keys the configured mode, and owner and group if set.

    Objects a previous daemon made stay in place (with their jobs) when the configuration
    widens ``ipc.mode`` or names a group; ``check_safe`` already refused any more open.
    """
    for key in keys:
        k = as_key_t(key)
        for kind in (sysv_ipc.MessageQueue, sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
            try:
                obj = kind(k, 0)
            except sysv_ipc.ExistentialError:
                continue
            if obj.mode & 0o777 != mode:
                obj.mode = mode
            if gid is not None and obj.gid != gid:
                obj.gid = gid
            if uid is not None and obj.uid != uid:
                obj.uid = uid
            if isinstance(obj, sysv_ipc.SharedMemory):
                obj.detach()


def sysv_objects() -> set[tuple[str, int, int]]:
    """(kind, key, id) of every SysV object on the host, from /proc/sysvipc: for checking
    that nothing was left behind (tests, the benchmark)."""
    found = set()
    for kind in ("msg", "shm", "sem"):
        with open(f"/proc/sysvipc/{kind}") as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                found.add((kind, int(fields[0]) & 0xFFFFFFFF, int(fields[1])))
    return found


def remove_objects(keys: tuple[int, ...]) -> list[str]:
    """Remove every queue, segment and semaphore at these keys (ipcd.tables.purge first
    removes the spill segments that only the objects at these keys name)."""
    removed: list[str] = []
    for key in keys:
        k = as_key_t(key)
        for kind, remover in (
            ("queue", sysv_ipc.MessageQueue),
            ("segment", sysv_ipc.SharedMemory),
            ("semaphore", sysv_ipc.Semaphore),
        ):
            try:
                obj = remover(k, 0)
            except sysv_ipc.ExistentialError:
                continue
            obj.remove()
            if isinstance(obj, sysv_ipc.SharedMemory):
                obj.detach()
            removed.append(f"{kind} {key:#010x}")
    return removed
