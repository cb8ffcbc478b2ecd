"""Signal handling: handlers only record what was asked; the main loops act on it.

A SysV queue cannot be ``select()``-ed, so a worker blocked in ``msgrcv`` learns of a stop
only when a signal interrupts the call (Linux never restarts msgrcv after a handler).  A
SIGTERM that lands just before the call starts, after the loop checked its flags, would be
lost; the master therefore repeats SIGTERM to idle workers until they are gone
(ipcd.arbiter).  A control message (type 1) on the queue also wakes a worker, and asks
nothing of it: the flags carry every request.
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
