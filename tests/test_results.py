"""Tests of the result ring: its layout over a plain buffer, then over a real SysV segment.

The layout tests run ipcd.layout.results on ``memoryview(bytearray(n))``; the store tests create
the segment and semaphores under a key of their own, fork real children and kill them with
real signals, and remove every object in the ``rig`` fixture's finalizer.
"""

from __future__ import annotations

import os
import signal
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import TEST_KEYS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcd.errors import NoResultError, NotRunningError, WaitTimeoutError
from ipcd.kernel import keys
from ipcd.layout import results
from ipcd.layout.results import (
    HEADER,
    HEADER_SIZE,
    RECORD,
    RECORD_SIZE,
    Header,
    Kind,
    Result,
    SlotState,
    Status,
)
from ipcd.tables import purge
from ipcd.tables.results import LOCK_TIMEOUT, ResultStore

SLOT = 256  # the smallest slot the config allows: 192 bytes of data
NEXT_SEQ = 24  # offset of next_seq in the segment header
LENGTH = 44  # offset of ``length`` in a record header


def ring(slot_count: int = 4, slot_size: int = SLOT, extra: int = 0) -> memoryview:
    """A freshly formatted ring of ``slot_count`` slots in a plain buffer."""
    buf = memoryview(bytearray(HEADER_SIZE + slot_count * slot_size + extra))
    results.format_segment(buf, slot_size)
    return buf


def header_of(buf: memoryview) -> Header:
    header = results.read_header(buf)
    assert header is not None
    return header


def put(buf: memoryview, result: Result) -> int:
    return results.write_result(buf, header_of(buf), result)


def find(buf: memoryview, job_id: str) -> Result | None:
    return results.find_result(buf, header_of(buf), job_id)


def ids(buf: memoryview) -> list[str]:
    return [r.job_id for r in results.iter_results(buf, header_of(buf))]


def text(job_id: str, data: bytes = b"done", attempt: int = 1) -> Result:
    """An ok text result for ``job_id``."""
    return Result(job_id, 2, Status.OK, Kind.TEXT, data, attempt)


def slot_offset(header: Header, seq: int) -> int:
    return HEADER_SIZE + (seq % header.slot_count) * header.slot_size


# --- layout: formatting and headers ----------------------------------------------------------


def test_format_writes_an_empty_ring() -> None:
    """A formatted buffer has a header for as many whole slots as fit, no results and zero
    counters; the bytes left over after the last slot are not used."""
    buf = ring(slot_count=3, extra=SLOT - 1)
    assert results.read_header(buf) == Header(
        slot_count=3,
        slot_size=SLOT,
        next_seq=0,
        daemon_pid=0,
        started=0.0,
        ok_count=0,
        error_count=0,
    )
    assert bytes(buf[:8]) == b"IPCDRES\0"
    assert bytes(buf[HEADER_SIZE:]) == bytes(len(buf) - HEADER_SIZE)
    assert results.iter_results(buf, header_of(buf)) == []
    assert find(buf, "anything") is None


def test_format_clears_an_old_ring() -> None:
    """Formatting a buffer that held results leaves an empty ring."""
    buf = ring()
    put(buf, text("old"))
    results.format_segment(buf, SLOT)
    assert header_of(buf).next_seq == 0
    assert find(buf, "old") is None


def test_layout_for_counts_whole_slots() -> None:
    """layout_for gives the number of whole slots after the 64-byte header."""
    assert results.layout_for(64 + 4 * 256, 256) == (4, 256)
    assert results.layout_for(64 + 4 * 256 + 255, 256) == (4, 256)
    assert results.layout_for(1 << 20, 4096) == (255, 4096)
    assert results.capacity(4096) == 4096 - RECORD_SIZE


def _header_bytes(**fields: object) -> bytearray:
    values: dict[str, object] = {
        "magic": b"IPCDRES\0",
        "version": 1,
        "header_size": 64,
        "slot_count": 2,
        "slot_size": SLOT,
    }
    values.update(fields)
    buf = bytearray(HEADER_SIZE + 2 * SLOT)
    HEADER.pack_into(
        buf,
        0,
        values["magic"],
        values["version"],
        values["header_size"],
        values["slot_count"],
        values["slot_size"],
        0,
        0,
        0,
        0.0,
        0,
        0,
    )
    return buf


