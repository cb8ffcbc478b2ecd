"""How ipcd's System V keys are derived, so that every client in every language agrees.

One key ``K`` names three objects, since SysV queues, segments and semaphores live in
separate namespaces: the job queue, the result segment and the semaphore guarding it.
The other objects use ``K + n * 0x01000000``, exactly what ``ftok(key_path, proj_id + n)``
gives, so a client that only knows ``ftok`` computes them the same way:

    n = 1  the reply queue (the daemon tells a waiting submitter its result is ready)
    n = 2  the result gate, a semaphore pulsed after every result
    n = 3  the in-flight table (segment) and its semaphore: jobs workers hold
    n = 4  the failed list (segment) and its semaphore: jobs that used all attempts
    n = 5  the stats segment (no semaphore): job and worker counters (ipcd.tables.stats)
    n = 6  the unique-key table (segment) and its semaphore: keys of cron-safe jobs
           waiting or running (``ipcctl submit --unique``)
    n = 7  the spill table (segment) and its semaphore: payloads and results too large
           for a message or a result slot, each in its own IPC_PRIVATE segment
           (ipcd.tables.spill.table)
    n = 8  the intake's slots (segment) and semaphore: messages the intake took off the
           job queue and has not yet committed to the job store (ipcd.daemon.intake)
    n = 9  the hand-off queue: the doorbell that wakes workers sleeping while the job
           store has no job for them (ipcd.daemon.doorbell). Mode 0600, the daemon's
           own: no client can ring it

``K`` is ``ftok(key_path, proj_id)`` or, when the config sets one, an explicit ``key``.
ftok mixes the file's inode and device numbers, so the key file must never be rewritten
(an editor's save-by-rename gives a new inode and so a new key): ipcd creates it empty
once and never touches it again.
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ipcd.config import IpcConfig
from ipcd.errors import ConfigError, IpcPermissionError, NotRunningError

#: Distance from the job key to the reply-queue key: one step of ftok's proj_id byte.
REPLY_KEY_OFFSET = 0x01000000
#: Distance from the job key to the result-announcement semaphore's key.
GATE_KEY_OFFSET = 0x02000000
INFLIGHT_KEY_OFFSET = 0x03000000
FAILED_KEY_OFFSET = 0x04000000
STATS_KEY_OFFSET = 0x05000000
UNIQUE_KEY_OFFSET = 0x06000000
SPILL_KEY_OFFSET = 0x07000000
INTAKE_KEY_OFFSET = 0x08000000
HANDOFF_KEY_OFFSET = 0x09000000


class Keys(NamedTuple):
    """The SysV keys of one ipcd instance, as unsigned 32-bit numbers."""

    jobs: int
    replies: int
    gate: int
    inflight: int
    failed: int
    stats: int
    unique: int
    spill: int
    how: str
    intake: int = 0
    handoff: int = 0

    @property
    def results(self) -> int:
        """The result segment and its semaphore share the job queue's key."""
        return self.jobs

    def all(self) -> tuple[int, ...]:
        """Every key ipcd makes objects at (for cleaning up and for the squatting check)."""
        return (
            self.jobs, self.replies, self.gate, self.inflight, self.failed, self.stats,
            self.unique, self.spill, self.intake, self.handoff,
        )  # fmt: skip


def ftok(path: os.PathLike[str] | str, proj_id: int) -> int:
    """glibc's ``ftok()``: ``(proj_id & 0xff) << 24 | (st_dev & 0xff) << 16 | (st_ino & 0xffff)``.

    Computed here rather than through sysv_ipc so that the lean client path and the
    documentation share one formula; ``tests/test_keys.py`` checks it against the C library.
    """
    st = os.stat(path)
    return ((proj_id & 0xFF) << 24) | ((st.st_dev & 0xFF) << 16) | (st.st_ino & 0xFFFF)


def derive(ipc: IpcConfig, *, create_key_file: bool = False) -> Keys:
    """The keys for this config; the daemon passes ``create_key_file`` to make the file once."""
    if ipc.key is not None:
        jobs = ipc.key
        how = f"explicit key {jobs:#010x} from the configuration"
    else:
        assert ipc.key_path is not None  # the config loader guarantees one of the two
        if create_key_file:
            _create_once(ipc.key_path)
        try:
            jobs = ftok(ipc.key_path, ipc.proj_id)
        except FileNotFoundError:
            raise NotRunningError(
                f"key file {ipc.key_path} does not exist (the daemon creates it at its "
                "first start): is ipcd installed and started?"
            ) from None
        except PermissionError:
            raise IpcPermissionError(f"key file {ipc.key_path}: permission denied") from None
        how = f"ftok({str(ipc.key_path)!r}, {ipc.proj_id:#04x})"
    return Keys(
        jobs=jobs,
        replies=(jobs + REPLY_KEY_OFFSET) & 0xFFFFFFFF,
        gate=(jobs + GATE_KEY_OFFSET) & 0xFFFFFFFF,
        inflight=(jobs + INFLIGHT_KEY_OFFSET) & 0xFFFFFFFF,
        failed=(jobs + FAILED_KEY_OFFSET) & 0xFFFFFFFF,
        stats=(jobs + STATS_KEY_OFFSET) & 0xFFFFFFFF,
        unique=(jobs + UNIQUE_KEY_OFFSET) & 0xFFFFFFFF,
        how=how,
        spill=(jobs + SPILL_KEY_OFFSET) & 0xFFFFFFFF,
        intake=(jobs + INTAKE_KEY_OFFSET) & 0xFFFFFFFF,
        handoff=(jobs + HANDOFF_KEY_OFFSET) & 0xFFFFFFFF,
    )


def _create_once(path: os.PathLike[str] | str) -> None:
    """Create the key file if missing; an existing one is left exactly as it is."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    os.close(fd)


def as_key_t(key: int) -> int:
    """The signed ``key_t`` the kernel sees for an unsigned key (0xffffffff is -1)."""
    return key - (1 << 32) if key >= 1 << 31 else key
