"""Noticing that one of the daemon's own IPC objects was removed or overwritten.

Anyone allowed to can ``ipcrm`` a queue, segment or semaphore at ipcd's keys, and a
program that attaches a segment at ipcd's key may write its own header into it (PHP's
``shm_attach()`` does, whatever is there).  Workers would then fail on every job and
clients be told the daemon is not running while it is.  So the master looks at every
turn of its loop (ipcd.daemon.arbiter): each object it made must still be at its key with the
kernel id it had (``/proc/sysvipc``), and each segment must still hold ipcd's header.
What it finds wrong, the master makes anew (ipcd.daemon.startup.reopen) and says so with
``ipc.recreated``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, NamedTuple

from ipcd.kernel import vetting
from ipcd.layout import results
from ipcd.layout import stats as statslayout
from ipcd.tables.inflight import InflightTable
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.unique import UniqueTable

if TYPE_CHECKING:
    from ipcd.daemon.startup import Objects
    from ipcd.kernel.keys import Keys
    from ipcd.kernel.queues import Queue
    from ipcd.kernel.segments import Segment

#: /proc/sysvipc's name for each kind of object.
QUEUE, SEGMENT, SEMAPHORE = "msg", "shm", "sem"


def expected(k: Keys, p: Objects) -> dict[tuple[str, int], tuple[int, str]]:
    """(kind, key) -> (kernel id, name) of every object the daemon uses, at keys ``k``."""
    out = {
        (QUEUE, k.jobs): (p.queue.id, "job queue"),
        (QUEUE, k.replies): (p.replies.id, "reply queue"),
        (SEGMENT, k.results): (p.store.segment.id, "result segment"),
        (SEMAPHORE, k.results): (p.store.lock.id, "result segment's lock"),
        (SEGMENT, k.inflight): (p.table.segment.id, "in-flight table"),
        (SEMAPHORE, k.inflight): (p.table.lock.id, "in-flight table's lock"),
        (SEGMENT, k.failed): (p.failed.store.segment.id, "failed list"),
        (SEMAPHORE, k.failed): (p.failed.store.lock.id, "failed list's lock"),
        (SEGMENT, k.stats): (p.stats.segment.id, "stats segment"),
        (SEGMENT, k.unique): (p.unique.segment.id, "unique-key table"),
        (SEMAPHORE, k.unique): (p.unique.lock.id, "unique-key table's lock"),
        (SEGMENT, k.spill): (p.spills.segment.id, "spill table"),
        (SEMAPHORE, k.spill): (p.spills.lock.id, "spill table's lock"),
        (QUEUE, k.handoff): (p.handoff.id, "hand-off queue"),
        (SEGMENT, k.intake): (p.intake.segment.id, "intake slots"),
        (SEMAPHORE, k.intake): (p.intake.lock.id, "intake slots' lock"),
    }
    if p.store.gate is not None:
        out[(SEMAPHORE, k.gate)] = (p.store.gate.id, "result gate")
    return out


class Watch:
    """The master's look at its objects; remembers the stats header last seen whole, to
    write it back over one that was overwritten (the counts after it are intact)."""

    def __init__(self) -> None:
        self._stats: statslayout.Header | None = None

    def problems(self, keys: Keys, p: Objects) -> list[str]:
        """What is wrong with the daemon's objects now: "job queue removed", "result
        segment overwritten"...; empty when all is well."""
        found = {(kind, key): id_ for kind, key, id_ in vetting.sysv_objects()}
        wrong = []
        for where, (id_, name) in expected(keys, p).items():
            now = found.get(where)
            if now is None:
                wrong.append(f"{name} removed")
            elif now != id_:
                wrong.append(f"{name} replaced by another object")
        wrong.extend(f"{name} overwritten" for name in self.overwritten(p))
        return wrong

    def overwritten(self, p: Objects) -> list[str]:
        """The segments whose header is no longer ipcd's."""
        bad = []
        if results.read_header(p.store.segment.buf) is None:
            bad.append("result segment")
        if results.read_header(p.failed.store.segment.buf) is None:
            bad.append("failed list")
        if not InflightTable.readable(p.table.segment.buf):
            bad.append("in-flight table")
        if not InflightTable.readable(p.intake.segment.buf):
            bad.append("intake slots")
        stats = statslayout.read_header(p.stats.buf)
        if stats is None:
            bad.append("stats segment")
        else:
            self._stats = stats
        if not UniqueTable.readable(p.unique.buf):
            bad.append("unique-key table")
        try:
            SpillTable(p.spills.segment, p.spills.lock)
        except ValueError:
            bad.append("spill table")
        return bad

    def rewrite_headers(self, p: Objects) -> None:
        """Write back the headers the master knows whole (the in-flight table's, with
        the jobs after it; the stats segment's, with the counts), so that making the
        objects anew keeps what they hold rather than formatting them empty.  The
        result ring and failed list are mended when they are opened again
        (results.repair_header)."""
        for table in (p.table, p.intake):
            if not InflightTable.readable(table.segment.buf):
                table.rewrite_header()
        if statslayout.read_header(p.stats.buf) is None and self._stats is not None:
            statslayout.write_header(p.stats.buf, self._stats)


