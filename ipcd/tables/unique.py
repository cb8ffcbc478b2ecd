"""The unique-key table: the keys of cron-safe jobs that are waiting or running.

``ipcctl submit --unique KEY`` claims KEY here before it sends its job, and the job's
final outcome releases it (ipcd.daemon.outcomes calls :func:`ipcd.daemon.uniquerelease.release`).  A
submit that finds the key held queues nothing and exits 4 (ALREADY_QUEUED), so a cron
line that fires again while the last run is still queued, delayed, waiting for a retry
or running does not pile up work.  The client claims under the table's lock, so two
submits started at the same instant cannot both queue.

A key is held from the claim until the job's outcome is final: its result stored ok,
or failed for good.  A retry, a delay or the death of the job's worker keeps it.  No
entry may block a key for ever, so a submitter that finds its key held first asks
whether the holder is still real (:func:`stale_reason`), and takes the key over when

- the holder is CLAIMING (its submitter has not sent the job yet) and that submitter's
  process is gone, or the claim is over an hour old: it died between claiming and
  sending;
- a result is stored for the holder's job since it claimed the key: the release was
  lost (the worker died just after storing the result, or the envelope was rejected).

The daemon, when it starts, also drops QUEUED entries whose job is neither in the job
queue nor in the in-flight table (:func:`ipcd.daemon.uniquerelease.sweep_lost`: the queue was
removed and made again), and entries of dead claimers.  When the daemon's objects are
removed, the table is made anew and empty.

Layout (little-endian)::

    header, 64 bytes: magic 8s b"IPCDUNQ\\0", version u32, header_size u32,
                      entry_count u32, entry_size u32, key_max u32, then zeros
    entry i at 64 + i * entry_size (256 bytes):
        state u32 (0 free, 1 claiming, 2 queued), hash u32 (CRC-32 of the key's UTF-8),
        pid u32 (the claiming client), key_length u32, claimed f64 (Unix time),
        job_id 16s (ASCII, NUL-padded), reserved 8 bytes, key 200s (UTF-8, NUL-padded),
        then zeros up to entry_size

Every read and write holds the semaphore at the table's key (SEM_UNDO, 5 s timeout).
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
import time
import zlib
from collections.abc import Callable, Collection, Iterator
from types import TracebackType
from typing import NamedTuple

from ipcd.errors import AlreadyQueuedError, IpcdError, QueueFullError, UsageError
from ipcd.kernel.segments import Lock, Segment, create_formatted
from ipcd.wire.protocol import MAX_UNIQUE, unique_key_problem

MAGIC = b"IPCDUNQ\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIII36x")
ENTRY = struct.Struct("<IIIId16s8x")
HEADER_SIZE = 64
ENTRY_HEAD = 48
ENTRY_SIZE = 256
#: How many keys may be held at once.
ENTRIES = 1024
LOCK_TIMEOUT = 5.0
#: Claims attempted when the holder changes under us while we look at it.
CLAIM_TRIES = 3
#: A claim older than this whose job was never sent is stale even if a process with the
#: claimer's PID runs (PIDs are reused); a send blocks for ``send_timeout`` at most.
CLAIM_MAX_AGE = 3600.0

assert HEADER.size == HEADER_SIZE and ENTRY.size == ENTRY_HEAD
assert ENTRY_HEAD + MAX_UNIQUE <= ENTRY_SIZE


class State(enum.IntEnum):
    FREE = 0
    #: Claimed; the submitter has not (yet) sent the job.
    CLAIMING = 1
    #: The job was sent (or parked for a delay): it waits, runs or waits for a retry.
    QUEUED = 2


class Entry(NamedTuple):
    """One held key."""

    slot: int
    state: State
    key: str
    job_id: str
    pid: int
    claimed: float


def segment_size(entries: int) -> int:
    return HEADER_SIZE + entries * ENTRY_SIZE


def check_key(key: str) -> bytes:
    """The key's UTF-8 bytes, or UsageError (exit 64) for a key the table cannot hold."""
    problem = unique_key_problem(key)
    if problem is not None:
        raise UsageError(f"unique key {problem}")
    return key.encode("utf-8")