@pytest.mark.parametrize(
    "raw",
    [
        bytearray(),
        bytearray(HEADER_SIZE - 1),
        bytearray(HEADER_SIZE + 2 * SLOT),
        bytearray(range(256)) * 4,
        bytearray(b"\xff" * (HEADER_SIZE + 2 * SLOT)),
        _header_bytes(magic=b"IPCDRES\x01"),
        _header_bytes(magic=b"ipcdres\0"),
        _header_bytes(version=2),
        _header_bytes(version=0),
        _header_bytes(header_size=128),
        _header_bytes(slot_count=3),  # one slot more than the buffer holds
        _header_bytes(slot_count=0xFFFFFFFF),
        _header_bytes(slot_count=0),
        _header_bytes(slot_size=SLOT + 1),  # two slots no longer fit
        _header_bytes(slot_size=RECORD_SIZE - 1),
        _header_bytes(slot_size=0),
    ],
    ids=[
        "empty",
        "short",
        "zeros",
        "counting",
        "all-ff",
        "magic-byte",
        "magic-case",
        "version-2",
        "version-0",
        "header-size",
        "one-slot-too-many",
        "huge-slot-count",
        "no-slots",
        "slots-overflow",
        "slot-smaller-than-record",
        "slot-size-0",
    ],
)
def test_read_header_rejects_what_is_not_a_ring(raw: bytearray) -> None:
    """read_header returns None for garbage, a wrong magic, version or header size, and a
    header claiming more (or fewer than one) slots than the buffer holds."""
    assert results.read_header(memoryview(raw)) is None


def test_read_header_accepts_a_header_that_exactly_fits() -> None:
    """A header whose slots end exactly at the end of the buffer is read."""
    assert results.read_header(memoryview(_header_bytes())) == Header(2, SLOT, 0, 0, 0.0, 0, 0)


def test_set_daemon_records_pid_and_start_time() -> None:
    """set_daemon stores the daemon's pid and start time without touching the ring."""
    buf = ring()
    put(buf, text("a"))
    results.set_daemon(buf, 4321, 1700000000.5)
    assert header_of(buf) == Header(4, SLOT, 1, 4321, 1700000000.5, 1, 0)
    assert find(buf, "a") == text("a")


# --- layout: records -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "result",
    [
        Result("job-1", 2, Status.OK, Kind.TEXT, b"hello", 1, 1700000000.25, 1700000001.5),
        Result("a" * 16, 2**31 - 1, Status.OK, Kind.JSON, b'{"n":[1,2]}', 3, 1.0, 2.0),
        Result("bin", -(2**63), Status.OK, Kind.BYTES, b"\x00\xff" * 96, 0xFFFF, -1.5, 0.0),
        Result("empty", 2**63 - 1, Status.OK, Kind.BYTES, b"", 1, 0.0, 0.0),
        Result("failed", 4, Status.ERROR, Kind.TEXT, "boom: ünïcode".encode(), 2, 5.0, 6.0),
        Result("full", 2, Status.OK, Kind.TEXT, b"x" * (SLOT - RECORD_SIZE), 1, 0.0, 0.0),
    ],
    ids=["text", "json", "bytes", "empty", "error", "full-slot"],
)
def test_every_field_round_trips(result: Result) -> None:
    """A written result is read back equal in every field."""
    buf = ring()
    assert put(buf, result) == 0
    assert find(buf, result.job_id) == result
    assert results.iter_results(buf, header_of(buf)) == [result]


def test_attempt_is_capped_at_the_field_width() -> None:
    """An attempt number beyond 65535 is stored as 65535."""
    buf = ring()
    put(buf, text("a", attempt=70000))
    found = find(buf, "a")
    assert found is not None
    assert found.attempt == 0xFFFF


def test_write_returns_consecutive_sequence_numbers() -> None:
    """Each write returns the next sequence number and advances next_seq."""
    buf = ring()
    assert [put(buf, text(f"j{i}")) for i in range(6)] == [0, 1, 2, 3, 4, 5]
    assert header_of(buf).next_seq == 6


def test_oversized_data_is_refused_without_touching_the_ring() -> None:
    """write_result raises ValueError for data larger than a slot holds and changes no byte."""
    buf = ring()
    put(buf, text("a"))
    before = bytes(buf)
    with pytest.raises(ValueError) as caught:
        put(buf, text("b", b"x" * (SLOT - RECORD_SIZE + 1)))
    assert str(caught.value) == "193 bytes do not fit a 256-byte slot"
    assert bytes(buf) == before


def test_newest_record_wins_for_a_repeated_id() -> None:
    """When one id was written twice, find_result returns the later record."""
    buf = ring()
    put(buf, text("again", b"first"))
    put(buf, text("other"))
    put(buf, text("again", b"second", attempt=2))
    assert find(buf, "again") == text("again", b"second", attempt=2)
    assert ids(buf) == ["again", "other", "again"]


