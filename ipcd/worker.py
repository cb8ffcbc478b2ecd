"""The worker: take a message, turn it into a job, run its handler, store the result.

One loop, blocking in ``msgrcv`` with no polling.  Every message ends in exactly one log
event (``job.done`` or ``job.rejected``) and, when its job id is known, one stored result;
no message can stop the loop.  The loop only ends when ``flags.stopping`` is set, which a
signal handler does; the stop wakes a blocked ``msgrcv`` by interrupting it, and
:mod:`ipcd.signals` also sends a control message so that no wake-up is lost.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable

from ipcd import protocol
from ipcd.config import CONTROL_TYPE
from ipcd.errors import IpcdError, MessageError, RefusedPayloadError
from ipcd.handlers import HandlerError, HandlerResult
from ipcd.ipc import Interrupted, Queue
from ipcd.log import Logger
from ipcd.protocol import Job
from ipcd.registry import Registry
from ipcd.results import Kind, Result, Status
from ipcd.resultstore import ResultStore
from ipcd.signals import Flags


def execute(registry: Registry, job: Job, log: Logger) -> tuple[Result, str]:
    """Run the job's handler; returns its result and the handler's name (or "-")."""
    registration = registry.lookup(job.type)
    if registration is None:
        return _error(job, f"no handler for message type {job.type}"), "-"
    try:
        value = registration.func(job)
    except HandlerError as exc:
        return _error(job, str(exc) or type(exc).__name__), registration.name
    except Exception as exc:  # a plugin's bug fails its job, never the daemon
        log.error(
            "handler.exception",
            job_id=job.id,
            handler=registration.name,
            traceback=traceback.format_exc(),
        )
        return _error(job, f"{type(exc).__name__}: {exc}"), registration.name
    return _ok(job, value), registration.name


def _ok(job: Job, value: HandlerResult) -> Result:
    if isinstance(value, bytes | bytearray | memoryview):
        kind, data = Kind.BYTES, bytes(value)
    elif isinstance(value, str):
        kind, data = Kind.TEXT, value.encode("utf-8", "surrogateescape")
    else:
        try:
            data = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            return _error(job, f"handler returned a value that is not JSON-able: {exc}")
        kind = Kind.JSON
    return Result(job.id, job.type, Status.OK, kind, data, job.attempt, job.submitted, time.time())


def _error(job: Job, message: str) -> Result:
    return Result(
        job.id,
        job.type,
        Status.ERROR,
        Kind.TEXT,
        message.encode("utf-8", "replace"),
        job.attempt,
        job.submitted,
        time.time(),
    )


class Worker:
    """Serves one queue until told to stop."""

    def __init__(
        self,
        *,
        queue: Queue,
        replies: Queue,
        store: ResultStore,
        registry: Registry,
        flags: Flags,
        log: Logger,
        on_reload: Callable[[], Registry],
    ) -> None:
        self.queue = queue
        self.replies = replies
        self.store = store
        self.registry = registry
        self.flags = flags
        self.log = log
        self.on_reload = on_reload
        self.jobs_done = 0

    def serve(self) -> None:
        """Receive and handle messages until ``flags.stopping`` is set."""
        while not self.flags.stopping:
            if self.flags.reload:
                self.flags.reload = False
                self.registry = self.on_reload()
                continue
            try:
                body, type_ = self.queue.receive(0)
            except Interrupted:
                continue  # a signal: the loop condition says what to do
            if type_ == CONTROL_TYPE:
                continue  # a wake-up; the flags carry the request itself
            self.handle(body, type_)

    def handle(self, body: bytes, type_: int) -> None:
        """Everything that happens to one message, ending in one log event."""
        started = time.monotonic()
        try:
            job = protocol.decode(body, type_, received=time.time())
        except MessageError as exc:
            self._reject(exc, body, type_)
            return
        result, handler = execute(self.registry, job, self.log)
        stored = self._store(result)
        self.jobs_done += 1
        fields = {
            "job_id": job.id,
            "type": job.type,
            "handler": handler,
            "outcome": "ok" if result.ok else "error",
            "ms": round((time.monotonic() - started) * 1000, 3),
            "attempt": job.attempt,
            "bytes_in": len(body),
            "bytes_out": len(result.data),
        }
        if job.bare:
            fields["bare"] = True
        if job.sender_pid:
            fields["sender_pid"] = job.sender_pid
        if not result.ok:
            fields["error"] = result.error
        if not stored:
            fields["stored"] = False
        self.log.info("job.done", **fields)
        if job.reply_to is not None:
            self._notify(job.reply_to, job.id)

    def _reject(self, exc: MessageError, body: bytes, type_: int) -> None:
        self.log.warning(
            "job.rejected",
            job_id=exc.job_id,
            type=type_,
            bytes_in=len(body),
            refused=isinstance(exc, RefusedPayloadError),
            error=str(exc),
            head=body[:64].hex(),
        )
        if exc.job_id is not None:
            job = Job(id=exc.job_id, type=type_, payload=None, submitted=time.time())
            self._store(_error(job, str(exc)))

    def _store(self, result: Result) -> bool:
        try:
            self.store.put(result)
        except IpcdError as exc:
            # The segment was removed or its semaphore stayed wedged past the timeout:
            # say so and go on serving; the job's outcome is in this log event.
            self.log.error("result.store_failed", job_id=result.job_id, error=str(exc))
            return False
        return True

    def _notify(self, reply_to: int, job_id: str) -> None:
        """Tell a waiting client its result is stored; never block on a full reply queue."""
        if self.replies.send_nowait(job_id.encode("ascii"), reply_to):
            return
        self._purge_replies()
        if not self.replies.send_nowait(job_id.encode("ascii"), reply_to):
            self.log.warning("reply.dropped", job_id=job_id, reply_to=reply_to)

    def _purge_replies(self) -> None:
        """Drop notifications nobody will read: those of clients that have exited."""
        kept: list[tuple[bytes, int]] = []
        dropped = 0
        for _ in range(4096):
            message = self.replies.receive_nowait(0)
            if message is None:
                break
            if _alive(message[1]):
                kept.append(message)
            else:
                dropped += 1
        for body, type_ in kept:
            self.replies.send_nowait(body, type_)
        self.log.info("reply.purged", dropped=dropped, kept=len(kept))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
