"""The least a Python daemon of issue 12's shape can do: a skeleton ipcd, beside the peers.

Issue 12 puts a job store between the kernel queue and the workers, and asks that ipcd
with it still beat beanstalkd (its round trip 2x, its confirmed jobs 1x) and the daemon
before the store (unconfirmed jobs 1x).  Whether any Python daemon of that shape can, is
what this measures: the shape with nothing else in it.

- An **intake** process blocks in ``msgrcv`` on the job queue, takes whatever else waits
  (64 at most, ipcd's batch), inserts the batch into a SQLite job table in one
  transaction, confirms the messages that ask for it, and rings a doorbell (a message on
  a queue of its own) for the worker.
- A **worker** process waits for the doorbell, claims up to 64 queued jobs in one
  transaction (``SELECT`` by a partial index, ``UPDATE`` of their state), "runs" each (its
  result is its body), and records their outcomes in the transaction that claims the
  next batch (as ipcd's ledger does), then replies to the jobs that ask for it.  (A
  claim in one statement, ``UPDATE ... RETURNING``, halved its round trips here.)
- The table is the least a job table can be (integer key, state, whether a reply is
  due, body, result), with the store's own settings (WAL, ``synchronous = NORMAL``,
  1 KiB pages, made by the store's ``connect``); writers take an ``flock`` first, as the
  store's do, so that none sleeps in SQLite's busy handler.
- The **client** (this process) encodes each job as ipcd's client does (the envelope,
  a new job id, a 64-byte payload: ``ipcd.wire.protocol.encode``) and says by the
  message type what it waits for: a confirmation, a reply, or nothing.  Before it
  sleeps for one, it polls for up to 1 ms, unless it may run on one CPU only
  (``ipcd.kernel.procs.poll_seconds``, as ipcd's client): where a poll pays, for
  confirmations too, which ipcd's client does not poll for; a ceiling takes the faster
  way.

What it leaves out is everything issue 12 asks of a job beyond that: vetting and
decoding the wire format, handler look-up, recovery slots, unique keys, priorities and
the indexes ``list`` needs, limits, pauses, dependencies, retention, logs and counters
(its done jobs are deleted between measurements, outside the clock).  So its rates are
ceilings for ipcd in this shape: a real daemon does all of the skeleton's work and more.
A process of it that fails prints why, sends DIED in place of every reply and removes
the job queue, so that a waiting client raises rather than hangs.  ``python -m
bench.skeleton`` prints its three rates as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import sysv_ipc

from bench.measure import place
from ipcd.kernel.procs import poll_seconds
from ipcd.store.sqlite import connect
from ipcd.wire import protocol

#: Messages per intake batch and jobs per claim, as ipcd's intake takes.
BATCH = 64
#: Each job's payload, as bench.measure's.
PAYLOAD = "p" * 64
#: How long the client polls before it sleeps, as ipcd's (ipcd.client.SPIN_SECONDS).
POLL = 0.001
#: Job queue types, which say what the client waits for: nothing, the confirmation
#: (the job committed), or the reply (its outcome recorded); STOP ends a loop.
PLAIN, CONFIRM, REPLY, STOP = 1, 2, 3, 9
#: The doorbell's type; the reply queue's: a confirmation, a reply.
RING, CONFIRMED, REPLIED = 1, 1, 2
#: What a process that fails sends in place of every reply.
DIED = b"died"


class Skeleton:
    """The three queues, the job table in a temporary directory, the intake and worker."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ipcd-bench-skeleton-"))
        self.path = self.dir / "jobs.db"
        self.queues: list[sysv_ipc.MessageQueue] = []
        self.pids: list[int] = []
        #: Jobs sent so far.
        self.sent = 0
        try:
            conn = connect(str(self.path), migrate=False)
            conn.execute(
                "CREATE TABLE jobs (id INTEGER PRIMARY KEY, state INTEGER NOT NULL, "
                "reply INTEGER NOT NULL, body BLOB NOT NULL, result BLOB)"
            )
            conn.execute("CREATE INDEX jobs_queued ON jobs (id) WHERE state = 0")
            conn.close()
            for _ in range(3):
                self.queues.append(sysv_ipc.MessageQueue(None, sysv_ipc.IPC_CREX, 0o600))
            self.jobs, self.replies, self.doorbell = self.queues
            for serve in (self._intake, self._worker):
                self.pids.append(self._fork(serve))
        except BaseException:
            self.close()
            raise

    @property
    def keys(self) -> list[int]:
        return [queue.key for queue in self.queues]

    @property
    def intake_pid(self) -> int:
        return self.pids[0]

    def processes(self) -> list[int]:
        """This process (the client), the intake and the worker."""
        return [os.getpid(), *self.pids]

    def _fork(self, serve: Callable[[], None]) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the intake or the worker
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up
                serve()
                code = 0
            except BaseException:
                traceback.print_exc()
                self._died()
            finally:
                os._exit(code)
        return pid

    def _died(self) -> None:  # pragma: no cover - a forked process
        """Unblock the client: DIED for whatever it waits for, and no job queue to send
        to (a send blocked on a full queue fails)."""
        for type_ in (CONFIRMED, REPLIED):
            with contextlib.suppress(sysv_ipc.Error, OSError):
                self.replies.send(DIED, False, type_)
        with contextlib.suppress(sysv_ipc.Error, OSError):
            self.jobs.remove()

    # --- the daemon's side ------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, int]:
        """A connection of this process's own (opened after fork) and its writer lock."""
        conn = connect(str(self.path), migrate=False)
        lock = os.open(self.dir / "jobs.lock", os.O_RDWR | os.O_CREAT, 0o600)
        return conn, lock

    def _intake(self) -> None:  # pragma: no cover - a forked process
        conn, lock = self._open()
        cursor = conn.cursor()
        jobs, replies, doorbell = self.jobs, self.replies, self.doorbell
        stopping = False
        while not stopping:
            body, type_ = jobs.receive(True, 0)
            batch = [] if type_ == STOP else [(type_, body)]
            with contextlib.suppress(sysv_ipc.BusyError):
                while len(batch) < BATCH and type_ != STOP:
                    body, type_ = jobs.receive(False, 0)
                    if type_ != STOP:
                        batch.append((type_, body))
            stopping = type_ == STOP
            if not batch:
                continue
            fcntl.flock(lock, fcntl.LOCK_EX)
            cursor.execute("BEGIN IMMEDIATE")
            cursor.executemany(
                "INSERT INTO jobs (state, reply, body) VALUES (0, ?, ?)",
                [(type_ == REPLY, body) for type_, body in batch],
            )
            cursor.execute("COMMIT")
            fcntl.flock(lock, fcntl.LOCK_UN)
            for type_, _ in batch:
                if type_ == CONFIRM:
                    replies.send(b"", True, CONFIRMED)
            with contextlib.suppress(sysv_ipc.BusyError):
                doorbell.send(b"", False, RING)

    def _worker(self) -> None:  # pragma: no cover - a forked process
        conn, lock = self._open()
        cursor = conn.cursor()
        replies, doorbell = self.replies, self.doorbell
        while True:
            _, type_ = doorbell.receive(True, 0)
            if type_ == STOP:
                return
            with contextlib.suppress(sysv_ipc.BusyError):
                while True:
                    doorbell.receive(False, RING)
            done: list[tuple[bytes, int]] = []
            replies_due = 0
            while True:  # a batch's outcomes recorded and the next claimed together
                fcntl.flock(lock, fcntl.LOCK_EX)
                cursor.execute("BEGIN IMMEDIATE")
                if done:
                    cursor.executemany("UPDATE jobs SET state = 2, result = ? WHERE id = ?", done)
                claimed = cursor.execute(
                    "SELECT id, reply, body FROM jobs WHERE state = 0 ORDER BY id LIMIT ?",
                    (BATCH,),
                ).fetchall()
                if claimed:
                    cursor.executemany(
                        "UPDATE jobs SET state = 1 WHERE id = ?", [(row[0],) for row in claimed]
                    )
                cursor.execute("COMMIT")
                fcntl.flock(lock, fcntl.LOCK_UN)
                for _ in range(replies_due):
                    replies.send(b"", True, REPLIED)
                if not claimed:
                    break
                # The "run": each job's result is its body.
                done = [(body, job_id) for job_id, _, body in claimed]
                replies_due = sum(reply for _, reply, _ in claimed)

    # --- the client's side --------------------------------------------------------------

    def _send(self, type_: int) -> None:
        self.sent += 1
        self.jobs.send(protocol.encode(PAYLOAD, job_id=protocol.new_job_id()), True, type_)

    def _wait(self, type_: int, poll: float) -> None:
        """The next message of ``type_`` on the reply queue: polled for ``poll`` seconds
        first, then waited for."""
        end = time.perf_counter() + poll
        while True:
            try:
                body, _ = self.replies.receive(False, type_)
                break
            except sysv_ipc.BusyError:
                if time.perf_counter() >= end:
                    body, _ = self.replies.receive(True, type_)
                    break
                os.sched_yield()
        if body == DIED:
            raise RuntimeError("a process of bench.skeleton failed (its traceback is above)")

    def _prune(self) -> None:
        """Delete the done jobs (outside the clock): each measurement starts with a small
        table."""
        conn, lock = self._open()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM jobs WHERE state = 2")
            conn.execute("COMMIT")
        finally:
            os.close(lock)
            conn.close()

    def round_trips(self, seconds: float) -> float:
        """Jobs per second, each sent and its reply (the outcome recorded) awaited."""
        self._prune()
        poll = poll_seconds(POLL)
        count = 0
        started = now = time.perf_counter()
        while now < started + seconds:
            self._send(REPLY)
            self._wait(REPLIED, poll)
            count += 1
            now = time.perf_counter()
        return count / (now - started)

    def jobs_completed(self, seconds: float, *, confirm: bool) -> float:
        """Jobs per second from the first send until the last is done: sent for
        ``seconds``, each confirmed (committed) before the next with ``confirm``, then
        one that asks for a reply (the worker takes jobs in order: its reply means every
        job before it is done)."""
        self._prune()
        poll = poll_seconds(POLL)
        count = 0
        started = time.perf_counter()
        while time.perf_counter() < started + seconds:
            self._send(CONFIRM if confirm else PLAIN)
            if confirm:
                self._wait(CONFIRMED, poll)
            count += 1
        self._send(REPLY)
        self._wait(REPLIED, poll)
        return (count + 1) / (time.perf_counter() - started)

    def close(self) -> None:
        """Stop both processes, remove the queues and the table."""
        for queue in self.queues[:1] + self.queues[2:]:
            # A queue removed already (by a process that failed) is EINVAL, an OSError.
            with contextlib.suppress(sysv_ipc.Error, OSError):
                queue.send(b"", False, STOP)
        for pid in self.pids:
            deadline = time.monotonic() + 5.0
            while not os.waitpid(pid, os.WNOHANG)[0]:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.01)
        self.pids = []
        for queue in self.queues:
            with contextlib.suppress(sysv_ipc.Error, OSError):
                queue.remove()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Skeleton:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.skeleton", description=__doc__)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--cpu", type=int, help="pin all three processes to this CPU")
    args = parser.parse_args(argv)
    with Skeleton() as skeleton:
        if args.cpu is not None:
            place(skeleton.processes(), {args.cpu})
        skeleton.round_trips(0.05)  # warm-up
        found = {
            "round_trips": skeleton.round_trips(args.seconds),
            "confirmed": skeleton.jobs_completed(args.seconds, confirm=True),
            "unconfirmed": skeleton.jobs_completed(args.seconds, confirm=False),
        }
    json.dump(found, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
