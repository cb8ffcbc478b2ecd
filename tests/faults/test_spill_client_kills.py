"""Clients SIGKILLed during large submissions while others submit large jobs: the spill
sweep removes what a dead client left unfinished, never the payload of an accepted job."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Instance

from ipcd.tables.spill.table import SpillTable, State

from .load import Load
from .processes import alive, configure, crash_report, start
from .tally import tally

HANDLERS = """
[handlers.digest]
type = 5
target = "ipcd_test_plugins:digest"
"""
#: A payload too large for one message (msgmax 8192): each job's goes in a segment.
PAYLOAD = "p" * 32768
#: Clients killed, in batches submitting at the same time, each a moment after its first
#: accepted job: most die in the middle of a submission.
DOOMED, AT_ONCE = 24, 3
#: Seconds the doomed clients' jobs are parked before they are queued.
DELAY = 4.0


def _entries(table: SpillTable, *states: State) -> list[int]:
    return [e.pid for e in table.entries() if e.state in states]


def _wait(done: Callable[[], object], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_clients_killed_during_large_submissions(instance: Instance) -> None:
    """24 clients SIGKILLed while submitting 32 KiB jobs, beside two clients that keep
    submitting: every job whose submit returned ends ok, no job fails for a missing
    segment, and nothing is left in the spill table or made by a dead client at the end.

    The doomed clients' jobs are parked for DELAY seconds (``submit --delay``), so every
    accepted payload still waits in its unattached segment when the master next sweeps
    the dead clients' entries (every 3 s): the queue is too shallow (msgmnb 16 KiB) to
    hold them back, and workers keep running."""
    configure(instance, HANDLERS, workers=2, jobs="spill_slots = 8192\nparked = 4096")
    master = start(instance)
    table = SpillTable.open(instance.keys.spill)
    rng = random.Random(20261206)
    began = time.monotonic()
    steady = Load(instance, "digest", PAYLOAD, submitters=2, count=200, pause=0.02, name="steady")
    doomed: list[Load] = []
    try:
        steady.start()
        while len(doomed) < DOOMED:
            batch = [
                Load(
                    instance,
                    "digest",
                    PAYLOAD,
                    submitters=1,
                    count=10**6,
                    delay=DELAY,
                    name=f"doomed{n}",
                )
                for n in range(len(doomed), len(doomed) + AT_ONCE)
            ]
            doomed += batch
            for load in batch:
                load.start()
            for load in batch:
                _wait(load.accepted, "no job accepted", 30)
            time.sleep(rng.uniform(0.02, 0.2))
            for load in batch:
                load.kill()
                for proc in load.procs:
                    proc.communicate()
        accepted, refused = steady.join()
    finally:
        for load in [steady, *doomed]:
            load.kill()
    ids = set(steady.accepted())
    for load in doomed:
        ids |= set(load.accepted())
    result = tally(instance, ids, timeout=60)
    assert alive(master), crash_report(instance)
    dead = {proc.pid for load in doomed for proc in load.procs}
    # Entries of jobs killed before their send go once the queue is empty twice.
    _wait(lambda: not _entries(table, *set(State) - {State.FREE}), "entries left", 20)
    table.segment.close()
    left = [f for f in _proc_shm() if f[0] == "0" and int(f[4]) in dead]  # listed or not
    swept = sum(int(str(e["entries"])) for e in result.events if e["event"] == "spill.swept")
    print(
        result.figures(
            "clients killed during large submissions",
            time.monotonic() - began,
            clients_killed=len(dead),
            entries_swept=swept,
            refused=refused,
        )
    )
    assert accepted == len(steady.accepted())
    assert result.missing == [] and result.duplicate_results == []
    failed = {j: r.error for j, r in result.results.items() if not r.ok}
    assert failed == {}, result.story(failed)  # any job: recorded as accepted or not
    assert len(ids) == result.ok
    assert left == []
    assert swept, "no kill landed in a submission: nothing was tested"


def _proc_shm() -> list[list[str]]:
    return [line.split() for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]
