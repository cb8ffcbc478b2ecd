"""The failed list: jobs that used all their attempts, kept so an operator can retry them.

It is a second result ring (ipcd.layout.results) at its own key, whose records carry the job's
whole message besides the reason, so ``ipcctl retry`` can put the very same job back on
the queue.  It is bounded: when full, the oldest entry goes, and ``dropped`` says how many
went that way.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import time
from collections.abc import Collection
from typing import TYPE_CHECKING, NamedTuple

from ipcd.kernel.segments import Lock, Segment
from ipcd.layout import results
from ipcd.layout.results import Kind, Result, Status
from ipcd.tables.results import ResultStore

if TYPE_CHECKING:
    from ipcd.tables.spill.table import SpillTable


class FailedJob(NamedTuple):
    """One entry of the failed list."""

    job_id: str
    type: int
    attempts: int
    error: str
    failed_at: float
    body: bytes
    #: False when the job's spilled payload was dropped as the list was listed (the
    #: failed list holds at most half the spill table): the job cannot be retried.
    payload_kept: bool = True

    def as_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "id": self.job_id,
            "type": self.type,
            "attempts": self.attempts,
            "error": self.error,
            "failed_at": self.failed_at,
            "bytes": len(self.body),
        }
        if not self.payload_kept:
            doc["payload_kept"] = False
        return doc


#: Characters of the failure reason kept with a failed job.
MAX_REASON = 512


def slot_size_for(text_size: int) -> int:
    """Room for the message in base64 inside a small JSON record, and the reason (which
    JSON may escape to six bytes a character)."""
    return results.RECORD_SIZE + (text_size + 2) // 3 * 4 + 6 * MAX_REASON + 256


class FailedList:
    def __init__(self, store: ResultStore) -> None:
        """``store``: the list's ring, made to call _drop_payload on the entries it drops."""
        self.store = store

    @classmethod
    def create(
        cls,
        key: int,
        mode: int,
        entries: int,
        text_size: int,
        spills: SpillTable | None = None,
        *,
        trusted: Collection[int] = (),
    ) -> FailedList:
        slot = slot_size_for(text_size)
        size = results.HEADER_SIZE + entries * slot
        store = ResultStore.create(
            key,
            None,
            mode,
            size,
            slot,
            what="failed list",
            trusted=trusted,
            on_evict=functools.partial(_drop_payload, spills),
        )
        return cls(store)

    @classmethod
    def open(cls, key: int) -> FailedList:
        segment = Segment.open(key, what="failed list")
        on_evict = functools.partial(_drop_payload, None)
        return cls(ResultStore(segment, Lock.open(key), on_evict=on_evict))

    def add(
        self,
        job_id: str,
        type_: int,
        body: bytes,
        attempts: int,
        error: str,
        *,
        payload_kept: bool = True,
    ) -> None:
        """List a job; ``payload_kept=False`` records that its spilled payload is gone."""
        if len(error) > MAX_REASON:  # the slot has room for the message and this much
            error = error[: MAX_REASON - 15] + " [truncated]"
        doc: dict[str, object] = {
            "error": error,
            "attempts": attempts,
            "body_b64": base64.b64encode(body).decode("ascii"),
        }
        if not payload_kept:
            doc["payload_kept"] = False
        data = json.dumps(doc).encode()
        now = time.time()
        self.store.put(Result(job_id, type_, Status.ERROR, Kind.JSON, data, attempts, now, now))

    def entries(self) -> list[FailedJob]:
        """Newest last; a job retried and failed again shows once, as it failed last."""
        latest: dict[str, FailedJob] = {}
        for record in self.store.all():
            entry = _entry(record)
            if entry is not None:
                latest.pop(entry.job_id, None)
                latest[entry.job_id] = entry
        return list(latest.values())

    def dropped(self) -> int:
        header = self.store.header()
        return max(0, header.next_seq - header.slot_count)

    def take(self, job_id: str) -> FailedJob | None:
        """Remove a job from the list and return it (for ``ipcctl retry``)."""
        for entry in reversed(self.entries()):
            if entry.job_id == job_id:
                self.store.clear(job_id)
                return entry
        return None


def _entry(record: Result) -> FailedJob | None:
    try:
        doc = json.loads(record.data)
        body = base64.b64decode(doc["body_b64"])
        return FailedJob(
            record.job_id, record.type, int(doc["attempts"]), str(doc["error"]),
            record.finished, body, doc.get("payload_kept", True) is not False,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None


def _drop_payload(spills: SpillTable | None, record: Result) -> None:
    """The list drops its oldest entry: a spilled payload's segment goes with it (settled
    in the daemon's spill table, or removed when there is none at hand)."""
    entry = _entry(record)
    if entry is None or b'"spill"' not in entry.body:
        return
    from ipcd.errors import IpcdError, MessageError
    from ipcd.tables import spill
    from ipcd.tables.spill import segment as spillsegment
    from ipcd.wire import protocol, split

    try:  # a job the intake failed holds its body's head: the envelope, split (its "spill")
        job = protocol.decode(split.envelope(entry.body), entry.type)
    except MessageError:
        return
    if job.spill is not None:
        if spills is None:
            spillsegment.remove_checked(job.spill.shmid, job.id)
            return
        with contextlib.suppress(IpcdError):
            spill.settle(spills, job)
