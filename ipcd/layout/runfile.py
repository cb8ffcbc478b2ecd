"""The layout of a worker's run file: a header the worker rewrites in place (which job it
runs, the job's progress) followed by what the job writes to its stdout and stderr.

:mod:`ipcd.daemon.capture` opens the file in each worker (its fds 1 and 2 point at it)
and reads it in the control process (``ipcctl tail``, ``show``); this module only says
where things are and how a reader tells a torn read from a whole one, so it needs no file.

Layout (little-endian), the header one page::

    magic 8s b"IPCDRUN\\0", version u32, header_size u32,
    seq u64          odd while the worker rewrites the fields below, even when whole
    job_id 16s       the job whose output follows (NULs: none since the worker started)
    started f64      when that job started (Unix time)
    fraction f64     its last progress published (NaN: none)
    updated f64      when that progress was published
    dropped u64      bytes of the job's output cut from the file's front (a trim)
    message_len u32, then message[MESSAGE_MAX] (UTF-8)
    ... zeros up to HEADER_SIZE, then the job's output, appended by the kernel

The worker is the only writer of the header (the kernel appends the output after it,
``O_APPEND``).  A job's output starts ``dropped`` bytes into all it wrote: the worker
trims a file grown past its bound to its last bytes (ipcd.daemon.capture), so a reader
adds ``dropped`` to a position in the file to get one in the job's output.  ``seq`` is a
sequence lock: the writer makes it odd, writes, makes it even; a reader that sees it
odd, or changed across its read, reads again.  Both sides are one ``memcpy`` of
fixed-size fields on a shared mapping, so the torn state is short and rare.
"""

from __future__ import annotations

import math
import mmap
import struct
from typing import NamedTuple, TypeAlias

#: What a header is read from: a copy, or a live mapping of the file (mmap.mmap).
Buffer: TypeAlias = "memoryview | bytearray | bytes | mmap.mmap"

MAGIC = b"IPCDRUN\0"
VERSION = 2
#: The header's size: one page, so the output starts on a page of its own.
HEADER_SIZE = 4096
#: The most bytes of a progress message kept (longer ones are cut at a character).
MESSAGE_MAX = 256

_PREFIX = struct.Struct("<8sII")
_SEQ = struct.Struct("<Q")
_FIELDS = struct.Struct("<16sdddQI")
_SEQ_AT = _PREFIX.size
_FIELDS_AT = _SEQ_AT + _SEQ.size
_MESSAGE_AT = _FIELDS_AT + _FIELDS.size
assert _MESSAGE_AT + MESSAGE_MAX <= HEADER_SIZE


class Header(NamedTuple):
    """What a reader found in a run file's header."""

    job_id: str
    started: float
    #: The last progress published (None: the job has published none).
    fraction: float | None
    updated: float
    message: str
    #: Bytes of the job's output no longer in the file (the worker trimmed its front).
    dropped: int = 0


def format_header(buf: memoryview | bytearray) -> None:
    """A new header: no job yet."""
    buf[:HEADER_SIZE] = bytes(HEADER_SIZE)
    _PREFIX.pack_into(buf, 0, MAGIC, VERSION, HEADER_SIZE)
    write(buf, "", 0.0, None, 0.0, "")


def readable(buf: Buffer) -> bool:
    """Whether the buffer starts with a run file header of this version."""
    if len(buf) < HEADER_SIZE:
        return False
    magic, version, size = _PREFIX.unpack_from(buf, 0)
    return bool(magic == MAGIC and version == VERSION and size == HEADER_SIZE)


def clip(message: str) -> bytes:
    """``message`` as the header keeps it: UTF-8, at most MESSAGE_MAX bytes, cut at a
    character, never in one."""
    raw = message.encode("utf-8", "replace")
    if len(raw) <= MESSAGE_MAX:
        return raw
    return raw[:MESSAGE_MAX].decode("utf-8", "ignore").encode("utf-8")


def write(
    buf: memoryview | bytearray,
    job_id: str,
    started: float,
    fraction: float | None,
    updated: float,
    message: str,
    dropped: int = 0,
) -> None:
    """Rewrite the fields, under the sequence lock (see the module's docstring)."""
    (seq,) = _SEQ.unpack_from(buf, _SEQ_AT)
    seq |= 1  # odd: being written (even a writer that died mid-way left it readable after)
    _SEQ.pack_into(buf, _SEQ_AT, seq)
    raw = clip(message) if message else b""  # none: every job's start
    _FIELDS.pack_into(
        buf, _FIELDS_AT, job_id.encode("ascii", "replace")[:16], started,
        math.nan if fraction is None else fraction, updated, dropped, len(raw),
    )  # fmt: skip
    if raw:
        buf[_MESSAGE_AT : _MESSAGE_AT + len(raw)] = raw
    _SEQ.pack_into(buf, _SEQ_AT, seq + 1)


def read(buf: Buffer, *, tries: int = 100) -> Header | None:
    """The header's fields as one consistent whole; None when the buffer holds no run
    file header, or the writer kept it torn for ``tries`` reads."""
    if not readable(buf):
        return None
    for _ in range(tries):
        (before,) = _SEQ.unpack_from(buf, _SEQ_AT)
        if before & 1:
            continue
        raw_id, started, fraction, updated, dropped, length = _FIELDS.unpack_from(buf, _FIELDS_AT)
        message = bytes(buf[_MESSAGE_AT : _MESSAGE_AT + min(length, MESSAGE_MAX)])
        (after,) = _SEQ.unpack_from(buf, _SEQ_AT)
        if before != after:
            continue
        return Header(
            raw_id.rstrip(b"\0").decode("ascii", "replace"),
            started,
            None if math.isnan(fraction) else fraction,
            updated,
            message.decode("utf-8", "replace"),
            dropped,
        )
    return None
