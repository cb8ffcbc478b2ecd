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


class _NoFlight:
    """An in-flight table with no slots (the sweep looks there for envelopes)."""

    workers = 0
    parked = 0


def _table_with_spare(instance: Instance, mode: int, entries: int) -> tuple[SpillTable, int]:
    """A spill table at the instance's key holding one spare of 100 KiB (a pooled result
    the ring evicted), and the spare's shmid."""
    from ipcd.layout.results import Kind
    from ipcd.tables.spill.segment import Role

    table = SpillTable.create(instance.keys.spill, mode, entries, pool_bytes=MIB)
    index, shmid, _ = table.put(
        b"a" * (100 << 10), job_id="joba", kind=Kind.BYTES, role=Role.RESULT,
        mode=mode & 0o640, owner=None, refused="not stored",
    )  # fmt: skip
    table.mark(index, State.RESULT, shmid)
    table.retire(shmid, "joba", index)
    assert table.entry(index).spare
    return table, shmid


def _unnamed(table: SpillTable, shmid: int) -> bool:
    """Whether the segment exists with no entry naming it (and remove it if so)."""
    from ipcd.kernel.segments import remove_id
    from ipcd.tables.spill.segment import exists

    named = {e.shmid for e in table.entries() if e.state is not State.FREE}
    if exists(shmid) and shmid not in named:
        remove_id(shmid)
        return True
    return False


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_a_spare_another_users_client_evicts_is_swept(instance: Instance) -> None:
    """A client of another user than the daemon whose payload claim evicts a spare may
    not remove it and frees its entry: the master's next sweep removes it."""
    from ipcd.daemon.sweep import Sweeper
    from ipcd.tables.spill.segment import Role

    table, shmid = _table_with_spare(instance, 0o660, 1)
    key = instance.keys.spill
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the client, as uid 1 in the table's group
        code = 1
        try:
            os.setgroups([0])
            os.setgid(0)
            os.setuid(1)
            SpillTable.open(key).claim("jobp", 200 << 10, role=Role.PAYLOAD, refused="no")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert [e.state for e in table.entries()] == [State.CLAIMING]  # the client's
        Sweeper(table, None, _NoFlight()).sweep()  # type: ignore[arg-type]
        assert not _unnamed(table, shmid), "the evicted spare was left behind"
    finally:
        table.segment.close()


def test_the_sweep_leaves_another_tables_spare_alone(instance: Instance) -> None:
    """A spare no entry names is removed only by the sweep of the table it was made for
    (another daemon of the same user keeps its own)."""
    from ipcd.daemon.sweep import Sweeper
    from ipcd.kernel.segments import remove_id
    from ipcd.tables.purge import remove_all
    from ipcd.tables.spill.segment import exists

    other_key = instance.keys.spill ^ 0x5A5A0000
    theirs, spare = _table_with_spare(instance, 0o600, 1)  # at the instance's key...
    ours = SpillTable.create(other_key, 0o600, 1, pool_bytes=MIB)  # ...and ours beside
    try:
        theirs.clear(0)  # unnamed in its own table, never named in ours
        Sweeper(ours, None, _NoFlight()).sweep()  # type: ignore[arg-type]
        assert exists(spare), "another table's spare was removed"
    finally:
        remove_id(spare)
        theirs.segment.close()
        ours.segment.close()
        remove_all((other_key,))


def test_a_dead_claimer_of_a_reused_spare_leaves_nothing(instance: Instance) -> None:
    """A worker killed while writing a result into a spare another process made: the
    master's sweep frees its entry and removes the segment (orphans() alone looks only
    at what the dead claimer made)."""
    from ipcd.daemon.sweep import Sweeper
    from ipcd.tables.spill.segment import Role

    table, shmid = _table_with_spare(instance, 0o600, 2)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a worker that dies after claiming the spare
        try:
            table._claim("jobb", 90 << 10, role=Role.RESULT, refused="no", pooled=True)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    try:
        (claiming,) = [e for e in table.entries() if e.state is State.CLAIMING]
        assert claiming.shmid == shmid and claiming.pid == pid
        Sweeper(table, None, _NoFlight()).sweep()  # type: ignore[arg-type]
        assert [e.state for e in table.entries()] == [State.FREE, State.FREE]
        assert not _unnamed(table, shmid), "the reused spare was left behind"
    finally:
        table.segment.close()


def test_a_spare_more_open_than_the_mode_is_not_reused(instance: Instance) -> None:
    """A spare a daemon with a looser ``[ipc] mode`` left (group-readable) is not written
    into by a daemon whose results are owner-only: the result gets a new segment of the
    tighter mode, and the master's sweep removes the old spare."""
    from ipcd.daemon.sweep import Sweeper
    from ipcd.kernel.segments import Segment, remove_id
    from ipcd.layout.results import Kind
    from ipcd.tables.spill.segment import Role

    table, spare = _table_with_spare(instance, 0o660, 2)  # its results 0o640
    made = -1
    try:
        _, made, _ = table.put(
            b"b" * (90 << 10), job_id="jobb", kind=Kind.BYTES, role=Role.RESULT,
            mode=0o600, owner=None, refused="not stored",
        )  # fmt: skip
        assert made != spare, "the group-readable spare took an owner-only result"
        segment = Segment.attach_id(made)
        assert segment is not None
        try:
            assert segment.info().mode == 0o600
        finally:
            segment.close()
        Sweeper(table, None, _NoFlight()).sweep()  # type: ignore[arg-type]
        assert not _unnamed(table, spare), "the passed-over spare was left behind"
    finally:
        if made >= 0:
            remove_id(made)
        table.segment.close()
