"""The control socket: the server (ipcd.daemon.control) on a real Unix socket, the client
(ipcd.client.control) and the ipcctl commands run as subprocesses against it.

The server runs in a thread of the test process, with its own connection to a real job
store (SQLite, in the test's directory) and a real in-flight table; the test looks at
the same store through a connection of its own.  ipcctl finds the socket from a
configuration whose PID file lies in the same (short: AF_UNIX paths are short) directory.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import Instance, remove_objects
from fakes import FakeLog

from ipcd.cli import control_socket_path
from ipcd.client.control import ControlClient
from ipcd.daemon import control
from ipcd.daemon.log import Logger
from ipcd.daemon.signals import Flags
from ipcd.errors import (
    AlreadyRunningError,
    ConfigError,
    ExitCode,
    IpcPermissionError,
    NoResultError,
    NotRunningError,
    UsageError,
)
from ipcd.layout import inflight as slot_layout
from ipcd.store import JobRecord, NewJob, State, open_store
from ipcd.tables.inflight import InflightTable

ECHO, SLEEP, FAIL = 2, 3, 4


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a socket's path has at most 107 bytes), readable by
    other users (the permission tests run clients as nobody)."""
    path = Path(tempfile.mkdtemp(prefix="ipcd-ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


class Served:
    """A control server in a thread with its own store connection (as the control
    process has its own), the test's connection to the same store file, the in-flight
    table, and what the server called back."""

    def __init__(self, inst: Instance, table: InflightTable) -> None:
        self.inst = inst
        self.db = str(inst.dir / "jobs.db")
        self.store = open_store(self.db)
        self.table = table
        self.path = control_socket_path(inst.config)
        self.wakes = 0
        self.cancelled: list[JobRecord] = []
        self.log = FakeLog()
        self.flags = Flags()
        self.listener = control.bind_socket(self.path, 0o660, None)
        self.exit: list[int] = []
        self.ready = threading.Event()
        self.server: control.ControlServer | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)

    def _wake(self) -> None:
        self.wakes += 1

    def _run(self) -> None:
        """The server's thread: sqlite3 connections stay in the thread that made them."""
        store = open_store(self.db)
        try:
            self.server = control.ControlServer(
                store,
                self.table,
                self._wake,
                cast(Logger, self.log),
                on_cancelled=self.cancelled.append,
            )
            self.ready.set()
            self.exit.append(self.server.serve(self.listener, self.flags))
        finally:
            store.close()

    def stop(self) -> None:
        self.flags.stopping = True
        self.thread.join(10)
        self.listener.close()
        self.store.close()

    @property
    def client(self) -> ControlClient:
        return ControlClient(self.path)

    def ipcctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.inst.ipcctl(*args)

    def add(self, job_id: str, type_: int = ECHO, **fields: Any) -> None:
        handler = {ECHO: "echo", SLEEP: "sleep", FAIL: "fail"}.get(type_, "-")
        accepted = fields.pop("accepted", time.time())
        job = NewJob(job_id, type_, handler, b"{}", False, accepted, 2, f"payload {job_id}")
        assert self.store.add([job._replace(**fields)]) == [job_id]


@pytest.fixture
def served(short_dir: Path) -> Iterator[Served]:
    inst = Instance(short_dir, short_dir / "ipcd.toml")
    inst.write()
    inst.config_path.chmod(0o644)
    table, _ = InflightTable.create(inst.keys.inflight, 0o600, 2, 2, 1024)
    server = Served(inst, table)
    yield server
    server.stop()
    table.segment.close()
    remove_objects(inst)


def _running_worker(served: Served, slot: int, job_id: str) -> subprocess.Popen[bytes]:
    """A process group like a worker's (a shell and the job it started), recorded in
    ``slot`` of the in-flight table as running ``job_id``."""
    worker = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], process_group=0)
    table = served.table
    table.reset_worker(slot, worker.pid)
    table.begin_receive(slot, worker.pid, 0)
    struct.pack_into("q", table.buf, table.offset(slot) + slot_layout.MSGBUF_TYPE, ECHO)
    table.received(slot, 2, 1, job_id, 0.0)
    return worker


# --- list and show ------------------------------------------------------------------------