@pytest.mark.parametrize("extra", [1, 3, 4, 9])
def test_the_oldest_results_are_evicted(extra: int) -> None:
    """After slot_count + k writes the oldest k results are gone and the rest are found."""
    buf = ring(slot_count=4)
    written = [f"job{i}" for i in range(4 + extra)]
    for job_id in written:
        put(buf, text(job_id, job_id.encode()))
    for job_id in written[:extra]:
        assert find(buf, job_id) is None
    for job_id in written[extra:]:
        assert find(buf, job_id) == text(job_id, job_id.encode())
    assert ids(buf) == written[extra:]


def test_counters_count_ok_and_error_results() -> None:
    """The header counts results written with status ok and with status error."""
    buf = ring(slot_count=2)
    for i in range(5):
        put(buf, text(f"ok{i}"))
    for i in range(3):
        put(buf, Result(f"err{i}", 2, Status.ERROR, Kind.TEXT, b"failed"))
    header = header_of(buf)
    assert (header.ok_count, header.error_count) == (5, 3)


def test_find_result_ignores_other_ids() -> None:
    """An id that was never written, or that only shares a prefix, is not found."""
    buf = ring()
    put(buf, text("abc"))
    assert find(buf, "ab") is None
    assert find(buf, "abcd") is None
    assert find(buf, "ABC") is None


# --- torn and corrupt records ----------------------------------------------------------------


def test_record_left_in_writing_state_is_not_read() -> None:
    """A record whose state word is WRITING (a writer died) is never returned."""
    buf = ring()
    put(buf, text("before"))
    seq = put(buf, text("torn"))
    put(buf, text("after"))
    struct.pack_into("<I", buf, slot_offset(header_of(buf), seq), SlotState.WRITING)
    assert find(buf, "torn") is None
    assert ids(buf) == ["before", "after"]


def test_the_unlocked_read_finds_what_the_locked_one_finds() -> None:
    """Without a writer at work, find_unlocked is sure and agrees with find_result: the
    newest record of an id, None for an id never stored or cleared."""
    buf = ring()
    for i in range(6):
        put(buf, text(f"job{i % 3}", bytes([i]) * i))
    for job_id in ("job0", "job1", "job2", "job9", ""):
        assert results.find_unlocked(buf, job_id) == (True, find(buf, job_id))
    results.clear_result(buf, header_of(buf), "job1")
    assert results.find_unlocked(buf, "job1") == (True, None)


def test_the_unlocked_read_leaves_to_the_lock_what_it_cannot_vouch_for() -> None:
    """A matching record being written, failing its CRC, or spilled (whose segment only
    the lock keeps), and a header that does not read, make find_unlocked unsure."""
    buf = ring()
    seq = put(buf, text("torn", b"data"))
    offset = slot_offset(header_of(buf), seq)
    struct.pack_into("<I", buf, offset, SlotState.WRITING)
    assert results.find_unlocked(buf, "torn") == (False, None)
    struct.pack_into("<I", buf, offset, SlotState.VALID)
    assert results.find_unlocked(buf, "torn") == (True, text("torn", b"data"))
    buf[offset + RECORD_SIZE] ^= 0x01
    assert results.find_unlocked(buf, "torn") == (False, None)
    put(buf, text("spilled")._replace(spill=results.Spilled(7, 1, 1000)))
    assert find(buf, "spilled") is not None
    assert results.find_unlocked(buf, "spilled") == (False, None)
    buf[:8] = b"PHP_SM\0\0"
    assert results.find_unlocked(buf, "spilled") == (False, None)


def test_record_with_a_flipped_data_byte_is_not_read() -> None:
    """A record whose data no longer matches its CRC is never returned."""
    buf = ring()
    seq = put(buf, text("torn", b"some result data"))
    put(buf, text("intact"))
    buf[slot_offset(header_of(buf), seq) + RECORD_SIZE + 5] ^= 0x01
    assert find(buf, "torn") is None
    assert ids(buf) == ["intact"]


@pytest.mark.parametrize(
    "field_offset",
    [8, 32, 42, 44, 48, 63],
    ids=["seq", "type", "attempt", "length", "submitted", "last"],
)
def test_record_with_a_flipped_header_byte_is_not_read(field_offset: int) -> None:
    """A record whose header (from ``seq`` on) no longer matches its CRC is never returned."""
    buf = ring()
    seq = put(buf, text("torn"))
    buf[slot_offset(header_of(buf), seq) + field_offset] ^= 0x40
    assert find(buf, "torn") is None


@pytest.mark.parametrize("length", [SLOT - RECORD_SIZE + 1, SLOT, 0xFFFFFFFF])
def test_record_longer_than_its_slot_is_not_read(length: int) -> None:
    """A record whose length runs past its slot is never returned, even with a CRC that
    matches the bytes it claims."""
    buf = ring(slot_count=8)
    seq = put(buf, text("long"))
    for i in range(6):
        put(buf, text(f"filler{i}", b"f" * 100))
    offset = slot_offset(header_of(buf), seq)
    struct.pack_into("<I", buf, offset + LENGTH, length)
    end = min(offset + RECORD_SIZE + length, len(buf))
    struct.pack_into("<I", buf, offset + 4, zlib.crc32(buf[offset + 8 : end]))
    assert find(buf, "long") is None
    assert "long" not in ids(buf)


