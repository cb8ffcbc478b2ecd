"""The daemon's IPC objects removed or overwritten under it: it makes them anew and serves."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import sysv_ipc
from conftest import IPCCTL, IPCD, Instance
from conftest import _running as _alive

from ipcd.errors import ExitCode
from ipcd.kernel.keys import as_key_t
from ipcd.kernel.queues import Queue

KINDS = {
    "queue": sysv_ipc.MessageQueue,
    "segment": sysv_ipc.SharedMemory,
    "sem": sysv_ipc.Semaphore,
}
#: Every object the daemon makes: (kind, the Keys field naming its key).
OBJECTS = [
    ("queue", "jobs"), ("queue", "replies"), ("segment", "results"), ("sem", "results"),
    ("sem", "gate"), ("segment", "inflight"), ("sem", "inflight"), ("segment", "failed"),
    ("sem", "failed"), ("segment", "stats"), ("segment", "unique"), ("sem", "unique"),
    ("segment", "spill"), ("sem", "spill"),
]  # fmt: skip
SEGMENTS = [key for kind, key in OBJECTS if kind == "segment"]


def _recreated(instance: Instance, count: int = 1) -> list[dict[str, object]]:
    return instance.wait_events(lambda e: e["event"] == "ipc.recreated", count, timeout=10)


def _serves(instance: Instance, text: str) -> None:
    """A submitter waits for its result and gets it; both status commands say up."""
    done = instance.ipcctl("submit", "echo", text, "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, f"{text}\n"), done.stderr
    assert instance.ipcd("status").returncode == 0
    status = instance.ipcctl("status")
    assert status.returncode == 0, status.stdout + status.stderr


def _running_then_inflight_removed(instance: Instance, *submit: str) -> str:
    """Submit a job, and once it runs, ``ipcrm`` the in-flight table and wait until the
    daemon has made it anew; returns the job's id."""
    submitted = instance.ipcctl("submit", *submit)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    instance.wait_events(lambda e: e["event"] == "job.started" and e["job_id"] == job_id, 1)
    sysv_ipc.SharedMemory(as_key_t(instance.keys.inflight)).remove()
    assert _recreated(instance)
    return job_id


@pytest.mark.parametrize(("kind", "field"), OBJECTS, ids=[f"{k}-{f}" for k, f in OBJECTS])
def test_a_removed_object_is_made_anew(daemon: Instance, kind: str, field: str) -> None:
    """``ipcrm`` of any one object at ipcd's keys: within seconds the daemon makes it anew,
    logs ``ipc.recreated`` and serves waiting submitters again."""
    _serves(daemon, "before")
    key = getattr(daemon.keys, field)
    KINDS[kind](as_key_t(key)).remove()
    recreated = _recreated(daemon)
    assert recreated, "no ipc.recreated event"
    assert any("removed" in str(o) for o in recreated[0]["objects"])  # type: ignore[attr-defined]
    _serves(daemon, "after")
    events = daemon.log_events()
    assert not [e for e in events if e["event"] in ("daemon.crashed", "worker.backoff")]


@pytest.mark.parametrize("field", SEGMENTS)
def test_an_overwritten_segment_header_is_written_back(daemon: Instance, field: str) -> None:
    """Garbage over a segment's header: the daemon writes its own back (keeping what the
    segment holds), logs ``ipc.recreated`` and serves."""
    _serves(daemon, "before")
    segment = sysv_ipc.SharedMemory(as_key_t(getattr(daemon.keys, field)))
    segment.write(b"\xa5" * 40, 0)
    segment.detach()
    assert _recreated(daemon)
    _serves(daemon, "after")
    if field == "results":
        before = next(e for e in daemon.log_events() if e.get("event") == "job.done")
        kept = daemon.ipcctl("result", str(before["job_id"]))
        assert (kept.returncode, kept.stdout) == (0, "before\n")


