"""Where the time of a round trip goes: CPU time per round trip of each process.

Rates say how far ipcd is from the kernel's speed; this says on which side.  The run
time the scheduler has charged to each process (``/proc/PID/schedstat``, nanoseconds,
kernel time included) is read before and after a window of round trips, for the raw
pair and for ipcd's client and worker, pinned to one CPU so that nothing runs in
parallel and every microsecond is somebody's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def run_ns(pid: int) -> int:
    """Nanoseconds of CPU the scheduler has charged to ``pid`` so far."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[0])


def per_round_trip(
    pids: Sequence[int], rate_for: Callable[[float], float], seconds: float
) -> list[float]:
    """Microseconds of CPU per round trip for each of ``pids``, over one window.

    ``rate_for(seconds)`` runs round trips for about ``seconds`` and returns their rate.
    """
    before = [run_ns(pid) for pid in pids]
    started = time.perf_counter()
    rate = rate_for(seconds)
    elapsed = time.perf_counter() - started
    after = [run_ns(pid) for pid in pids]
    trips = max(rate * elapsed, 1.0)
    return [(a - b) / trips / 1000 for a, b in zip(after, before, strict=True)]
