"""`ipcctl stats` and `ipcctl status --watch` against a real daemon, checked with the
Prometheus project's own parser (and promtool when it is installed)."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from collections import defaultdict

import pytest
from conftest import IPCCTL, TESTS, Instance
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ipcd.client.metrics import count, figure
from ipcd.errors import ExitCode
from ipcd.kernel.queues import Queue

FLAKY = '\n[handlers.flaky]\ntype = 20\ntarget = "ipcd_test_plugins:flaky"\nmax_attempts = 5\n'


def parse_strict(text: str) -> dict[str, Metric]:
    """Parse the exposition with prometheus_client and hold it to the format's rules.

    Every sample's family has HELP and TYPE lines, counters end in ``_total``, histogram
    buckets never decrease and the +Inf bucket equals ``_count``.
    """
    helped, typed = set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            typed[name] = kind
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name = line.split("{")[0].split()[0]
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and typed.get(name[: -len(suffix)]) == "histogram":
                family = name[: -len(suffix)]
        assert family in typed and family in helped, f"{name}: no TYPE or HELP line"
    for name, kind in typed.items():
        if kind == "counter":
            assert name.endswith("_total"), name
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for parsed in families.values():
        assert parsed.documentation and parsed.type != "unknown", parsed.name
        if parsed.type == "histogram":
            _check_histogram(parsed)
    return families


def _check_histogram(family: Metric) -> None:
    buckets: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = defaultdict(list)
    counts = {}
    for s in family.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        if s.name.endswith("_bucket"):
            buckets[key].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            counts[key] = s.value
    assert buckets and set(buckets) == set(counts)
    for key, series in buckets.items():
        bounds = [b for b, _ in series]
        values = [v for _, v in series]
        assert bounds == sorted(bounds) and math.isinf(bounds[-1]), key
        assert values == sorted(values), f"buckets of {key} decrease"
        assert values[-1] == counts[key], f"+Inf bucket of {key} is not _count"


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    """The one sample of that name whose labels include ``labels``."""
    found = [
        float(s.value)
        for family in families.values()
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    ]
    assert len(found) == 1, f"{len(found)} samples {sample}{labels}"
    return found[0]


def promtool_check(text: str) -> None:
    """`promtool check metrics` too, where Prometheus's own linter is installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        print("promtool is not on PATH (Debian: apt-get install prometheus): not run")
        return
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def scrape(instance: Instance) -> dict[str, Metric]:
    done = instance.ipcctl("stats", "--prometheus")
    assert done.returncode == 0, done.stderr
    promtool_check(done.stdout)
    return parse_strict(done.stdout)


