"""The stats segment's layout as pure functions of a buffer: no kernel, no daemon."""

from __future__ import annotations

import time

import pytest

from ipcd.layout import stats as statslayout
from ipcd.tables import stats
from ipcd.tables.stats import Recorder


def _segment(records: int = 3, handlers: tuple[tuple[str, int], ...] = ()) -> bytearray:
    columns = statslayout.columns_for(len(handlers))
    buf = bytearray(statslayout.segment_size(records, columns))
    statslayout.format_segment(buf, records, columns, created=1000.0)
    statslayout.register(buf, [("echo", 2), ("fail", 4), *handlers])
    return buf


def _totals(buf: bytearray) -> dict[str, stats.HandlerTotals]:
    snap = stats.snapshot(buf)
    assert snap is not None
    return {h.name: h for h in snap.handlers}


def test_a_fresh_segment_names_no_handler_column_first() -> None:
    """Column 0 is "-" (jobs no handler ran); configured handlers follow in order."""
    buf = _segment()
    assert statslayout.handler_names(buf) == [("-", 0), ("echo", 2), ("fail", 4)]
    snap = stats.snapshot(buf)
    assert snap is not None and snap.created == 1000.0 and snap.finished == 0
    assert snap.master == dict.fromkeys(statslayout.MASTER_COUNTERS, 0)


def test_records_are_added_up_by_handler_and_outcome() -> None:
    """Two workers' and the master's counts are summed per handler; outcomes stay apart."""
    buf = _segment()
    long_ago = time.monotonic() - 2.0  # between the 1 s and 5 s bounds
    first, second = Recorder(buf, 1), Recorder(buf, 2)
    for _ in range(3):
        first.done("echo", True, long_ago)
    second.done("echo", True, long_ago)
    second.done("fail", False, long_ago)
    second.retried("fail")
    first.rejected()
    master = Recorder(buf, 0, timed=False)
    master.done("fail", False, long_ago)
    totals = _totals(buf)
    assert totals["echo"].outcomes == {"ok": 4, "error": 0, "retried": 0, "rejected": 0}
    assert totals["fail"].outcomes == {"ok": 0, "error": 2, "retried": 1, "rejected": 0}
    assert totals["-"].outcomes == {"ok": 0, "error": 0, "retried": 0, "rejected": 1}
    five = statslayout.BOUNDS.index(5.0)
    assert totals["echo"].buckets[five] == 4 and sum(totals["echo"].buckets) == 4
    assert 8.0 <= totals["echo"].seconds < 20.0
    # The master cannot know how long a dead worker's job ran: it counts, it does not time.
    assert sum(totals["fail"].buckets) == 1


def test_bucket_bounds_are_inclusive_upper_bounds() -> None:
    """A duration equal to a bound falls in that bound's bucket (Prometheus ``le``)."""
    assert statslayout.bucket_index(statslayout.BOUNDS, 0.005) == statslayout.BOUNDS.index(0.005)
    assert statslayout.bucket_index(statslayout.BOUNDS, 0.0051) == statslayout.BOUNDS.index(0.01)
    assert statslayout.bucket_index(statslayout.BOUNDS, 0.0) == 0
    assert statslayout.bucket_index(statslayout.BOUNDS, 31.0) == len(statslayout.BOUNDS)  # +Inf


def test_master_counters_are_counted_in_the_master_record() -> None:
    """Workers started, restarts, recoveries, requeues and reloads add up in record 0."""
    buf = _segment()
    master = Recorder(buf, 0, timed=False)
    for counter in (stats.WORKERS_STARTED, stats.WORKERS_STARTED, stats.WORKER_RESTARTS):
        master.bump(counter)
    master.bump(stats.RELOADS)
    snap = stats.snapshot(buf)
    assert snap is not None
    assert snap.master == {
        "workers_started": 2,
        "worker_restarts": 1,
        "jobs_recovered": 0,
        "jobs_requeued": 0,
        "reloads": 1,
        "log_dropped": 0,
        "results_lost": 0,
        "store_errors": 0,
    }


