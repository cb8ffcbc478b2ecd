"""Signal handling for the daemon: handlers only record; a waker makes sure they are seen.

A SysV queue cannot be ``select()``-ed, so a process blocked in ``msgrcv`` learns of a
stop only when the call is interrupted.  A signal that lands just before the call starts
(after the loop checked its flags) would be lost, and the daemon would sleep until the
next job.  So the handlers set flags, and ``signal.set_wakeup_fd`` has the C-level handler
write the signal number to a pipe that a small thread watches; for each stop or reload
signal that thread sends a control message (type 1) to the queue, which ``msgrcv`` is
guaranteed to see.  The thread blocks the signals itself so that they are always delivered
to the main thread, whose ``msgrcv`` they interrupt at once in the common case.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

from ipcd.config import CONTROL_TYPE

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)
#: The control message's body, for anyone reading the queue by hand.
WAKE_BODY = b"ipcd:wake"


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


class Waker:
    """Turns every stop or reload signal into a control message on the queue."""

    def __init__(self, send_wake: Callable[[], object]) -> None:
        self._send_wake = send_wake
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous = -1
        self._thread = threading.Thread(target=self._run, name="ipcd-waker", daemon=True)

    def start(self) -> None:
        self._previous = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._thread.start()

    def _run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS + RELOAD_SIGNALS)
        while True:
            try:
                data = os.read(self._read_fd, 64)
            except OSError:
                return
            if not data:
                return
            if any(b in STOP_SIGNALS + RELOAD_SIGNALS for b in data):
                with contextlib.suppress(Exception):
                    self._send_wake()

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._write_fd)  # the thread's read() returns b"" and it ends
        self._thread.join(timeout=1)
        os.close(self._read_fd)


def wake_message() -> tuple[bytes, int]:
    return WAKE_BODY, CONTROL_TYPE
