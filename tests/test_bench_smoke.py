"""Smoke version of ``make bench``: a guard against slow paths, not a timing claim.

Raw sysv_ipc round trips (``python -m bench.raw``, the benchmark's own baseline) and
``Client.call`` round trips alternate for a few rounds in one run, every process pinned
to one CPU so that both sides pay the same scheduling; the medians are compared.
The bench's own measures are checked for what they count (every job done, the peer's
binlog on), never for how fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Instance

from bench import floors, intake, measure, peers, skeleton
from bench import store as job_store
from bench.daemon import IPCCTL, child_env, role_pid
from bench.intake import Sample
from bench.run import BEANSTALKD_HINT, LIST_TYPES, SUBMISSIONS, Bench, ff_ceiling, parse_args
from ipcd.client import Client
from ipcd.kernel import vetting
from ipcd.store import open_store
from ipcd.store.sqlite import connect

ROOT = Path(__file__).resolve().parent.parent
#: ipcd's round trip must stay above this fraction of the raw one.  Issue 5 asks for a
#: guard at 0.2x once ipcd is fast enough.  Before the job store ipcd ran at ~0.06-0.07x
#: pinned; every job now also takes three commits to the store (the intake's, the
#: worker's claim and its outcome) and two more process hops, and runs at ~0.008x pinned
#: (`make bench`, December 2026, after issue 14's second pass; 0.006x before it): the
#: guard sits at half of that (issue 14), to catch an accidental slow path without
#: failing on noise.  bench.floors shows why the store's path cannot reach issue 14's
#: 0.3x: three minimal SQLite write transactions alone cap it at about 0.25x.
GUARD = 0.004
ROUNDS = 3
SECONDS = 0.3
PAYLOAD = "p" * 64


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


@pytest.fixture
def one_cpu(daemon: Instance) -> Iterator[int]:
    """Pin this process and the daemon's to one CPU; this process is unpinned after."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    master = daemon.pid()
    for pid in (os.getpid(), master, *_children(master)):
        os.sched_setaffinity(pid, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def _raw_round_trips(cpu: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, "-m", "bench.raw", "round-trips", f"--seconds={SECONDS}", f"--cpu={cpu}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    rate: float = json.loads(done.stdout)["per_s"]
    return rate


def _ipcd_round_trips(client: Client) -> float:
    count = 0
    started = now = time.perf_counter()
    while now - started < SECONDS:
        assert client.call("echo", PAYLOAD, timeout=10).ok
        count += 1
        now = time.perf_counter()
    return count / (now - started)


def test_round_trip_is_not_far_below_the_raw_limit(daemon: Instance, one_cpu: int) -> None:
    """Client.call round trips reach at least GUARD times raw sysv_ipc round trips."""
    client = Client(daemon.config)
    for _ in range(50):  # warm-up: imports, first attach, page faults
        assert client.call("echo", PAYLOAD, timeout=10).ok
    raw: list[float] = []
    ipcd: list[float] = []
    for _ in range(ROUNDS):
        raw.append(_raw_round_trips(one_cpu))
        ipcd.append(_ipcd_round_trips(client))
    raw_rate, ipcd_rate = statistics.median(raw), statistics.median(ipcd)
    ratio = ipcd_rate / raw_rate
    summary = (
        f"round trips/s on CPU {one_cpu}: raw {raw_rate:.0f}, ipcd {ipcd_rate:.0f}, "
        f"ratio {ratio:.3f} (guard {GUARD})"
    )
    print(summary)
    assert ratio >= GUARD, summary


def test_beanstalkd_binlog_peer_counts_only_finished_jobs() -> None:
    """beanstalkd -b's jobs figure returns once its worker has deleted every job put, the
    jobs went through a binlog in the peer's directory, and close removes server and
    directory."""
    exe = peers.beanstalkd_exe()
    if exe is None:
        pytest.skip(f"beanstalkd is not installed ({BEANSTALKD_HINT}): its peer is untested")
    peer = peers.BeanstalkPeer(exe, binlog=True)
    try:
        binlog = peer.binlog
        assert binlog is not None
        assert peer.jobs(0.05) > 0
        stats = peer.client.stats_tube("requests")
        waiting = {k: stats[k] for k in ("current-jobs-ready", "current-jobs-reserved")}
        assert waiting == {"current-jobs-ready": "0", "current-jobs-reserved": "0"}
        assert int(stats["total-jobs"]) > 1
        assert [p.name for p in binlog.glob("binlog.*")], sorted(os.listdir(binlog))
    finally:
        peer.close()
    assert peer.server.returncode is not None
    assert not binlog.exists()


def test_fire_and_forget_waits_for_every_job(daemon: Instance) -> None:
    """The bench's fire-and-forget figure returns only once every submitted job has its
    result stored, with each submission option of the jobs-completed rows."""
    client = Client(daemon.config)
    try:
        for submission in SUBMISSIONS:
            before = measure.completed(client)
            assert measure.fire_and_forget(client, 0, count=300, options=submission.options) > 0
            assert measure.completed(client) - before == 300, submission.name
        assert client.store.header().error_count == 0
    finally:
        client.store.close()


def test_store_bench_fills_mixed_states_and_applies_retention() -> None:
    """bench.store fills a store with its stated mix of states, and passes jobs through it
    calling retain() every so many jobs, sizing the files as it goes."""
    with job_store.scratch_store("list.db") as (store, _):
        listed = job_store.list_times(store, 3000, rounds=2)
    assert listed.states == {
        "queued": 1050,
        "scheduled": 300,
        "running": 0,
        "done": 1350,
        "failed": 150,
        "cancelled": 150,
    }
    assert len(listed.newest) == len(listed.queued) == 2
    assert {name: len(times) for name, times in listed.forms.items()} == dict.fromkeys(
        job_store.LIST_FORMS, 2
    )
    with job_store.scratch_store("through.db") as (store, path):
        passed = job_store.through(store, path, 12_000, retain_every=5000, sizes_every=5000)
    # One job in a hundred fails; retain() keeps the newest 1000 done at 5000 and 10000.
    assert [(size.jobs, size.kept) for size in passed.sizes] == [
        (5000, 1050),
        (10_000, 1100),
        (12_000, 1000 + 1980 + 120),
    ]
    assert all(size.db > 0 for size in passed.sizes)
    assert not path.parent.exists()


def test_floors_pass_every_job_and_bound_the_raw_rates() -> None:
    """bench.floors times what it says (it raises when a batch claims fewer jobs than it
    added), and the ceilings it sets are the raw rate with the floor's cost added: on
    one CPU the costs add up, on two the slower side holds."""
    found = floors.measure(rounds=1)
    assert all(value > 0 for value in found), found
    assert ff_ceiling("pinned", 1e6, 4.0) == pytest.approx(2e5)
    assert ff_ceiling("unpinned", 1e6, 4.0) == pytest.approx(2.5e5)
    assert ff_ceiling("unpinned", 1e5, 4.0) == pytest.approx(1e5)


def test_intake_full_stretches_run_between_the_samples_around_them() -> None:
    """A full stretch runs from halfway before its first full sample to halfway after its
    last (or the window's edge), with 'full' meaning less than one message of room."""
    max_bytes, message = 100, 10
    windows = [
        [Sample(0, 0), Sample(1, 95), Sample(2, 91), Sample(3, 90), Sample(4, 95)],
        [Sample(10, 95), Sample(11, 0), Sample(13, 0)],
    ]
    found = intake.full_stretches(windows, max_bytes, message)
    assert found.stretches == [2.0, 0.5, 0.5]
    assert (found.sampled, found.full) == (7.0, 3.0)
    assert (found.gap_median, found.gap_longest) == (1.0, 2.0)


def test_intake_step_counts_every_job_its_loops_and_commits_submitted(daemon: Instance) -> None:
    """The intake step's shell loops, Python loop and timed commits account for every job
    the daemon then runs, with one commit timed after each sampling window."""
    client = Client(daemon.config)
    store = open_store(str(daemon.config.store.path))
    try:
        before = measure.completed(client)
        found = intake.measure(client, store, seconds=1.0, ipcctl=IPCCTL, env=child_env())
        load = found.load
        assert load.shell_jobs > 0 and load.python_jobs > 0 and load.refused == 0, load
        assert len(found.commits) == len(found.stretches.stretches) or found.commits
        submitted = load.shell_jobs + load.python_jobs + intake.BATCH * len(found.commits)
        deadline = time.monotonic() + 60
        while measure.completed(client) - before < submitted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert measure.completed(client) - before == submitted
        assert found.stretches.sampled > 0
    finally:
        store.close()
        client.store.close()


def test_list_daemon_keeps_every_filled_job_and_runs_none() -> None:
    """The list step's daemon holds every job bench.store filled its store with (its
    retention raised) and runs none of them (their handlers paused); ipcctl list -n 50
    shows 50 of them. (Its warm-up's echo jobs are in the store too.)"""
    with contextlib.ExitStack() as stack:
        bench = Bench(parse_args(["--quick"]), stack)
        daemon, states = bench.list_daemon(3000)

        def filled(*args: str) -> list[dict[str, object]]:
            argv = [IPCCTL, "-c", str(daemon.config_path), "list", "--json", *args]
            done = subprocess.run(
                argv, env=child_env(), capture_output=True, text=True, timeout=30, check=True
            )
            jobs: list[dict[str, object]] = json.loads(done.stdout)["jobs"]
            return [job for job in jobs if job["type"] in LIST_TYPES]

        assert len(filled("-n", "5000")) == sum(states.values()) == 3000
        assert len(filled("-n", "5000", "--state", "queued")) == states["queued"] == 1050
        assert len(filled("-n", "50", "--state", "queued")) == 50
        assert bench.teardown() == []


def test_skeleton_runs_every_job_it_is_sent_and_leaves_nothing() -> None:
    """bench.skeleton's rates count jobs that went through its table: each job sent in
    the last measurement is there done, its result its body (a measurement first deletes
    the jobs done before it); closing it ends both processes and removes its queues and
    its directory."""
    with skeleton.Skeleton() as skel:
        assert skel.round_trips(0.02) > 0
        assert skel.jobs_completed(0.02, confirm=True) > 0
        first = skel.sent
        assert skel.jobs_completed(0.02, confirm=False) > 0
        conn = connect(str(skel.path), migrate=False)
        try:
            rows = conn.execute("SELECT state, count(*), sum(result = body) FROM jobs GROUP BY 1")
            states = rows.fetchall()
        finally:
            conn.close()
        sent = skel.sent - first
        pids, keys, directory = skel.pids, skel.keys, skel.dir
    assert states == [(2, sent, sent)]
    assert sent > 3
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert not [key for kind, key, _ in vetting.sysv_objects() if key in keys]
    assert not directory.exists()


def test_skeleton_that_fails_raises_in_its_client_rather_than_hangs() -> None:
    """An intake whose insert fails (its table no longer has the column) tells the
    waiting client, which raises; the skeleton still closes cleanly."""
    with skeleton.Skeleton() as skel:
        conn = connect(str(skel.path), migrate=False)
        try:
            conn.execute("ALTER TABLE jobs RENAME COLUMN reply TO gone")
        finally:
            conn.close()
        with pytest.raises(RuntimeError, match=r"bench\.skeleton failed"):
            skel.round_trips(0.05)
        pids, keys, directory = skel.pids, skel.keys, skel.dir
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert not [key for kind, key, _ in vetting.sysv_objects() if key in keys]
    assert not directory.exists()


def test_cpu_per_message_counts_each_intakes_messages(daemon: Instance) -> None:
    """The intake's CPU per message is charged to ipcd's intake (found from its log) and
    to the skeleton's, for the messages each took; the loop's is this process's own."""
    client = Client(daemon.config)
    intake_pid = role_pid(daemon.log_file, "intake")
    assert intake_pid not in (0, os.getpid())
    try:
        with skeleton.Skeleton() as skel:
            found = intake.cpu_per_message(client, intake_pid, skel, seconds=0.2)
            assert skel.sent > 10
    finally:
        client.store.close()
    assert all(0 < value < 10_000 for value in found), found