def test_counts_match_the_jobs_run_and_survive_a_killed_worker(daemon: Instance) -> None:
    """5 echo jobs and 2 failing ones count 5 ok and 2 errors, timed in the histogram;
    killing a worker counts one restart and loses none of the counts."""
    for i in range(5):
        assert daemon.ipcctl("submit", "echo", f"job {i}", "--wait").returncode == 0
    for _ in range(2):
        assert daemon.ipcctl("submit", "fail", "no", "--wait").returncode == ExitCode.JOB_FAILED
    m = scrape(daemon)
    assert value(m, "ipcd_up") == 1
    assert value(m, "ipcd_jobs_total", handler="echo", outcome="ok") == 5
    assert value(m, "ipcd_jobs_total", handler="echo", outcome="error") == 0
    assert value(m, "ipcd_jobs_total", handler="fail", outcome="error") == 2
    assert value(m, "ipcd_jobs_total", handler="fail", outcome="ok") == 0
    assert value(m, "ipcd_job_duration_seconds_count", handler="echo") == 5
    assert value(m, "ipcd_job_duration_seconds_count", handler="fail") == 2
    assert value(m, "ipcd_job_duration_seconds_bucket", handler="echo", le="+Inf") == 5
    assert value(m, "ipcd_job_duration_seconds_sum", handler="echo") > 0
    assert value(m, "ipcd_workers") == 2 and value(m, "ipcd_workers_busy") == 0
    assert value(m, "ipcd_failed_jobs") == 2 and value(m, "ipcd_store_jobs", state="failed") == 2
    assert value(m, "ipcd_store_jobs", state="done") == 5
    assert value(m, "ipcd_results_slots_used") == 7 and value(m, "ipcd_queue_messages") == 0
    assert value(m, "ipcd_worker_restarts_total") == 0
    assert value(m, "ipcd_workers_started_total") == 2
    started = value(m, "ipcd_start_time_seconds")
    assert 0 <= started - value(m, "ipcd_stats_created_seconds") < 30  # counting began first
    assert started <= time.time()

    victim = json.loads(daemon.ipcctl("status", "--json").stdout)["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert len(daemon.wait_events(lambda e: e["event"] == "worker.started", 3)) == 3
    m = scrape(daemon)
    assert value(m, "ipcd_worker_restarts_total") == 1
    assert value(m, "ipcd_workers_started_total") == 3
    assert value(m, "ipcd_jobs_total", handler="echo", outcome="ok") == 5
    assert value(m, "ipcd_jobs_total", handler="fail", outcome="error") == 2


#: What the store holds in test_the_store_counts_jobs_per_state_in_every_form: one job
#: done, one failed, one delayed for an hour (scheduled), none queued, running or cancelled.
STORE_JOBS = {"queued": 0, "scheduled": 1, "running": 0, "done": 1, "failed": 1, "cancelled": 0}


def test_the_store_counts_jobs_per_state_in_every_form(daemon: Instance) -> None:
    """A job delayed with --delay counts as scheduled in the job store, a finished one as
    done and a failed one as failed, and a paused handler is named, in status and stats
    alike (text, JSON, Prometheus); cancelling the delayed job moves it to cancelled."""
    assert daemon.ipcctl("submit", "echo", "now", "--wait").returncode == 0
    assert daemon.ipcctl("submit", "fail", "no", "--wait").returncode == ExitCode.JOB_FAILED
    later = daemon.ipcctl("submit", "echo", "later", "--delay", "3600")
    assert later.returncode == 0, later.stderr
    assert daemon.ipcctl("pause", "sleep").returncode == 0

    m = scrape(daemon)
    assert {state: value(m, "ipcd_store_jobs", state=state) for state in STORE_JOBS} == STORE_JOBS
    assert value(m, "ipcd_handlers_paused") == 1
    assert "ipcd_parked_jobs" not in daemon.ipcctl("stats", "--prometheus").stdout
    line = (
        "jobs       0 queued, 1 delayed or waiting to retry, 0 running, 1 done, 1 failed, "
        "0 cancelled (job store)"
    )
    for command in ("status", "stats"):
        doc = json.loads(daemon.ipcctl(command, "--json").stdout)
        assert doc["store"]["jobs"] == STORE_JOBS and doc["store_error"] is None
        assert [(p["type"], p["handler"]) for p in doc["store"]["paused"]] == [(3, "sleep")]
        assert "parked" not in doc and "delayed" not in doc
        text = daemon.ipcctl(command).stdout.splitlines()
        assert line in text, text
        assert any(re.fullmatch(r"paused     sleep \(since \d\d:\d\d:\d\d\)", t) for t in text)

    assert daemon.ipcctl("cancel", later.stdout.strip()).returncode == 0
    m = scrape(daemon)
    assert value(m, "ipcd_store_jobs", state="scheduled") == 0
    assert value(m, "ipcd_store_jobs", state="cancelled") == 1


def test_retries_and_rejected_messages_are_counted(instance: Instance) -> None:
    """Each attempt that asks for another run counts as retried; an undecodable message
    counts as rejected under handler "(none)", in every form of ``ipcctl stats``."""
    instance.write(FLAKY)
    assert instance.ipcd("start").returncode == 0
    try:
        done = instance.ipcctl("submit", "flaky", "3", "--wait")
        assert done.stdout == "ok on attempt 3\n"
        Queue.open(instance.keys.jobs).send(b'O:8:"stdClass":1:{s:1:"a";i:1;}', 2, timeout=1)
        assert instance.wait_events(lambda e: e["event"] == "job.rejected", 1)
        m = scrape(instance)
        assert value(m, "ipcd_jobs_total", handler="flaky", outcome="retried") == 2
        assert value(m, "ipcd_jobs_total", handler="flaky", outcome="ok") == 1
        # Jobs no handler ran: a clear label, not "-", and no type number (they are many).
        none = {"handler": "(none)", "type": "(unknown)"}
        assert value(m, "ipcd_jobs_total", **none, outcome="rejected") == 1
        assert value(m, "ipcd_jobs_total", handler="flaky", type="20", outcome="ok") == 1
        assert value(m, "ipcd_jobs_total", handler="echo", outcome="rejected") == 0
        doc = json.loads(instance.ipcctl("stats", "--json").stdout)
        assert doc["jobs"]["(none)"]["type"] is None and doc["jobs"]["(none)"]["rejected"] == 1
        assert doc["jobs"]["flaky"]["type"] == 20 and "-" not in doc["jobs"]
        rows = instance.ipcctl("stats").stdout.splitlines()
        assert any(re.fullmatch(r"\(none\) +0 +0 +0 +1 +-", row) for row in rows), rows
    finally:
        instance.ipcd("stop")


def test_a_reload_that_adds_handlers_keeps_the_labels(instance: Instance) -> None:
    """Handlers added by a reload (listed first, even) get counts of their own and the
    counts of the others stay under their names."""
    assert instance.ipcd("start").returncode == 0
    try:
        assert instance.ipcctl("submit", "echo", "before", "--wait").returncode == 0
        assert instance.ipcctl("submit", "fail", "before", "--wait").returncode == 1
        instance.write(handlers=FLAKY + "[handlers.fail]\ntype = 4\n[handlers.echo]\ntype = 2\n")
        assert instance.ipcd("reload").returncode == 0
        assert instance.wait_events(lambda e: e["event"] == "daemon.reloaded", 1)
        assert instance.ipcctl("submit", "flaky", "1", "--wait").returncode == 0
        assert instance.ipcctl("submit", "echo", "after", "--wait").returncode == 0
        m = scrape(instance)
        assert value(m, "ipcd_jobs_total", handler="echo", outcome="ok") == 2
        assert value(m, "ipcd_jobs_total", handler="fail", outcome="error") == 1
        assert value(m, "ipcd_jobs_total", handler="flaky", outcome="ok") == 1
        assert value(m, "ipcd_reloads_total") == 1
    finally:
        instance.ipcd("stop")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (2830.4, "2830"),
        (100.0, "100"),
        (28.34, "28.3"),
        (2.834, "2.83"),
        (0.2834, "0.283"),
        (0.002834, "0.00283"),
        (0.0, "0"),
        (1.5e-9, "0.000000"),
    ],
)
def test_figures_have_no_exponent(value: float, shown: str) -> None:
    """Rates and mean milliseconds read as plain numbers: 2830, not 2.83e+03."""
    assert figure(value) == shown


