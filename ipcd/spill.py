"""Spilling: payloads and results too large for a message or a result slot.

Each large payload or result lives in a SysV segment of its own, made with IPC_PRIVATE
(key 0) by its producer: the client for a payload, the worker for a result.  The queue
carries only a small envelope naming the segment (``"spill"``, see docs/protocol.md) and
the result ring only a 16-byte descriptor (ipcd.results), so neither fills with data.

A segment with key 0 is known only by its id, so a producer that dies at the wrong moment
would orphan it.  The *spill table* (a segment and a SEM_UNDO lock at the job key plus
``7 * 0x01000000``) records every one.  Its entries move through these states:

    FREE -> CLAIMING   claimed under the lock *before* shmget: pid, claimed_at, job id
         -> (shmid recorded, data written, segment handed to the daemon's uid)
         -> QUEUED     the envelope was sent; the job's outcome frees it (ipcd.outcome)
         or RESULT     the ring holds the descriptor; eviction from the ring frees it

The master sweeps entries left CLAIMING by a dead process: it removes the recorded
segment and also any key-0 segment that process created since it claimed (it died
between shmget and recording the id), then frees the entry.  QUEUED entries belong to
the queue (and, for a job that failed for good, to the failed list); RESULT entries to
the ring.

Layout (little-endian)::

    table header, 64 bytes: magic 8s b"IPCDSPT\\0", version u32, header_size u32,
                            entries u32, entry_size u32, then zeros
    entry, 48 bytes:        state u32, pid u32, claimed_at f64, shmid i32 (-1: none yet),
                            reserved u32, size u64, job_id 16s
    spill segment:          magic 8s b"IPCDSPD\\0", version u32, role u32 (0 payload,
                            1 result), kind u32 (0 bytes, 1 text, 2 JSON), reserved u32,
                            size u64, job_id 16s, zeros to 64 bytes; then the raw data

Data is copied once in (the producer writes straight into the segment) and once out (the
reader copies it into a bytes object): no base64, no JSON, no CRC over the data.
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from ipcd import protocol
from ipcd.errors import IpcdError, MessageError, PayloadError, QueueFullError
from ipcd.procs import alive
from ipcd.protocol import Job, Payload, SpillRef
from ipcd.results import Kind, Result, Spilled, Status
from ipcd.shm import Lock, Segment, create_formatted, remove_id

if TYPE_CHECKING:
    from ipcd.client import Client
    from ipcd.resultstore import ResultStore

MAGIC = b"IPCDSPT\0"
VERSION = 1
HEADER = struct.Struct("<8sIIII")
HEADER_SIZE = 64
ENTRY = struct.Struct("<IIdiIQ16s")
ENTRY_SIZE = 48
SEGMENT_MAGIC = b"IPCDSPD\0"
SEGMENT = struct.Struct("<8sIIIIQ16s")
#: Where a spill segment's data starts.
DATA = 64
LOCK_TIMEOUT = 5.0
#: How long after claiming a dead creator's segment may have been made (clock skew).
CTIME_SLACK = 1.0
SYSVIPC_SHM = "/proc/sysvipc/shm"

assert ENTRY.size == ENTRY_SIZE and SEGMENT.size <= DATA


class State(enum.IntEnum):
    FREE = 0
    CLAIMING = 1
    QUEUED = 2
    RESULT = 3


class Role(enum.IntEnum):
    PAYLOAD = 0
    RESULT = 1


_KINDS = {"bytes": Kind.BYTES, "text": Kind.TEXT, "json": Kind.JSON}
_NAMES = {v: k for k, v in _KINDS.items()}


class Entry(NamedTuple):
    slot: int
    state: State
    pid: int
    claimed_at: float
    shmid: int
    size: int
    job_id: str


class Swept(NamedTuple):
    freed: int
    removed: int


def segment_size(entries: int) -> int:
    return HEADER_SIZE + entries * ENTRY_SIZE


class SpillTable:
    """The table over a live segment; every change holds its lock."""

    def __init__(self, segment: Segment, lock: Lock) -> None:
        self.segment = segment
        self.lock = lock
        self.buf = segment.buf
        magic, version, hsize, count, esize = HEADER.unpack_from(self.buf, 0)
        if magic != MAGIC or version != VERSION or hsize != HEADER_SIZE or esize != ENTRY_SIZE:
            raise ValueError("not a spill table")
        if segment_size(count) > segment.size:
            raise ValueError("spill table larger than its segment")
        self.count: int = count
        #: The daemon's limits for results ([results] max_result, [ipc] mode).
        self.max_result = 0
        self.mode = 0o600
        #: The group of the daemon's objects ([ipc] group), given to result segments.
        self.gid: int | None = None

    @classmethod
    def create(cls, key: int, mode: int, entries: int) -> SpillTable:
        """Create the table, or keep the one a previous daemon left (its entries still
        name live segments); one of another size is rebuilt with its entries carried."""
        lock = Lock.create(key, mode)
        carried: list[Entry] = []

        def keep(segment: Segment) -> bool:
            with contextlib.suppress(ValueError):
                old = cls(segment, lock)
                if old.count == entries:
                    return True
                carried.extend(e for e in old.entries() if e.state is not State.FREE)
            return False

        def format(segment: Segment) -> None:
            segment.buf[:] = bytes(len(segment.buf))
            HEADER.pack_into(segment.buf, 0, MAGIC, VERSION, HEADER_SIZE, entries, ENTRY_SIZE)
            table = cls(segment, lock)
            for index, entry in enumerate(carried[:entries]):
                table._write(entry._replace(slot=index))

        segment = create_formatted(
            key,
            mode,
            segment_size(entries),
            keep=keep,
            format=format,
            lock=lock,
            lock_timeout=LOCK_TIMEOUT,
        )
        for entry in carried[entries:]:  # no room: what they named cannot be kept
            remove_checked(entry.shmid, entry.job_id)
        return cls(segment, lock)

    @classmethod
    def open(cls, key: int) -> SpillTable:
        return cls(Segment.open(key), Lock.open(key))

    # --- entries --------------------------------------------------------------------------

    def entry(self, index: int) -> Entry:
        state, pid, claimed, shmid, _, size, raw_id = ENTRY.unpack_from(
            self.buf, HEADER_SIZE + index * ENTRY_SIZE
        )
        try:
            st = State(state)
        except ValueError:
            st = State.FREE
        job_id = raw_id.rstrip(b"\0").decode("ascii", "replace")
        return Entry(index, st, pid, claimed, shmid, size, job_id)

    def entries(self) -> list[Entry]:
        return [self.entry(i) for i in range(self.count)]

    def _write(self, e: Entry) -> None:
        ENTRY.pack_into(
            self.buf, HEADER_SIZE + e.slot * ENTRY_SIZE, e.state, e.pid, e.claimed_at,
            e.shmid, 0, e.size, e.job_id.encode("ascii", "replace")[:16],
        )  # fmt: skip

    def claim(self, job_id: str, size: int) -> int:
        """Take a free entry for a segment this process is about to make."""
        with self.lock.held(LOCK_TIMEOUT):
            for index in range(self.count):
                if self.entry(index).state is State.FREE:
                    self._write(
                        Entry(index, State.CLAIMING, os.getpid(), time.time(), -1, size, job_id)
                    )
                    return index
        raise QueueFullError(
            f"every spill slot is taken ([jobs] spill_slots = {self.count}): "
            "the large job was not accepted"
        )

    def record(self, index: int, shmid: int) -> None:
        with self.lock.held(LOCK_TIMEOUT):
            self._write(self.entry(index)._replace(shmid=shmid))

    def mark(self, index: int, state: State, shmid: int) -> None:
        """Move an entry on, if it still names that segment."""
        with self.lock.held(LOCK_TIMEOUT):
            entry = self.entry(index)
            if entry.shmid == shmid:
                self._write(entry._replace(state=state))

    def find(self, shmid: int, job_id: str) -> Entry | None:
        for entry in self.entries():
            if entry.state is not State.FREE and entry.shmid == shmid and entry.job_id == job_id:
                return entry
        return None

    def discard(self, index: int, shmid: int) -> None:
        """Remove a segment this process made (its creator may, whoever owns it now) and
        free its entry: a submission that failed before its envelope was sent."""
        remove_id(shmid)
        self.free(index)

    def free(self, index: int) -> None:
        with self.lock.held(LOCK_TIMEOUT):
            self._write(Entry(index, State.FREE, 0, 0.0, -1, 0, ""))

    def release(self, shmid: int, job_id: str, hint: int | None = None) -> None:
        """Remove the segment (only if it really is this job's) and free its entry."""
        with self.lock.held(LOCK_TIMEOUT):
            entry = None
            if hint is not None and 0 <= hint < self.count:
                entry = self.entry(hint)
                if entry.shmid != shmid or entry.job_id != job_id:
                    entry = None
            entry = entry or self.find(shmid, job_id)
            if not remove_checked(shmid, job_id) and _exists(shmid):
                return  # not ours to remove (a client's process): leave it recorded
            if entry is not None:
                self._write(Entry(entry.slot, State.FREE, 0, 0.0, -1, 0, ""))

    # --- making segments ------------------------------------------------------------------

    def put(
        self, data: bytes, *, job_id: str, kind: Kind, role: Role, mode: int, owner: int | None
    ) -> tuple[int, int]:
        """Claim an entry, make the segment, write header and data, hand it to ``owner``.

        Returns (entry, shmid); the entry is still CLAIMING.  On any failure the segment
        is removed and the entry freed before the error goes on.
        """
        index = self.claim(job_id, len(data))
        shmid = -1
        try:
            segment = Segment.create_private(DATA + len(data), mode)
            shmid = segment.id
            self.record(index, shmid)
            try:
                SEGMENT.pack_into(
                    segment.buf, 0, SEGMENT_MAGIC, VERSION, role, kind, 0, len(data),
                    job_id.encode("ascii")[:16],
                )  # fmt: skip
                segment.buf[DATA : DATA + len(data)] = data
                segment.give_to(owner, self.gid if role is Role.RESULT else None)
            finally:
                segment.close()
        except BaseException:
            if shmid >= 0:
                remove_id(shmid)
            self.free(index)
            raise
        return index, shmid

    # --- the master's sweep -----------------------------------------------------------------

    def sweep(self, store: ResultStore | None = None) -> Swept:
        """Free entries left CLAIMING by dead processes, removing what they made; with
        ``store`` (at start) also RESULT entries the ring no longer holds."""
        entries = segments = 0
        referenced: set[int] | None = None
        with contextlib.ExitStack() as stack:
            if store is not None:  # ring lock first, as ResultStore.put takes them
                stack.enter_context(store.lock.held(store.lock_timeout))
                referenced = {r.spill.shmid for r in store.records() if r.spill is not None}
            stack.enter_context(self.lock.held(LOCK_TIMEOUT))
            shm: list[list[str]] | None = None
            for entry in self.entries():
                if entry.state is State.CLAIMING and not alive(entry.pid):
                    if shm is None:
                        shm = _proc_shm()
                    for shmid in _orphans(shm, entry):
                        segments += remove_id(shmid)
                elif (
                    entry.state is State.RESULT
                    and referenced is not None
                    and entry.shmid not in referenced
                ):
                    segments += remove_checked(entry.shmid, entry.job_id)
                else:
                    continue
                self._write(Entry(entry.slot, State.FREE, 0, 0.0, -1, 0, ""))
                entries += 1
        return Swept(entries, segments)

    def remove_segments(self) -> int:
        """Remove every segment the table lists (when the daemon's objects are purged)."""
        return sum(
            remove_checked(e.shmid, e.job_id)
            for e in self.entries()
            if e.state is not State.FREE and e.shmid >= 0
        )


def remove_listed(key: int) -> int:
    """Remove the segments listed by a spill table at ``key``, if that is one."""
    try:
        table = SpillTable.open(key)
    except (IpcdError, ValueError):
        return 0
    try:
        return table.remove_segments()
    finally:
        table.segment.close()


# --- payloads -----------------------------------------------------------------------------


@contextlib.contextmanager
def outgoing(
    client: Client,
    payload: Payload,
    body: bytes | None,
    *,
    job_id: str,
    reply_to: int | None,
    timeout: float | None,
    unique: str | None = None,
) -> Iterator[bytes]:
    """The envelope to send: ``body`` when the client could encode the payload into a
    message, else one that points to a segment the payload is spilled into.

    Used as ``with outgoing(...) as body: send(body)``: for a spilled payload the entry
    becomes QUEUED once the block succeeds, and if the block raises (queue full, ...) the
    segment is removed and the entry freed, so a refused job leaves nothing behind.
    """
    if body is not None:
        yield body
        return
    kind, raw = _as_data(payload)
    limit = client.config.jobs.max_payload
    if len(raw) > limit:
        raise PayloadError(
            f"payload of {len(raw)} bytes exceeds [jobs] max_payload ({limit} bytes)"
        )
    table = SpillTable.open(client.keys.spill)
    owner = client.queue.info().uid  # the daemon's: its workers remove the segment
    index, shmid = table.put(
        raw, job_id=job_id, kind=_KINDS[kind], role=Role.PAYLOAD, mode=0o600,
        owner=owner if owner != os.geteuid() else None,
    )  # fmt: skip
    ref = SpillRef(shmid, len(raw), index, kind)
    try:
        yield protocol.encode(
            None, job_id=job_id, reply_to=reply_to, timeout=timeout, unique=unique, spill=ref
        )
    except BaseException:
        table.discard(index, shmid)
        raise
    table.mark(index, State.QUEUED, shmid)


def _as_data(payload: Payload) -> tuple[str, bytes]:
    if isinstance(payload, bytes):
        return "bytes", payload
    if isinstance(payload, bytearray | memoryview):
        return "bytes", bytes(payload)
    if isinstance(payload, str):
        try:
            return "text", payload.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadError(f"payload text is not valid Unicode: {exc}") from None
    return "json", protocol.payload_json(payload)


def load(job: Job, table: SpillTable | None, max_payload: int) -> Job:
    """The job with its payload read from its segment.

    MessageError when the payload is too large or the segment is gone or not this job's:
    the job fails for good (a retry would find the same), so its entry goes at once.
    """
    try:
        return _load(job, max_payload)
    except MessageError:
        settle(table, job)
        raise


def _load(job: Job, max_payload: int) -> Job:
    ref = job.spill
    if ref is None:
        return job
    if ref.size > max_payload:
        raise _bad(job, f"spilled payload of {ref.size} bytes exceeds [jobs] max_payload")
    raw = _read(ref.shmid, job.id, ref.size, Role.PAYLOAD, _KINDS[ref.kind])
    if isinstance(raw, str):
        raise _bad(job, raw)
    payload: Payload = raw
    try:
        if ref.kind == "text":
            payload = raw.decode("utf-8")
        elif ref.kind == "json":
            payload = protocol.payload_from_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, MessageError):
            raise
        raise _bad(job, f"spilled payload is not valid {ref.kind}") from None
    return job._replace(payload=payload)