@pytest.mark.parametrize(("status", "kind"), [(2, 0), (0, 3), (255, 255)])
def test_record_with_unknown_status_or_kind_is_not_read(status: int, kind: int) -> None:
    """A record with a status or kind ipcd does not know (and a matching CRC) is skipped."""
    buf = ring()
    seq = put(buf, text("odd"))
    offset = slot_offset(header_of(buf), seq)
    struct.pack_into("<BB", buf, offset + 40, status, kind)
    struct.pack_into("<I", buf, offset + 4, zlib.crc32(buf[offset + 8 : offset + 64 + 4]))
    assert find(buf, "odd") is None


# --- too large -------------------------------------------------------------------------------


def test_too_large_replaces_the_data_by_an_error() -> None:
    """too_large keeps the job's identity and times and turns it into an error result saying
    the result was too large."""
    big = Result("big", 7, Status.OK, Kind.JSON, b"x" * 5000, 2, 10.0, 11.0)
    assert results.too_large(big, 4096) == Result(
        job_id="big",
        type=7,
        status=Status.ERROR,
        kind=Kind.TEXT,
        data=b"result too large for the result segment: 5000 bytes, a slot holds 4032 "
        b"(raise [results] slot_size)",
        attempt=2,
        submitted=10.0,
        finished=11.0,
    )


def test_require_raises_no_result_error_for_none() -> None:
    """require returns a found result and raises NoResultError naming the id otherwise."""
    assert results.require(text("a"), "a") == text("a")
    with pytest.raises(NoResultError) as caught:
        results.require(None, "abc")
    assert str(caught.value) == (
        "no result for job abc (still queued or running, evicted, or never submitted)"
    )


# --- arbitrary and damaged segments ----------------------------------------------------------


def _check_safe_reads(buf: memoryview, job_ids: list[str]) -> None:
    """Reading ``buf`` raises nothing, and every record returned lies inside one valid slot."""
    header = results.read_header(buf)
    if header is None:
        return
    returned = results.iter_results(buf, header)
    returned += [r for r in (results.find_result(buf, header, i) for i in job_ids) if r]
    returned += [r for r in (results.find_unlocked(buf, i)[1] for i in job_ids) if r]
    for result in returned:
        assert len(result.data) <= results.capacity(header.slot_size)
        assert any(
            bytes(buf[off + RECORD_SIZE : off + RECORD_SIZE + len(result.data)]) == result.data
            and struct.unpack_from("<I", buf, off)[0] == SlotState.VALID
            and struct.unpack_from("<I", buf, off + LENGTH)[0] == len(result.data)
            for off in (slot_offset(header, i) for i in range(header.slot_count))
        )


@settings(max_examples=400, deadline=None, database=None)
@given(st.binary(max_size=2048), st.lists(st.text(max_size=17), max_size=3))
def test_random_bytes_never_break_the_readers(data: bytes, job_ids: list[str]) -> None:
    """Random bytes as a segment make the readers return None or in-slot records, never
    raise."""
    _check_safe_reads(memoryview(bytearray(data)), job_ids)


