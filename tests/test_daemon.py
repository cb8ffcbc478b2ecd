"""The daemon's lifecycle, driven through the real ``ipcd`` command."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import DEFAULT_HANDLERS, IPCD, Instance, run

from ipcd.errors import ExitCode
from ipcd.store import State, open_store


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait until the process has exited (a zombie not yet reaped by init counts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _proc_stat(pid)[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def test_start_detaches_with_a_double_fork(daemon: Instance) -> None:
    """`ipcd start` returns once the daemon runs in its own session, reparented, with a PID file."""
    pid = daemon.pid()
    fields = _proc_stat(pid)
    ppid, pgrp, session = int(fields[1]), int(fields[2]), int(fields[3])
    assert session != os.getsid(0)  # a new session...
    assert session != pid  # ...whose leader (the first child) has exited: no controlling tty
    assert pgrp == session
    assert ppid != os.getpid()  # reparented away from the test process
    assert Path(f"/proc/{pid}/cwd").resolve() == daemon.dir.resolve()
    fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in ("0", "1", "2")}
    assert fds == {"/dev/null"}
    events = [e["event"] for e in daemon.log_events()]
    assert events[0] == "daemon.started"


def test_start_returns_when_ready(instance: Instance) -> None:
    """Right after `ipcd start` returns, a job is served (objects open, handlers imported)."""
    assert instance.ipcd("start").returncode == 0
    try:
        done = instance.ipcctl("submit", "echo", "ready?", "--wait", "--timeout", "10")
        assert (done.returncode, done.stdout) == (0, "ready?\n")
    finally:
        assert instance.ipcd("stop").returncode == 0


def test_stop_removes_pid_file_and_waits(daemon: Instance) -> None:
    """`ipcd stop` returns only after the process is gone and the PID file removed."""
    pid = daemon.pid()
    stopped = daemon.ipcd("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not daemon.pid_file.exists()
    assert _gone(pid, timeout=0.1)
    assert daemon.log_events()[-1]["event"] == "daemon.stopped"
    assert stopped.stderr == ""  # an idle daemon stops at once: nothing to say


def test_stop_says_what_it_waits_for(daemon: Instance) -> None:
    """While a worker finishes its job, the master logs daemon.stopping at once and
    `ipcd stop` says on stderr that it waits, and for how long at most."""
    job_id = daemon.ipcctl("submit", "sleep", "3").stdout.strip()
    running = daemon.wait_events(
        lambda e: e.get("event") == "job.started" and e.get("job_id") == job_id, 1
    )
    assert running, "the sleep job never started"
    pid = daemon.pid()
    stopped = daemon.ipcd("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stderr == (
        f"ipcd: waiting for the daemon (pid {pid}) to stop: its workers finish their jobs "
        "for up to [daemon] graceful_timeout (20s)\n"
    )
    events = [
        e
        for e in daemon.log_events()
        if e.get("event") in ("daemon.stopping", "job.done", "daemon.stopped")
    ]
    assert [e["event"] for e in events] == ["daemon.stopping", "job.done", "daemon.stopped"]
    assert events[0]["busy_workers"] == 1 and events[0]["signal"] == signal.SIGTERM


def test_stop_is_prompt_while_idle(daemon: Instance) -> None:
    """An idle daemon blocked in msgrcv reacts to SIGTERM within a fraction of a second."""
    pid = daemon.pid()
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    assert _gone(pid, timeout=2.0)
    print(f"idle stop took {time.monotonic() - started:.3f}s")


def test_stop_lets_the_running_job_finish(daemon: Instance) -> None:
    """A stop during a job lets it finish and store its result; queued jobs stay queued."""
    # 4 s: the submits and the stop below must land while both still run (a loaded host
    # takes up to a second per command); the stop waits for them anyway.
    running = [daemon.ipcctl("submit", "sleep", "4").stdout.strip() for _ in range(2)]
    started = daemon.wait_events(  # both workers hold one (not a sleep: a loaded host)
        lambda e: e["event"] == "job.started" and e["job_id"] in running, 2
    )
    assert len(started) == 2
    queued = daemon.ipcctl("submit", "echo", "later").stdout.strip()
    assert daemon.ipcd("stop").returncode == 0
    for job_id in running:
        assert daemon.ipcctl("result", job_id).stdout == "slept 4s\n"
    assert daemon.ipcctl("status", "--json").returncode == ExitCode.UNAVAILABLE
    assert daemon.ipcctl("result", queued).returncode == ExitCode.NO_RESULT
    assert daemon.ipcd("start").returncode == 0  # the next start serves the queued job
    waited = daemon.ipcctl("result", queued, "--wait", "--timeout", "10")
    assert waited.stdout == "later\n"


def test_second_start_is_refused(daemon: Instance) -> None:
    """A second `ipcd start` while one runs fails with status 73 and names the running PID."""
    second = daemon.ipcd("start")
    assert second.returncode == ExitCode.ALREADY_RUNNING
    assert f"already running (pid {daemon.pid()}" in second.stderr


def test_stale_pid_file_does_not_block_start(instance: Instance) -> None:
    """A PID file left by a SIGKILLed daemon is replaced by the next start."""
    assert instance.ipcd("start").returncode == 0
    pid = instance.pid()
    os.kill(pid, signal.SIGKILL)
    assert _gone(pid)
    assert instance.pid_file.exists()
    assert instance.ipcd("status").returncode == ExitCode.NOT_RUNNING
    restarted = instance.ipcd("start")
    assert restarted.returncode == 0, restarted.stderr
    assert instance.pid() != pid
    assert instance.ipcctl("submit", "echo", "again", "--wait").stdout == "again\n"
    assert instance.ipcd("stop").returncode == 0


def test_start_failure_is_reported_before_detaching(instance: Instance) -> None:
    """A handler that cannot be imported makes `ipcd start` exit 78 with the reason."""
    instance.write(handlers='[handlers.broken]\ntype = 9\ntarget = "no_such_module:f"\n')
    failed = instance.ipcd("start")
    assert failed.returncode == ExitCode.CONFIG
    assert "handler 'broken': cannot load 'no_such_module:f'" in failed.stderr
    assert not instance.pid_file.exists()


def test_start_failure_after_detaching_is_reported(instance: Instance) -> None:
    """A failure inside the detached daemon (its PID file cannot be written: a directory
    is in the way) reaches `ipcd start`'s stderr, and leaves no daemon."""
    instance.pid_file.mkdir()
    failed = instance.ipcd("start")
    assert failed.returncode == 1
    assert f"cannot write the PID file {instance.pid_file}: Is a directory" in failed.stderr
    assert instance.ipcd("status").returncode == ExitCode.NOT_RUNNING


