"""The raw limit: Python's sysv_ipc between two processes, with nothing of ipcd on top.

The shape is ipcd's own, minus ipcd: a request queue, a reply queue, and a result in
shared memory under a SEM_UNDO semaphore.

- Round trip: the client sends a 64-byte request; the server takes it, writes 64 bytes
  into the segment while holding the semaphore and sends a short reply; the client takes
  the reply and reads the 64 bytes back while holding the semaphore.
- One-way: the client sends 64-byte messages as fast as it can, the server takes them,
  and a last message asks the server to say it has seen them all.
- 16 MiB: a write into a segment and a read back out, against a plain bytes copy.

Every object is made at a fresh random key (``IPC_CREX``) and removed by :meth:`close`.
``python -m bench.raw`` prints one measurement as JSON (the smoke test runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from typing import TypeVar

import sysv_ipc

#: Bytes per request and per result, as in the spec's raw rows.
SIZE = 64
#: Message types on the request queue.
PING, ONEWAY, DONE, STOP = 2, 3, 4, 5
#: The server's replies on the reply queue.
REPLY = 1

_Obj = TypeVar("_Obj", sysv_ipc.MessageQueue, sysv_ipc.SharedMemory, sysv_ipc.Semaphore)


class RawPeer:
    """A forked server process and the queues, segment and semaphore it serves."""

    def __init__(self) -> None:
        self._made: list[sysv_ipc.MessageQueue | sysv_ipc.SharedMemory | sysv_ipc.Semaphore]
        self._made = []
        try:
            self.requests = self._keep(sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, 0o600))
            self.replies = self._keep(sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, 0o600))
            self.shm = self._keep(sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, 0o600, SIZE))
            self.sem = self._keep(sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, 0o600, 1))
        except BaseException:
            self._remove()
            raise
        self.sem.undo = True
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the server process
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up
                self._serve()
                code = 0
            finally:
                os._exit(code)

    def _keep(self, obj: _Obj) -> _Obj:
        self._made.append(obj)
        return obj

    @property
    def keys(self) -> list[int]:
        """The keys of every object made (for checking that none is left)."""
        return [obj.key for obj in self._made]

    def pids(self) -> list[int]:
        """Both processes: this one (the client) and the server."""
        return [os.getpid(), self.pid]

    def _serve(self) -> None:  # pragma: no cover - the server process
        requests, replies, shm, sem = self.requests, self.replies, self.shm, self.sem
        while True:
            body, type_ = requests.receive(True, 0)
            if type_ == ONEWAY:
                continue
            if type_ == PING:
                sem.acquire()
                shm.write(body)
                sem.release()
                replies.send(b"k", True, REPLY)
            elif type_ == DONE:
                replies.send(b"d", True, REPLY)
            elif type_ == STOP:
                return

    def round_trips(self, seconds: float, poll: float = 0.0) -> float:
        """Round trips per second, for ``seconds``; with ``poll``, the client polls for the
        reply that long (yielding the CPU) before it blocks, as ipcd's client does."""
        requests, replies, shm, sem = self.requests, self.replies, self.shm, self.sem
        payload = b"q" * SIZE
        count = 0
        started = now = time.perf_counter()
        end = started + seconds
        while now < end:
            requests.send(payload, True, PING)
            if not (poll and _polled(replies, poll)):
                replies.receive(True, REPLY)
            sem.acquire()
            shm.read(SIZE)
            sem.release()
            count += 1
            now = time.perf_counter()
        return count / (now - started)

    def one_way(self, seconds: float) -> float:
        """Messages per second sent and received, for about ``seconds``."""
        requests = self.requests
        payload = b"q" * SIZE
        count = 0
        started = time.perf_counter()
        end = started + seconds
        while time.perf_counter() < end:
            requests.send(payload, True, ONEWAY)
            count += 1
        requests.send(b"d", True, DONE)
        self.replies.receive(True, REPLY)
        return count / (time.perf_counter() - started)

    def close(self) -> None:
        """Stop the server and remove every object."""
        if self.pid > 0:
            with contextlib.suppress(sysv_ipc.Error):
                self.requests.send(b"", False, STOP)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.01)
            else:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            self.pid = 0
        self._remove()

    def _remove(self) -> None:
        for obj in self._made:
            with contextlib.suppress(sysv_ipc.Error):
                obj.remove()
            if isinstance(obj, sysv_ipc.SharedMemory):
                with contextlib.suppress(sysv_ipc.Error):
                    obj.detach()
        self._made.clear()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _polled(replies: sysv_ipc.MessageQueue, seconds: float) -> bool:
    """Whether a reply came while polling for ``seconds`` (ipcd.kernel.waits.spin_wait's way)."""
    end = time.perf_counter() + seconds
    while True:
        try:
            replies.receive(False, REPLY)
            return True
        except sysv_ipc.BusyError:
            if time.perf_counter() >= end:
                return False
            os.sched_yield()