@settings(max_examples=400, deadline=None, database=None)
@given(
    st.sampled_from([1, 2, 5]) | st.integers(0, 8) | st.integers(0, 0xFFFFFFFF),
    st.sampled_from([64, 65, 256]) | st.integers(60, 300) | st.integers(0, 0xFFFFFFFF),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=1, max_size=300),
    st.integers(-2, 64),
)
def test_random_slots_behind_a_valid_magic_never_break_the_readers(
    slot_count: int, slot_size: int, next_seq: int, pattern: bytes, slack: int
) -> None:
    """A correct magic with arbitrary geometry, sequence and slot bytes never makes the
    readers raise or return a record reaching past its slot."""
    size = max(HEADER_SIZE, min(HEADER_SIZE + slot_count * slot_size + slack, 1 << 15))
    raw = bytearray((pattern * (size // len(pattern) + 1))[:size])
    HEADER.pack_into(raw, 0, b"IPCDRES\0", 1, 64, slot_count, slot_size, next_seq, 0, 0, 0.0, 0, 0)
    _check_safe_reads(memoryview(raw), ["", "x", "a" * 16])


def _valid_segment() -> bytearray:
    buf = ring(slot_count=5)
    for i in range(7):
        put(buf, text(f"job{i}", bytes([i]) * (i * 25)))
    return bytearray(buf)


_VALID = bytes(_valid_segment())


@settings(
    max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=12
    ),
    st.just(len(_VALID)) | st.integers(0, len(_VALID)),
)
def test_mutated_segments_never_break_the_readers(
    mutations: list[tuple[int, int]], keep: int
) -> None:
    """Random byte changes (and truncation) of a valid segment never make the readers raise
    or return a record reaching past its slot."""
    raw = bytearray(_VALID)
    for offset, value in mutations:
        raw[offset] = value
    _check_safe_reads(memoryview(raw[:keep]), [f"job{i}" for i in range(7)])


# --- the store over real kernel objects ------------------------------------------------------


def _live_keys() -> set[int]:
    """Every key in use by a queue, segment or semaphore on this machine."""
    found: set[int] = set()
    for kind in ("msg", "shm", "sem"):
        with open(f"/proc/sysvipc/{kind}") as fh:
            next(fh)
            found.update(int(line.split()[0]) & 0xFFFFFFFF for line in fh)
    return found


@dataclass
class Rig:
    """A private key pair for one test, and the stores it opened (closed at the end)."""

    key: int
    gate_key: int
    stores: list[ResultStore] = field(default_factory=list)

    def create(self, size: int = 64 + 8 * 512, slot_size: int = 512) -> ResultStore:
        store = ResultStore.create(self.key, self.gate_key, 0o600, size, slot_size)
        self.stores.append(store)
        return store

    def open(self) -> ResultStore:
        store = ResultStore.open(self.key)
        self.stores.append(store)
        return store


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """Keys from ftok() on a file of this test's own; every object at them is removed after."""
    live = _live_keys()
    for n in range(20):
        key_file = tmp_path / f"k{n}"
        key_file.touch()
        key = keys.ftok(key_file, 0x49)
        gate_key = key + keys.GATE_KEY_OFFSET
        if not {key, gate_key} & live:
            break
    else:
        pytest.fail("no free SysV key found for this test")
    made = Rig(key, gate_key)
    TEST_KEYS.update((key, gate_key))
    try:
        yield made
    finally:
        for store in made.stores:
            store.close()
        purge.remove_all((key, gate_key))


def test_store_put_and_get_across_two_stores(rig: Rig) -> None:
    """A result put through the daemon's store is read through a client's store opened on
    the same key, and the other way round."""
    daemon = rig.create()
    client = rig.open()
    first = Result("first", 2, Status.OK, Kind.JSON, b'{"a":1}', 1, 1.0, 2.0)
    second = Result("second", 3, Status.ERROR, Kind.TEXT, b"nope", 2, 3.0, 4.0)
    assert daemon.put(first) == 0
    assert client.get("first") == first
    assert client.put(second) == 1
    assert daemon.get("second") == second
    assert daemon.all() == client.all() == [first, second]
    assert client.get("third") is None
    assert client.header() == Header(8, 512, 2, 0, 0.0, 1, 1)


def test_store_replaces_an_oversized_result_by_an_error(rig: Rig) -> None:
    """ResultStore.put stores an error saying "too large" in place of a result that does not
    fit a slot, and counts it as an error."""
    store = rig.create(slot_size=512)
    store.put(Result("big", 2, Status.OK, Kind.BYTES, b"\xff" * 449, 1, 5.0, 6.0))
    assert store.get("big") == Result(
        "big",
        2,
        Status.ERROR,
        Kind.TEXT,
        b"result too large for the result segment: 449 bytes, a slot holds 448 "
        b"(raise [results] slot_size)",
        1,
        5.0,
        6.0,
    )
    store.put(text("fits", b"\xff" * 448))
    header = store.header()
    assert (header.ok_count, header.error_count) == (1, 1)


def test_store_records_the_daemon(rig: Rig) -> None:
    """set_daemon is visible to a client's store; pid 0 clears it."""
    store = rig.create()
    client = rig.open()
    store.set_daemon(777, 12.5)
    assert (client.header().daemon_pid, client.header().started) == (777, 12.5)
    store.set_daemon(0, 0.0)
    assert client.header().daemon_pid == 0


def test_store_on_a_clobbered_segment_says_so_and_keeps_the_lock_usable(rig: Rig) -> None:
    """A client's look at a segment whose header is not a ring raises NotRunningError
    (OverwrittenError), and the semaphore is released for the next caller."""
    created = rig.create()
    # A client's store: it does not know the layout to mend it.
    store = ResultStore(created.segment, created.lock)
    store.segment.buf[:8] = b"NOTARING"
    with pytest.raises(NotRunningError) as caught:
        store.get("x")
    assert str(caught.value).startswith(
        f"the segment at key {rig.key:#010x} is not an ipcd result segment (another program"
    )
    with store.lock.held(0.5):
        pass


def _wait_for(pid: int) -> int:
    """Reap child ``pid`` and return the signal that killed it (0 if it exited)."""
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def test_a_holder_killed_with_the_lock_does_not_wedge_it(rig: Rig) -> None:
    """When a process holding the result semaphore is killed, SEM_UNDO releases it and put
    and get succeed within the lock timeout."""
    store = rig.create()
    held_r, held_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: take the lock, say so, wait for the go, die holding it
        try:
            os.close(held_r)
            os.close(go_w)
            held = store.lock.held(5)  # kept referenced: collecting it would release the lock
            held.__enter__()
            os.write(held_w, b"held")
            os.read(go_r, 1)
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.close(held_w)
    os.close(go_r)
    try:
        assert os.read(held_r, 4) == b"held"
        with pytest.raises(WaitTimeoutError), store.lock.held(0.2):
            pass  # the child really holds it
    finally:
        os.close(go_w)
        os.close(held_r)
        killed_by = _wait_for(pid)
    assert killed_by == signal.SIGKILL

    start = time.monotonic()
    store.put(text("after-kill"))
    assert store.get("after-kill") == text("after-kill")
    assert time.monotonic() - start < LOCK_TIMEOUT


def test_a_writer_killed_mid_record_leaves_nothing_readable(rig: Rig) -> None:
    """A child killed half-way through writing a record leaves no result for that id (nor
    for the evicted one), and the next put and get work."""
    store = rig.create(size=64 + 4 * 512)
    for i in range(4):
        store.put(text(f"old{i}"))
    pid = os.fork()
    if pid == 0:  # child: the first steps of write_result by hand, then death
        try:
            held = store.lock.held(5)
            held.__enter__()
            buf = store.segment.buf
            header = header_of(buf)
            seq = header.next_seq
            offset = slot_offset(header, seq)
            struct.pack_into("<I", buf, offset, SlotState.WRITING)
            struct.pack_into("<Q", buf, NEXT_SEQ, seq + 1)
            record = RECORD.pack(
                SlotState.WRITING, 0, seq, b"torn".ljust(16, b"\0"), 2, 0, 1, 1, 300, 1.0, 2.0
            )
            full = record + b"t" * 300
            buf[offset : offset + len(full) // 2] = full[: len(full) // 2]
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    assert _wait_for(pid) == signal.SIGKILL

    assert store.get("torn") is None
    assert store.get("old0") is None  # its slot was being overwritten
    assert [r.job_id for r in store.all()] == ["old1", "old2", "old3"]
    assert store.put(text("next")) == 5
    assert store.get("next") == text("next")
    assert [r.job_id for r in store.all()] == ["old2", "old3", "next"]


def test_results_survive_a_daemon_restart(rig: Rig) -> None:
    """ResultStore.create on an existing segment of the same layout keeps its results and
    counters."""
    first = rig.create(size=64 + 8 * 512, slot_size=512)
    first.put(text("kept", b"survives"))
    first.set_daemon(1234, 1.0)
    first.close()

    second = rig.create(size=64 + 8 * 512, slot_size=512)
    assert second.get("kept") == text("kept", b"survives")
    assert second.header() == Header(8, 512, 1, 1234, 1.0, 1, 0)


def test_a_new_slot_size_reformats_the_segment(rig: Rig) -> None:
    """ResultStore.create with another slot_size on a segment of the same size formats it
    anew: the old results are gone."""
    first = rig.create(size=64 + 8 * 512, slot_size=512)
    first.put(text("dropped"))
    first.close()

    second = rig.create(size=64 + 8 * 512, slot_size=256)
    assert second.header() == Header(16, 256, 0, 0, 0.0, 0, 0)
    assert second.get("dropped") is None
    second.put(text("new"))
    assert second.get("new") == text("new")


def test_a_new_size_makes_a_new_segment(rig: Rig) -> None:
    """ResultStore.create with another size replaces the segment by one of the new size."""
    first = rig.create(size=64 + 8 * 512, slot_size=512)
    first.put(text("dropped"))
    first.close()

    second = rig.create(size=64 + 4 * 512, slot_size=512)
    assert second.segment.size == 64 + 4 * 512
    assert second.header() == Header(4, 512, 0, 0, 0.0, 0, 0)
    assert second.get("dropped") is None


def test_missing_tables_are_named_in_errors(tmp_path: Path) -> None:
    """Each table's ``open`` names its own object when none is there, not "result segment"."""
    from conftest import Instance

    from ipcd.tables.failed import FailedList
    from ipcd.tables.inflight import InflightTable
    from ipcd.tables.spill.table import SpillTable
    from ipcd.tables.unique import UniqueTable

    inst = Instance(tmp_path, tmp_path / "ipcd.toml")
    inst.write()
    k = inst.keys  # no daemon ever ran here: none of its objects exist
    openers = [
        (FailedList.open, k.failed, "no failed list at key"),
        (InflightTable.open, k.inflight, "no in-flight table at key"),
        (SpillTable.open, k.spill, "no spill table at key"),
        (UniqueTable.open, k.unique, "no unique-key table at key"),
    ]
    for opener, key, expected in openers:
        with pytest.raises(NotRunningError, match=expected):
            opener(key)


def test_a_daemon_store_mends_an_overwritten_header_keeping_its_records(rig: Rig) -> None:
    """The daemon's store (which knows the slot size) writes the header back over PHP's
    40 bytes, keeps every record, and says how many it kept and lost."""
    store = rig.create()
    store.put(Result("kept", 2, Status.OK, Kind.TEXT, b"still here"))
    store.segment.buf[:40] = b"PHP_SM\0\0" + bytes(32)
    found = store.get("kept")
    assert found is not None and found.data == b"still here"
    mended = store.take_mends()
    assert mended == [(1, 0)]
    assert store.take_mends() == []  # taken once
    store.put(Result("next", 2, Status.OK, Kind.TEXT, b"after"))
    assert [r.job_id for r in store.all()] == ["kept", "next"]


def _race_result(n: int) -> Result:
    """Write number ``n`` of the race: every field says ``n``, and so does every 8 bytes
    of its data, whose length also follows from ``n``."""
    return Result(
        "race", n, Status.OK, Kind.BYTES, struct.pack("<Q", n) * (1 + n % 500), n & 0xFFFF,
        float(n), float(n),
    )  # fmt: skip


def _writer(store: ResultStore, writes: Iterator[Result]) -> int:
    """Fork a child that puts ``writes`` into ``store`` as fast as it can; returns once
    the first is stored (the child's PID)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            os.close(ready_r)
            store.put(next(writes))
            os.write(ready_w, b"w")
            for result in writes:
                store.put(result)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"w"
    os.close(ready_r)
    return pid


def test_a_lock_free_read_racing_a_writer_never_accepts_a_torn_record(rig: Rig) -> None:
    """A child process rewrites a two-slot ring as fast as ResultStore.put can while this
    process reads it with find_unlocked: every result the unlocked read accepts is one
    the writer wrote whole (each field and each 8 data bytes name the same write)."""
    store = rig.create(size=64 + 2 * 4096, slot_size=4096)
    reader = rig.open()
    writes = 200_000
    pid = _writer(store, (_race_result(n) for n in range(1, writes + 1)))
    accepted = unsure = torn = 0
    last = 0
    try:
        while last < writes:
            sure, found = results.find_unlocked(reader.segment.buf, "race")
            if not sure:
                unsure += 1
                continue
            assert found is not None
            accepted += 1
            if found != _race_result(found.type):
                torn += 1
            last = max(last, found.type)
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    print(f"lock-free reads: {accepted} accepted, {unsure} left to the lock, {torn} torn")
    assert torn == 0
    assert accepted > 0
    assert store.get("race") == _race_result(writes)


# --- waiters in the header -------------------------------------------------------------------

T0 = 1_700_000_000.0


def test_a_waiters_stamp_holds_until_its_end_and_then_lapses() -> None:
    """A stamp says someone waits from now until its end, not a millisecond after."""
    buf = ring()
    assert not results.someone_waits(buf, T0)
    results.mark_waiting(buf, T0 + 0.25, T0)
    assert results.someone_waits(buf, T0)
    assert results.someone_waits(buf, T0 + 0.25)
    assert not results.someone_waits(buf, T0 + 0.252)
    assert not results.someone_waits(buf, T0 + 3600)


def test_a_later_stamp_is_kept_and_an_earlier_one_replaced() -> None:
    """A waiter whose wait ends sooner leaves another's later end; a lapsed end is
    replaced by any new one."""
    buf = ring()
    results.mark_waiting(buf, T0 + 5, T0)
    results.mark_waiting(buf, T0 + 1, T0 + 0.5)
    assert results.someone_waits(buf, T0 + 4.9)
    results.mark_waiting(buf, T0 + 11, T0 + 10)
    assert results.someone_waits(buf, T0 + 10.9)
    assert not results.someone_waits(buf, T0 + 11.1)


def test_stamps_wrap_round_the_32_bit_millisecond_count() -> None:
    """Across the moment the millisecond count wraps to 0, a stamp still holds until its
    end and lapses after it."""
    wrap = (2**32) / 1000 * 397_000  # a Unix time whose ms count is 0 modulo 2**32
    buf = ring()
    results.mark_waiting(buf, wrap + 0.1, wrap - 0.1)
    assert results.someone_waits(buf, wrap - 0.1)
    assert results.someone_waits(buf, wrap + 0.05)
    assert not results.someone_waits(buf, wrap + 0.2)


def test_a_stamp_beyond_the_horizon_counts_as_nobody() -> None:
    """No stamp is written further ahead than WAIT_HORIZON_MS, and one found there (no
    ipcd client's) is not believed."""
    buf = ring()
    results.mark_waiting(buf, T0 + 3600, T0)
    assert results.someone_waits(buf, T0 + results.WAIT_HORIZON_MS / 1000 - 0.01)
    assert not results.someone_waits(buf, T0 + results.WAIT_HORIZON_MS / 1000 + 0.01)
    struct.pack_into("<I", buf, 36, (int(T0 * 1000) + results.WAIT_HORIZON_MS + 5) & 0xFFFFFFFF)
    assert not results.someone_waits(buf, T0)


def test_set_daemon_leaves_the_waiters_stamp() -> None:
    """Recording the daemon does not erase a waiter's stamp (it shares a header word's
    neighbourhood)."""
    buf = ring()
    results.mark_waiting(buf, T0 + 1, T0)
    results.set_daemon(buf, 4321, T0)
    assert results.someone_waits(buf, T0 + 0.5)
    assert header_of(buf).daemon_pid == 4321


def _gate_waiter(store: ResultStore, stamp: bool, pause: float) -> int:
    """Fork a child that waits on the gate for ``pause`` seconds (after stamping its wait
    when ``stamp``); it exits 0 when a pulse woke it, 1 when none came."""
    gate = store.gate
    assert gate is not None
    pid = os.fork()
    if pid == 0:
        try:
            if stamp:
                store.waiting(pause)
            os._exit(0 if gate.wait(pause) else 1)
        finally:
            os._exit(2)
    while not gate._sem.waiting_for_zero:  # until the child is in its semop
        time.sleep(0.001)
    return pid


@pytest.mark.parametrize("stamp", [True, False], ids=["stamped", "unstamped"])
def test_a_result_pulses_the_gate_only_for_a_waiter_that_said_so(rig: Rig, stamp: bool) -> None:
    """A put wakes a process waiting on the gate that stamped its wait in the header;
    one that did not is not pulsed (the daemon no longer asks the kernel)."""
    store = rig.create()
    pid = _gate_waiter(store, stamp, 3.0 if stamp else 0.5)
    store.put(text("news"))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == (0 if stamp else 1)


def test_a_waiter_killed_while_waiting_leaves_a_stamp_that_lapses(rig: Rig) -> None:
    """A waiter SIGKILLed in its wait leaves its stamp, which stops counting once its
    wait would have ended: nothing to undo, and the daemon's pulses stop by themselves."""
    store = rig.create()
    pid = _gate_waiter(store, True, 5.0)
    stamped = time.time()
    os.kill(pid, signal.SIGKILL)
    assert _wait_for(pid) == signal.SIGKILL
    buf = store.segment.buf
    assert results.someone_waits(buf, stamped)
    assert not results.someone_waits(buf, stamped + 5.0 + 0.05)


def test_a_write_in_progress_never_shows_an_empty_slot_or_a_cleared_count(rig: Rig) -> None:
    """While a child process writes results for fresh ids as fast as ResultStore.put can,
    a reader probing the header and the newest slot never sees ``next_seq`` go back (to
    0: struct's pack_into clears a field before it fills it) nor a record whose write
    began (its id is there) read as an empty slot.  The unlocked read takes both for
    "surely no result" (docs/protocol.md; the PHP client trusts them always), so either
    would make a waiter that looked during the write sleep through the pulse after it,
    or a PHP waiter, already told the job ended, wait until its timeout."""
    slots = 64
    store = rig.create(size=64 + slots * 512, slot_size=512)
    reader = rig.open()
    buf = reader.segment.buf
    writes = 100_000
    pid = _writer(store, (text(f"w{n:07d}", b"x" * (n % 200)) for n in range(writes)))
    probes = went_back = emptied = 0
    last = 1
    seq_of = struct.Struct("<Q").unpack_from
    state_of = struct.Struct("<I").unpack_from
    try:
        while last < writes:
            probes += 1
            count = seq_of(buf, 24)[0]
            if count < last:
                went_back += 1
                continue
            last = count
            offset = HEADER_SIZE + ((count - 1) % slots) * 512
            if buf[offset + 16 : offset + 24] != f"w{count - 1:07d}".encode():
                continue  # the writer has not reached the id yet
            state = state_of(buf, offset)[0]
            if state == SlotState.EMPTY and seq_of(buf, 24)[0] - count < slots // 2:
                emptied += 1  # begun, not yet overwritten, and yet "empty"
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    print(f"{probes} probes: next_seq went back {went_back}, a begun record empty {emptied}")
    assert (went_back, emptied) == (0, 0)
