"""The job store as an operator meets it: the real daemon (``ipcd start``), ``ipcctl`` as
processes, real handlers, real users and groups, a real full disk.

Each test is one thing an operator tries (issue 12's "Done when"): find and cancel what
a runaway loop queued, kill a hung job, pause a handler, keep the store bounded, read
results after a restart and after shared memory is lost, refuse a broken store at start,
ride out a full disk, keep non-members out.  Jobs are followed through ``ipcctl`` and the
daemon's event log; a job ran once for each ``job.started`` event it has.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import IPCCTL, IPCD, Instance, _kill_leftover, _running, remove_objects, run

from ipcd.client import Client
from ipcd.errors import ExitCode, QueueFullError
from ipcd.kernel import keys, vetting

HANG_HANDLER = """
[handlers.hang]
type = 9
target = "ipcd_test_plugins:hang"
"""


# --- helpers ----------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    return done.stdout


def jobs(inst: Instance, *args: str) -> list[dict[str, Any]]:
    """``ipcctl list --json`` with these filters (up to 10,000 jobs)."""
    found: list[dict[str, Any]] = json.loads(
        ok(inst.ipcctl("list", "-n", "10000", "--json", *args))
    )["jobs"]
    return found


def job(inst: Instance, job_id: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(ok(inst.ipcctl("show", job_id, "--json")))["job"]
    return record


def state_is(inst: Instance, job_id: str, state: str) -> Callable[[], bool]:
    return lambda: job(inst, job_id)["state"] == state


def runs(inst: Instance) -> Counter[str]:
    """How often each job started, from the event log."""
    return Counter(str(e["job_id"]) for e in inst.log_events() if e.get("event") == "job.started")


def events(inst: Instance, name: str) -> list[dict[str, Any]]:
    return [e for e in inst.log_events() if e.get("event") == name]


def configure(inst: Instance, extra: str = "", *, workers: int = 2, handlers: str = "") -> None:
    from conftest import DEFAULT_HANDLERS

    inst.write(extra, handlers=DEFAULT_HANDLERS + handlers)
    text = inst.config_path.read_text().replace("workers = 2", f"workers = {workers}")
    inst.config_path.write_text(text)


def start(inst: Instance) -> None:
    started = inst.ipcd("start")
    assert started.returncode == 0, started.stderr


def objects_at(inst: Instance) -> set[tuple[str, int, int]]:
    """The IPC objects at any key this instance derives."""
    jobs_key = inst.keys.jobs
    made = {(jobs_key + n * keys.REPLY_KEY_OFFSET) & 0xFFFFFFFF for n in range(10)}
    return {o for o in vetting.sysv_objects() if o[1] in made}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (AF_UNIX socket paths are short) that other users
    may enter (tests run ipcctl and the daemon as nobody)."""
    path = Path(tempfile.mkdtemp(prefix="ipcd-op-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def open_instance(short_dir: Path) -> Iterator[Instance]:
    """An instance in a directory other users may enter; its daemon and objects go after."""
    inst = Instance(short_dir, short_dir / "ipcd.toml")
    inst.write()
    yield inst
    _kill_leftover(inst)
    remove_objects(inst)


# --- 1. the runaway loop ----------------------------------------------------------------


def test_five_hundred_queued_copies_are_found_and_cancelled_by_one_command(
    daemon: Instance,
) -> None:
    """500 copies of a job queued behind a paused handler are listed by handler, cancelled
    by one `cancel --type H --state queued`, never run, and free their unique keys."""
    ok(daemon.ipcctl("pause", "echo"))
    client = Client(daemon.config)
    copies = [
        client.submit("echo", f"copy {n}", confirm=True, unique=f"copy-{n}") for n in range(500)
    ]
    listed = ok(daemon.ipcctl("list", "--type", "echo")).splitlines()
    assert listed[0].split()[:3] == ["ID", "HANDLER", "STATE"]
    assert len(listed) == 1 + 50  # the default -n
    assert all(line.split()[1:3] == ["echo", "queued"] for line in listed[1:])
    assert len(ok(daemon.ipcctl("list", "--type", "echo", "-n", "7")).splitlines()) == 1 + 7
    queued = jobs(daemon, "--type", "echo")
    assert sorted(j["id"] for j in queued) == sorted(copies)
    assert {j["state"] for j in queued} == {"queued"}
    cancelled = ok(daemon.ipcctl("cancel", "--type", "echo", "--state", "queued"))
    assert cancelled.strip() == "cancelled 500 jobs"
    ok(daemon.ipcctl("resume", "echo"))
    # A job submitted after them runs: had any copy been left queued, it would have run.
    assert ok(daemon.ipcctl("submit", "echo", "after", "--wait")).strip() == "after"
    assert {j["id"] for j in jobs(daemon, "--state", "cancelled")} == set(copies)
    assert not set(runs(daemon)) & set(copies)
    again = daemon.ipcctl("submit", "echo", "again", "--unique", "copy-7", "--wait")
    assert again.returncode == 0, again.stderr  # the key was freed


# --- 2. a hung job ----------------------------------------------------------------------


def test_a_hung_job_is_killed_with_its_group_and_ends_cancelled(
    instance: Instance, tmp_path: Path
) -> None:
    """`cancel --kill ID` stops a job with no timeout: its worker's process group dies, it
    ends cancelled after one attempt, its waiter hears an error, a new worker comes."""
    configure(instance, handlers=HANG_HANDLER)
    start(instance)
    pid_file = tmp_path / "child.pid"
    waiter = subprocess.Popen(
        [IPCCTL, "-c", str(instance.config_path), "submit", "hang", str(pid_file), "--wait",
         "--timeout", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent / "plugins")},
    )  # fmt: skip
    try:
        hung = wait_for("the hung job to run", lambda: jobs(instance, "--state", "running"))[0]
        child = int(
            wait_for("the handler's child", lambda: pid_file.exists() and pid_file.read_text())
        )
        worker = hung["worker_pid"]
        assert worker and _running(worker) and _running(child)
        killed = ok(instance.ipcctl("cancel", "--kill", hung["id"]))
        assert "killed the worker of 1 running" in killed
        wait_for(
            "the worker and its child to die", lambda: not _running(worker) and not _running(child)
        )
        out, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == ExitCode.JOB_FAILED, (out, err)
    assert "cancelled" in err
    wait_for(
        "a worker in place of the killed one",
        lambda: len([w for w in _workers(instance) if w["pid"] != worker]) == 2,
    )
    record = job(instance, hung["id"])
    assert record["state"] == "cancelled" and record["attempts"] == 1
    assert not [e for e in events(instance, "job.retry") if e.get("job_id") == hung["id"]]
    assert runs(instance)[hung["id"]] == 1


def _workers(inst: Instance) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(ok(inst.ipcctl("status", "--json")))["workers"]
    return found


# --- 3. pause and resume ----------------------------------------------------------------


def test_pause_holds_one_handler_while_others_run_and_resume_releases_it(
    daemon: Instance,
) -> None:
    """`pause sleep` holds the sleep handler's queued jobs while echo jobs run; status
    shows it; `pause --wait` returns once the running sleep job finished; `resume` runs
    the held jobs."""
    running = ok(daemon.ipcctl("submit", "sleep", "1.5")).strip()
    wait_for("the sleep job to start", state_is(daemon, running, "running"))
    ok(daemon.ipcctl("pause", "sleep"))
    held = [ok(daemon.ipcctl("submit", "sleep", "0")).strip() for _ in range(3)]
    assert ok(daemon.ipcctl("submit", "echo", "still served", "--wait")).strip() == "still served"
    status = json.loads(ok(daemon.ipcctl("status", "--json")))
    assert [p["handler"] for p in status["store"]["paused"]] == ["sleep"]
    assert "paused     sleep" in ok(daemon.ipcctl("status"))
    ok(daemon.ipcctl("pause", "sleep", "--wait", "--timeout", "30"))
    assert job(daemon, running)["state"] == "done"  # drained: it had finished
    assert {job(daemon, h)["state"] for h in held} == {"queued"}
    assert not set(runs(daemon)) & set(held)
    ok(daemon.ipcctl("resume", "sleep"))
    for held_id in held:
        wait_for(f"held job {held_id} to run", state_is(daemon, held_id, "done"))
    assert json.loads(ok(daemon.ipcctl("status", "--json")))["store"]["paused"] == []


# --- 4. retention -----------------------------------------------------------------------


def test_retention_keeps_the_newest_done_jobs_and_purge_removes_the_rest(
    instance: Instance,
) -> None:
    """With `keep_done = 5`, a reload applies retention at once: of 20 done jobs the
    newest 5 stay; `purge --state done` removes those."""
    configure(instance, '[store]\npath = "jobs.db"\n')
    start(instance)
    # A reload with nothing changed: the master has applied retention (nothing to delete)
    # and would not again for a minute, were it not for the reload below.
    ok(instance.ipcd("reload"))
    client = Client(instance.config)
    ids = []
    for n in range(20):  # one after another: the last five finished last
        ids.append(client.submit("echo", n, confirm=True))
        client.wait(ids[-1], 30)
    assert len(jobs(instance, "--state", "done")) == 20
    configure(instance, '[store]\npath = "jobs.db"\nkeep_done = 5\nkeep_done_age = "1d"\n')
    ok(instance.ipcd("reload"))
    kept = wait_for(
        "retention",
        lambda: (found := jobs(instance, "--state", "done")) and len(found) <= 5 and found,
    )
    assert sorted(j["id"] for j in kept) == sorted(ids[-5:])
    assert events(instance, "store.retained")[-1]["deleted"] == 15
    assert ok(instance.ipcctl("purge", "--state", "done")).strip() == "purged 5 jobs"
    assert jobs(instance, "--state", "done") == []


def test_retention_applies_at_start(instance: Instance) -> None:
    """A daemon started with `keep_done = 5` over a store holding 12 done jobs keeps 5."""
    configure(instance, '[store]\npath = "jobs.db"\n')
    start(instance)
    client = Client(instance.config)
    for n in range(12):
        client.wait(client.submit("echo", n, confirm=True), 30)
    ok(instance.ipcd("stop"))
    configure(instance, '[store]\npath = "jobs.db"\nkeep_done = 5\n')
    start(instance)
    wait_for("retention at start", lambda: len(jobs(instance, "--state", "done")) == 5)


# --- 5. results across restarts ---------------------------------------------------------


def test_results_are_read_from_the_store_after_restart_and_lost_shared_memory(
    daemon: Instance,
) -> None:
    """A finished job's result stays readable with `ipcctl result ID` after `ipcd stop` +
    `ipcd start`, and after the result segment is removed while stopped (a reboot)."""
    job_id = ok(daemon.ipcctl("submit", "echo", "kept across reboots")).strip()
    assert ok(daemon.ipcctl("result", job_id, "--wait")).strip() == "kept across reboots"
    ok(daemon.ipcd("stop"))
    start(daemon)
    assert ok(daemon.ipcctl("result", job_id)).strip() == "kept across reboots"
    ok(daemon.ipcd("stop"))
    results_key = daemon.keys.results
    assert any(o[0] == "shm" and o[1] == results_key for o in vetting.sysv_objects())
    ok(run(["ipcrm", "-M", str(results_key)]))
    assert not any(o[0] == "shm" and o[1] == results_key for o in vetting.sysv_objects())
    start(daemon)
    assert ok(daemon.ipcctl("result", job_id)).strip() == "kept across reboots"
    shown = json.loads(ok(daemon.ipcctl("result", job_id, "--json")))
    assert shown["output"] == "kept across reboots"


# --- 6. bounded -------------------------------------------------------------------------


def test_max_queued_bounds_the_store_and_backpressure_reaches_submitters(
    instance: Instance,
) -> None:
    """With `max_queued = 20` and echo paused, the store takes 20 jobs and the intake
    stops; the kernel queue fills and `submit --send-timeout 0.5` exits 75; after
    `resume` everything accepted runs once and submissions are accepted again."""
    configure(instance, '[store]\npath = "jobs.db"\nmax_queued = 20\n', workers=1)
    start(instance)
    ok(instance.ipcctl("pause", "echo"))
    ok(instance.ipcd("stop"))
    # The daemon is down: messages pile up in the kernel queue, then all come at start.
    client = Client(instance.config)
    accepted = _fill(client, "before start")
    assert len(accepted) > 20 + 1
    start(instance)
    wait_for("the intake to stop at the bound", lambda: events(instance, "intake.store_full"))
    assert len(jobs(instance, "--state", "queued")) == 20
    accepted += _fill(client, "while bounded")
    refused = instance.ipcctl("submit", "echo", "one more", "--send-timeout", "0.5")
    assert refused.returncode == ExitCode.QUEUE_FULL, refused.stderr
    assert len(jobs(instance, "--state", "queued")) == 20  # the intake still waits
    ok(instance.ipcctl("resume", "echo"))
    wait_for(
        "every accepted job to run",
        lambda: set(accepted) <= set(runs(instance)),
        timeout=60,
    )
    assert all(runs(instance)[job_id] == 1 for job_id in accepted)
    assert ok(instance.ipcctl("submit", "echo", "accepted again", "--wait")).strip() == (
        "accepted again"
    )


def _fill(client: Client, text: str) -> list[str]:
    """Send unconfirmed jobs until the kernel queue is full, even for a short one (large
    ones first, then the smallest); their ids."""
    sent: list[str] = []
    for pad in (200, 0):
        while True:
            try:
                sent.append(
                    client.submit("echo", f"{text} {len(sent)}" + "x" * pad, send_timeout=0)
                )
            except QueueFullError:
                break
    return sent


# --- 7. a broken store at start ---------------------------------------------------------


@pytest.mark.parametrize("fault", ["missing directory", "corrupt file", "not writable"])
def test_start_refuses_a_broken_store_and_check_says_why(
    open_instance: Instance, fault: str
) -> None:
    """A store in a missing directory, a file of garbage, or one the daemon's user cannot
    write: `ipcd start` exits 74 naming the path and the cause and leaves no IPC objects;
    `ipcd check` says the same."""
    inst = open_instance
    db = inst.dir / "jobs.db"
    extra = '[store]\npath = "jobs.db"\n'
    if fault == "missing directory":
        db = inst.dir / "gone" / "jobs.db"
        extra = '[store]\npath = "gone/jobs.db"\n'
        cause = "does not exist"
    elif fault == "corrupt file":
        db.write_bytes(os.urandom(8192))
        cause = "not a database"
    else:
        # The daemon runs as nobody; its store's directory is root's (0755): SQLite cannot
        # make the -wal and -shm files there as nobody.
        db = inst.dir / "root" / "jobs.db"
        db.parent.mkdir(mode=0o755)
        extra = '[store]\npath = "root/jobs.db"\n'
        cause = "readonly database"
    inst.write(extra)
    if fault == "not writable":
        text = inst.config_path.read_text()
        inst.config_path.write_text(text.replace("[daemon]\n", '[daemon]\nuser = "nobody"\n'))
        inst.dir.chmod(0o777)  # its PID file and log
    before = vetting.sysv_objects()
    started = inst.ipcd("start")
    assert started.returncode == ExitCode.STORE, (started.stdout, started.stderr)
    assert f"job store {db}" in started.stderr and cause in started.stderr, started.stderr
    assert vetting.sysv_objects() - before == set()
    checked = inst.ipcd("check")
    assert checked.returncode == ExitCode.STORE, (checked.stdout, checked.stderr)
    assert f"job store {db}" in checked.stdout + checked.stderr
    assert cause in checked.stdout + checked.stderr


def test_check_leaves_an_older_store_to_the_next_start(instance: Instance) -> None:
    """`ipcd check` beside a running daemon of the version before (`ipcd check &&
    systemctl reload ipcd`) must not convert the store under it: it checks a store of an
    older schema version as it is and says that `ipcd start` brings it up to date, which
    the next start does."""
    import contextlib
    import sqlite3

    from ipcd.store import schema

    older = schema.VERSION - 1
    db = instance.dir / "jobs.db"
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as raw:
        for steps in schema.MIGRATIONS[:older]:
            for statement in steps:
                raw.execute(statement)
        raw.execute(f"PRAGMA user_version = {older:d}")
    instance.write('[store]\npath = "jobs.db"\n')

    def version() -> int:
        with contextlib.closing(sqlite3.connect(db)) as raw:
            return int(raw.execute("PRAGMA user_version").fetchone()[0])

    checked = instance.ipcd("check")
    assert checked.returncode == 0, (checked.stdout, checked.stderr)
    assert f"job store {db}: ok, schema version {older}: ipcd start brings it to version " in (
        checked.stdout
    )
    assert version() == older
    started = instance.ipcd("start")
    try:
        assert started.returncode == 0, started.stderr
        assert version() == schema.VERSION
        assert instance.ipcctl("submit", "echo", "after", "--wait").stdout == "after\n"
    finally:
        instance.ipcd("stop")
    checked = instance.ipcd("check")
    assert checked.stdout.endswith(f"job store {db}: ok\n"), checked.stdout


# --- 8. a full disk at run time ---------------------------------------------------------


def test_a_full_disk_stops_the_store_and_the_daemon_recovers_by_itself(
    open_instance: Instance,
) -> None:
    """With the store on a small tmpfs that fills up, the daemon stays up: the job that
    finishes meanwhile and the jobs queued behind it wait, submissions wait in the kernel
    queue (store.unwritable logged, store_errors counted); once space is freed every job
    runs exactly once and the store records each outcome, with nobody's help."""
    inst = open_instance
    disk = inst.dir / "disk"
    disk.mkdir()
    configure(inst, '[store]\npath = "disk/jobs.db"\n', workers=1)
    script = (
        f"mount -t tmpfs -o size=16m ipcd-test {disk} && exec {IPCD} -c {inst.config_path} start"
    )
    started = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    assert started.returncode == 0, started.stderr
    master = inst.pid()

    def inside(*argv: str) -> subprocess.CompletedProcess[str]:
        return run(["nsenter", "-t", str(master), "-m", *argv])

    def fill() -> None:
        for n, block in enumerate(("1M", "4k")):  # to the last page
            filled = inside("dd", "if=/dev/zero", f"of={disk}/filler{n}", f"bs={block}")
            assert "No space left on device" in filled.stderr, filled.stderr

    def free() -> None:
        ok(inside("sh", "-c", f"rm {disk}/filler*"))

    assert not (disk / "jobs.db").exists()  # the store is on the tmpfs, not here
    assert ok(inst.ipcctl("submit", "echo", "before", "--wait")).strip() == "before"

    # A job running and ten queued behind it when the disk fills: the running one's
    # outcome cannot be recorded; the worker tries again until it can.
    running = ok(inst.ipcctl("submit", "sleep", "5")).strip()  # outlives what follows
    wait_for("the sleep job to run", state_is(inst, running, "running"))
    client = Client(inst.config)
    queued = [client.submit("echo", f"queued {n}", confirm=True) for n in range(10)]
    fill()
    assert job(inst, running)["state"] == "running", "the job ended before the disk filled"
    wait_for("the outcome refused", lambda: events(inst, "store.write_failed"))
    assert job(inst, running)["state"] == "running"
    free()
    for job_id in [running, *queued]:
        wait_for(f"job {job_id} to be done", state_is(inst, job_id, "done"))

    # Submissions while the disk is full wait in the kernel queue.
    fill()
    sent = [client.submit("echo", f"while full {n}") for n in range(30)]
    confirmed = inst.ipcctl("submit", "echo", "confirm?", "--send-timeout", "1")
    assert confirmed.returncode == ExitCode.NOT_CONFIRMED, confirmed.stderr
    sent.append(confirmed.stdout.strip())
    wait_for("store.unwritable", lambda: events(inst, "store.unwritable"))
    assert "full" in str(events(inst, "store.unwritable")[0]["error"])
    assert _store_errors(json.loads(ok(inst.ipcctl("stats", "--json")))) > 0
    assert _running(master)
    free()
    wait_for("the jobs sent while full to run", lambda: set(sent) <= set(runs(inst)), 60)
    for job_id in sent:
        wait_for(f"job {job_id} to be done", state_is(inst, job_id, "done"))
    everything = [running, *queued, *sent]
    assert all(runs(inst)[job_id] == 1 for job_id in everything)
    assert job(inst, running)["attempts"] == 1
    assert ok(inst.ipcctl("submit", "echo", "after", "--wait")).strip() == "after"


FILL_THEN_DIE = """
[handlers.cue]
type = 5
target = "ipcd_test_plugins:fill_then_die"
"""


def test_a_worker_that_dies_while_the_disk_is_full_has_its_batch_settled_later(
    open_instance: Instance,
) -> None:
    """A worker's batch: quick jobs, then one that fills the store's disk and kills its
    worker, then more quick jobs it never started.  The master cannot record the quick
    jobs' outcomes (from the result ring) nor put the rest back while the disk is full;
    it tries again on its own, and once space is freed every job ends done, the quick
    ones having run once, without a restart."""
    inst = open_instance
    disk = inst.dir / "disk"
    disk.mkdir()
    configure(inst, '[store]\npath = "disk/jobs.db"\n', workers=1, handlers=FILL_THEN_DIE)
    script = (
        f"mount -t tmpfs -o size=16m ipcd-test {disk} && exec {IPCD} -c {inst.config_path} start"
    )
    started = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    assert started.returncode == 0, started.stderr
    master = inst.pid()
    client = Client(inst.config)
    warm = client.submit("cue", "warm", confirm=True)  # the type is timed as quick
    wait_for("the warm-up", state_is(inst, warm, "done"))
    ok(inst.ipcctl("pause", "cue"))
    before = [client.submit("cue", f"before {n}", confirm=True) for n in range(5)]
    killer = client.submit("cue", str(disk), confirm=True)
    after = [client.submit("cue", f"after {n}", confirm=True) for n in range(5)]
    ok(inst.ipcctl("resume", "cue"))
    wait_for("the worker's death", lambda: events(inst, "job.requeue_failed"))
    time.sleep(1.5)  # several turns of the master's loop, all refused
    assert "running" in {job(inst, j)["state"] for j in [*before, *after]}  # held up
    ok(run(["nsenter", "-t", str(master), "-m", "rm", f"{disk}/filler-die"]))
    for job_id in [*before, *after, killer]:
        wait_for(f"job {job_id} to be done", state_is(inst, job_id, "done"))
    counted = runs(inst)
    assert all(counted[j] == 1 for j in [*before, *after])
    assert all(job(inst, j)["attempts"] == 1 for j in [*before, *after])
    assert job(inst, killer)["attempts"] == 2  # it ran, and died: its attempt counts
    assert _running(master)


def _store_errors(stats: dict[str, Any]) -> int:
    """store_errors wherever `stats --json` keeps it."""
    found = 0
    for key, value in stats.items():
        if key == "store_errors" and isinstance(value, int):
            found += value
        elif isinstance(value, dict):
            found += _store_errors(value)
    return found


# --- 9. access --------------------------------------------------------------------------


def test_group_members_may_list_and_cancel_others_get_77_and_nobody_reads_the_file(
    open_instance: Instance,
) -> None:
    """A non-root member of the socket's group can list and cancel; a non-member gets
    exit 77 and nothing; neither can open the database file itself."""
    inst = open_instance
    group = grp.getgrnam("users").gr_gid
    inst.write('[store]\npath = "jobs.db"\n')
    text = inst.config_path.read_text().replace("[ipc]\n", '[ipc]\ngroup = "users"\n')
    inst.config_path.write_text(text)
    inst.config_path.chmod(0o644)
    start(inst)
    ok(inst.ipcctl("pause", "echo"))
    waiting = ok(inst.ipcctl("submit", "echo", "secret payload")).strip()
    member = ["setpriv", "--reuid=65534", "--regid=65534", f"--groups={group}"]
    stranger = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    ipcctl = [IPCCTL, "-c", str(inst.config_path)]

    listed = run([*member, *ipcctl, "list", "--json"])
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)["jobs"]] == [waiting]
    refused = run([*stranger, *ipcctl, "list"])
    assert refused.returncode == ExitCode.NO_PERMISSION, refused.stderr
    assert refused.stdout == "" and "secret" not in refused.stderr
    refused = run([*stranger, *ipcctl, "cancel", waiting])
    assert refused.returncode == ExitCode.NO_PERMISSION, refused.stderr
    assert job(inst, waiting)["state"] == "queued"

    db = inst.dir / "jobs.db"
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        if path.exists():
            assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == 0, path
    for who in (member, stranger):
        for path in (db, Path(f"{db}-wal")):
            read = run([*who, "cat", str(path)])
            assert read.returncode != 0 and "Permission denied" in read.stderr, (who, path)
            written = run([*who, "sh", "-c", 'exec 3>>"$1"', "-", str(path)])
            assert written.returncode != 0 and "Permission denied" in written.stderr, (who, path)

    cancelled = run([*member, *ipcctl, "cancel", waiting])
    assert cancelled.returncode == 0, cancelled.stderr
    assert job(inst, waiting)["state"] == "cancelled"