def _bad(job: Job, reason: str) -> MessageError:
    exc = MessageError(f"spilled payload of job {job.id}: {reason}")
    exc.job_id = job.id
    exc.reply_to = job.reply_to
    return exc


def settle(table: SpillTable | None, job: Job) -> None:
    """The job's outcome is final: its payload's segment and entry go."""
    if table is not None and job.spill is not None:
        table.release(job.spill.shmid, job.id, job.spill.slot)


# --- results ------------------------------------------------------------------------------


def spill_result(table: SpillTable, result: Result) -> Result:
    """The result with its data moved to a segment of its own (the ring then stores a
    descriptor), or an error result when it exceeds [results] max_result or cannot be
    made.  Clients in the daemon's group may read the segment, as they read the ring."""
    max_result, mode = table.max_result, table.mode
    size = len(result.data)
    if size > max_result:
        return _error(
            result,
            f"result too large: {size} bytes, more than [results] max_result ({max_result})",
        )
    try:
        index, shmid = table.put(
            result.data, job_id=result.job_id, kind=result.kind, role=Role.RESULT,
            mode=0o600 | (mode & 0o044), owner=None,
        )  # fmt: skip
    except IpcdError as exc:
        return _error(result, f"result of {size} bytes could not be stored: {exc}")
    return result._replace(data=b"", spill=Spilled(shmid, index, size))


