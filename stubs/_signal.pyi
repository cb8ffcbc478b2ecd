# The C module under ``signal``: ipcd's client waits through it directly, skipping the
# enum conversions of ``signal.signal`` (about 7 microseconds a call) and the import of
# the signal module.
from collections.abc import Callable
from types import FrameType
from typing import Any

_Handler = Callable[[int, FrameType | None], Any] | int | None

def signal(signalnum: int, handler: _Handler, /) -> _Handler: ...

SIGALRM: int
ITIMER_REAL: int

def setitimer(which: int, seconds: float, interval: float = ..., /) -> tuple[float, float]: ...
