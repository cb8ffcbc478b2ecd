"""Handlers the benchmark's daemons load (``target = "bench.handlers:NAME"``)."""

from __future__ import annotations

import time

from ipcd.handlers import HandlerResult, Job

_made: dict[int, bytes] = {}


def busy(job: Job) -> HandlerResult:
    """Use the payload's number of milliseconds of this process's CPU time: fixed work.

    It spins on CPU time, not on the clock: two such jobs sharing one core take twice as
    long, so going from 1 to 2 workers only helps as far as the work really runs in
    parallel (a clock-based spin would show a perfect 2x even on one core).
    """
    end = time.process_time() + float(str(job.payload)) / 1000
    spins = 0
    while time.process_time() < end:
        spins += 1
    return spins


def big(job: Job) -> HandlerResult:
    """Return as many bytes as the payload says, made once per size, so that what is
    measured is moving the result rather than making it."""
    size = int(str(job.payload))
    data = _made.get(size)
    if data is None:
        _made.clear()
        data = _made[size] = b"r" * size
    return data


def length(job: Job) -> HandlerResult:
    """The payload's length: a large payload in, a small result out."""
    payload = job.payload
    return len(payload) if isinstance(payload, bytes | str) else 0