class UniqueTable:
    """The table over a live segment."""

    def __init__(self, segment: Segment, lock: Lock) -> None:
        if not self.readable(segment.buf):
            raise ValueError("not a unique-key table")
        self.segment = segment
        self.lock = lock
        self.buf = segment.buf
        self.count: int = HEADER.unpack_from(self.buf, 0)[3]

    # --- creation ---------------------------------------------------------------------

    @classmethod
    def create(
        cls, key: int, mode: int, entries: int = ENTRIES, *, trusted: Collection[int] = ()
    ) -> UniqueTable:
        """Create the table, or keep the one a previous daemon left (with its keys: the
        jobs holding them may still be queued).  One of another shape is made anew."""
        lock = Lock.create(key, mode, trusted=trusted)
        segment = create_formatted(
            key,
            mode,
            segment_size(entries),
            keep=lambda old: cls.readable(old.buf) and HEADER.unpack_from(old.buf, 0)[3] == entries,
            format=lambda new: cls.format(new.buf, entries),
            lock=lock,
            lock_timeout=LOCK_TIMEOUT,
            what="unique-key table",
            trusted=trusted,
        )
        return cls(segment, lock)

    @classmethod
    def open(cls, key: int) -> UniqueTable:
        """Attach the daemon's table (a submitting client)."""
        return cls(Segment.open(key, what="unique-key table"), Lock.open(key))

    @staticmethod
    def format(buf: memoryview, entries: int) -> None:
        buf[:] = bytes(len(buf))
        HEADER.pack_into(buf, 0, MAGIC, VERSION, HEADER_SIZE, entries, ENTRY_SIZE, MAX_UNIQUE)

    @staticmethod
    def readable(buf: memoryview) -> bool:
        if len(buf) < HEADER_SIZE:
            return False
        magic, version, hsize, entries, esize, key_max = HEADER.unpack_from(buf, 0)
        return bool(
            magic == MAGIC
            and version == VERSION
            and hsize == HEADER_SIZE
            and esize == ENTRY_SIZE
            and key_max == MAX_UNIQUE
            and HEADER_SIZE + entries * esize <= len(buf)
        )

    # --- entries (the caller holds the lock) --------------------------------------------

    def _offset(self, index: int) -> int:
        return HEADER_SIZE + index * ENTRY_SIZE

    def _state(self, index: int) -> int:
        state: int = struct.unpack_from("<I", self.buf, self._offset(index))[0]
        return state

    def _read(self, index: int) -> Entry:
        off = self._offset(index)
        state, _, pid, length, claimed, raw_id = ENTRY.unpack_from(self.buf, off)
        key = bytes(self.buf[off + ENTRY_HEAD : off + ENTRY_HEAD + min(length, MAX_UNIQUE)])
        try:
            st = State(state)
        except ValueError:
            st = State.FREE
        return Entry(
            index, st, key.decode("utf-8", "replace"),
            raw_id.rstrip(b"\0").decode("ascii", "replace"), pid, claimed,
        )  # fmt: skip

    def _find(self, encoded: bytes) -> int | None:
        """The entry holding this key: hashes are compared first, then the text."""
        wanted = struct.pack("<I", zlib.crc32(encoded))
        length = struct.pack("<I", len(encoded))
        for index in range(self.count):
            off = self._offset(index)
            if (
                self.buf[off + 4 : off + 8] == wanted
                and self._state(index) != State.FREE
                and self.buf[off + 12 : off + 16] == length
                and self.buf[off + ENTRY_HEAD : off + ENTRY_HEAD + len(encoded)] == encoded
            ):
                return index
        return None

    def _write(self, index: int, state: State, encoded: bytes, job_id: str, pid: int) -> None:
        """Fill the entry, the state last so that a half-written entry is never live."""
        off = self._offset(index)
        struct.pack_into("<I", self.buf, off, State.FREE)
        self.buf[off + ENTRY_HEAD : off + ENTRY_SIZE] = encoded.ljust(
            ENTRY_SIZE - ENTRY_HEAD, b"\0"
        )
        ENTRY.pack_into(
            self.buf, off, State.FREE, zlib.crc32(encoded), pid, len(encoded), time.time(),
            job_id.encode("ascii", "replace")[:16],
        )  # fmt: skip
        struct.pack_into("<I", self.buf, off, state)

    def _matches(self, index: int, job_id: str) -> bool:
        return self._read(index).job_id == job_id

    # --- operations -----------------------------------------------------------------------

    def claim(self, key: str, job_id: str, pid: int, state: State = State.CLAIMING) -> Entry | None:
        """Hold ``key`` for ``job_id``; returns the entry that holds it already instead.

        Raises QueueFullError when every entry is taken: the job is not accepted.
        """
        encoded = check_key(key)
        with self.lock.held(LOCK_TIMEOUT):
            found = self._find(encoded)
            if found is not None:
                return self._read(found)
            for index in range(self.count):
                if self._state(index) == State.FREE:
                    self._write(index, state, encoded, job_id, pid)
                    return None
        raise QueueFullError(
            f"the unique-key table is full ({self.count} keys held): the job was not accepted"
        )

    def take_over(self, holder: Entry, job_id: str, pid: int) -> bool:
        """Replace a stale holder's claim with ours, if the entry still is that very claim."""
        encoded = check_key(holder.key)
        with self.lock.held(LOCK_TIMEOUT):
            if self._read(holder.slot) != holder:
                return False
            self._write(holder.slot, State.CLAIMING, encoded, job_id, pid)
            return True

    def confirm(self, key: str, job_id: str) -> bool:
        """The job was sent: CLAIMING becomes QUEUED (unless its outcome already freed it)."""
        with self.lock.held(LOCK_TIMEOUT):
            found = self._find(check_key(key))
            if found is None or not self._matches(found, job_id):
                return False
            struct.pack_into("<I", self.buf, self._offset(found), State.QUEUED)
            return True

    def release(self, key: str, job_id: str) -> bool:
        """Free the key if ``job_id`` holds it (another job may hold it by now)."""
        with self.lock.held(LOCK_TIMEOUT):
            found = self._find(key.encode("utf-8", "replace"))
            if found is None or not self._matches(found, job_id):
                return False
            struct.pack_into("<I", self.buf, self._offset(found), State.FREE)
            return True

    def lookup(self, key: str) -> Entry | None:
        with self.lock.held(LOCK_TIMEOUT):
            found = self._find(check_key(key))
            return None if found is None else self._read(found)

    def entries(self) -> list[Entry]:
        """Every held key, in table order."""
        with self.lock.held(LOCK_TIMEOUT):
            return list(self._held())

    def sweep(self, judge: Callable[[], Callable[[Entry], str | None]]) -> list[tuple[Entry, str]]:
        """Free every entry the judge gives a reason for; returns them with the reasons.

        ``judge()`` is called with the lock held, so what it looks at (the job queue,
        the in-flight table) is seen with no claim confirmed meanwhile.
        """
        freed = []
        with self.lock.held(LOCK_TIMEOUT):
            lost = judge()
            for entry in list(self._held()):
                reason = lost(entry)
                if reason is not None:
                    struct.pack_into("<I", self.buf, self._offset(entry.slot), State.FREE)
                    freed.append((entry, reason))
        return freed

    def _held(self) -> Iterator[Entry]:
        for index in range(self.count):
            if self._state(index) != State.FREE:
                yield self._read(index)