def test_list_newest_first_with_filters(served: Served) -> None:
    """``ipcctl list`` prints one row per job, newest first, filtered by state, handler
    and unique key; --json gives the whole records."""
    now = time.time()
    served.add("old", accepted=now - 7200)
    served.add("mid", SLEEP, accepted=now - 90, unique="nightly")
    served.add("new", accepted=now - 5)
    served.store.claim(1, now)  # the first in dispatch order: "old" (type 2, oldest)
    shown = served.ipcctl("list")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "HANDLER", "STATE", "ATT", "PRI", "AGE", "EXPIRES", "UNIQUE", "SIZE", "PREVIEW",
    ]  # fmt: skip
    assert [line.split()[:9] for line in lines[1:]] == [
        ["new", "echo", "queued", "0", "0", "5s", "-", "-", "2B"],
        ["mid", "sleep", "queued", "0", "0", "1m", "-", "nightly", "2B"],
        ["old", "echo", "running", "1", "0", "2h", "-", "-", "2B"],
    ]
    assert lines[1].endswith("payload new")
    only = served.ipcctl("list", "--state", "queued", "--type", "echo", "--json")
    assert [j["id"] for j in json.loads(only.stdout)["jobs"]] == ["new"]
    keyed = served.ipcctl("list", "--unique", "nightly", "-n", "5", "--json")
    assert [(j["id"], j["state"]) for j in json.loads(keyed.stdout)["jobs"]] == [("mid", "queued")]
    assert served.ipcctl("list", "-n", "1").stdout.count("\n") == 2  # header and one row


def test_show_prints_record_result_and_events(served: Served) -> None:
    """``ipcctl show ID`` prints the whole record, its stored result and the job's log
    events; --json the same as one document; an unknown id exits 66."""
    served.add("j1")
    served.store.claim(1, time.time())
    served.store.finish("j1", ok=True, finished=time.time(), result_kind=1, data=b"hi", error=None)
    served.inst.log_file.write_text(
        json.dumps({"event": "job.done", "job_id": "j1", "level": "info"})
        + "\n"
        + json.dumps({"event": "job.done", "job_id": "other", "level": "info"})
        + "\n"
    )
    shown = served.ipcctl("show", "j1")
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(":", 1) for line in shown.stdout.splitlines() if ": " in line)
    assert fields["state"].strip() == "done"
    assert fields["handler"].strip() == "echo (type 2)"
    assert fields["result"].strip() == "text, 2B"
    assert "\n  hi\nevents:\n" in shown.stdout
    assert "job.done" in shown.stdout.split("events:")[1]
    assert "other" not in shown.stdout
    doc = json.loads(served.ipcctl("show", "j1", "--json").stdout)
    assert doc["job"]["state"] == "done"
    assert doc["result"] == {"kind": "text", "output": "hi"}
    assert [e["job_id"] for e in doc["events"]] == ["j1"]
    unknown = served.ipcctl("show", "nosuchjob")
    assert unknown.returncode == ExitCode.NO_RESULT
    assert "no job nosuchjob in the job store" in unknown.stderr


# --- cancel ------------------------------------------------------------------------------


def test_cancel_by_id_frees_and_wakes(served: Served) -> None:
    """Cancelled waiting jobs are reported to on_cancelled (their unique key freed, their
    waiters told) and the master is woken; a job that is not waiting is named on stderr
    and the status is 66."""
    served.add("q1", unique="k")
    served.add("s1", due=time.time() + 3600)
    served.add("d1")
    served.store.claim(1, time.time())  # the first in dispatch order: q1, now running
    done = served.ipcctl("cancel", "s1", "d1")
    assert (done.returncode, done.stdout) == (0, "cancelled 2 jobs\n"), done.stderr
    assert sorted(r.id for r in served.cancelled) == ["d1", "s1"]
    assert served.wakes == 1
    again = served.ipcctl("cancel", "s1", "q1", "zz")
    assert again.returncode == ExitCode.NO_RESULT
    assert again.stdout == "cancelled 0 jobs\n"
    assert again.stderr.splitlines() == [
        "ipcctl: job s1 was not cancelled: it is cancelled",
        "ipcctl: job q1 was not cancelled: it is running (--kill stops it)",
        "ipcctl: job zz was not cancelled: no such job in the store",
        "ipcctl: 3 of the jobs named were not cancelled",
    ]
    assert served.store.get("q1").state is State.RUNNING  # type: ignore[union-attr]


