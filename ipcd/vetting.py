"""The kernel border, part three: which objects at ipcd's keys may be trusted.

SysV messages carry no sender identity, so an object's owner and permission bits are the
only access control: an object another user pre-created at ipcd's key with mode 0666
would let anyone read or forge jobs.  The daemon vets every object it finds (squatting
defence), gives them the configured mode and group, and tests and ``ipcrm``-like clean-up
remove them here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import sysv_ipc

from ipcd.errors import IpcPermissionError, NotRunningError, UnsafeObjectError
from ipcd.keys import as_key_t


class ObjectInfo(NamedTuple):
    """Owner and mode of an IPC object, for the squatting check."""

    kind: str
    key: int
    uid: int
    gid: int
    mode: int


_O = TypeVar("_O")


def open_existing(attach: Callable[[], _O], what: str, key: int) -> _O:
    """Open an object a client needs and the daemon makes: a missing one means the daemon
    never ran with this configuration, a refused one that the caller is not in its group."""
    try:
        return attach()
    except sysv_ipc.ExistentialError:
        raise NotRunningError(
            f"no {what} at key {key:#010x}: is ipcd running with this configuration?"
        ) from None
    except sysv_ipc.PermissionsError:
        raise IpcPermissionError(
            f"permission denied opening the {what} at key {key:#010x} "
            "(are you in the daemon's group?)"
        ) from None


def open_or_create(open_existing: Callable[[int], _O], what: str, key: int) -> _O:
    try:
        return open_existing(sysv_ipc.IPC_CREAT)
    except sysv_ipc.PermissionsError:
        raise IpcPermissionError(
            f"permission denied opening the {what} at key {key:#010x}"
        ) from None


#: Besides ipcd's own uid, the uid a root-started daemon drops to owns its objects.
TRUSTED_UIDS: set[int] = set()


def check_safe(info: ObjectInfo, mode: int) -> None:
    """Refuse an object not owned by us or more open than ``mode`` (squatting defence).

    SysV messages carry no sender identity, so the object's permission bits are the only
    access control: one pre-created by another user with 0666 would let anyone read or
    forge jobs.
    """
    euid = os.geteuid()
    if info.uid != euid and info.uid not in TRUSTED_UIDS:
        raise UnsafeObjectError(
            f"the {info.kind} at key {info.key:#010x} is owned by uid {info.uid}, not by "
            f"ipcd's uid {euid}: refusing to use an object another user may have planted "
            f"(remove it with ipcrm after checking who made it)"
        )
    if info.mode & ~mode & 0o777:
        raise UnsafeObjectError(
            f"the {info.kind} at key {info.key:#010x} has mode {info.mode:#o}, more open than "
            f"the configured {mode:#o}: refusing to use it (remove it with ipcrm, or fix "
            f"ipc.mode)"
        )


def refuse_world_writable(info: ObjectInfo) -> None:
    """The client's side of the squatting defence: ipcd never makes an object anyone may
    write, so one that is was planted by someone else; jobs sent to it could be read or
    forged.  (Clients cannot know the daemon's uid, so the mode is what they check.)"""
    if info.mode & 0o002:
        raise UnsafeObjectError(
            f"the {info.kind} at key {info.key:#010x} is world-writable (mode {info.mode:#o}) "
            "and ipcd never makes such objects: refusing to use it (see docs/security.md)"
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


def remove_all(keys: tuple[int, ...]) -> list[str]:
    """Remove every queue, segment and semaphore at these keys; for tests and ``ipcd purge``.

    The spill segments the spill table lists (key 0, known only by the table) go first.
    """
    from ipcd.spillsweep import remove_listed

    removed: list[str] = [f"{n} spill segments" for k in keys if (n := remove_listed(k))]
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