def stale_reason(
    holder: Entry, *, alive: Callable[[int], bool], finished: float | None, now: float
) -> str | None:
    """Why ``holder`` no longer holds its key, or None while it does.

    ``finished`` is when the holder's job's stored result was written, None when no
    result is stored for it.
    """
    if holder.state is State.CLAIMING and not alive(holder.pid):
        return f"its submitter (pid {holder.pid}) died before sending it"
    if holder.state is State.CLAIMING and now - holder.claimed > CLAIM_MAX_AGE:
        return f"its submitter (pid {holder.pid}) claimed it long ago and never sent it"
    if finished is not None and finished >= holder.claimed:
        return "its outcome is stored"
    return None


class Claim:
    """Holds a unique key while its job is sent: a context manager.

    Entering claims the key (or takes over a stale holder's) and raises
    AlreadyQueuedError when a live job holds it; leaving marks the job QUEUED, or frees
    the key again when the body of the ``with`` raised (the job was not sent).
    """

    def __init__(
        self,
        table: UniqueTable,
        key: str,
        job_id: str,
        *,
        alive: Callable[[int], bool],
        finished: Callable[[str], float | None],
    ) -> None:
        self.table = table
        self.key = key
        self.job_id = job_id
        self.alive = alive
        self.finished = finished
        #: The stale holder this claim replaced, and why it was stale.
        self.replaced: tuple[Entry, str] | None = None

    def __enter__(self) -> Claim:
        pid = os.getpid()
        holder = None
        for _ in range(CLAIM_TRIES):
            holder = self.table.claim(self.key, self.job_id, pid)
            if holder is None:
                return self
            reason = stale_reason(
                holder, alive=self.alive, finished=self.finished(holder.job_id), now=time.time()
            )
            if reason is None:
                break
            if self.table.take_over(holder, self.job_id, pid):
                self.replaced = (holder, reason)
                return self
        assert holder is not None
        raise AlreadyQueuedError(holder.job_id, self.key)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            # The job is accepted whatever happens here: a confirm lost to a wedged lock
            # leaves the claim CLAIMING, which our exit makes stale, not the submit failed.
            with contextlib.suppress(IpcdError):
                self.table.confirm(self.key, self.job_id)
            return
        # The send's own error is the one to report; if this release fails too, the
        # entry stays CLAIMING under our PID, and our exit makes it stale.
        with contextlib.suppress(IpcdError):
            self.table.release(self.key, self.job_id)