class BigSegment:
    """A segment (and its SEM_UNDO semaphore) for one large write and read back."""

    def __init__(self, size: int) -> None:
        self.sem = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, 0o600, 1)
        try:
            self.shm = sysv_ipc.SharedMemory(None, sysv_ipc.IPC_CREX, 0o600, size)
        except BaseException:
            self.sem.remove()
            raise
        self.sem.undo = True
        self.size = size

    @property
    def keys(self) -> list[int]:
        return [self.sem.key, self.shm.key]

    def write_read(self, data: bytes) -> float:
        """Seconds to write ``data`` into the segment and read it back, each under the lock."""
        started = time.perf_counter()
        self.sem.acquire()
        self.shm.write(data)
        self.sem.release()
        self.sem.acquire()
        back = self.shm.read(len(data))
        self.sem.release()
        elapsed = time.perf_counter() - started
        assert len(back) == len(data)
        return elapsed

    def close(self) -> None:
        for obj in (self.shm, self.sem):
            with contextlib.suppress(sysv_ipc.Error):
                obj.remove()
        with contextlib.suppress(sysv_ipc.Error):
            self.shm.detach()


def spin(ms: float) -> None:
    """Use ``ms`` milliseconds of this process's CPU time (as bench.handlers.busy does)."""
    end = time.process_time() + ms / 1000
    while time.process_time() < end:
        pass


def cpu_jobs(jobs: int, ms: float, processes: int) -> float:
    """Jobs per second when ``processes`` forked processes share ``jobs`` spins of ``ms``:
    how far this machine, as loaded now, lets CPU-bound work run in parallel."""
    started = time.perf_counter()
    pids = []
    for index in range(processes):
        share = jobs // processes + (1 if index < jobs % processes else 0)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                for _ in range(share):
                    spin(ms)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return jobs / (time.perf_counter() - started)


def build_info() -> dict[str, object]:
    """Which sysv_ipc this is, and whether its semaphore waits can take a timeout."""
    return {"sysv_ipc": sysv_ipc.VERSION, "semtimedop": sysv_ipc.SEMAPHORE_TIMEOUT_SUPPORTED}


def plain_copy(data: bytes) -> float:
    """Seconds for one plain copy of ``data`` into a new bytes-like object."""
    started = time.perf_counter()
    copy = bytearray(data)
    elapsed = time.perf_counter() - started
    assert len(copy) == len(data)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    """One raw measurement, printed as a JSON object."""
    parser = argparse.ArgumentParser(prog="python -m bench.raw", description=__doc__)
    parser.add_argument("what", choices=["round-trips", "one-way"])
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--cpu", type=int, help="pin both processes to this CPU")
    args = parser.parse_args(argv)
    with RawPeer() as peer:
        if args.cpu is not None:
            for pid in peer.pids():
                os.sched_setaffinity(pid, {args.cpu})
        peer.round_trips(0.02)  # warm up
        measure = peer.round_trips if args.what == "round-trips" else peer.one_way
        rate = measure(args.seconds)
    json.dump({"what": args.what, "per_s": rate}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
