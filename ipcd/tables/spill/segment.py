"""A spill segment: one large payload or result in a SysV segment of its own.

It is made with IPC_PRIVATE (key 0), so only its id names it, and it starts with a
header that says whose it is; ipcd.tables.spill.table records every one.  Layout
(little-endian)::

    magic 8s b"IPCDSPD\0", version u32, role u32 (0 payload, 1 result, 2 spare), kind u32
    (0 bytes, 1 text, 2 JSON), table u32 (the spill table's key; 0 from an older ipcd),
    size u64, job_id 16s, zeros to 64 bytes; then the data

Data is copied once in (the producer writes straight into the segment) and once out (the
reader copies it into a bytes object): no base64, no JSON, no CRC over the data.  Before
anything removes a segment by id it checks this header, so a forged or stale id cannot
make ipcd remove a segment that is not that job's.

A *spare* is a result's segment kept after its result was evicted, for the next large
result (ipcd.tables.spill.table, "The pool"): its header keeps the last job's id, so
that whatever removes it by that id still may, but says role 2, so that a reader of
that job's result finds no result (:data:`SPARE`) rather than bytes about to be
overwritten.  Reusing it writes the new job's header first, then the data.
"""

from __future__ import annotations

import enum
import struct

from ipcd.kernel.segments import Segment, remove_id
from ipcd.layout.results import Kind

MAGIC = b"IPCDSPD\0"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQ16s")
#: The role in the header, on its own (:func:`make_spare`).
ROLE = struct.Struct("<I")
ROLE_OFFSET = 12
#: Where a spill segment's data starts.
DATA = 64
#: How long after claiming a dead creator's segment may have been made (clock skew).
CTIME_SLACK = 1.0
SYSVIPC_SHM = "/proc/sysvipc/shm"

assert HEADER.size <= DATA

#: What :func:`mismatch` says of a segment that is not (or no longer) the one expected.
NOT_SPILL = "is not a spill segment"
ANOTHER_JOB = "belongs to another job, not "


SPARE = "was evicted (kept as a spare)"


class Role(enum.IntEnum):
    PAYLOAD = 0
    RESULT = 1
    #: A result's segment kept for the next result (the pool).
    SPARE = 2


def write(
    segment: Segment, data: bytes, *, job_id: str, role: Role, kind: Kind, table: int = 0
) -> None:
    """Header, then the data: the producer's one copy.  ``table``: the spill table's key,
    in the reserved field, so that a spare no entry names is known to be this table's
    (:func:`lost_spares`; another daemon of the same user has its own)."""
    HEADER.pack_into(
        segment.buf, 0, MAGIC, VERSION, role, kind, table, len(data),
        job_id.encode("ascii")[:16],
    )  # fmt: skip
    segment.buf[DATA : DATA + len(data)] = data


def mismatch(segment: Segment, job_id: str, size: int | None, role: Role | None,
              kind: Kind | None = None) -> str:  # fmt: skip
    if segment.key != 0 or segment.size < DATA:
        return NOT_SPILL
    magic, version, s_role, s_kind, _, s_size, raw_id = HEADER.unpack_from(segment.buf, 0)
    if magic != MAGIC or version != VERSION:
        return NOT_SPILL
    if raw_id.rstrip(b"\0").decode("ascii", "replace") != job_id:
        return ANOTHER_JOB
    if s_role == Role.SPARE and role is not None and role != Role.SPARE:
        return SPARE
    if size is not None and (s_size != size or segment.size < DATA + size):
        return f"holds {s_size} bytes, not {size}"
    if (role is not None and s_role != role) or (kind is not None and s_kind != kind):
        return "holds another kind of data"
    return ""


def make_spare(segment: Segment) -> None:
    """Mark a result's segment spare: only the role changes (the caller checked whose it is)."""
    ROLE.pack_into(segment.buf, ROLE_OFFSET, Role.SPARE)


def is_spare(segment: Segment, table: int | None = None) -> bool:
    """Whether the header says spare (whichever job it last held), and with ``table``
    that it was written for the spill table at that key."""
    if segment.key != 0 or segment.size < DATA:
        return False
    magic, version, role, _, key = struct.unpack_from("<8sIIII", segment.buf, 0)
    if table is not None and key != table:
        return False
    return bool(magic == MAGIC and version == VERSION and role == Role.SPARE)


def lost_spares(shm: list[list[str]], uid: int, listed: set[int], table: int) -> set[int]:
    """Spares no entry names (``listed``: the ids the table names; the caller holds the
    table's lock): key 0, made and owned by ``uid``, unattached, header spare and of the
    spill table at key ``table``.  A client of another user than the daemon that evicts
    a spare for room (a payload's claim, an older ipcd's too) may not remove it, and
    frees its entry anyway: with no ring record naming it, only this finds it again."""
    found: set[int] = set()
    for f in shm:
        key, shmid, nattch = int(f[0]), int(f[1]), int(f[6])
        owner, creator = int(f[7]), int(f[9])
        if key != 0 or nattch != 0 or shmid in listed or owner != uid or creator != uid:
            continue
        segment = Segment.attach_id(shmid, readonly=True)
        if segment is None:
            continue
        try:
            info = segment.info()
            if table and info.cuid == info.uid == uid and is_spare(segment, table):
                found.add(shmid)
        finally:
            segment.close()
    return found


def remove_checked(shmid: int, job_id: str, *, or_spare: bool = False) -> bool:
    """Remove the segment if its header says it is this job's spill segment, or with
    ``or_spare`` still a spare: a claimer that died reusing a spare for ``job_id`` left it
    either rewritten or not yet.  Another process may have made such a spare, so
    :func:`orphans`, which trusts only what the dead claimer made, misses it."""
    if shmid < 0:
        return False
    segment = Segment.attach_id(shmid, readonly=True)
    if segment is None:
        return False
    try:
        if mismatch(segment, job_id, None, None) and not (or_spare and is_spare(segment)):
            return False
    finally:
        segment.close()
    return remove_id(shmid)


def exists(shmid: int) -> bool:
    """Whether a segment with this id exists (whoever may attach it)."""
    return any(int(f[1]) == shmid for f in proc_shm())


def proc_shm() -> list[list[str]]:
    """The rows of /proc/sysvipc/shm, split into fields (none when it cannot be read)."""
    try:
        with open(SYSVIPC_SHM) as fh:
            next(fh)
            return [line.split() for line in fh]
    except (OSError, StopIteration):
        return []


def orphans(
    shm: list[list[str]], pid: int, recorded: int, claimed_at: float, size: int, taken: set[int]
) -> set[int]:
    """What a dead claimer ``pid`` made for one entry: its ``recorded`` segment, and a key-0
    segment it made for it but died before recording: one of the entry's size (header and
    ``size`` bytes of data), created after the claim, that nobody has attached and that
    no other entry or envelope names (``taken``).

    The size and ``taken`` tests matter: a client that queued large jobs a moment before
    it died leaves their segments unattached, made by the same pid just as recently, and
    those belong to accepted jobs.
    """
    found: set[int] = set()
    for f in shm:
        key, shmid, segsz, cpid = int(f[0]), int(f[1]), int(f[3]), int(f[4])
        nattch, ctime = int(f[6]), int(f[13])
        if key != 0 or cpid != pid:
            continue
        if shmid == recorded or (
            recorded < 0
            and shmid not in taken
            and segsz == DATA + size
            and nattch == 0
            and ctime >= claimed_at - CTIME_SLACK
        ):
            found.add(shmid)
    return found
