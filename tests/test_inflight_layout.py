"""The in-flight table's layout (ipcd.layout.inflight) over a plain buffer, no kernel.

The live table (ipcd.tables.inflight) and a worker's ``msgrcv`` into its slot are tested
on real segments by the daemon's tests (test_workers.py, test_poison.py, tests/faults/);
here the kernel's part of a delivery, writing the message type and text into the slot's
``struct msgbuf``, is done by hand.
"""

from __future__ import annotations

import struct

import pytest

from ipcd.layout import inflight as layout
from ipcd.layout.inflight import Held, Peek, Shape, State, WorkerView

WORKERS, PARKED, TEXT_SIZE = 2, 3, 256


def _table() -> memoryview:
    buf = memoryview(bytearray(layout.segment_size(WORKERS, PARKED, TEXT_SIZE)))
    layout.format_segment(buf, WORKERS, PARKED, TEXT_SIZE)
    return buf


def _deliver(buf: memoryview, off: int, type_: int, text: bytes) -> None:
    """What the kernel does as msgrcv delivers into the slot: mtype, then the text."""
    struct.pack_into("<q", buf, off + layout.MSGBUF_TYPE, type_)
    buf[off + layout.TEXT : off + layout.TEXT + len(text)] = text


SHAPE = Shape(WORKERS, PARKED, layout.slot_size_for(TEXT_SIZE), TEXT_SIZE)


def test_a_formatted_table_reads_back_its_shape_with_every_slot_free() -> None:
    """The header says how many slots of which size; every slot starts FREE, no master."""
    buf = _table()
    assert layout.readable(buf)
    assert layout.read_shape(buf) == SHAPE
    assert SHAPE.size == len(buf)
    assert layout.master_pid(buf) == 0
    for index in range(WORKERS + PARKED):
        assert layout.peek(buf, SHAPE.offset(index)) == Peek(State.FREE, 0, 0.0, 0.0, "")
        assert layout.held(buf, SHAPE.offset(index), index, TEXT_SIZE) is None


def test_slots_are_aligned_and_hold_a_whole_message() -> None:
    """A slot is its 64-byte header, the msgbuf's mtype, and text_size bytes, rounded up
    to 8 so that every slot's mtype and f64 fields stay aligned."""
    assert layout.slot_size_for(256) == 64 + 8 + 256
    assert layout.slot_size_for(8189) == 64 + 8 + 8192
    assert SHAPE.offset(3) == 64 + 3 * SHAPE.slot_size


def test_what_is_not_a_table_is_refused() -> None:
    """Another program's bytes, a shorter buffer, or a header promising more slots than
    the buffer holds: not readable, and read_shape says why."""
    buf = _table()
    assert not layout.readable(buf[:32])
    assert not layout.readable(buf[:-1])
    with pytest.raises(ValueError, match="larger than its segment"):
        layout.read_shape(buf[:-1])
    other = memoryview(bytearray(len(buf)))
    assert not layout.readable(other)
    with pytest.raises(ValueError, match="not an in-flight table"):
        layout.read_shape(other)


def test_a_job_passes_through_a_worker_slot() -> None:
    """Receiving, delivered (length unknown: read up to the NULs), running with its id and
    deadline, finished (counted, no job held): what the master sees at each step."""
    buf = _table()
    off = SHAPE.offset(1)
    layout.reset_worker(buf, off, SHAPE.slot_size, 4242)
    layout.begin_receive(buf, off, 4242, 0, TEXT_SIZE)
    assert layout.held(buf, off, 1, TEXT_SIZE) is None
    _deliver(buf, off, 7, b'{"ipcd":1}')
    assert layout.held(buf, off, 1, TEXT_SIZE) == Held(
        1, State.RECEIVING, 4242, 7, b'{"ipcd":1}', 0, "", 0.0, 0.0
    )
    layout.received(buf, off, length=10, attempt=2, job_id="job1", started=100.0, deadline=130.0)
    assert layout.message_type(buf, off) == 7
    assert bytes(layout.text(buf, off, 10)) == b'{"ipcd":1}'
    assert layout.held(buf, off, 1, TEXT_SIZE) == Held(
        1, State.RUNNING, 4242, 7, b'{"ipcd":1}', 2, "job1", 100.0, 130.0
    )
    assert layout.peek(buf, off) == Peek(State.RUNNING, 7, 100.0, 130.0, "job1")
    assert layout.worker_view(buf, off, 1) == WorkerView(1, 4242, State.RUNNING, "job1", 100.0, 0)
    layout.finished(buf, off)
    assert layout.held(buf, off, 1, TEXT_SIZE) is None
    assert layout.worker_view(buf, off, 1) == WorkerView(1, 4242, State.RECEIVING, "", 0.0, 1)


