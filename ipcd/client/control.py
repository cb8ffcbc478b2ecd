"""The client of the control socket: ask the daemon about the jobs in its store.

Only the daemon opens the job store; ``ipcctl list``, ``show``, ``cancel``, ``pause`` and
the other operator commands ask it over a Unix socket whose mode and group say who may
(ipcd.daemon.control makes it; the protocol is ipcd.wire.control).  Each method sends one
request on a connection of its own and returns plain values, or raises the ipcd error of
the daemon's answer: NoResultError (66) for an unknown job, UsageError (64) for a request
the daemon refuses, and so on.  Lean like the rest of the client side: no sqlite3, no
structlog, nothing of the daemon.
"""

from __future__ import annotations

import builtins
import errno
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ipcd.errors import (
    AlreadyQueuedError,
    ControlError,
    IpcdError,
    IpcPermissionError,
    NoResultError,
    NotRunningError,
    PayloadError,
    UsageError,
    WaitTimeoutError,
)
from ipcd.wire import control as wire
from ipcd.wire.control import Cancelled, JobDetail, JobInfo, LimitInfo, Progress, Request, Tail

#: How long one request may take, connect to last byte: the daemon's store waits up to
#: its busy_timeout (10 s by default) for a lock, and answers within that.
TIMEOUT = 30.0

#: The error classes a daemon's answer may name by status; others become ControlError.
_BY_STATUS: dict[int, type[IpcdError]] = {
    int(cls.exit_code): cls
    for cls in (UsageError, PayloadError, NoResultError, NotRunningError, IpcPermissionError)
}


