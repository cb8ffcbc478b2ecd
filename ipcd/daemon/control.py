"""The control socket's server: the operator commands answered from the job store.

``ipcctl list``, ``show``, ``cancel``, ``pause``, ``resume``, ``purge``, ``failed`` and
``retry`` ask the daemon over a Unix stream socket (protocol: ipcd.wire.control; client:
ipcd.client.control).  The daemon alone opens the store, so a member of the socket's group
may read and steer jobs but cannot corrupt the database, and a non-member cannot connect at
all (the socket's mode and group, set by :func:`bind_socket`).

:func:`serve` is the control process's main loop (a child of the master, with its own
store connection).  It answers one connection at a time, each bounded by
:data:`IO_TIMEOUT`: a request that is malformed, too long or too slow gets an error answer
(or none, when the client is gone) and the server goes on; an unexpected exception in one
request is logged with its traceback and answered with status 70, never the end of the
server.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from ipcd.daemon.capture import RunFiles
from ipcd.daemon.log import Logger
from ipcd.daemon.signals import Flags
from ipcd.errors import (
    AlreadyQueuedError,
    AlreadyRunningError,
    ConfigError,
    IpcdError,
    NoResultError,
    UsageError,
)
from ipcd.kernel.procs import signal_worker
from ipcd.layout.inflight import Peek, WorkerView
from ipcd.layout.inflight import State as SlotState
from ipcd.store import Captured, JobRecord, JobStore, State
from ipcd.wire import control as wire
from ipcd.wire.control import Request

#: How long one connection may take to send its request and take the answer.
IO_TIMEOUT = 5.0
#: How often the accept loop looks at the stop flag (Python retries a poll that a signal
#: interrupts, so the flag is what ends the wait).
STOP_CHECK = 0.5
#: Connections the kernel queues while one is answered.
BACKLOG = 64

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class WorkerSlots(Protocol):
    """What the server reads of the in-flight table (ipcd.tables.inflight.InflightTable):
    which worker runs which job."""

    def worker_views(self) -> list[WorkerView]: ...

    def peek(self, index: int) -> Peek: ...


class ControlServer:
    """Answers control requests from the store.

    ``wake_master`` tells the master to dispatch again (after resume, retry and cancel);
    ``on_cancelled`` is called with each cancelled job that never reached a worker, so that
    its unique key is freed and its waiters get the error result (the master's recovery
    does that for a running job it finds cancelled when its killed worker is reaped).
    ``retrying`` is entered around the store's retry of a job: it claims the job's unique
    key again, raising AlreadyQueuedError (4) while another job holds it, and frees it
    again when the retry fails (None: nothing to claim, as in tests without the tables).
    ``runs``: the workers' run files, where running jobs' output and progress are read
    (ipcd.daemon.capture; None: none shown until a job ends).
    """

    def __init__(
        self,
        store: JobStore,
        table: WorkerSlots,
        wake_master: Callable[[], None],
        log: Logger,
        *,
        on_cancelled: Callable[[JobRecord], None] | None = None,
        retrying: Callable[[JobRecord], contextlib.AbstractContextManager[object]] | None = None,
        clock: Callable[[], float] = time.time,
        runs: RunFiles | None = None,
    ) -> None:
        self.store = store
        self.table = table
        self.wake_master = wake_master
        self.log = log
        self.on_cancelled = on_cancelled
        self.retrying = retrying
        self.clock = clock
        self.runs = runs
        self._ops: dict[str, Callable[[Request], dict[str, Any]]] = {
            "list": self._list,
            "show": self._show,
            "result": self._show,
            "cancel": self._cancel,
            "pause": self._pause,
            "resume": self._resume,
            "paused": lambda request: self._paused(),
            "running": self._running,
            "purge": self._purge,
            "failed": self._failed,
            "retry": self._retry,
            "counts": self._counts,
            "jobs": self._jobs,
            "schedules": self._schedules,
            "limits": lambda request: {
                "limits": wire.limits_to_list(self.store.limited(self.clock()))
            },
            "tail": self._tail,
        }
        #: Who asked, for the log events of the requests that change something.
        self._peer: dict[str, int] = {}

    # --- the loop -------------------------------------------------------------------------

    def serve(self, listener: socket.socket, flags: Flags) -> int:
        """Accept and answer connections until ``flags.stopping``; returns the exit
        status for the control process (0)."""
        listener.setblocking(False)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        self.log.info("control.serving", socket=_name(listener))
        while not flags.stopping:
            if not poller.poll(STOP_CHECK * 1000):
                continue
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue  # another wake-up took it, or the client gave up already
            with conn:
                self.handle(conn)
        return 0

    def handle(self, conn: socket.socket) -> None:
        """Read one request, answer it and return; never raises for what a client sends."""
        deadline = time.monotonic() + IO_TIMEOUT
        try:
            self._peer = _peer(conn)
            try:
                line = _read_request(conn, deadline)
            except UsageError as exc:  # too long: say so rather than drop it
                answer = wire.encode_error(str(exc), int(exc.exit_code))
            else:
                answer = self.answer(line)
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            conn.sendall(answer)
        except (TimeoutError, BrokenPipeError, ConnectionResetError) as exc:
            self.log.warning("control.dropped", reason=type(exc).__name__, **self._peer)
        except OSError as exc:
            self.log.warning("control.dropped", reason=str(exc), **self._peer)

    def answer(self, line: bytes) -> bytes:
        """The answer to one request line: its fields, or the error with its status."""
        op = "?"
        try:
            request = wire.decode_request(line)
            op = request.op
            return wire.encode_answer(self._ops[op](request))
        except AlreadyQueuedError as exc:  # the client raises it again, holder and key
            return wire.encode_error(str(exc), int(exc.exit_code), (exc.job_id, exc.key))
        except IpcdError as exc:
            return wire.encode_error(str(exc), int(exc.exit_code))
        except Exception as exc:  # one request's bug must not end the server: logged, 70
            self.log.error("control.error", op=op, error=repr(exc), exc_info=True)
            return wire.encode_error(f"internal error in the daemon: {exc!r} (see its log)", 70)

    # --- the ops ----------------------------------------------------------------------------

    def _list(self, request: Request) -> dict[str, Any]:
        records = self.store.list(
            states=_states(request.states),
            types=request.types,
            unique=request.unique,
            limit=request.limit,
        )
        return {
            "jobs": [wire.job_to_dict(r) for r in records],
            "waits": self._waits(records),
            "progress": self._progress(records),
        }

    def _progress(self, records: Sequence[JobRecord]) -> dict[str, list[Any]]:
        """The running jobs' progress as their run files hold it, ``{id: [fraction,
        message]}`` (the files are read only when one of ``records`` runs)."""
        if self.runs is None or not any(r.state is State.RUNNING for r in records):
            return {}
        running = {r.id for r in records if r.state is State.RUNNING}
        return {
            job_id: [header.fraction, header.message]
            for job_id, header in self.runs.headers().items()
            if job_id in running and header.fraction is not None
        }

    def _show(self, request: Request) -> dict[str, Any]:
        """The record, its result, and what it wrote: the stored output of a job that
        ended, the last ``max_output`` bytes of a running one's so far."""
        record = self._get(request.id)
        result = self.store.result(request.id)
        if record.state is State.RUNNING:
            output = self._live(request.id, 0)
        else:
            output = wire.output_to_dict(self.store.output(request.id), live=False)
        return {
            "job": wire.job_to_dict(record),
            "result": wire.result_to_dict(result),
            "output": output,
            "waits": self._waits([record]),
        }

    def _tail(self, request: Request) -> dict[str, Any]:
        """A job's output from ``offset`` on: live while it runs (``live`` true), else
        what the store kept (then ``state`` says how it ended)."""
        record = self._get(request.id)
        if record.state is State.RUNNING:
            live = self._live(request.id, request.offset)
            # None: not in a run file, so not begun yet, or ended and not yet recorded
            # (a worker records its outcomes with its next claim): the client asks again.
            return {
                "state": record.state.value, "error": None, "output": live,
                "attempts": record.attempts,
            }  # fmt: skip
        stored = self.store.output(request.id)
        output = wire.output_to_dict(stored, live=False)
        return {
            "state": record.state.value, "error": record.error, "output": output,
            "attempts": record.attempts,
        }  # fmt: skip

    def _live(self, job_id: str, offset: int) -> dict[str, Any] | None:
        live = self.runs.live(job_id, offset) if self.runs is not None else None
        if live is None:
            return None
        header = live.header
        return wire.output_to_dict(
            Captured(live.data, live.size, header.fraction, header.message),
            live=True,
            offset=live.offset,
        )

    def _waits(self, records: Sequence[JobRecord]) -> dict[str, list[str]]:
        """What the held jobs among ``records`` still wait for (``--after``): read only
        when there are some."""
        held = [r.id for r in records if r.after and r.state is State.SCHEDULED]
        return self.store.waits(held) if held else {}

    def _cancel(self, request: Request) -> dict[str, Any]:
        """Cancel in the store first, then kill the workers of the running ones: a worker
        killed before the store says cancelled would be retried by the recovery."""
        records = self.store.cancel(
            request.ids,
            types=request.types,
            states=_states(request.states) or (State.QUEUED, State.SCHEDULED),
            running=request.kill,
            now=self.clock(),
        )
        killed = [r.id for r in records if r.state is State.RUNNING and self._kill(r.id)]
        # The jobs held for them were cancelled with them (ipcd.store.chains).
        records += self.store.take_chained().cancelled
        for record in records:
            if record.state is not State.RUNNING and self.on_cancelled is not None:
                self.on_cancelled(record)
        done = {r.id for r in records}
        skipped = [
            {"id": job_id, "state": _value(getattr(self.store.get(job_id), "state", None))}
            for job_id in request.ids
            if job_id not in done
        ]
        self.log.info(
            "control.cancel",
            jobs=sorted(done),
            killed=killed,
            types=list(request.types),
            **self._peer,
        )
        self.wake_master()
        return {
            "cancelled": [wire.job_to_dict(r) for r in records],
            "killed": killed,
            "skipped": skipped,
        }

    def _kill(self, job_id: str) -> bool:
        """SIGKILL the process group of the worker that runs ``job_id``; False when no
        worker holds it (it finished meanwhile, or was handed off and not yet received:
        the worker then finds it cancelled in the store)."""
        for view in self.table.worker_views():
            if view.job_id != job_id or view.state is not SlotState.RUNNING:
                continue
            # Look again right before the kill: the worker may have moved on to another job.
            if self.table.peek(view.slot).job_id != job_id:
                return False
            signal_worker(view.pid, signal.SIGKILL)
            return True
        return False

    def _pause(self, request: Request) -> dict[str, Any]:
        self.store.pause(request.types, self.clock())
        self.log.info("control.pause", types=list(request.types), **self._peer)
        return self._paused()

    def _resume(self, request: Request) -> dict[str, Any]:
        self.store.resume(request.types)
        self.log.info("control.resume", types=list(request.types), **self._peer)
        self.wake_master()
        return self._paused()

    def _paused(self) -> dict[str, Any]:
        return {"paused": wire.paused_to_list(self.store.paused())}

    def _running(self, request: Request) -> dict[str, Any]:
        return {"jobs": [wire.job_to_dict(r) for r in self.store.running(request.types)]}

    def _purge(self, request: Request) -> dict[str, Any]:
        count = self.store.purge(_states(request.states), request.older_than, self.clock())
        self.log.info(
            "control.purge",
            states=list(request.states),
            older_than=request.older_than,
            purged=count,
            **self._peer,
        )
        return {"purged": count}

    def _failed(self, request: Request) -> dict[str, Any]:
        records = self.store.list(states=(State.FAILED,), limit=request.limit)
        return {"jobs": [wire.job_to_dict(r) for r in records]}

    def _retry(self, request: Request) -> dict[str, Any]:
        """A failed or cancelled job queued again.  One with a unique key claims it first
        (``retrying``), and stays as it is, exit 4, while another job holds the key: the
        key guards against two of its jobs at once, a retry included."""
        found = self._get(request.id)
        record = None
        if found.state in (State.FAILED, State.CANCELLED):
            with self.retrying(found) if self.retrying else contextlib.nullcontext():
                record = self.store.retry(request.id, self.clock())
                if record is None:  # it changed meanwhile: the claim is undone
                    found = self._get(request.id)
                    raise _not_retryable(found)
        if record is None:
            raise _not_retryable(found)
        self.log.info("control.retry", job_id=request.id, **self._peer)
        self.wake_master()
        return {"job": wire.job_to_dict(record)}

    def _counts(self, request: Request) -> dict[str, Any]:
        return {"counts": {_value(state): n for state, n in self.store.counts().items()}}

    def _jobs(self, request: Request) -> dict[str, Any]:
        """Each named job's record, or null when the store does not hold it: what
        ``ipcctl wait`` asks until the jobs have ended."""
        found = self.store.records(request.ids)
        records = (found.get(job_id) for job_id in request.ids)
        return {"jobs": [None if r is None else wire.job_to_dict(r) for r in records]}

    def _schedules(self, request: Request) -> dict[str, Any]:
        """The schedules the master keeps in the store, each with its last job's state."""
        answer = []
        for state in self.store.schedules():
            last = self.store.get(state.last_job) if state.last_job else None
            answer.append(wire.schedule_to_dict(state, _value(last.state) if last else None))
        return {"schedules": answer}

    def _get(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise NoResultError(f"no job {job_id} in the job store")
        return record


def serve(
    listener: socket.socket,
    store: JobStore,
    table: WorkerSlots,
    wake_master: Callable[[], None],
    log: Logger,
    flags: Flags,
    *,
    on_cancelled: Callable[[JobRecord], None] | None = None,
    retrying: Callable[[JobRecord], contextlib.AbstractContextManager[object]] | None = None,
    runs: RunFiles | None = None,
) -> int:
    """The control process's main loop: answer on ``listener`` until ``flags.stopping``.

    Returns the exit status for ``os._exit``.  The caller opened ``store`` in this
    process (never share a sqlite3 connection across fork), installed the signal flags,
    and removes the socket file when the daemon stops.
    """
    server = ControlServer(
        store, table, wake_master, log, on_cancelled=on_cancelled, retrying=retrying, runs=runs
    )
    return server.serve(listener, flags)


def bind_socket(path: Path, mode: int, gid: int | None) -> socket.socket:
    """Make the listening control socket at ``path``, with ``mode`` and group ``gid``.

    In this order: the directory must exist (ConfigError, 78); a socket file already there
    is removed only if nothing answers on it (a daemon that was killed left it), and one
    that answers is another daemon's (AlreadyRunningError, 73); anything else at the path
    is refused, never removed.  The socket is bound with mode 0600 (a umask around the
    bind), then given its group, then its mode: no moment in which a wider mode than asked
    lets someone connect.
    """
    problem = wire.socket_path_problem(os.fsencode(path))
    if problem:
        raise ConfigError(f"control socket {path} {problem}")
    if not path.parent.is_dir():
        raise ConfigError(f"control socket {path}: the directory {path.parent} does not exist")
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(os.fsencode(path))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        raise ConfigError(f"control socket {path}: {exc.strerror or exc}") from None
    return sock


def socket_mode(ipc_mode: int) -> int:
    """The control socket's mode for an ``[ipc] mode``: 0660, or 0666 when that mode lets
    others write the job queue (then anyone may submit, so anyone may ask)."""
    return 0o666 if ipc_mode & 0o002 else 0o660


def _remove_stale(path: Path) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"control socket {path}: something else than a socket is there")
    # The control process of a daemon killed a moment ago may still answer: it leaves
    # within half a second of its master's death (PR_SET_PDEATHSIG, STOP_CHECK).
    deadline = time.monotonic() + ORPHAN_GRACE
    while _answers(path):
        if time.monotonic() >= deadline:
            raise AlreadyRunningError(f"control socket {path}: another ipcd listens on it")
        time.sleep(0.05)
    os.unlink(path)