def read_result(result: Result) -> Result:
    """A spilled result with its data copied out of its segment (the caller holds the ring
    lock, so eviction cannot remove the segment meanwhile)."""
    spilled = result.spill
    if spilled is None:
        return result
    raw = _read(spilled.shmid, result.job_id, spilled.size, Role.RESULT, result.kind)
    if isinstance(raw, str):
        return _error(result, f"the stored result is lost: {raw}")
    return result._replace(data=raw, spill=None)


def _error(result: Result, message: str) -> Result:
    return result._replace(status=Status.ERROR, kind=Kind.TEXT, data=message.encode(), spill=None)


# --- segments ----------------------------------------------------------------------------


def _read(shmid: int, job_id: str, size: int, role: Role, kind: Kind) -> bytes | str:
    """The data of a verified segment, or why there is none."""
    segment = Segment.attach_id(shmid, readonly=True)
    if segment is None:
        return f"segment {shmid} does not exist (or may not be read)"
    try:
        why = _mismatch(segment, job_id, size, role, kind)
        if why:
            return f"segment {shmid} {why}"
        return bytes(segment.buf[DATA : DATA + size])
    finally:
        segment.close()


def _mismatch(segment: Segment, job_id: str, size: int | None, role: Role | None,
              kind: Kind | None = None) -> str:  # fmt: skip
    if segment.key != 0 or segment.size < DATA:
        return "is not a spill segment"
    magic, version, s_role, s_kind, _, s_size, raw_id = SEGMENT.unpack_from(segment.buf, 0)
    if magic != SEGMENT_MAGIC or version != VERSION:
        return "is not a spill segment"
    if raw_id.rstrip(b"\0").decode("ascii", "replace") != job_id:
        return f"belongs to another job, not {job_id}"
    if size is not None and (s_size != size or segment.size < DATA + size):
        return f"holds {s_size} bytes, not {size}"
    if (role is not None and s_role != role) or (kind is not None and s_kind != kind):
        return "holds another kind of data"
    return ""


