"""Run a handler in-process as a worker would, for the tests of handler plugins.

``run_handler(handler, payload)`` takes the path a job takes through ipcd, without a
daemon, a queue or a segment:

1. the payload is encoded into an envelope as ``ipcctl submit`` and ``ipcd.client`` do
   (so a payload JSON cannot carry fails here as it would there);
2. the envelope is decoded into the ``Job`` the worker would build (a tuple arrives as
   a list, bytes as bytes, and so on);
3. the handler is called by the worker's own ``execute()``, which turns its return value
   or exception into the stored ``Result`` (or a ``Retry`` request); its
   ``job.progress()`` calls are kept in ``HandlerRun.progress``;
4. a result larger than ``[results] max_result`` is replaced by the error the daemon
   would store (a result larger than a slot is not: the daemon spills it to a segment
   of its own, see ipcd.tables.spill);

and captures every log event emitted meanwhile with structlog's ``capture_logs()``.

What it does not do: enforce a timeout (the master does that by killing the worker),
run retries (it returns the ``Retry`` the handler raised), or survive a handler that
ends the process. Handlers that log through ``structlog.get_logger()`` are captured;
loggers bound before ``structlog.configure(cache_logger_on_first_use=True)`` may not be.
This module is for tests: it imports the daemon's modules and structlog, which
``ipcctl`` never does.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from structlog.testing import capture_logs

from ipcd.config import ResultsConfig
from ipcd.daemon.log import get_logger
from ipcd.daemon.worker import execute
from ipcd.handlers import Handler, Retry
from ipcd.handlers.registry import Registration, Registry
from ipcd.layout.results import Result
from ipcd.tables.spill import within_max_result
from ipcd.wire import protocol
from ipcd.wire.protocol import Job, Payload

#: ``[results] max_result`` when the configuration does not set it.
DEFAULT_MAX_RESULT: int = ResultsConfig._field_defaults["max_result"]


@dataclass(frozen=True, slots=True)
class HandlerRun:
    """What became of one job run by :func:`run_handler`."""

    #: The job as the handler received it.
    job: Job
    #: The result a worker would store; None when the handler raised ``Retry``.
    result: Result | None
    #: The handler's ``Retry`` request, or None.
    retry: Retry | None
    #: The log events emitted during the run, as dicts (``event``, ``log_level``, fields).
    events: list[MutableMapping[str, Any]] = field(default_factory=list)
    #: Every ``job.progress(fraction, message)`` the handler called, in order (the
    #: daemon publishes a few per second of them and keeps the last).
    progress: list[tuple[float, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the job succeeded."""
        return self.result is not None and self.result.ok

    @property
    def output(self) -> object:
        """The stored output as a client reads it back: bytes, str or the JSON value.

        Raises AssertionError (with the error) when the job did not succeed, so that a
        test's failure says why.
        """
        if self.result is None:
            raise AssertionError(f"the handler asked for a retry: {self.retry}")
        if not self.result.ok:
            raise AssertionError(f"the job failed: {self.result.error}")
        return self.result.value()

    @property
    def error(self) -> str:
        """The error a client would see ("" when the job succeeded or asked for a retry)."""
        return "" if self.result is None else self.result.error

    def logged(self, event: str) -> list[MutableMapping[str, Any]]:
        """The captured events named ``event``."""
        return [e for e in self.events if e.get("event") == event]


def run_handler(
    handler: Handler,
    payload: Payload = None,
    *,
    type: int = 2,
    attempt: int = 1,
    name: str = "handler",
    job_id: str | None = None,
    timeout: float | None = None,
    max_result: int = DEFAULT_MAX_RESULT,
) -> HandlerRun:
    """Run ``handler`` on ``payload`` as a worker would run a job of message ``type``.

    ``attempt`` is the run's number (``Job.attempt``: 2 is the first retry), ``name`` the
    handler's name in the configuration (in log events), ``timeout`` the envelope's
    ``--timeout-job`` (only passed on in ``Job.timeout``), ``max_result`` the
    ``[results] max_result`` that bounds the output (the daemon keeps a result larger
    than a slot in a segment of its own, so the slot size bounds nothing).
    """
    body = protocol.encode(
        payload,
        job_id=job_id or protocol.new_job_id(),
        attempt=attempt,
        timeout=timeout,
    )
    progress: list[tuple[float, str]] = []
    job = protocol.decode(body, type, received=time.time())
    job = job._replace(reporter=lambda fraction, message: progress.append((fraction, message)))
    registry = Registry({type: Registration(name, type, f"<{name}>", handler)})
    with capture_logs() as events:
        outcome, _ = execute(registry, job, get_logger(role="worker"))
    if isinstance(outcome, Retry):
        return HandlerRun(job, None, outcome, events, progress)
    outcome = within_max_result(outcome, max_result)
    return HandlerRun(job, outcome, None, events, progress)


__all__ = ["DEFAULT_MAX_RESULT", "HandlerRun", "run_handler"]