def test_cancel_by_type_and_state(served: Served) -> None:
    """``cancel --type H --state queued`` cancels every queued job of that handler and
    nothing else (the runaway cron loop's 500 copies)."""
    for n in range(20):
        served.add(f"e{n}")
    served.add("later", due=time.time() + 3600)
    served.add("other", SLEEP)
    done = served.ipcctl("cancel", "--type", "echo", "--state", "queued", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert sorted(doc["cancelled"]) == sorted(f"e{n}" for n in range(20))
    assert (doc["killed"], doc["skipped"]) == ([], [])
    states = {r.id: r.state for r in served.store.list(limit=100)}
    assert states["later"] is State.SCHEDULED and states["other"] is State.QUEUED


def test_cancel_kill_kills_the_workers_process_group(served: Served) -> None:
    """``cancel ID --kill`` marks the running job cancelled and kills the process group of
    the worker whose in-flight slot holds it, and only that one."""
    served.add("run1")
    served.add("run2", SLEEP)
    served.store.claim(2, time.time())
    victim = _running_worker(served, 0, "run1")
    bystander = _running_worker(served, 1, "run2")
    try:
        done = served.ipcctl("cancel", "run1", "--kill")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "cancelled 1 job (killed the worker of 1 running)\n"
        assert victim.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None
        assert served.store.get("run1").state is State.CANCELLED  # type: ignore[union-attr]
        assert served.cancelled == []  # the master's recovery ends a killed job
    finally:
        for worker in (victim, bystander):
            with_group = worker.pid
            if worker.poll() is None:
                os.killpg(with_group, signal.SIGKILL)
            worker.wait(10)


# --- pause, resume ----------------------------------------------------------------------


def test_pause_wait_and_resume(served: Served) -> None:
    """``pause echo`` pauses type 2 only; ``--wait`` returns once no echo job runs and
    exits 124 while one does; ``resume`` lifts it."""
    done = served.ipcctl("pause", "echo")
    assert (done.returncode, done.stdout) == (0, "paused: echo\n"), done.stderr
    assert set(served.store.paused()) == {ECHO}
    assert served.ipcctl("pause", "echo", "--wait", "--timeout", "5").returncode == 0
    served.add("r1")
    served.store.resume([])
    served.store.claim(1, time.time())
    waited = served.ipcctl("pause", "echo", "--wait", "--timeout", "0.3")
    assert waited.returncode == ExitCode.TIMEOUT
    assert "1 job still running after 0.3 s (r1); the pause stays" in waited.stderr
    served.store.finish("r1", ok=True, finished=time.time(), result_kind=None, data=None,
                        error=None)  # fmt: skip
    assert served.ipcctl("pause", "sleep", "--wait").stdout == "paused: echo, sleep\n"
    resumed = served.ipcctl("resume", "echo", "--json")
    assert [p["type"] for p in json.loads(resumed.stdout)["paused"]] == [SLEEP]
    assert served.ipcctl("pause").stdout == "paused: every handler\n"
    assert served.ipcctl("resume").stdout == "paused: nothing\n"
    assert served.wakes == 2  # each resume


# --- purge, failed, retry -------------------------------------------------------------


def test_purge_failed_and_retry(served: Served) -> None:
    """``failed`` lists failed jobs newest last as before; ``retry`` queues one again and
    prints its id (66 for a job that did not fail); ``purge`` removes finished jobs."""
    now = time.time()
    for job_id, ok in (("f1", False), ("ok1", True), ("f2", False)):
        served.add(job_id)
        served.store.claim(1, now)
        served.store.finish(job_id, ok=ok, finished=now, result_kind=None, data=None,
                            error=None if ok else f"boom {job_id}")  # fmt: skip
        time.sleep(0.01)  # accepted times differ: newest first is well defined
    listed = served.ipcctl("failed").stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["f1", "f2"]
    assert listed[0].endswith("attempts 1  boom f1")
    entries = json.loads(served.ipcctl("failed", "--json").stdout)["failed"]
    assert [(e["id"], e["error"]) for e in entries] == [("f1", "boom f1"), ("f2", "boom f2")]
    retried = served.ipcctl("retry", "f1")
    assert (retried.returncode, retried.stdout) == (0, "f1\n"), retried.stderr
    assert served.store.get("f1").state is State.QUEUED  # type: ignore[union-attr]
    refused = served.ipcctl("retry", "f1")
    assert refused.returncode == ExitCode.NO_RESULT
    assert "job f1 is queued, not failed or cancelled" in refused.stderr
    kept = served.ipcctl("purge", "--state", "done", "--older-than", "1h")
    assert kept.stdout == "purged 0 jobs\n"
    purged = served.ipcctl("purge", "--state", "done", "--state", "failed", "--json")
    assert json.loads(purged.stdout) == {"purged": 2}
    assert sorted(r.id for r in served.store.list()) == ["f1"]


# --- the server under bad input ---------------------------------------------------------


def _raw(path: Path, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    doc: dict[str, Any] = json.loads(answer)
    return doc


def test_bad_requests_get_errors_and_the_server_goes_on(served: Served) -> None:
    """Garbage, an unknown op, a bad field, a request over 64 KiB: each gets an error
    answer with status 64, and the next request is answered as usual."""
    for data, error in (
        (b"not json\n", "not a JSON line"),
        (b'{"op": "explode"}\n', "unknown control op 'explode'"),
        (b'{"op": "show", "id": "bad id!"}\n', "is not a job id"),
        (b'{"op": "list", "limit": "all"}\n', "'limit' must be an integer"),
        (b'{"op": "purge", "states": ["queued"]}\n', "purge: state 'queued' is not one of"),
        (b'{"op": "counts", "extra": 1}\n', "takes no field 'extra'"),
        (b'{"op": "list"}' + b" " * 70000 + b"\n", "longer than 65536 bytes"),
    ):
        answer = _raw(served.path, data)
        assert answer["ok"] is False and answer["status"] == ExitCode.USAGE
        assert error in answer["error"]
    assert served.client.counts()["queued"] == 0


def test_a_silent_client_is_dropped(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that connects and sends nothing is dropped after the I/O timeout, and the
    requests behind it are answered."""
    monkeypatch.setattr(control, "IO_TIMEOUT", 0.3)
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(served.path))
        assert served.client.paused() == {}
    assert ("warning", "control.dropped") in served.log.names()


def test_an_unexpected_error_is_logged_and_answered_70(served: Served) -> None:
    """A store that raises something unexpected: the answer has status 70, the event log
    the traceback, and the server answers the next request."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    assert served.server is not None
    served.server.store.counts = broken  # type: ignore[method-assign, assignment]
    answer = _raw(served.path, b'{"op": "counts"}\n')
    assert (answer["ok"], answer["status"]) == (False, 70)
    assert "disk on fire" in answer["error"]
    assert ("error", "control.error") in served.log.names()
    assert served.client.paused() == {}


def test_serve_ends_when_stopping(served: Served) -> None:
    """The loop notices the stop flag without a connection and returns 0."""
    served.flags.stopping = True
    served.thread.join(10)
    assert served.exit == [0]


# --- reaching the socket ----------------------------------------------------------------


def test_no_daemon_is_69(short_dir: Path) -> None:
    """No socket file, or one nobody listens on: ``ipcd is not running``, exit 69."""
    inst = Instance(short_dir, short_dir / "ipcd.toml")
    inst.write()
    path = control_socket_path(inst.config)
    gone = inst.ipcctl("list")
    assert gone.returncode == ExitCode.UNAVAILABLE
    assert gone.stderr == f"ipcctl: ipcd is not running (no control socket at {path})\n"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nothing listens: a killed daemon's
    refused = inst.ipcctl("pause")
    assert refused.returncode == ExitCode.UNAVAILABLE
    assert "ipcd is not running" in refused.stderr
    with pytest.raises(NotRunningError):
        ControlClient(path).counts()


def _as_user(path: Path, groups: list[int]) -> int:
    """Ask for the paused handlers from a forked child that became nobody (with these
    supplementary groups); the exit status ipcctl would have."""
    from ipcd.cli import run as run_cli

    def ask(argv: list[str]) -> int:
        ControlClient(path).paused()
        return 0

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.setgroups(groups)
            os.setgid(65534)
            os.setuid(65534)
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
            code = run_cli("ipcctl", ask, [])
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_socket_group_decides_who_may_ask(served: Served) -> None:
    """With the socket 0660 in a group, a member who is not its owner may ask, and any
    other user gets permission denied (77) naming the socket and the group."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as an unprivileged user")
    group = grp.getgrnam("users")
    os.chown(served.path, 0, group.gr_gid)
    assert served.path.stat().st_mode & 0o777 == 0o660
    assert _as_user(served.path, [group.gr_gid]) == 0
    assert _as_user(served.path, []) == ExitCode.NO_PERMISSION
    message = str(ControlClient(served.path)._not_reached(PermissionError(13, "denied")))
    assert f"control socket {served.path}" in message and "group users" in message
    assert isinstance(ControlClient(served.path)._not_reached(PermissionError(13, "x")),
                      IpcPermissionError)  # fmt: skip


# --- binding ----------------------------------------------------------------------------


def test_bind_socket(short_dir: Path) -> None:
    """bind_socket sets mode and group, replaces a socket nobody listens on, and refuses
    a live one (73), another kind of file, and a missing directory (78)."""
    path = short_dir / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    users = grp.getgrnam("users").gr_gid
    listener = control.bind_socket(path, 0o660, users)
    try:
        info = path.stat()
        assert (info.st_mode & 0o777, info.st_gid) == (0o660, users)
        with pytest.raises(AlreadyRunningError, match="another ipcd listens"):
            control.bind_socket(path, 0o660, None)
    finally:
        listener.close()
    (short_dir / "file").write_text("")
    with pytest.raises(ConfigError, match="something else than a socket"):
        control.bind_socket(short_dir / "file", 0o660, None)
    with pytest.raises(ConfigError, match="does not exist"):
        control.bind_socket(short_dir / "nodir" / "s", 0o660, None)
    with pytest.raises(ConfigError, match="at most 107"):
        control.bind_socket(short_dir / ("x" * 120), 0o660, None)
    assert (control.socket_mode(0o660), control.socket_mode(0o666)) == (0o660, 0o666)


def test_client_errors_by_status(served: Served) -> None:
    """The daemon's error statuses come back as ipcd's own errors."""
    with pytest.raises(NoResultError, match="no job abc in the job store"):
        served.client.show("abc")
    with pytest.raises(UsageError, match="cancel needs job ids or types"):
        served.client.cancel()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["cancel"], "cancel takes job ids or --type H, not both and not neither"),
        (["cancel", "j1", "--type", "echo"], "not both and not neither"),
        (["cancel", "j1", "--state", "queued"], "--state S only applies with --type H"),
        (["cancel", "--type", "echo", "--state", "done"], "invalid choice: 'done'"),
        (["purge"], "the following arguments are required: --state"),
        (["purge", "--state", "done", "--older-than", "3x"], "not a duration: '3x'"),
        (["list", "-n", "0"], "must be from 1 to 100000"),
        (["list", "--type", "nosuch"], "unknown handler 'nosuch'"),
        (["pause", "--timeout", "3"], "--timeout S only applies with --wait"),
        (["show", "bad id!"], "is not a job id"),
    ],
)
def test_usage_errors_are_64(served: Served, args: list[str], error: str) -> None:
    """Commands the parser or the configuration refuse exit 64 and reach no daemon."""
    done = served.ipcctl(*args)
    assert done.returncode == ExitCode.USAGE, done.stderr
    assert error in done.stderr


def test_durations() -> None:
    """--older-than reads 30s, 10m, 2h, 7d and plain seconds."""
    from ipcd.cli.ipcctl_args import duration

    assert [duration(t) for t in ("30s", "10m", "2h", "7d", "12", "1.5")] == [
        30, 600, 7200, 604800, 12, 1.5,
    ]  # fmt: skip


def test_store_commands_stay_lean(served: Served) -> None:
    """``ipcctl list`` loads neither sqlite3 nor the daemon side nor structlog."""
    code = (
        "import sys\n"
        "from ipcd.cli import run, ipcctl\n"
        f"code = run('ipcctl', ipcctl.main, ['-c', {str(served.inst.config_path)!r}, 'list'])\n"
        "bad = [m for m in ('sqlite3', 'structlog', 'ipcd.daemon', 'ipcd.store', 'daemon')\n"
        "       if m in sys.modules]\n"
        "print(code, bad)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.splitlines()[-1] == "0 []", done.stderr