def test_status_and_stats_report_an_overwritten_table_and_never_exit_70(daemon: Instance) -> None:
    """While the in-flight table holds another program's header (the daemon stopped, so
    nobody mends it), ``ipcctl status`` and ``stats`` report what they find."""
    assert daemon.ipcd("stop").returncode == 0
    for field in SEGMENTS:
        segment = sysv_ipc.SharedMemory(as_key_t(getattr(daemon.keys, field)))
        segment.write(b"\xa5" * 40, 0)
        segment.detach()
    for args in (["status"], ["status", "--json"], ["stats"], ["stats", "--json"]):
        shown = daemon.ipcctl(*args)
        assert shown.returncode == ExitCode.UNAVAILABLE, (args, shown.stdout, shown.stderr)
        assert "internal error" not in shown.stderr
    started = daemon.ipcd("start")  # a start mends them too
    assert started.returncode == 0, started.stderr
    _serves(daemon, "mended")


@pytest.mark.skipif(shutil.which("php") is None, reason="php-cli is not installed")
def test_php_shm_attach_on_the_result_key(daemon: Instance) -> None:
    """PHP's ``shm_attach()`` writes its own header into ipcd's result segment: the next
    result is stored all the same, earlier results are kept, and the log says so."""
    _serves(daemon, "before")
    attached = subprocess.run(
        ["php", "-r", "shm_attach((int) $argv[1]);", "--", str(as_key_t(daemon.keys.results))],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert attached.returncode == 0, attached.stderr
    segment = sysv_ipc.SharedMemory(as_key_t(daemon.keys.results))
    assert segment.read(6, 0) == b"PHP_SM"  # PHP did write its header
    segment.detach()
    _serves(daemon, "after")
    recreated = _recreated(daemon)
    assert recreated and recreated[0]["objects"] == ["result segment overwritten"]
    assert recreated[0]["results_lost"] == 0
    first = next(e for e in daemon.log_events() if e.get("event") == "job.done")
    kept = daemon.ipcctl("result", str(first["job_id"]))
    assert (kept.returncode, kept.stdout) == (0, "before\n")
    stats = json.loads(daemon.ipcctl("stats", "--json").stdout)
    assert stats["master"]["results_lost"] == 0
    assert not [e for e in daemon.log_events() if e["event"] == "result.store_failed"]


def test_a_waiter_whose_result_was_lost_is_told_so(daemon: Instance) -> None:
    """The result segment removed while a job runs: its worker stores the result in the
    removed segment, so the waiting submitter is told the result was lost (76), not that
    there is no daemon (69)."""
    waiter = subprocess.Popen(
        [*_ipcctl(daemon), "submit", "sleep", "3", "--wait", "--timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    daemon.wait_events(lambda e: e["event"] == "job.started", 1)
    sysv_ipc.SharedMemory(as_key_t(daemon.keys.results)).remove()
    assert _recreated(daemon)
    _, err = waiter.communicate(timeout=30)
    assert waiter.returncode == ExitCode.RESULT_LOST, err
    assert "result was lost" in err
    _serves(daemon, "after")


def _ipcctl(instance: Instance) -> list[str]:
    from conftest import IPCCTL

    return [IPCCTL, "-c", str(instance.config_path)]


def test_a_removed_inflight_table_keeps_the_unique_keys_of_its_jobs(daemon: Instance) -> None:
    """``ipcrm`` of the in-flight table while a ``--unique`` job runs: the table made anew
    holds that job (carried over from the removed one), so its key stays taken and a
    second submission with it exits 4 rather than run the work twice."""
    job_id = _running_then_inflight_removed(daemon, "--unique", "nightly", "sleep", "4")
    again = daemon.ipcctl("submit", "--unique", "nightly", "sleep", "0")
    assert again.returncode == ExitCode.ALREADY_QUEUED, (again.stdout, again.stderr)
    done = daemon.ipcctl("result", job_id, "--wait", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    assert not [e for e in daemon.log_events() if e["event"] == "unique.freed"]


def test_a_removed_job_queue_frees_the_keys_of_the_jobs_it_held(instance: Instance) -> None:
    """``ipcrm`` of the job queue loses only the jobs still in it: once the daemon made it
    anew, their unique keys are free (``unique.freed``) and can be submitted again, while
    a job the intake had already stored keeps its key and runs."""
    # One waiting job fills the store ([store] max_queued = 1), so the intake leaves the
    # next message in the kernel queue; pausing echo keeps the stored one waiting.
    instance.write('\n[store]\npath = "jobs.db"\nmax_queued = 1\n')
    assert instance.ipcd("start").returncode == 0
    try:
        assert instance.ipcctl("pause", "echo").returncode == 0
        stored = instance.ipcctl("submit", "--unique", "nightly", "echo", "kept")
        assert stored.returncode == 0, stored.stderr  # confirmed: in the store
        queued = instance.ipcctl("submit", "--no-confirm", "--unique", "weekly", "echo", "lost")
        assert queued.returncode == 0, queued.stderr
        assert Queue.open(instance.keys.jobs).stats().messages == 1
        sysv_ipc.MessageQueue(as_key_t(instance.keys.jobs)).remove()
        assert _recreated(instance)
        freed = instance.wait_events(lambda e: e["event"] == "unique.freed", 1, timeout=10)
        assert [(e["job_id"], e["unique"]) for e in freed] == [(queued.stdout.strip(), "weekly")]
        held = instance.ipcctl("submit", "--unique", "nightly", "echo", "twice")
        assert held.returncode == ExitCode.ALREADY_QUEUED, held.stderr
        assert instance.ipcctl("resume", "echo").returncode == 0
        kept = instance.ipcctl("result", stored.stdout.strip(), "--wait", "--timeout", "20")
        assert (kept.returncode, kept.stdout) == (0, "kept\n"), kept.stderr
        again = instance.ipcctl("submit", "--unique", "weekly", "echo", "again", "--wait")
        assert (again.returncode, again.stdout) == (0, "again\n"), again.stderr
    finally:
        instance.ipcd("stop")


def test_a_job_running_when_the_inflight_table_is_removed_ends_once(daemon: Instance) -> None:
    """``ipcrm`` of the in-flight table while a job runs: its worker finishes it on the old
    table and leaves; the job ends with one ``job.done`` and one count, not a second one
    for the copy of its slot carried into the new table."""
    job_id = _running_then_inflight_removed(daemon, "sleep", "2")
    done = daemon.ipcctl("result", job_id, "--wait", "--timeout", "20")
    assert done.returncode == 0, done.stderr
    exited = daemon.wait_events(lambda e: e["event"] == "worker.exited", 2)
    assert len(exited) == 2, exited  # both workers of the first generation left
    _serves(daemon, "after")
    events = daemon.log_events()
    assert [e["job_id"] for e in events if e["event"] == "job.done"].count(job_id) == 1
    assert not [e for e in events if e["event"] in ("job.requeued", "job.recovery_failed")]
    stats = json.loads(daemon.ipcctl("stats", "--json").stdout)
    assert stats["jobs"]["sleep"]["ok"] == 1


def test_a_retry_parked_in_the_removed_inflight_table_runs(instance: Instance) -> None:
    """A job that asks for a retry after ``ipcrm`` of the in-flight table made its worker's
    table a removed one: the retry its worker parked there is carried into the new table
    when that worker leaves, and runs."""
    handler = '[handlers.slow_retry_once]\ntype = 9\ntarget = "ipcd_test_plugins:slow_retry_once"'
    instance.write(extra=f"\n{handler}\n")
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    try:
        job_id = _running_then_inflight_removed(instance, "slow_retry_once", "2")
        done = instance.ipcctl("result", job_id, "--wait", "--timeout", "20")
        assert (done.returncode, done.stdout) == (0, "ok on attempt 2\n"), done.stderr
        # The result is stored before its job.done line is written: wait for the line.
        instance.wait_events(lambda e: e["event"] == "job.done" and e.get("job_id") == job_id, 1)
        events = [e["event"] for e in instance.log_events() if e.get("job_id") == job_id]
        # Its worker left normally: not a dead worker's job that the master requeues.
        assert events == ["job.started", "job.retry", "job.started", "job.done"], events
    finally:
        assert instance.ipcd("stop").returncode == 0


def test_a_planted_replacement_makes_the_daemon_exit_for_a_restart(instance: Instance) -> None:
    """The stats segment removed and another one planted at its key before the master
    looks (mode 0o666, which ipcd never makes): the master cannot make its own, so it
    logs ``ipc.unrecoverable`` naming the object and exits non-zero (77), for systemd to
    restart it: a daemon that cannot serve must not look healthy."""
    master = subprocess.Popen(
        [IPCD, "-c", str(instance.config_path), "run"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while instance.ipcd("status").returncode != 0:
            assert master.poll() is None and time.monotonic() < deadline, "not ready"
            time.sleep(0.1)
        key = as_key_t(instance.keys.stats)
        sysv_ipc.SharedMemory(key).remove()
        sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, mode=0o666, size=4096).detach()
        code = master.wait(timeout=20)
        assert code == ExitCode.NO_PERMISSION, master.communicate()[1]
    finally:
        if master.poll() is None:
            master.kill()
        master.communicate()
    [gone] = instance.wait_events(lambda e: e["event"] == "ipc.unrecoverable", 1)
    assert gone["objects"] == ["stats segment replaced by another object"]
    assert "0o666" in str(gone["error"]), gone["error"]
    assert instance.ipcd("status").returncode == ExitCode.NOT_RUNNING


def test_a_waiter_whose_reply_queue_is_removed_still_gets_its_result(daemon: Instance) -> None:
    """``ipcrm`` of the reply queue while ``submit --wait`` waits in it: the job still runs
    and stores its result, so the waiter reads it (exit 0), not 69 ("not running"), which
    would invite running the job twice."""
    waiter = subprocess.Popen(
        [IPCCTL, "-c", str(daemon.config_path), "submit", "sleep", "2", "--wait"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    daemon.wait_events(lambda e: e["event"] == "job.started", 1)
    sysv_ipc.MessageQueue(as_key_t(daemon.keys.replies)).remove()
    out, err = waiter.communicate(timeout=30)
    assert (waiter.returncode, out) == (0, "slept 2s\n"), err


def test_a_removed_table_whose_lock_is_held_is_made_anew_once_it_is_free(daemon: Instance) -> None:
    """``ipcrm`` of the in-flight table while its lock is held (one semctl): the master
    waits for the lock as it does for any (``lock.timeout``, never an exit), makes the
    table anew once the lock is free, and serves."""
    master = daemon.pid()
    lock = sysv_ipc.Semaphore(as_key_t(daemon.keys.inflight))
    lock.value = 0
    try:
        sysv_ipc.SharedMemory(as_key_t(daemon.keys.inflight)).remove()
        timeouts = daemon.wait_events(lambda e: e["event"] == "lock.timeout", 2, timeout=15)
        assert len(timeouts) >= 2 and _alive(master)
    finally:
        lock.value = 1
    assert _recreated(daemon)
    _serves(daemon, "after")
    assert daemon.pid() == master
    assert not [e for e in daemon.log_events() if e["event"] == "ipc.unrecoverable"]


def test_objects_made_anew_after_a_reload_keep_their_start_settings(daemon: Instance) -> None:
    """A reload that changes a setting the objects were made with (``[ipc] mode``: it
    needs a restart, and the daemon says so) does not change how a removed object is made
    anew: with the mode the others have, not one the vetting would refuse them for."""
    text = daemon.config_path.read_text()
    daemon.config_path.write_text(text.replace("mode = 0o660", "mode = 0o600"))
    reloaded = daemon.ipcd("reload")
    assert reloaded.returncode == 0, reloaded.stderr
    sysv_ipc.SharedMemory(as_key_t(daemon.keys.stats)).remove()
    assert _recreated(daemon)
    _serves(daemon, "after")
    assert not [e for e in daemon.log_events() if e["event"] == "ipc.unrecoverable"]
    made = sysv_ipc.SharedMemory(as_key_t(daemon.keys.stats))
    assert made.mode & 0o777 == 0o660
    made.detach()
