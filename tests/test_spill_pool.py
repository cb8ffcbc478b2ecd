"""The pool of result segments ([results] pool_bytes, ipcd.tables.spill.table): a large
result's segment is kept as a spare and reused by the next, within bounds, and swept.

Real daemons and segments; every test ends with no spill segment left on the host.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import suppress

import pytest
from conftest import Instance, spill_segments

from ipcd.client import Client
from ipcd.tables.spill.table import Entry, SpillTable, State

MIB = 1 << 20

HANDLERS = """
[handlers.big]
type = 6
target = "ipcd_test_plugins:big"

[handlers.echo]
type = 2
"""


@pytest.fixture(autouse=True)
def no_spill_segment_left() -> Iterator[None]:
    """Set up before (so torn down after) the instance: nothing it made may remain."""
    before = spill_segments()
    yield
    assert not spill_segments() - before, "spill segments left behind"


def _start(instance: Instance, results: str = "", size: int = 262144) -> Client:
    instance.write(handlers=HANDLERS, results=results)
    text = instance.config_path.read_text().replace("size = 262144", f"size = {size}")
    instance.config_path.write_text(text)
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    return Client(instance.config)


def _entries(instance: Instance) -> list[Entry]:
    table = SpillTable.open(instance.keys.spill)
    try:
        return [e for e in table.entries() if e.state is not State.FREE]
    finally:
        table.segment.close()


def _spares(instance: Instance, count: int = 1) -> list[Entry]:
    """The spares, once there are ``count`` (a worker makes one after its reply)."""
    deadline = time.monotonic() + 10
    while True:
        spares = [e for e in _entries(instance) if e.spare]
        if len(spares) >= count or time.monotonic() > deadline:
            return spares
        time.sleep(0.02)


def test_the_next_large_result_reuses_a_spare_and_reads_back_exactly(instance: Instance) -> None:
    """After a large result a spare of its class exists; the next result goes into that
    very segment, and a smaller result in a larger spare reads back exactly its bytes."""
    client = _start(instance)
    try:
        first = client.call("echo", b"A" * MIB, timeout=30)
        assert first.ok and first.data == b"A" * MIB
        (spare,) = _spares(instance)
        assert spare.capacity == MIB
        second = client.call("echo", b"B" * (900_000), timeout=30)
        assert second.ok and second.data == b"B" * 900_000  # none of A's bytes
        held = {e.job_id: e for e in _entries(instance) if not e.spare}
        assert held[second.job_id].shmid == spare.shmid  # no new segment for it
        again = client.result(first.job_id)
        assert again is not None and again.data == b"A" * MIB  # the first is untouched
    finally:
        assert instance.ipcd("stop").returncode == 0
    assert [e for e in _entries(instance) if e.spare] == []  # stop removes the spares


def test_pool_bytes_zero_keeps_no_spare(instance: Instance) -> None:
    """With [results] pool_bytes = 0 no spare is made and each result has its own segment."""
    client = _start(instance, results="pool_bytes = 0")
    try:
        ids = [client.call("big", str(MIB), timeout=30) for _ in range(2)]
        assert all(r.ok for r in ids)
        entries = _entries(instance)
        assert [e.spare for e in entries] == [False, False]
        assert len({e.shmid for e in entries}) == 2
    finally:
        assert instance.ipcd("stop").returncode == 0


def test_ring_eviction_keeps_spares_within_pool_bytes(instance: Instance) -> None:
    """Results the ring evicts become spares while their bytes fit [results] pool_bytes;
    the rest are removed, and a reader of an evicted result finds none."""
    client = _start(instance, results=f"pool_bytes = {2 * MIB}", size=64 + 4 * 2048)
    try:
        big = [client.call("big", str(MIB), timeout=30) for _ in range(3)]
        assert all(r.ok for r in big)
        for n in range(4):
            assert client.call("echo", f"small {n}", timeout=30).ok
        assert all(client.result(r.job_id) is None for r in big)
        spares = [e for e in _entries(instance) if e.spare]
        assert sum(e.capacity for e in spares) <= 2 * MIB and len(spares) == 2
        doc = json.loads(instance.ipcctl("status", "--json").stdout)["spill"]
        assert (doc["spares"], doc["spare_bytes"], doc["pool_bytes"]) == (2, 2 * MIB, 2 * MIB)
    finally:
        assert instance.ipcd("stop").returncode == 0


def test_pool_bytes_above_spill_bytes_is_refused(instance: Instance) -> None:
    """The pool counts within spill_bytes: a larger pool_bytes is a configuration error."""
    instance.write(handlers=HANDLERS, results="spill_bytes = 1000000\npool_bytes = 2000000")
    started = instance.ipcd("start")
    assert started.returncode != 0
    assert "results.pool_bytes (2000000) must not exceed results.spill_bytes" in started.stderr


def _kill_tree(master: int) -> None:
    """SIGKILL the master and its children at once, as a crash would."""
    with open(f"/proc/{master}/task/{master}/children") as fh:
        pids = [master, *(int(p) for p in fh.read().split())]
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        with suppress(ChildProcessError):
            os.waitpid(-1, os.WNOHANG)
        time.sleep(0.02)


def test_spares_of_a_killed_daemon_are_reused_by_the_next(instance: Instance) -> None:
    """SIGKILL of the whole daemon leaves its spare listed; the next start keeps it and
    its next large result goes into it; ``ipcd stop`` then removes it."""
    client = _start(instance)
    assert client.call("big", str(MIB), timeout=30).ok
    (spare,) = _spares(instance)
    _kill_tree(instance.pid())
    client = _start(instance)
    try:
        result = client.call("big", str(MIB), timeout=30)
        assert result.ok and len(result.data) == MIB
        held = {e.job_id: e for e in _entries(instance) if not e.spare}
        assert held[result.job_id].shmid == spare.shmid
    finally:
        assert instance.ipcd("stop").returncode == 0
