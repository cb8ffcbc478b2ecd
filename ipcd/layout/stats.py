"""The stats segment's layout, as pure functions of a buffer: sizes, header, handler
table, and where each counter of a record lies.

:mod:`ipcd.tables.stats` counts into it (one writer a record, under a seqlock) and adds the
records up; this module only says where things are, so it needs no kernel object.

Layout (little-endian; docs/protocol.md has it for other languages)::

    header, 64 bytes
      magic         8s   b"IPCDSTA\\0"
      version       u32  1
      header_size   u32  offset of record 0 (header, bounds and handler table)
      records       u32  record 0 is the master's, record i + 1 worker slot i's
      columns       u32  handler columns per record; column 0 is "-" (no handler)
      bounds        u32  B, the number of finite histogram bounds
      record_size   u32
      handlers      u32  columns named so far (the table grows, it never reorders)
      name_size     u32  bytes of a name in the handler table (48)
      created       f64  when the counting started (Unix time)
      zeros
    bounds: B f64 at offset 64, the upper bounds (``le``) of the duration buckets
    handler table: ``columns`` entries of {type i64, name name_size bytes, NUL-padded}
    record: seq u64, counters 8 u64 (workers_started, worker_restarts,
            jobs_recovered, jobs_requeued, reloads: the master's, zero outside record 0;
            log_dropped, results_lost: any process's, in its own record; 1 reserved),
            then per column: ok, error, retried, rejected u64;
            B + 1 bucket counts u64 (not cumulative; the last is +Inf); sum f64 seconds

A handler keeps its column for the segment's life: a reload that adds handlers appends
columns, so counts are never relabelled.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable
from typing import NamedTuple

MAGIC = b"IPCDSTA\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIIIIIId")
HEADER_SIZE = 64
NAME_SIZE = 48
ENTRY = struct.Struct(f"<q{NAME_SIZE}s")
SEQ = struct.Struct("<Q")
_HANDLERS_OFFSET = 32  # of the header's ``handlers`` count
#: Upper bounds of the job-duration buckets, in seconds (Prometheus ``le``).
BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
#: How a job ended, in column order.  ``error`` is a final error result (the job failed
#: for good), ``retried`` an attempt that asked for another run, ``rejected`` a message
#: that could not be decoded (counted under "-").
OUTCOMES = ("ok", "error", "retried", "rejected")
OK, ERROR, RETRIED, REJECTED = range(4)
#: The daemon's counters, in record order; readers add them up over every record.  The
#: first five only the master counts; ``log_dropped`` (log lines the log file refused: a
#: full disk), ``results_lost`` (results a damaged result segment lost) and
#: ``store_errors`` (writes the job store refused) every process counts in its own record.
MASTER_COUNTERS = (
    "workers_started",
    "worker_restarts",
    "jobs_recovered",
    "jobs_requeued",
    "reloads",
    "log_dropped",
    "results_lost",
    "store_errors",
)
(
    WORKERS_STARTED, WORKER_RESTARTS, JOBS_RECOVERED, JOBS_REQUEUED, RELOADS, LOG_DROPPED,
    RESULTS_LOST, STORE_ERRORS,
) = range(8)  # fmt: skip
MASTER_SLOTS = 8
MASTER = struct.Struct(f"<{MASTER_SLOTS}Q")
#: The name of column 0: jobs no handler ran (unknown type, undecodable message).
NO_HANDLER = "-"
#: Handler columns a new segment has room for, at the least.
MIN_COLUMNS = 64

assert HEADER.size <= HEADER_SIZE


def bucket_index(bounds: tuple[float, ...], seconds: float) -> int:
    """The bucket a duration falls in: the first bound at or above it (``le``), else
    ``len(bounds)``, the +Inf bucket."""
    return bisect.bisect_left(bounds, seconds)


def column_struct(bounds: int) -> struct.Struct:
    return struct.Struct(f"<{len(OUTCOMES) + bounds + 1}Qd")


def record_size(columns: int, bounds: int) -> int:
    return SEQ.size + MASTER.size + columns * column_struct(bounds).size


def header_size(columns: int, bounds: int) -> int:
    return (HEADER_SIZE + 8 * bounds + columns * ENTRY.size + 63) // 64 * 64


def segment_size(records: int, columns: int, bounds: int = len(BOUNDS)) -> int:
    return header_size(columns, bounds) + records * record_size(columns, bounds)


def columns_for(handlers: int) -> int:
    """Room for every handler now and for reloads that add as many again."""
    return max(MIN_COLUMNS, 2 * (handlers + 1))


class Header(NamedTuple):
    records: int
    columns: int
    bounds: tuple[float, ...]
    record_size: int
    handlers: int
    created: float
    header_size: int

    def record_offset(self, index: int) -> int:
        return self.header_size + index * self.record_size


def format_segment(buf: memoryview | bytearray, records: int, columns: int, created: float) -> None:
    """Zero the segment and write an empty layout whose only named column is "-"."""
    bounds = len(BOUNDS)
    buf[:] = bytes(len(buf))
    struct.pack_into(f"<{bounds}d", buf, HEADER_SIZE, *BOUNDS)
    HEADER.pack_into(
        buf, 0, MAGIC, VERSION, header_size(columns, bounds), records, columns, bounds,
        record_size(columns, bounds), 0, NAME_SIZE, created,
    )  # fmt: skip
    register(buf, [(NO_HANDLER, 0)])


def write_header(buf: memoryview | bytearray, header: Header) -> None:
    """Write ``header`` (one read earlier) back over one another program overwrote."""
    HEADER.pack_into(
        buf, 0, MAGIC, VERSION, header.header_size, header.records, header.columns,
        len(header.bounds), header.record_size, header.handlers, NAME_SIZE, header.created,
    )  # fmt: skip


def read_header(buf: memoryview | bytearray | bytes) -> Header | None:
    """The header, or None if the buffer does not hold a stats layout this code reads."""
    if len(buf) < HEADER_SIZE:
        return None
    magic, version, hsize, records, columns, nbounds, rsize, handlers, nsize, created = (
        HEADER.unpack_from(buf, 0)
    )
    if (
        magic != MAGIC
        or version != VERSION
        or nsize != NAME_SIZE
        or hsize != header_size(columns, nbounds)
        or rsize != record_size(columns, nbounds)
        or handlers > columns
        or hsize + records * rsize > len(buf)
    ):
        return None
    bounds = struct.unpack_from(f"<{nbounds}d", buf, HEADER_SIZE)
    return Header(records, columns, bounds, rsize, handlers, created, hsize)


def _table_offset(header: Header, column: int) -> int:
    return HEADER_SIZE + 8 * len(header.bounds) + column * ENTRY.size


def handler_names(buf: memoryview | bytearray | bytes) -> list[tuple[str, int]]:
    """(name, message type) of every named column, in column order."""
    header = read_header(buf)
    if header is None:
        return []
    out = []
    for column in range(header.handlers):
        type_, raw = ENTRY.unpack_from(buf, _table_offset(header, column))
        out.append((raw.rstrip(b"\0").decode("utf-8", "replace"), type_))
    return out


def register(buf: memoryview | bytearray, handlers: Iterable[tuple[str, int]]) -> list[str]:
    """Give each handler not yet named a column; returns the names there was no room for.

    Only the master calls this (at start and at each reload), so the table has one
    writer.  An entry is written before the count that publishes it.
    """
    header = read_header(buf)
    assert header is not None
    known = {name: column for column, (name, _) in enumerate(handler_names(buf))}
    used = header.handlers
    left_out = []
    for name, type_ in handlers:
        raw = name.encode("utf-8")[:NAME_SIZE]
        column = known.get(name)
        if column is None and used >= header.columns:
            left_out.append(name)
            continue
        if column is None:
            column = used
            used += 1
            known[name] = column
        ENTRY.pack_into(buf, _table_offset(header, column), type_, raw)
        struct.pack_into("<I", buf, _HANDLERS_OFFSET, used)
    return left_out