class ControlClient:
    """Requests to the daemon's control socket at ``path``.

    ``group`` is the group the socket should have (``[ipc] group``), named in the
    message when the socket refuses us; the socket's own group is named when it can be
    read.
    """

    def __init__(
        self, path: Path | str, *, group: str | None = None, timeout: float = TIMEOUT
    ) -> None:
        self.path = Path(path)
        self.group = group
        self.timeout = timeout

    # --- one method per op ------------------------------------------------------------

    def list(
        self,
        states: Sequence[str] = (),
        types: Sequence[int] = (),
        unique: str | None = None,
        limit: int = 50,
    ) -> builtins.list[JobInfo]:
        """Jobs newest first; with states == ["queued"] alone, in dispatch order."""
        return self.list_more(states, types, unique, limit)[0]

    def list_more(
        self,
        states: Sequence[str] = (),
        types: Sequence[int] = (),
        unique: str | None = None,
        limit: int = 50,
    ) -> tuple[builtins.list[JobInfo], dict[str, tuple[str, ...]], dict[str, Progress]]:
        """:meth:`list`, and for each held job among them the jobs it still waits for
        (``--after``), and the running jobs' last ``job.progress()``, by job id."""
        answer = self.ask(
            Request("list", states=tuple(states), types=tuple(types), unique=unique, limit=limit)
        )
        return wire.jobs_from(answer), wire.waits_from(answer), wire.progress_from(answer)

    def show(self, job_id: str) -> JobDetail:
        """The job's whole record and its stored result; NoResultError (66) if unknown."""
        return _detail(self.ask(Request("show", id=job_id)))

    def result(self, job_id: str) -> JobDetail:
        """As :meth:`show`: what ``ipcctl result`` reads once the result ring forgot it."""
        return _detail(self.ask(Request("result", id=job_id)))

    def tail(self, job_id: str, offset: int = 0) -> Tail:
        """The job's state and its output from ``offset`` on: live while it runs (None
        when it has not begun, or has ended and its outcome is not recorded yet: ask
        again), else as the store kept it (None: it wrote nothing)."""
        answer = self.ask(Request("tail", id=job_id, offset=offset))
        state, error = answer.get("state"), answer.get("error")
        if not isinstance(state, str) or not (error is None or isinstance(error, str)):
            raise ControlError("the daemon's answer has no state", 70)
        attempts = answer.get("attempts", 0)
        if not isinstance(attempts, int) or isinstance(attempts, bool):
            raise ControlError("the daemon's answer has no attempts", 70)
        return Tail(state, error, wire.output_from_dict(answer.get("output")), attempts)

    def cancel(
        self,
        ids: Sequence[str] = (),
        *,
        types: Sequence[int] = (),
        states: Sequence[str] = (),
        kill: bool = False,
    ) -> Cancelled:
        """Cancel waiting jobs (by id, or by type and state); with ``kill`` running ones
        too, whose workers' process groups the daemon kills."""
        answer = self.ask(
            Request("cancel", ids=tuple(ids), types=tuple(types), states=tuple(states), kill=kill)
        )
        return Cancelled(
            wire.jobs_from(answer, "cancelled"),
            wire.strings_from(answer, "killed"),
            wire.skipped_from(answer),
        )

    def pause(self, types: Sequence[int] = ()) -> dict[int, float]:
        """Stop dispatching those types (none: everything); returns what is paused now,
        ``{type: since}`` with type 0 for everything."""
        return wire.paused_from(self.ask(Request("pause", types=tuple(types))))

    def resume(self, types: Sequence[int] = ()) -> dict[int, float]:
        """Dispatch those types again (none: everything); returns what is still paused."""
        return wire.paused_from(self.ask(Request("resume", types=tuple(types))))

    def paused(self) -> dict[int, float]:
        return wire.paused_from(self.ask(Request("paused")))

    def running(self, types: Sequence[int] = ()) -> builtins.list[JobInfo]:
        """Jobs a worker runs now, of those types (none: all)."""
        return wire.jobs_from(self.ask(Request("running", types=tuple(types))))

    def purge(self, states: Sequence[str], older_than: float | None = None) -> int:
        """Remove finished jobs in those states (finished more than ``older_than`` seconds
        ago); returns how many."""
        answer = self.ask(Request("purge", states=tuple(states), older_than=older_than))
        return _count(answer, "purged")

    def failed(self, limit: int = 1000) -> builtins.list[JobInfo]:
        """Failed jobs, newest first."""
        return wire.jobs_from(self.ask(Request("failed", limit=limit)))

    def retry(self, job_id: str) -> JobInfo:
        """Queue a failed or cancelled job again with fresh attempts; its record as it is
        now.  NoResultError (66) when the job is unknown or not failed or cancelled."""
        answer = self.ask(Request("retry", id=job_id))
        return wire.job_from_dict(answer.get("job"))

    def limits(self) -> builtins.list[LimitInfo]:
        """The limited handlers' limits, running and queued jobs and tokens now."""
        return wire.limits_from(self.ask(Request("limits")))

    def counts(self) -> dict[str, int]:
        """How many jobs the store holds in each state."""
        raw = self.ask(Request("counts")).get("counts")
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in raw.items()
        ):
            raise ControlError("the daemon's answer has no counts", 70)
        return dict(raw)

    def jobs(self, ids: Sequence[str]) -> builtins.list[JobInfo | None]:
        """Each job's record, in the order named; None for a job the store does not hold
        (never submitted, purged, or still in the kernel's queue)."""
        return wire.maybe_jobs_from(self.ask(Request("jobs", ids=tuple(ids))))

    def schedules(self) -> builtins.list[wire.ScheduleInfo]:
        """The daemon's recurring schedules: next run, last run and its job."""
        return wire.schedules_from(self.ask(Request("schedules")))

    # --- the connection -------------------------------------------------------------------

    def ask(self, request: Request) -> dict[str, Any]:
        """Send one request and read the answer's fields; the daemon's error as the ipcd
        error of its status."""
        line = wire.encode_request(request)
        try:
            answer = wire.decode_answer(self._exchange(line))
        except ControlError as exc:
            if exc.status == AlreadyQueuedError.exit_code and exc.holder is not None:
                raise AlreadyQueuedError(*exc.holder) from None
            cls = _BY_STATUS.get(exc.status)
            if cls is None:
                raise
            raise cls(str(exc)) from None
        return answer

    def _exchange(self, line: bytes) -> bytes:
        problem = wire.socket_path_problem(os.fsencode(self.path))
        if problem:
            raise UsageError(f"control socket {self.path} {problem}")
        deadline = time.monotonic() + self.timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(os.fsencode(self.path))
                sock.sendall(line)
                sock.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := sock.recv(1 << 16):
                    chunks.append(chunk)
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise WaitTimeoutError(
                    f"ipcd did not answer on its control socket {self.path} "
                    f"within {self.timeout:g} s"
                ) from None
            except OSError as exc:
                raise self._not_reached(exc) from None
        if not chunks:
            raise NotRunningError(
                f"ipcd closed its control socket {self.path} without an answer "
                "(it may be stopping; see its log)"
            )
        return b"".join(chunks)

    def _not_reached(self, exc: OSError) -> IpcdError:
        """The ipcd error for a connection that failed."""
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return NotRunningError(f"ipcd is not running (no control socket at {self.path})")
        if exc.errno == errno.ECONNREFUSED:
            return NotRunningError(
                f"ipcd is not running (no control socket at {self.path}: "
                "the file is there but nothing listens)"
            )
        if exc.errno in (errno.EACCES, errno.EPERM):
            return IpcPermissionError(
                f"permission denied on ipcd's control socket {self.path}: only the daemon's "
                f"user, root and members of group {self._group()} may use it"
            )
        if exc.errno in (errno.ECONNRESET, errno.EPIPE):
            return NotRunningError(
                f"ipcd closed its control socket {self.path} without an answer "
                "(it may be stopping; see its log)"
            )
        return NotRunningError(f"cannot use ipcd's control socket {self.path}: {exc.strerror}")

    def _group(self) -> str:
        """The socket's group by name (or the configured one when the socket cannot be
        looked at: a directory above it refused us)."""
        import grp  # only on this error path

        try:
            gid = self.path.stat().st_gid
        except OSError:
            return self.group or "(the daemon's [ipc] group)"
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)


def _detail(answer: dict[str, Any]) -> JobDetail:
    job = wire.job_from_dict(answer.get("job"))
    return JobDetail(
        job,
        wire.result_from_dict(answer.get("result")),
        wire.waits_from(answer).get(job.id, ()),
        wire.output_from_dict(answer.get("output")),
    )


def _count(answer: dict[str, Any], name: str) -> int:
    value = answer.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ControlError(f"the daemon's answer has no count {name!r}", 70)
    return value