def remove_checked(shmid: int, job_id: str) -> bool:
    """Remove the segment if its header says it is this job's spill segment."""
    if shmid < 0:
        return False
    segment = Segment.attach_id(shmid, readonly=True)
    if segment is None:
        return False
    try:
        if _mismatch(segment, job_id, None, None):
            return False
    finally:
        segment.close()
    return remove_id(shmid)


def _exists(shmid: int) -> bool:
    return any(int(f[1]) == shmid for f in _proc_shm())


def _proc_shm() -> list[list[str]]:
    try:
        with open(SYSVIPC_SHM) as fh:
            next(fh)
            return [line.split() for line in fh]
    except (OSError, StopIteration):
        return []


def _orphans(shm: list[list[str]], entry: Entry) -> set[int]:
    """What a dead claimer made: its recorded segment, and any key-0 segment nobody has
    attached that it created after claiming (it died before recording the id)."""
    found: set[int] = set()
    for f in shm:
        key, shmid, cpid, nattch, ctime = int(f[0]), int(f[1]), int(f[4]), int(f[6]), int(f[13])
        if key != 0 or cpid != entry.pid:
            continue
        if shmid == entry.shmid or (nattch == 0 and ctime >= entry.claimed_at - CTIME_SLACK):
            found.add(shmid)
    return found
