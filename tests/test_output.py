"""Captured output and progress (ipcd.daemon.capture): what a handler and the programs it
starts write to stdout and stderr is caught per job, followed live with ``ipcctl tail``,
stored with the job (its tail, ``[jobs] max_output``) and shown by ``show`` and ``result
--output``; ``job.progress()`` shows in ``list``, ``show`` and ``tail``."""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IPCCTL, Instance

from ipcd.daemon.capture import PUBLISH_INTERVAL, Capture, RunDir, RunFiles
from ipcd.layout import runfile
from ipcd.store import Captured, Outcome, State, open_store
from ipcd.testing import run_handler
from ipcd.wire.protocol import Job

HANDLERS = """
[handlers.cue]
type = 2
target = "ipcd_test_plugins:print_on_cue"

[handlers.chatter]
type = 3
target = "ipcd_test_plugins:chatter"

[handlers.retrier]
type = 4
target = "ipcd_test_plugins:retry_chatter"

[handlers.spew]
type = 5
target = "ipcd_test_plugins:spew"
"""


@pytest.fixture
def served(instance: Instance) -> Iterator[Instance]:
    instance.write("\n[jobs]\nmax_output = 100\n", handlers=HANDLERS)
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    yield instance
    instance.ipcd("stop")


def _submit(inst: Instance, handler: str, payload: str) -> str:
    done = inst.ipcctl("submit", "--json", handler, payload)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _until(check: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_tail_shows_a_running_handlers_print_before_it_ends(served: Instance) -> None:
    """``ipcctl tail`` prints a running handler's line before the handler is let go on,
    then what it and its child wrote after, and exits 0 once the job is done; ``list``
    and ``show`` show its progress meanwhile, and ``show`` its output after."""
    cue = served.dir / "cue"
    job_id = _submit(served, "cue", json.dumps(str(cue)))
    tail = subprocess.Popen(
        [IPCCTL, "-c", str(served.config_path), "tail", job_id],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert tail.stdout is not None
        readable, _, _ = select.select([tail.stdout], [], [], 20)
        assert readable, "tail printed nothing of the running job"
        first = tail.stdout.readline()
        assert first == f"started {job_id}\n".encode()
        assert not cue.exists() and tail.poll() is None
        listed = json.loads(served.ipcctl("list", "--json", check=True).stdout)["jobs"]
        assert [j.get("progress") for j in listed if j["id"] == job_id] == [
            {"fraction": 0.5, "message": "waiting for the cue"}
        ]
        shown = served.ipcctl("show", job_id, check=True).stdout
        assert "progress:  50% waiting for the cue" in shown
        status = served.ipcctl("status", check=True).stdout
        assert f"job {job_id} for " in status and "s (50% waiting for the cue)" in status
        workers = json.loads(served.ipcctl("status", "--json", check=True).stdout)["workers"]
        assert [w["progress"] for w in workers if w["job_id"] == job_id] == [
            {"fraction": 0.5, "message": "waiting for the cue"}
        ]
        cue.write_text("the cue\n")
        rest, err = tail.communicate(timeout=20)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert rest == b"the cue\n"
    assert tail.returncode == 0, err
    shown = json.loads(served.ipcctl("show", job_id, "--json", check=True).stdout)["output"]
    assert shown["output"] == f"started {job_id}\nthe cue\n"
    assert (shown["progress"], shown["message"], shown["live"]) == (1.0, "cued", False)


def test_the_stored_output_is_the_last_max_output_bytes_and_result_output_prints_it(
    served: Instance,
) -> None:
    """A job that wrote more than ``[jobs] max_output`` keeps its last bytes and says how
    many it wrote; ``result --output`` prints them with the job's status (1: failed),
    and ``tail`` of the ended job prints them and exits 1."""
    job_id = _submit(served, "chatter", '{"lines": 50, "fail": true}')
    done = served.ipcctl("result", job_id, "--wait", "--output")
    assert done.returncode == 1, done.stderr
    whole = "".join(f"line {n}\n" for n in range(50))
    assert done.stdout == whole[-100:]
    as_json = json.loads(served.ipcctl("result", job_id, "--output", "--json").stdout)
    assert (as_json["state"], as_json["size"], as_json["output"]) == (
        "failed",
        len(whole),
        whole[-100:],
    )
    tail = served.ipcctl("tail", job_id)
    assert (tail.returncode, tail.stdout) == (1, whole[-100:])
    assert "failed after chatter" in tail.stderr


def test_tail_follows_a_retried_job_from_its_new_attempts_first_byte(served: Instance) -> None:
    """Attempt 2 writes afresh, less than attempt 1 did: ``tail`` prints all of it after
    an ``[attempt 2]`` line on stderr, not only what lies past attempt 1's length."""
    job_id = _submit(served, "retrier", '"go"')
    tail = served.ipcctl("tail", job_id)
    assert tail.returncode == 0, tail.stderr
    first = "first attempt, a line longer than the second's " + "x" * 40 + "\n"
    assert tail.stdout in (first + "second\n", "second\n")  # attempt 1 seen live, or not
    assert tail.stdout.endswith("second\n")
    if tail.stdout.startswith("first"):
        assert "[attempt 2]" in tail.stderr


def test_a_job_writing_without_end_does_not_grow_its_run_file_without_end(
    served: Instance,
) -> None:
    """30 MiB written: the worker's thread trims the run file once it is past LIVE_MAX,
    while the job runs, and the outcome still says how much the job wrote."""
    done = served.ipcctl("submit", "--json", "spew", "30", "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["biggest"] < 30 << 20
    job_id = json.loads(served.ipcctl("list", "--json", check=True).stdout)["jobs"][0]["id"]
    output = json.loads(served.ipcctl("show", job_id, "--json", check=True).stdout)["output"]
    # All of it, but for what a cut may lose in the instant of the cut (one write at most).
    assert (29 << 20) < output["size"] <= 30 << 20 and output["output"] == "x" * 100


def test_a_job_killed_at_its_timeout_keeps_what_it_wrote(served: Instance) -> None:
    """A job whose worker is killed (its timeout here) cannot record its own output: the
    master records what its run file holds with the job's outcome, so an operator sees
    how far the hung job got."""
    cue = served.dir / "never"
    done = served.ipcctl(
        "submit", "--json", "cue", json.dumps(str(cue)), "--timeout-job", "1", "--wait"
    )
    assert done.returncode == 1 and "timeout" in done.stderr, done.stderr
    job_id = json.loads(served.ipcctl("list", "--json", check=True).stdout)["jobs"][0]["id"]
    shown = json.loads(served.ipcctl("show", job_id, "--json", check=True).stdout)
    assert shown["job"]["state"] == "failed"
    output = shown["output"]
    assert output is not None, "the dead worker's output was not recorded"
    assert output["output"] == f"started {job_id}\n"
    assert (output["progress"], output["message"]) == (0.5, "waiting for the cue")


def test_a_job_that_writes_nothing_has_no_output_and_the_log_stays_clean(
    served: Instance,
) -> None:
    """A quiet job stores no output (``show`` says -); a chatty job's lines never reach
    the structured log, which stays JSON only."""
    quiet = _submit(served, "chatter", '{"lines": 0}')
    loud = _submit(served, "chatter", '{"lines": 3}')
    for job_id in (quiet, loud):
        assert served.ipcctl("result", job_id, "--wait").returncode == 0
    shown = json.loads(served.ipcctl("show", quiet, "--json", check=True).stdout)
    assert shown["output"] is None
    for line in served.log_file.read_text().splitlines():
        json.loads(line)  # not a handler's "line N"


# --- in-process: the worker's side and the control process's ---------------------------


def test_capture_keeps_the_tail_and_publishes_progress_at_most_every_interval(
    tmp_path: Path,
) -> None:
    """A Capture cut to ``max_output`` keeps the last bytes; progress reaches the header
    on the first call and then only once PUBLISH_INTERVAL passed (the latest is kept and
    goes with the outcome); the next job starts with an empty output."""
    now = [100.0]
    path = RunDir(tmp_path).slot_file(0)
    capture = Capture.open(path, 8)
    capture._monotonic = lambda: now[0]
    files = RunFiles(RunDir(tmp_path), 1, 8)
    try:
        capture.begin("j1")
        with open(path, "ab") as out:  # as the kernel appends for fds 1 and 2
            out.write(b"0123456789abc")
        capture.progress(0.1, "one")
        capture.progress(0.2, "two")  # within the interval: kept, not published
        header = files.headers()["j1"]
        assert (header.fraction, header.message) == (0.1, "one")
        live = files.live("j1", 0)
        assert live is not None and (live.data, live.offset, live.size) == (b"56789abc", 5, 13)
        now[0] += PUBLISH_INTERVAL
        capture.progress(0.3, "three")
        assert files.headers()["j1"].fraction == 0.3
        capture.progress(0.4, "four")
        assert capture.end() == Captured(b"56789abc", 13, 0.4, "four")
        assert files.headers()["j1"].fraction == 0.4  # published at the end
        capture.begin("j2")
        assert capture.end() is None
        assert files.live("j1", 0) is None
    finally:
        capture.close()


def test_a_run_file_past_its_bound_is_trimmed_and_readers_keep_their_place(
    tmp_path: Path,
) -> None:
    """A job that writes without end: its run file is cut to its last bytes once past
    the bound, the header counts what was cut, a follower's position in the job's output
    stays right, and the outcome says how much the job wrote in all."""
    path = RunDir(tmp_path).slot_file(0)
    capture = Capture.open(path, 10)
    files = RunFiles(RunDir(tmp_path), 1, 10)
    written = b"".join(b"line %04d\n" % n for n in range(300))  # 3000 bytes
    try:
        capture.begin("j1")
        assert not capture.trim(limit=10_000, keep=20)  # not past the bound
        with open(path, "ab") as out:
            out.write(written[:2000])
        followed = files.live("j1", 0)
        assert followed is not None and followed.offset == 1990  # the last max_output
        assert capture.trim(limit=1000, keep=20)
        assert os.path.getsize(path) == runfile.HEADER_SIZE + 20
        assert files.headers()["j1"].dropped == 1980
        with open(path, "ab") as out:
            out.write(written[2000:])
        more = files.live("j1", 2000)  # where the follower was: only what is new
        assert more is not None and (more.offset, more.size) == (2990, 3000)
        assert more.data == written[2990:]
        assert files.live("j1", 1500) == more  # older than the last max_output: those
        assert capture.end() == Captured(written[-10:], 3000)
        capture.begin("j2")  # the next job starts afresh, nothing dropped
        assert files.headers()["j2"].dropped == 0
    finally:
        capture.close()
    assert not capture.trim(limit=0)  # closed: the trimming thread leaves the fd alone


def test_a_run_file_header_read_while_torn_is_read_again() -> None:
    """A header whose sequence is odd (being written) is not returned as it is."""
    buf = bytearray(runfile.HEADER_SIZE)
    runfile.format_header(buf)
    runfile.write(buf, "abc", 1.0, 0.25, 2.0, "é" * 200)
    header = runfile.read(buf)
    assert header is not None and header.job_id == "abc" and header.fraction == 0.25
    assert len(header.message.encode()) <= runfile.MESSAGE_MAX
    buf[16] |= 1  # seq odd: a writer in the middle
    assert runfile.read(buf, tries=3) is None


def test_run_handler_records_progress_and_refuses_a_bad_fraction() -> None:
    """``job.progress`` reaches ``HandlerRun.progress`` in order; a fraction outside 0..1
    fails the job with a ValueError naming it."""

    def handler(job: Job) -> str:
        job.progress(0.5, "half")
        job.progress(1)
        return "ok"

    run = run_handler(handler)
    assert run.progress == [(0.5, "half"), (1.0, "")]

    def bad(job: Job) -> str:
        job.progress(math.nan)
        return "ok"

    assert "progress fraction nan" in run_handler(bad).error


def test_the_store_keeps_output_with_the_outcome_and_drops_it_on_retry(tmp_path: Path) -> None:
    """An outcome with captured output stores it (a large one as a file beside the
    store); one without stores none; an operator's retry removes the old output."""
    from test_ledger import _add

    jobs = open_store(str(tmp_path / "jobs.db"))
    try:
        ids = _add(jobs, 2, 2, prefix="o")
        claimed = jobs.claim(2, time.time())
        assert len(claimed) == 2
        big = b"x" * (200 << 10)
        jobs.exchange(
            [
                Outcome(
                    ids[0], False, time.time(), 1, b"", "no", Captured(big, 300 << 10, 0.5, "m")
                ),
                Outcome(ids[1], True, time.time(), 1, b'"ok"', None),
            ],
            0,
            time.time(),
        )
        assert jobs.output(ids[0]) == Captured(big, 300 << 10, 0.5, "m")
        assert jobs.output(ids[1]) is None
        assert os.listdir(tmp_path / "jobs.db.bodies")
        assert jobs.retry(ids[0], time.time()) is not None
        assert jobs.output(ids[0]) is None
        assert jobs.check() == []
        assert jobs.get(ids[0]).state is State.QUEUED  # type: ignore[union-attr]
    finally:
        jobs.close()