def test_the_next_receive_zeroes_the_last_message() -> None:
    """A slot receiving again holds no trace of the previous, longer message, so a
    shorter one delivered next is read whole up to its NULs."""
    buf = _table()
    off = SHAPE.offset(0)
    layout.begin_receive(buf, off, 1, 0, TEXT_SIZE)
    _deliver(buf, off, 7, b"x" * 40)
    layout.received(buf, off, length=40, attempt=1, job_id="a", started=1.0, deadline=0.0)
    layout.finished(buf, off)
    layout.begin_receive(buf, off, 1, 40, TEXT_SIZE)
    assert bytes(layout.text(buf, off, TEXT_SIZE)) == bytes(TEXT_SIZE)
    _deliver(buf, off, 7, b"short")
    held = layout.held(buf, off, 0, TEXT_SIZE)
    assert held is not None and held.body == b"short"


def test_a_new_worker_starts_its_slot_from_zero() -> None:
    """reset_worker clears the counters and whatever the dead worker left."""
    buf = _table()
    off = SHAPE.offset(0)
    _deliver(buf, off, 7, b"left")
    layout.received(buf, off, length=4, attempt=1, job_id="a", started=1.0, deadline=0.0)
    layout.finished(buf, off)
    layout.reset_worker(buf, off, SHAPE.slot_size, 99)
    assert layout.worker_view(buf, off, 0) == WorkerView(0, 99, State.RECEIVING, "", 0.0, 0)
    assert bytes(layout.text(buf, off, 4)) == bytes(4)


def test_a_parked_job_is_held_until_cleared() -> None:
    """A parked slot holds the job's envelope, attempt and due time; cleared, it is free."""
    buf = _table()
    off = SHAPE.offset(3)
    assert layout.is_free(buf, off)
    layout.park_in(
        buf, off, type_=9, body=b"envelope", job_id="job2", attempt=3, parked_at=5.0, due=60.0
    )
    assert not layout.is_free(buf, off)
    assert layout.attempt(buf, off) == 3
    assert layout.held(buf, off, 3, TEXT_SIZE) == Held(
        3, State.PARKED, 0, 9, b"envelope", 3, "job2", 5.0, 60.0
    )
    layout.clear(buf, off)
    assert layout.is_free(buf, off)
    assert layout.held(buf, off, 3, TEXT_SIZE) is None


def test_a_job_kept_in_its_worker_gets_its_new_envelope_and_attempt() -> None:
    """rewrite puts the next attempt's envelope in the slot, with its length."""
    buf = _table()
    off = SHAPE.offset(0)
    _deliver(buf, off, 7, b"attempt one, longer")
    layout.received(buf, off, length=19, attempt=1, job_id="a", started=1.0, deadline=0.0)
    layout.rewrite(buf, off, b"attempt two", 2)
    held = layout.held(buf, off, 0, TEXT_SIZE)
    assert held is not None and (held.body, held.attempt) == (b"attempt two", 2)


def test_the_header_written_again_keeps_the_slots() -> None:
    """A header overwritten by another program is written back from the shape known,
    with the master's pid, and the jobs in the slots are still there."""
    buf = _table()
    off = SHAPE.offset(4)
    layout.park_in(buf, off, type_=9, body=b"b", job_id="j", attempt=1, parked_at=0.0, due=1.0)
    buf[:64] = b"\xff" * 64
    assert not layout.readable(buf)
    layout.write_header(buf, SHAPE, 777)
    assert layout.read_shape(buf) == SHAPE
    assert layout.master_pid(buf) == 777
    layout.set_master(buf, 778)
    assert layout.master_pid(buf) == 778
    held = layout.held(buf, off, 4, TEXT_SIZE)
    assert held is not None and held.job_id == "j"


def test_a_slot_with_an_unknown_state_holds_nothing() -> None:
    """A state no version of ipcd writes is read as FREE: no job is made up from it."""
    buf = _table()
    off = SHAPE.offset(0)
    _deliver(buf, off, 7, b"x")
    struct.pack_into("<I", buf, off, 99)
    assert layout.peek(buf, off).state is State.FREE
    assert layout.held(buf, off, 0, TEXT_SIZE) is None
