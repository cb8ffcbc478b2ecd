"""The result ring over a live segment, guarded by its semaphore.

:mod:`ipcd.results` knows the layout as pure functions of a buffer; this module pairs it
with the kernel objects from :mod:`ipcd.ipc` and holds the semaphore around every access.
"""

from __future__ import annotations

import time

from ipcd import results
from ipcd.errors import NotRunningError
from ipcd.results import Header, Result
from ipcd.shm import Gate, Lock, Segment

#: How long any process waits for the semaphore before giving up: far longer than any
#: critical section (a memcpy of one slot), far shorter than a wedge would need to last.
LOCK_TIMEOUT = 5.0


class ResultStore:
    """Read and write results in the shared ring."""

    def __init__(
        self,
        segment: Segment,
        lock: Lock,
        gate: Gate | None = None,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self.segment = segment
        self.lock = lock
        self.gate = gate
        self.lock_timeout = lock_timeout

    @classmethod
    def open(cls, key: int) -> ResultStore:
        """Attach an existing segment (the client side)."""
        lock = Lock.open(key)
        return cls(Segment.open(key), lock)

    @classmethod
    def create(
        cls, key: int, gate_key: int | None, mode: int, size: int, slot_size: int
    ) -> ResultStore:
        """Create or reuse the segment and semaphore (the daemon side).

        An existing segment whose layout matches is kept, so results survive a restart;
        one of another size or version is removed and made anew.
        """
        lock = Lock.create(key, mode)
        segment, created = Segment.create(key, mode, size)
        if not created and segment.size != size:
            segment.remove()
            segment, created = Segment.create(key, mode, size)
        store = cls(segment, lock, None if gate_key is None else Gate.create(gate_key, mode))
        with lock.held(LOCK_TIMEOUT):
            header = results.read_header(segment.buf)
            if created or header is None or header.slot_size != slot_size:
                results.format_segment(segment.buf, slot_size)
        return store

    def header(self) -> Header:
        header = results.read_header(self.segment.buf)
        if header is None:
            raise NotRunningError(
                f"the segment at key {self.segment.key:#010x} is not an ipcd result segment"
            )
        return header

    def put(self, result: Result) -> int:
        """Store a result (an error result in its place if it does not fit)."""
        self.lock.acquire(self.lock_timeout)
        try:
            header = self.header()
            if len(result.data) > results.capacity(header.slot_size):
                result = results.too_large(result, header.slot_size)
            seq = results.write_result(self.segment.buf, header, result)
        finally:
            self.lock.release()
        if self.gate is not None:
            self.gate.pulse()
        return seq

    def capacity(self) -> int | None:
        """Bytes of data one result may have, or None if the segment is not readable."""
        header = results.read_header(self.segment.buf)
        return None if header is None else results.capacity(header.slot_size)

    def get(self, job_id: str) -> Result | None:
        self.lock.acquire(self.lock_timeout)
        try:
            return results.find_result(self.segment.buf, self.header(), job_id)
        finally:
            self.lock.release()

    def clear(self, job_id: str) -> int:
        with self.lock.held(self.lock_timeout):
            return results.clear_result(self.segment.buf, self.header(), job_id)

    def all(self) -> list[Result]:
        with self.lock.held(self.lock_timeout):
            return results.iter_results(self.segment.buf, self.header())

    def set_daemon(self, pid: int, started: float | None = None) -> None:
        """Record (or with pid 0 clear) the serving daemon, for ``ipcctl status``."""
        with self.lock.held(self.lock_timeout):
            results.set_daemon(self.segment.buf, pid, time.time() if started is None else started)

    def close(self) -> None:
        self.segment.close()
