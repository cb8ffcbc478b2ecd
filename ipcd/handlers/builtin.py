"""The handlers ipcd ships: ``echo``, ``sleep`` and ``fail``, for demos and tests."""

from __future__ import annotations

import time

from ipcd.handlers import HandlerError, HandlerResult, Job

#: The longest ``sleep`` job accepted, so a typo cannot park the daemon for days.
MAX_SLEEP = 3600.0


def echo(job: Job) -> HandlerResult:
    """Return the payload unchanged."""
    return job.payload


def sleep(job: Job) -> HandlerResult:
    """Sleep for the payload's number of seconds (a number, or text such as "0.5")."""
    payload = job.payload
    if isinstance(payload, bytes):
        payload = payload.decode("ascii", "replace")
    if isinstance(payload, dict):
        payload = payload.get("seconds")
    try:
        seconds = float(payload)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HandlerError(f"sleep needs a number of seconds, got {payload!r}") from None
    if not 0 <= seconds <= MAX_SLEEP:
        raise HandlerError(f"sleep takes 0 to {MAX_SLEEP:g} seconds, got {seconds:g}")
    time.sleep(seconds)
    return f"slept {seconds:g}s"


def fail(job: Job) -> HandlerResult:
    """Fail the job on purpose, with the payload as the error message."""
    message = job.payload if isinstance(job.payload, str) and job.payload else "failed on purpose"
    raise HandlerError(message)
