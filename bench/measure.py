"""ipcd's side of each comparison, through the Python client API, and the round robin
that interleaves it with the raw side.

Every figure is a rate taken over a short window; :func:`interleave` runs the subjects
in turn, round after round (reversing the order every other round so that no subject
always runs right after the same neighbour), and the caller compares medians.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ipcd.client import Client

#: A 64-byte text payload, the size of the raw messages.
PAYLOAD = "p" * 64
#: Longest wait for submitted jobs to finish before a round counts as broken.
DRAIN_TIMEOUT = 60.0

Measure = Callable[[], float]


def interleave(subjects: Sequence[tuple[str, Measure]], rounds: int) -> dict[str, list[float]]:
    """Run every subject once per round, alternating the order; all samples by name."""
    samples: dict[str, list[float]] = {name: [] for name, _ in subjects}
    for round_ in range(rounds):
        ordered = subjects if round_ % 2 == 0 else list(reversed(subjects))
        for name, measure in ordered:
            samples[name].append(measure())
    return samples


def median(values: Iterable[float]) -> float:
    return float(statistics.median(values))


def round_trips(client: Client, seconds: float, handler: str = "echo") -> float:
    """``Client.call`` round trips per second, for ``seconds``."""
    count = 0
    started = now = time.perf_counter()
    end = started + seconds
    while now < end:
        result = client.call(handler, PAYLOAD)
        if not result.ok:
            raise RuntimeError(f"bench job failed: {result.error}")
        count += 1
        now = time.perf_counter()
    return count / (now - started)


def completed(client: Client) -> int:
    """Results the daemon has stored so far (ok and error), from the segment's header."""
    header = client.store.header()
    return header.ok_count + header.error_count


def fire_and_forget(
    client: Client,
    seconds: float,
    *,
    handler: str = "echo",
    payload: str = PAYLOAD,
    count: int | None = None,
    options: Mapping[str, Any] | None = None,
    when_loaded: Callable[[], None] = lambda: None,
) -> float:
    """Jobs per second from the first ``Client.submit`` until the last result is stored.

    Submits for ``seconds`` (or exactly ``count`` jobs), each with ``options`` as
    ``Client.submit``'s keywords, calls ``when_loaded`` while the workers still have work,
    then waits for the result count to catch up.
    """
    keywords = options or {}
    before = completed(client)
    submitted = 0
    started = time.perf_counter()
    end = started + seconds
    while (submitted < count) if count is not None else (time.perf_counter() < end):
        client.submit(handler, payload, **keywords)
        submitted += 1
    when_loaded()
    wait_completed(client, before, submitted)
    elapsed = time.perf_counter() - started
    if client.store.header().error_count:
        raise RuntimeError("bench jobs failed: see the daemon's log")
    return submitted / elapsed


def wait_completed(client: Client, before: int, count: int) -> None:
    """Wait until the daemon has stored ``count`` more results than ``before`` (a
    :func:`completed` figure); RuntimeError after DRAIN_TIMEOUT."""
    deadline = time.perf_counter() + DRAIN_TIMEOUT
    while completed(client) - before < count:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{count} jobs did not finish within {DRAIN_TIMEOUT:g}s")
        time.sleep(0.0002)


def place(pids: Iterable[int], cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of every process in ``pids``."""
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except FileNotFoundError:
            continue
        for tid in tids:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(tid, cpus)