def carry_over(old: Objects, fresh: Objects) -> list[str]:
    """Copy what each removed segment held into the one made in its place (the master
    is still attached to the removed one, so nothing in it is lost), under the new
    segment's lock; returns the names of the segments copied."""
    pairs: list[tuple[str, Segment, Segment]] = [
        ("result segment", old.store.segment, fresh.store.segment),
        ("in-flight table", old.table.segment, fresh.table.segment),
        ("failed list", old.failed.store.segment, fresh.failed.store.segment),
        ("stats segment", old.stats.segment, fresh.stats.segment),
        ("unique-key table", old.unique.segment, fresh.unique.segment),
        ("spill table", old.spills.segment, fresh.spills.segment),
        ("intake slots", old.intake.segment, fresh.intake.segment),
    ]
    locks = fresh.locks()
    copied = []
    for name, was, now in pairs:
        if was.id == now.id or was.size != now.size:
            continue
        lock = locks.get(name)
        with lock.held(5.0) if lock is not None else contextlib.nullcontext():
            now.buf[:] = was.buf
        copied.append(name)
    return copied


def close(old: Objects, *, keep: Segment | None = None) -> None:
    """Detach the segments of the objects the master no longer uses (but ``keep``)."""
    for segment in (
        old.store.segment, old.table.segment, old.failed.store.segment, old.stats.segment,
        old.unique.segment, old.spills.segment, old.intake.segment,
    ):  # fmt: skip
        if segment is keep:
            continue
        with contextlib.suppress(ValueError, BufferError):
            segment.close()


class Retired(NamedTuple):
    """A removed in-flight table that the workers ``pids`` still use until they leave: it,
    not its copy, records their jobs (one they finish after the copy, or take from the
    queue, would otherwise look still held, and be run or announced again)."""

    table: InflightTable
    pids: set[int]
    #: (job id, attempt) of the jobs parked in it when it was copied into the new one.
    copied: set[tuple[str, int]]

    @classmethod
    def of(cls, table: InflightTable, pids: set[int]) -> Retired:
        return cls(table, pids, {(h.job_id, h.attempt) for h in table.parked_jobs()})

    def hand_over(self, fresh: InflightTable, queue: Queue) -> None:
        """Its last worker left: park in ``fresh`` (or queue) what its workers parked
        after the copy (a job's retry), then detach it."""
        for held in self.table.parked_jobs():
            if (held.job_id, held.attempt) in self.copied:
                continue
            due = dict(self.table.parked_due()).get(held.slot, 0.0)
            if not fresh.park(held.type, held.body, held.job_id, held.attempt, due):
                queue.send_nowait(held.body, held.type)
        with contextlib.suppress(ValueError, BufferError):
            self.table.segment.close()