def test_counts_are_singular_for_one() -> None:
    assert [count(n, "reload") for n in (0, 1, 2)] == ["0 reloads", "1 reload", "2 reloads"]
    assert count(1, "job") + " done" == "1 job done"


def test_stats_of_a_stopped_daemon(instance: Instance) -> None:
    """With no daemon, --prometheus still exits 0 with ipcd_up 0 and the queue depth;
    the text and JSON forms exit 69, as status does."""
    never = instance.ipcctl("stats", "--prometheus")
    assert never.returncode == 0, never.stderr
    assert value(parse_strict(never.stdout), "ipcd_up") == 0
    assert instance.ipcctl("stats").returncode == ExitCode.UNAVAILABLE

    assert instance.ipcd("start").returncode == 0
    assert instance.ipcctl("submit", "echo", "ran", "--wait").returncode == 0
    assert instance.ipcd("stop").returncode == 0
    assert instance.ipcctl("submit", "--no-confirm", "echo", "for later").returncode == 0
    down = instance.ipcctl("stats", "--prometheus")
    assert down.returncode == 0
    m = parse_strict(down.stdout)
    assert value(m, "ipcd_up") == 0 and value(m, "ipcd_queue_messages") == 1
    assert value(m, "ipcd_workers") == 0
    # Only the daemon reads its job store: no counts per state rather than stale ones.
    assert "ipcd_store_jobs" not in down.stdout and "ipcd_handlers_paused" not in down.stdout
    assert value(m, "ipcd_jobs_total", handler="echo", outcome="ok") == 1  # the last run's
    text = instance.ipcctl("stats")
    assert text.returncode == ExitCode.UNAVAILABLE and "not running" in text.stdout
    # No rate that decays while nothing runs; one of each counted thing is singular.
    assert "rate       -\n" in text.stdout and "jobs/s" not in text.stdout
    assert "queue      1 message, " in text.stdout
    doc = instance.ipcctl("stats", "--json")
    assert doc.returncode == ExitCode.UNAVAILABLE
    assert json.loads(doc.stdout)["up"] is False
    assert json.loads(doc.stdout)["queue"]["messages"] == 1
    assert json.loads(doc.stdout)["store"] is None
    assert "(job store)" not in text.stdout


def test_output_file_is_replaced_whole(daemon: Instance) -> None:
    """--output writes the file by rename (no temporary file left); an unwritable place
    exits 73."""
    target = daemon.dir / "prom" / "ipcd.prom"
    target.parent.mkdir()
    for _ in range(2):
        done = daemon.ipcctl("stats", "--prometheus", "--output", str(target))
        assert (done.returncode, done.stdout) == (0, "")
    assert value(parse_strict(target.read_text()), "ipcd_up") == 1
    assert os.listdir(target.parent) == ["ipcd.prom"]
    assert target.stat().st_mode & 0o777 == 0o644
    nowhere = daemon.ipcctl("stats", "--prometheus", "-o", str(daemon.dir / "no" / "x.prom"))
    assert nowhere.returncode == ExitCode.CANT_CREATE and "cannot write" in nowhere.stderr