def test_missing_pid_file_directory_is_reported(instance: Instance) -> None:
    """A PID file in a directory that does not exist fails the start (1), naming it."""
    text = instance.config_path.read_text().replace(
        'pid_file = "ipcd.pid"', 'pid_file = "missing-dir/ipcd.pid"'
    )
    instance.config_path.write_text(text)
    failed = instance.ipcd("start")
    assert failed.returncode == 1
    assert "PID file directory" in failed.stderr and "missing-dir" in failed.stderr


def test_invalid_config_exit_status(instance: Instance) -> None:
    """A config with an unknown key is refused with status 78 and the key named."""
    instance.config_path.write_text(instance.config_path.read_text() + "\n[ipc2]\nx = 1\n")
    failed = instance.ipcd("start")
    assert failed.returncode == ExitCode.CONFIG
    assert "unknown setting ipc2" in failed.stderr


def test_status_and_reload(daemon: Instance) -> None:
    """`ipcd status` says running; `ipcd reload` re-reads handlers and reopens the log."""
    assert daemon.ipcd("status").returncode == 0
    daemon.log_file.rename(daemon.dir / "ipcd.log.1")  # what logrotate does
    daemon.write(
        handlers="[handlers.echo]\ntype = 2\n[handlers.shout]\ntype = 7\n"
        'target = "ipcd.handlers.builtin:echo"\n'
    )
    assert daemon.ipcd("reload").returncode == 0
    done = daemon.ipcctl("submit", "shout", "HI", "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "HI\n")
    events = [e["event"] for e in daemon.log_events()]  # the new file
    assert events.count("worker.started") == 2 and "job.done" in events
    assert events.index("daemon.reloaded") < events.index("job.done")
    exits = daemon.wait_events(lambda e: e["event"] == "worker.exited", 2)
    assert len(exits) == 2 and all(e["level"] == "info" for e in exits)  # retired, not died
    assert daemon.ipcctl("submit", "sleep", "0").returncode == ExitCode.USAGE  # gone


def test_bad_reload_keeps_running_config(daemon: Instance) -> None:
    """A SIGHUP with a broken config is logged and the daemon keeps serving the old one."""
    daemon.config_path.write_text("this is not toml")
    refused = daemon.ipcd("reload")  # `ipcd reload` checks the file before signalling
    assert refused.returncode == ExitCode.CONFIG and "invalid TOML" in refused.stderr
    os.kill(daemon.pid(), signal.SIGHUP)  # what `kill -HUP` or a bare SIGHUP does
    deadline = time.monotonic() + 10
    while "daemon.reload_failed" not in daemon.log_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    daemon.write()
    done = daemon.ipcctl("submit", "echo", "still here", "--wait", "--timeout", "10")
    assert done.stdout == "still here\n"
    failed = [e for e in daemon.log_events() if e["event"] == "daemon.reload_failed"]
    assert len(failed) == 1 and "invalid TOML" in str(failed[0]["error"])


def test_reload_the_daemon_refuses_fails_and_keeps_the_old_config(daemon: Instance) -> None:
    """A reload that fails in the daemon (a handler module that does not import there,
    which `ipcd reload` itself does not check) exits 78 with the daemon's error on
    stderr, and the daemon keeps serving its old configuration; the next good reload
    exits 0."""
    daemon.write(
        handlers=DEFAULT_HANDLERS + '[handlers.broken]\ntype = 9\ntarget = "no_such_module:f"\n'
    )
    failed = daemon.ipcd("reload")
    assert failed.returncode == ExitCode.CONFIG, failed.stderr
    assert (
        f"reload failed, ipcd (pid {daemon.pid()}) keeps its old configuration: "
        "handler 'broken': cannot load 'no_such_module:f'"
    ) in failed.stderr
    done = daemon.ipcctl("submit", "echo", "old config", "--wait", "--timeout", "10")
    assert done.stdout == "old config\n"
    daemon.write(handlers=DEFAULT_HANDLERS + "[handlers.shout]\ntype = 7\n"
                 'target = "ipcd.handlers.builtin:echo"\n')  # fmt: skip
    fixed = daemon.ipcd("reload")
    assert fixed.returncode == 0, fixed.stderr
    assert daemon.ipcctl("submit", "shout", "new", "--wait").stdout == "new\n"


def test_stop_and_status_when_not_running(instance: Instance) -> None:
    """`ipcd stop`/`reload` without a daemon exit 69; `ipcd status` exits 3 (LSB)."""
    assert instance.ipcd("stop").returncode == ExitCode.UNAVAILABLE
    assert instance.ipcd("reload").returncode == ExitCode.UNAVAILABLE
    assert instance.ipcd("status").returncode == ExitCode.NOT_RUNNING


def test_foreground_run_logs_to_terminal_and_stops_on_sigint(instance: Instance) -> None:
    """`ipcd run` serves in the foreground, prints readable events and exits 0 on Ctrl-C."""
    proc = subprocess.Popen(
        [IPCD, "-c", str(instance.config_path), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not instance.pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        done = instance.ipcctl("submit", "echo", "fg", "--wait", "--timeout", "10")
        assert done.stdout == "fg\n"
        assert instance.ipcd("status").returncode == 0
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "daemon.started" in err and "job.done" in err and "daemon.stopped" in err
    assert not instance.pid_file.exists()


def test_key_file_is_created_once(instance: Instance) -> None:
    """The daemon creates the key file at its first start and never rewrites it."""
    key_file = instance.dir / "ipcd.key"
    assert not key_file.exists()
    assert instance.ipcd("start").returncode == 0
    inode = key_file.stat().st_ino
    assert instance.ipcd("stop").returncode == 0
    assert instance.ipcd("start").returncode == 0
    assert key_file.stat().st_ino == inode
    assert instance.ipcd("stop").returncode == 0


def test_help_lists_exit_statuses() -> None:
    """`ipcd --help` documents the exit statuses."""
    shown = run([IPCD, "--help"])
    assert shown.returncode == 0 and "exit status" in shown.stdout


def test_type_one_is_a_job_type(instance: Instance) -> None:
    """A bare message of type 1, sent with sysv_ipc, runs the handler mapped to type 1, and
    so does ``ipcctl submit 1``: ipcd keeps no type for itself."""
    import sysv_ipc

    instance.write(handlers='[handlers.first]\ntype = 1\ntarget = "ipcd.handlers.builtin:echo"\n')
    assert instance.ipcd("start").returncode == 0
    sysv_ipc.MessageQueue(instance.keys.jobs).send(b"bare one", True, 1)
    [done] = instance.wait_events(lambda e: e["event"] == "job.done", 1)
    assert (done["handler"], done["type"], done["outcome"], done["bare"]) == (
        "first", 1, "ok", True,
    )  # fmt: skip
    assert instance.ipcctl("result", str(done["job_id"])).stdout == "bare one\n"
    sent = instance.ipcctl("submit", "1", "by number", "--wait", "--timeout", "10")
    assert (sent.returncode, sent.stdout) == (0, "by number\n")
    assert instance.ipcd("stop").returncode == 0


def test_a_type_without_handler_is_listed_failed(daemon: Instance) -> None:
    """A message of a type no handler has (type 1 here) is not dropped: it ends with an
    error result, on the failed list, and in a job.done event."""
    import sysv_ipc

    sysv_ipc.MessageQueue(daemon.keys.jobs).send(b"nobody's", True, 1)
    [done] = daemon.wait_events(lambda e: e["event"] == "job.done", 1)
    assert (done["type"], done["outcome"], done["error"]) == (
        1, "error", "no handler for message type 1",
    )  # fmt: skip
    shown = daemon.ipcctl("result", str(done["job_id"]))
    assert (shown.returncode, shown.stderr.strip().endswith("no handler for message type 1")) == (
        1, True,
    )  # fmt: skip
    assert str(done["job_id"]) in daemon.ipcctl("failed").stdout


def test_reload_keeps_serving_when_the_log_cannot_be_reopened(instance: Instance) -> None:
    """A reload whose log file cannot be opened again (its directory moved away) logs
    log.reopen_failed to the file it has and goes on serving; it does not stop."""
    logs = instance.dir / "logs"
    logs.mkdir()
    instance.config_path.write_text(
        instance.config_path.read_text().replace('file = "ipcd.log"', 'file = "logs/ipcd.log"')
    )
    assert instance.ipcd("start").returncode == 0
    moved = instance.dir / "logs.old"
    logs.rename(moved)
    assert instance.ipcd("reload").returncode == 0
    done = instance.ipcctl("submit", "echo", "still here", "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "still here\n")
    import json

    events = [json.loads(line) for line in (moved / "ipcd.log").read_text().splitlines()]
    assert any(e["event"] == "log.reopen_failed" for e in events)
    assert any(e["event"] == "job.done" for e in events)
    assert instance.ipcd("stop").returncode == 0


def test_a_reload_keeps_the_store_and_socket_it_started_with(daemon: Instance) -> None:
    """A reload that names another store file, sync or socket keeps the running ones
    (new workers and intake must write the store the master reads) and names them in
    ``restart_needed`` at every reload until the restart; ``keep_done`` applies."""
    daemon.write('[store]\npath = "other.db"\nsync = "full"\nsocket = "other.sock"\n')
    for _ in range(2):
        assert daemon.ipcd("reload").returncode == 0
    reloads = [e for e in daemon.log_events() if e["event"] == "daemon.reloaded"]
    assert [e["restart_needed"] for e in reloads] == [
        ["store.path", "store.sync", "store.socket"]
    ] * 2
    done = daemon.ipcctl("submit", "echo", "kept", "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "kept\n")
    assert not (daemon.dir / "other.db").exists()
    jobs = open_store(str(daemon.dir / "jobs.db"))
    try:
        (job_id,) = [e["job_id"] for e in daemon.log_events() if e["event"] == "job.done"]
        record = jobs.get(str(job_id))
    finally:
        jobs.close()
    assert record is not None and record.state is State.DONE
