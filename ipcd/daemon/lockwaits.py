"""Waiting out a lock that another process holds too long, in the daemon's processes.

Every table the daemon shares with its clients is guarded by a SysV semaphore that any
member of the group can take: a client stopped with Ctrl-Z inside its critical section,
or one ``semctl`` setting the value to 0, keeps it taken for as long as it likes.  A
client gives up after its timeout (exit status 124); the daemon must not, since giving up
means crashing the master or losing the job in hand.  So each of the daemon's locks is
made patient: a wait that runs out is logged as one ``lock.timeout`` event (which lock,
how long it has waited so far) and started again, and the job in hand goes on as soon
as the lock is free.  Only a master that is still starting gives up, after
:data:`START_PATIENCE` seconds, with a message saying which lock is held.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ipcd.daemon.log import Logger
from ipcd.kernel.segments import Lock

#: Seconds a master that is not yet ready waits for a lock before start-up fails: short
#: of the 30 s that ``ipcd start`` waits for the daemon to say it is ready.
START_PATIENCE = 20.0

#: Whether to stop waiting, given the seconds waited so far.
GiveUp = Callable[[float], bool]


def be_patient(
    locks: Mapping[str, Lock], log: Logger, give_up: GiveUp = lambda waited: False
) -> None:
    """Make each of ``locks`` (by the name a ``lock.timeout`` event gives it) log each
    timeout and wait again, until ``give_up``."""
    for name, lock in locks.items():
        lock.on_timeout = _patience(name, log, give_up)


def _patience(name: str, log: Logger, give_up: GiveUp) -> Callable[[Lock, float], bool]:
    def on_timeout(lock: Lock, waited: float) -> bool:
        stop = give_up(waited)
        log.warning(
            "lock.timeout",
            lock=name,
            key=f"{lock.key:#010x}",
            waited_s=round(waited, 3),
            then="give up" if stop else "wait again",
        )
        return not stop

    return on_timeout
