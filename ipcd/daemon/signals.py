"""Signal handling: handlers only record what was asked; the main loops act on it.

A SysV queue cannot be ``select()``-ed, so a worker blocked in ``msgrcv`` learns of a stop
only when a signal interrupts the call (Linux never restarts msgrcv after a handler).  A
SIGTERM that lands just before the call starts, after the loop checked its flags, would be
lost; the master therefore repeats SIGTERM to idle workers until they are gone, every
0.2 s at stop and at every turn of its loop (at most a second) for workers retired by a
reload (ipcd.daemon.arbiter).  That repetition, not a message, closes the race.

Why not a wake-up message on the job queue: every message type from 1 to LONG_MAX is one
a client may send (PHP's ``msg_send`` takes any positive C long, and the article it is
taught from starts with type 1), so a type set aside for wake-ups would be one on which a
client's job vanishes, or one a client can forge.  ``msgrcv`` waits on one queue only, so a
second, private queue cannot wake a worker blocked on the job queue either.  A signal is a
path no client can write to: only the daemon's own user (or root) may signal its workers.
So every message type is a job type, and the queue carries jobs and nothing else.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)


class Flags:
    """What the signal handlers asked for; the main loop acts on it."""

    def __init__(self) -> None:
        self.stopping = False
        self.reload = False
        self.signal: int | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        """The one signal handler: record, nothing else."""
        self.signal = signum
        if signum in RELOAD_SIGNALS:
            self.reload = True
        else:
            self.stopping = True

    def signal_map(self) -> dict[int, Callable[[int, FrameType | None], None] | None]:
        """Dispositions for python-daemon's ``signal_map`` (and for foreground runs)."""
        return {
            **{s: self.handler for s in STOP_SIGNALS + RELOAD_SIGNALS},
            signal.SIGTTIN: None,
            signal.SIGTTOU: None,
            signal.SIGTSTP: None,
        }

    def install(self) -> None:
        for signum, action in self.signal_map().items():
            signal.signal(signum, signal.SIG_IGN if action is None else action)
