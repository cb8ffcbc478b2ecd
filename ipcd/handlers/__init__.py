"""The handler plugin API: what a handler receives, returns and raises.

A handler is a plain function ``handler(job: Job) -> HandlerResult``.  It is registered
under a name, either through the ``ipcd.handlers`` entry-point group of an installed
package or as ``target = "package.module:function"`` in the config, and the config maps
the name to a message type.  It returns bytes, str or a JSON-able value; whatever it
raises fails that job with the exception's text recorded as the error, and never stops
the daemon.  docs/handlers.md is the guide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from ipcd.wire.protocol import Job, JSONValue, Payload

HandlerResult: TypeAlias = "bytes | str | JSONValue"
Handler: TypeAlias = Callable[[Job], HandlerResult]


class HandlerError(Exception):
    """Raise this from a handler to fail the job with just the message (no traceback)."""


class Retry(Exception):
    """Raise this from a handler to run the job again later.

    ``delay`` (seconds) overrides the handler's back-off for this retry.  When the job has
    used all its attempts, it fails with ``reason`` instead and goes to the failed list.
    """

    def __init__(self, reason: str = "retry requested", *, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


__all__ = ["Handler", "HandlerError", "HandlerResult", "JSONValue", "Job", "Payload", "Retry"]