def test_status_shows_counts_and_rate(daemon: Instance) -> None:
    """status (text and --json) adds the job counts and jobs per second since the start."""
    for _ in range(3):
        daemon.ipcctl("submit", "echo", "x", "--wait")
    daemon.ipcctl("submit", "fail", "x", "--wait")
    doc = json.loads(daemon.ipcctl("status", "--json").stdout)
    assert doc["counts"] == {
        "ok": 3,
        "error": 1,
        "retried": 0,
        "rejected": 0,
        "worker_restarts": 0,
    }
    assert doc["rate"]["over"] == "start" and doc["rate"]["jobs_per_second"] > 0
    text = daemon.ipcctl("status").stdout
    assert "counts     3 ok, 1 failed, 0 retried, 0 rejected, 0 worker restarts" in text
    assert "jobs/s since start" in text


def _read_until(fd: int, done: str, count: int, timeout: float = 20.0) -> str:
    """What a process writes to ``fd`` until ``done`` has appeared ``count`` times."""
    out = b""
    deadline = time.monotonic() + timeout
    while out.decode(errors="replace").count(done) < count and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the pty's other side closed
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS / "plugins")}


def test_watch_on_a_terminal_redraws_until_ctrl_c(daemon: Instance) -> None:
    """On a tty, --watch clears the screen once and then draws each frame over the last
    (cursor home, each line and then the rest of the screen cleared: no flicker), shows
    the rate over the last interval from the second frame on, and Ctrl-C exits 0."""
    main, sub = pty.openpty()
    proc = subprocess.Popen(
        [IPCCTL, "-c", str(daemon.config_path), "status", "--watch", "0.2"],
        stdin=sub,
        stdout=sub,
        stderr=sub,
        env=_env(),
    )
    os.close(sub)
    try:
        shown = _read_until(main, "\x1b[J", 3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    assert shown.startswith("\x1b[H\x1b[2J") and shown.count("\x1b[2J") == 1, shown
    frames = [f.split("\x1b[J")[0] for f in shown.split("\x1b[H")[2:]]
    assert len(frames) >= 3, shown
    assert all(line.endswith("\x1b[K") for f in frames for line in f.splitlines()), shown
    assert all("daemon     pid" in f for f in frames[:2])
    # The interval is the 0.2 s sleep plus the time a reading takes (a busy machine's).
    over = re.search(r"jobs/s over the last (\d+\.\d)s", frames[1])
    assert over is not None and float(over[1]) >= 0.2, frames[1]
    assert "Traceback" not in shown


def test_watch_into_a_pipe_prints_frames_apart(daemon: Instance) -> None:
    """Into a pipe, --watch prints each frame after a blank line, starting with the time it
    was taken, without ANSI codes; with --json one document per line."""
    for args, frame_start in ((["--watch", "0.1"], "time       "), (["--json", "--watch"], "{")):
        proc = subprocess.Popen(
            [IPCCTL, "-c", str(daemon.config_path), "status", *args],
            stdout=subprocess.PIPE,
            env=_env(),
        )
        assert proc.stdout is not None
        try:
            shown = _read_until(proc.stdout.fileno(), "\n" + frame_start, 2)
            proc.send_signal(signal.SIGINT)
            shown += proc.stdout.read().decode()
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert "\x1b" not in shown
        if frame_start == "{":
            docs = [json.loads(line) for line in shown.splitlines()]
            assert len(docs) >= 3 and docs[1]["rate"]["over"] == "interval"
        else:
            frames = shown.rstrip("\n").split("\n\n")
            assert len(frames) >= 3 and all(f.startswith(frame_start) for f in frames)
            for frame in frames:
                stamp, queue = frame.splitlines()[:2]
                assert re.fullmatch(r"time {7}\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stamp), frame
                assert queue.startswith("queue      "), frame


def test_a_job_whose_worker_died_counts_as_recovered_and_requeued(daemon: Instance) -> None:
    """The master counts the job it found with a killed worker and put back for a rerun."""
    job_id = daemon.ipcctl("submit", "sleep", "3").stdout.strip()
    deadline = time.monotonic() + 10
    busy: list[int] = []
    while not busy and time.monotonic() < deadline:
        doc = json.loads(daemon.ipcctl("status", "--json").stdout)
        busy = [w["pid"] for w in doc["workers"] if w["job_id"] == job_id]
        time.sleep(0.05)
    assert busy, "the job never started"
    os.kill(busy[0], signal.SIGKILL)
    assert daemon.wait_events(lambda e: e["event"] == "job.requeued", 1)
    m = scrape(daemon)
    assert value(m, "ipcd_jobs_recovered_total") == 1
    assert value(m, "ipcd_jobs_requeued_total") == 1
    assert value(m, "ipcd_worker_restarts_total") == 1
    assert value(m, "ipcd_jobs_total", handler="sleep", outcome="error") == 0