# --- 10. unique keys across a restart ---------------------------------------------------


@pytest.mark.parametrize("shared_memory", ["kept", "lost"])
def test_a_queued_unique_key_stays_taken_across_a_restart(
    daemon: Instance, shared_memory: str
) -> None:
    """A job queued with `--unique K` behind a paused handler keeps K taken after `ipcd
    stop; ipcd start` (also when the IPC objects were lost meanwhile, as in a reboot);
    K is free once the job ran."""
    ok(daemon.ipcctl("pause", "echo"))
    first = ok(daemon.ipcctl("submit", "echo", "once", "--unique", "K")).strip()
    ok(daemon.ipcd("stop"))
    if shared_memory == "lost":
        remove_objects(daemon)
        assert objects_at(daemon) == set()
    start(daemon)
    second = daemon.ipcctl("submit", "echo", "twice", "--unique", "K")
    assert second.returncode == ExitCode.ALREADY_QUEUED, (second.stdout, second.stderr)
    assert first in second.stderr
    ok(daemon.ipcctl("resume", "echo"))
    wait_for("the unique job to run", state_is(daemon, first, "done"))
    third = daemon.ipcctl("submit", "echo", "thrice", "--unique", "K", "--wait")
    assert third.returncode == 0, third.stderr
    assert runs(daemon)[first] == 1
