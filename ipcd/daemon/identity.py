"""Who the daemon runs as: names from the config resolved, and privileges dropped.

A daemon started as root (an init script, or ``ipcd start`` by hand) creates what needs
root first (its kernel objects, the key file, the log file) and then becomes
``[daemon] user``/``group`` before it forks a worker or handles a job.  Under systemd the
unit's ``User=``/``Group=`` do this instead and these settings stay unset.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path
from typing import NamedTuple

from ipcd.config import Config
from ipcd.errors import ConfigError, IpcPermissionError


class Identity(NamedTuple):
    """Resolved ids: the objects' group, and the user/group to become (None: stay)."""

    object_gid: int | None
    uid: int | None
    gid: int | None
    user: str | None

    @property
    def drops(self) -> bool:
        """Started as root with a user or group to become."""
        return os.geteuid() == 0 and (
            (self.uid is not None and self.uid != 0) or (self.gid is not None and self.gid != 0)
        )


def resolve(config: Config) -> Identity:
    """Look the configured names up; unknown names are configuration errors."""
    object_gid = _gid(config.ipc.group, "ipc.group")
    user = config.daemon.user
    uid = gid = None
    if user is not None:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"{config.path}: daemon.user {user!r} does not exist") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    group_gid = _gid(config.daemon.group, "daemon.group")
    if group_gid is not None:
        gid = group_gid
    if user is not None and os.geteuid() != 0 and uid != os.geteuid():
        raise IpcPermissionError(
            f"daemon.user is {user!r}: only root can switch to it (running as uid {os.geteuid()})"
        )
    return Identity(object_gid, uid, gid, user)


def hand_over(identity: Identity, paths: list[Path]) -> None:
    """Give the files the dropped daemon must keep writing to (the log, the job store)
    to its user; a directory's files too (the store's large bodies: ones an earlier run
    as root wrote, 0600, would be unreadable to the dropped daemon otherwise)."""
    if not identity.drops:
        return
    uid = identity.uid if identity.uid is not None else -1
    gid = identity.gid if identity.gid is not None else -1
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            for entry in path.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    os.chown(entry, uid, gid)
        if path.exists():
            os.chown(path, uid, gid)


def drop(identity: Identity) -> None:
    """Become the configured user and group for good (supplementary groups included)."""
    if not identity.drops:
        return
    gid = identity.gid if identity.gid is not None else os.getgid()
    if identity.user is not None and identity.uid is not None:
        os.initgroups(identity.user, gid)
        os.setgid(gid)
        os.setuid(identity.uid)
    else:  # [daemon] group alone: change group, stay root
        os.setgroups([])
        os.setgid(gid)


def _gid(name: str | None, setting: str) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"{setting} {name!r} is not a group on this host") from None