def test_loss_counters_add_up_over_every_record() -> None:
    """Dropped log lines and lost results are counted by any process in its own record,
    and read as one total."""
    buf = _segment()
    Recorder(buf, 0, timed=False).bump(stats.LOG_DROPPED)
    Recorder(buf, 1).bump(stats.LOG_DROPPED)
    Recorder(buf, 2).bump(stats.RESULTS_LOST)
    snap = stats.snapshot(buf)
    assert snap is not None
    assert (snap.master["log_dropped"], snap.master["results_lost"]) == (2, 1)
    assert stats.counter_total(buf, stats.LOG_DROPPED) == 2


def test_a_counter_is_bumped_by_a_count() -> None:
    """bump adds the count it is given (a process's dropped log lines taken at once)."""
    buf = _segment()
    Recorder(buf, 0, timed=False).bump(stats.LOG_DROPPED, 3)
    Recorder(buf, 1).bump(stats.LOG_DROPPED)
    assert stats.counter_total(buf, stats.LOG_DROPPED) == 4


def test_counts_survive_the_worker_that_made_them() -> None:
    """A new worker in a slot goes on from what the dead one counted."""
    buf = _segment()
    Recorder(buf, 1).done("echo", True, time.monotonic())
    Recorder(buf, 1).done("echo", True, time.monotonic())  # its successor
    assert _totals(buf)["echo"].outcomes["ok"] == 2


def test_a_record_left_mid_update_is_healed_by_the_next_writer() -> None:
    """A writer killed mid-update leaves its sequence odd; the slot's next worker evens it,
    and a reader meanwhile gives up waiting and takes the record as it is."""
    buf = _segment()
    header = statslayout.read_header(buf)
    assert header is not None
    offset = header.record_offset(1)
    statslayout.SEQ.pack_into(buf, offset, 7)  # as if a writer died between its two seq writes
    data = stats.read_record(buf, offset, header.record_size)
    assert statslayout.SEQ.unpack_from(data)[0] == 7
    recorder = Recorder(buf, 1)
    assert statslayout.SEQ.unpack_from(buf, offset)[0] == 8
    recorder.done("echo", True, time.monotonic())
    assert statslayout.SEQ.unpack_from(buf, offset)[0] == 10  # even: consistent for readers
    assert _totals(buf)["echo"].outcomes["ok"] == 1


def test_a_reload_appends_columns_and_never_relabels() -> None:
    """Handlers registered later get new columns; existing counts keep their names, even
    when the new configuration lists the handlers in another order."""
    buf = _segment()
    Recorder(buf, 1).done("fail", False, time.monotonic())
    assert statslayout.register(buf, [("new", 9), ("fail", 4), ("echo", 2)]) == []
    assert statslayout.handler_names(buf) == [("-", 0), ("echo", 2), ("fail", 4), ("new", 9)]
    recorder = Recorder(buf, 2)
    recorder.done("new", True, time.monotonic())
    totals = _totals(buf)
    assert totals["fail"].outcomes["error"] == 1 and totals["new"].outcomes["ok"] == 1
    assert totals["echo"].finished == 0


def test_handlers_beyond_the_columns_count_as_no_handler() -> None:
    """When the table is full, register names what it left out, and their jobs count
    under "-" rather than under another handler's name."""
    buf = _segment()
    header = statslayout.read_header(buf)
    assert header is not None
    more = [(f"h{i}", 100 + i) for i in range(header.columns)]
    left_out = statslayout.register(buf, more)
    assert left_out == [name for name, _ in more[header.columns - 3 :]]
    Recorder(buf, 1).done(left_out[0], True, time.monotonic())
    assert _totals(buf)["-"].outcomes["ok"] == 1


def test_foreign_buffers_are_not_read() -> None:
    """Another layout, a truncated segment or a newer version is no stats segment."""
    buf = _segment()
    assert statslayout.read_header(bytes(64)) is None
    assert statslayout.read_header(buf[:100]) is None
    newer = bytearray(buf)
    newer[8] = 2
    assert statslayout.read_header(newer) is None and stats.snapshot(newer) is None
    with pytest.raises(ValueError):
        Recorder(buf, 3)  # three records: 0 to 2
