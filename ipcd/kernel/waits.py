"""Bounding blocking calls: every wait ipcd makes on the kernel has an end.

sysv_ipc's ``receive()`` and blocking ``send()`` take no timeout, and the PyPI wheel of
sysv_ipc is built without ``semtimedop``.  A blocking call is bounded with a one-shot
``ITIMER_REAL`` whose SIGALRM interrupts the system call (Linux never restarts
``msgrcv``/``msgsnd``/``semop`` after a handler, see signal(7)); sysv_ipc then raises
its base ``Error``.  Signals can only be handled in the main thread, so in any other
thread the call falls back to non-blocking attempts with a capped back-off.  And a wait
whose answer is due within microseconds can poll first (:func:`spin_wait`).
"""

from __future__ import annotations

import _signal
import os
import time
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import sysv_ipc

from ipcd.errors import IpcdError

T = TypeVar("T")


class Interrupted(IpcdError, InterruptedError):
    """A blocking call was interrupted by a signal other than ipcd's own deadline."""


class _Alarm:
    """A one-shot SIGALRM for bounding one system call; records whether it fired."""

    fired = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.fired = True


def bounded(call: Callable[[bool], T], timeout: float | None) -> T:
    """Run ``call(block)`` for at most ``timeout`` seconds; ``None`` waits forever.

    ``call(False)`` must raise ``sysv_ipc.BusyError`` when it would block.  Raises
    ``TimeoutError`` when the time runs out and :class:`Interrupted` for any other signal.
    """
    if timeout is None:
        try:
            return call(True)
        except sysv_ipc.BusyError:
            raise
        except sysv_ipc.Error as exc:
            if type(exc) is sysv_ipc.Error:
                raise Interrupted(str(exc)) from None
            raise
    if timeout <= 0:
        try:
            return call(False)
        except sysv_ipc.BusyError:
            raise TimeoutError from None
    try:
        return call(False)  # the common case costs no timer
    except sysv_ipc.BusyError:
        pass
    alarm = _Alarm()
    started = time.monotonic()
    # _signal, not signal: signal.signal's enum conversions cost ~7 us a call, twice per
    # wait, and the client never imports the signal module (1.3 ms of its start-up).
    try:
        previous = _signal.signal(_signal.SIGALRM, alarm._handler)
    except ValueError:  # not the main thread: no signal handlers here
        return _bounded_by_backoff(call, timeout)
    outer_delay, outer_interval = _signal.setitimer(_signal.ITIMER_REAL, timeout)
    try:
        return call(True)
    except sysv_ipc.BusyError:  # pragma: no cover - blocking calls do not raise it
        raise TimeoutError from None
    except sysv_ipc.Error as exc:
        if type(exc) is not sysv_ipc.Error:
            raise
        # The Python-level handler may not have run yet when sysv_ipc raises, so the
        # clock, not only the flag, tells our alarm from another signal.
        if alarm.fired or time.monotonic() - started >= timeout * 0.999:
            raise TimeoutError from None
        raise Interrupted(str(exc)) from None
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, previous)
        if outer_delay > 0:
            # Someone else's timer (a test runner's, an application's) was running: give it
            # back what is left of it, firing at once if it fell due meanwhile.
            left = outer_delay - (time.monotonic() - started)
            _signal.setitimer(_signal.ITIMER_REAL, max(left, 1e-6), outer_interval)


def spin_wait(poll: Callable[[], T | None], seconds: float) -> T | None:
    """Call ``poll`` until it returns something or ``seconds`` have passed, giving the CPU
    away between calls.

    Why: a process that blocks in msgrcv is put to sleep, and on a virtual machine waking
    it (an IPI to a halted vCPU) costs more than the whole exchange it waits for.  When
    the answer is due within microseconds, as a worker's reply is, polling for a moment
    first halves a round trip.  sched_yield lets the peer run first when both share a CPU.
    """
    end = time.monotonic() + seconds
    while True:
        got = poll()
        if got is not None or time.monotonic() >= end:
            return got
        os.sched_yield()


def _bounded_by_backoff(call: Callable[[bool], T], timeout: float) -> T:
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        try:
            return call(False)
        except sysv_ipc.BusyError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.05)
