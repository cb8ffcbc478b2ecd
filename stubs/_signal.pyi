# The C module under ``signal``: ipcd calls its ``signal`` directly on the client's wait
# path, skipping the enum conversions of ``signal.signal`` (about 7 microseconds a call).
from collections.abc import Callable
from types import FrameType
from typing import Any

_Handler = Callable[[int, FrameType | None], Any] | int | None

def signal(signalnum: int, handler: _Handler, /) -> _Handler: ...