#: How long a start waits for a socket that answers to stop answering (see _remove_stale).
ORPHAN_GRACE = 2.0


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(IO_TIMEOUT)
        try:
            probe.connect(os.fsencode(path))
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise ConfigError(f"control socket {path}: {exc.strerror or exc}") from None
            return False
    return True


def _read_request(conn: socket.socket, deadline: float) -> bytes:
    """One request line (without reading past its newline's chunk); UsageError for one
    longer than MAX_REQUEST, TimeoutError past the deadline."""
    data = b""
    while b"\n" not in data:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = conn.recv(wire.MAX_REQUEST)
        if not chunk:
            break
        data += chunk
        if len(data) > wire.MAX_REQUEST:
            raise UsageError(f"control request longer than {wire.MAX_REQUEST} bytes")
    return data.split(b"\n", 1)[0]


def _peer(conn: socket.socket) -> dict[str, int]:
    """The connecting process's pid and uid (SO_PEERCRED), for the log."""
    try:
        pid, uid, _ = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
    except OSError:
        return {}
    return {"peer_pid": pid, "peer_uid": uid}


def _not_retryable(record: JobRecord) -> NoResultError:
    return NoResultError(
        f"job {record.id} is {_value(record.state)}, not failed or cancelled: nothing to retry"
    )


def _states(names: Sequence[str]) -> tuple[State, ...]:
    return tuple(State(name) for name in names)


def _value(state: object) -> str | None:
    if state is None:
        return None
    return str(getattr(state, "value", state))


def _name(listener: socket.socket) -> str:
    name = listener.getsockname()
    return os.fsdecode(name) if isinstance(name, (str, bytes)) else str(name)
