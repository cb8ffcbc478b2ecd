"""Handlers used by the end-to-end tests, loaded by the daemon through ``target`` paths."""

from __future__ import annotations

import os

from ipcd.handlers import HandlerResult, Job


def describe(job: Job) -> HandlerResult:
    """Return what the handler was given, so tests can check the Job fields."""
    payload = job.payload
    return {
        "id": job.id,
        "type": job.type,
        "payload": payload.hex() if isinstance(payload, bytes) else payload,
        "payload_is_bytes": isinstance(payload, bytes),
        "attempt": job.attempt,
        "sender_pid": job.sender_pid,
        "bare": job.bare,
        "handler_pid": os.getpid(),
    }


def crash(job: Job) -> HandlerResult:
    """Raise an unexpected exception (not a HandlerError)."""
    raise ZeroDivisionError("division by zero in a plugin")


def big(job: Job) -> HandlerResult:
    """Return as many bytes as the payload asks for."""
    assert isinstance(job.payload, str)
    return b"x" * int(job.payload)


def not_jsonable(job: Job) -> HandlerResult:
    """Return something that cannot be a result."""
    return {"a set": {1, 2}}  # type: ignore[dict-item]
