"""What the fault tests share: a configured daemon, its processes, a load, and the tally.

The tests drive the real ``ipcd`` and real processes: the master's workers are found as
its children in /proc, killed with real signals, and jobs come from separate submitter
processes (tests/faults/submitter.py) so the load keeps flowing while the test process
kills things.  The tally reads the final state the way a user would: results from the
shared segment, events from the JSON log, failures from the failed list.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import Instance

from ipcd.results import Result
from ipcd.resultstore import ResultStore

SUBMITTER = Path(__file__).with_name("submitter.py")

# --- configuration ---------------------------------------------------------------------------


def configure(
    inst: Instance,
    handlers: str,
    *,
    workers: int = 4,
    jobs: str = "",
    result_slots: int = 8192,
    slot_size: int = 256,
) -> None:
    """Write the instance's config with ``workers`` workers and room for ``result_slots``.

    conftest's template already sets ``[daemon] workers`` and ``[results] size`` and
    ``slot_size`` (TOML refuses a key given twice, so its ``results=`` argument cannot
    change them): those lines are rewritten here.
    """
    inst.write(handlers=handlers, extra=f"\n[jobs]\n{jobs}\n" if jobs else "")
    text = inst.config_path.read_text()
    for pattern, value in (
        (r"^workers = \d+$", f"workers = {workers}"),
        (r"^size = \d+$", f"size = {64 + result_slots * slot_size}"),
        (r"^slot_size = \d+$", f"slot_size = {slot_size}"),
    ):
        text, found = re.subn(pattern, value, text, flags=re.MULTILINE)
        assert found == 1, f"conftest's config template changed: no line {pattern!r}"
    inst.config_path.write_text(text)


def start(inst: Instance) -> int:
    """``ipcd start``; returns the master's pid once its workers are all there."""
    started = inst.ipcd("start")
    assert started.returncode == 0, started.stderr
    master = inst.pid()
    wait_workers(master, inst.config.daemon.workers)
    return master


# --- processes -------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (for the master: its workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [child for child in map(int, text.split()) if alive(child)]


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not reaped yet, counts as gone)."""
    try:
        return _stat(pid)[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def age(pid: int) -> float:
    """Seconds since the process started (field 22 of /proc/PID/stat, in clock ticks)."""
    ticks = int(_stat(pid)[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def wait_workers(master: int, count: int, timeout: float = 15.0) -> list[int]:
    """The master's workers, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        workers = children(master)
        if len(workers) == count:
            return workers
        assert time.monotonic() < deadline, f"master has {len(workers)} workers, not {count}"
        time.sleep(0.02)


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if alive(p)]}"
        time.sleep(0.02)


def kill_daemon(master: int) -> list[int]:
    """SIGKILL the master and every worker at once; returns the pids killed.

    Each worker leads its own process group, so one killpg would miss them: the master is
    stopped first (SIGSTOP) so that it cannot fork a worker between the listing and the kill.
    """
    os.kill(master, signal.SIGSTOP)
    workers = children(master)
    for pid in [master, *workers]:
        os.kill(pid, signal.SIGKILL)
    wait_gone([master, *workers])
    return [master, *workers]


# --- load ------------------------------------------------------------------------------------


@dataclass
class Load:
    """Several submitter processes, each submitting ``count`` jobs (or until stopped)."""

    inst: Instance
    handler: str
    payload: str
    submitters: int = 4
    count: int = 750
    pause: float = 0.0
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def stop_file(self) -> Path:
        return self.inst.dir / "stop-submitting"

    def out(self, n: int) -> Path:
        return self.inst.dir / f"submitted-{n}.txt"

    def start(self) -> Load:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # each submitter imports ipcd: cache it
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(SUBMITTER),
                    str(self.inst.config_path),
                    self.handler,
                    self.payload,
                    str(self.count),
                    str(self.out(n)),
                    str(self.stop_file),
                    str(self.pause),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for n in range(self.submitters)
        ]
        return self

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        self.stop_file.touch()

    def join(self, timeout: float = 60.0) -> tuple[int, int]:
        """Wait for every submitter; returns (accepted, refused) over all of them."""
        accepted = refused = 0
        for proc in self.procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err
            counts = json.loads(out)
            accepted += counts["accepted"]
            refused += counts["refused"]
        return accepted, refused

    def kill(self) -> None:
        """For a failing test: leave no submitter behind."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def accepted(self) -> dict[str, float]:
        """Every accepted job id and when ``submit`` returned it."""
        ids: dict[str, float] = {}
        for n in range(self.submitters):
            if not self.out(n).exists():
                continue
            for line in self.out(n).read_text().splitlines():
                job_id, when = line.split()
                assert job_id not in ids, f"job id {job_id} handed out twice"
                ids[job_id] = float(when)
        return ids


# --- the final tally -------------------------------------------------------------------------


@dataclass
class Tally:
    """What became of a set of submitted jobs."""

    submitted: int
    ok: int
    failed: int
    missing: list[str]
    #: Job ids with more than one record in the result segment.
    duplicate_results: list[str]
    #: Job ids whose ``job.done`` event was logged other than exactly once.
    done_not_once: dict[str, int]
    requeued: int
    retried: int
    results: dict[str, Result]
    events: list[dict[str, object]]

    def figures(self, name: str, seconds: float, **more: object) -> str:
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in more.items())
        return (
            f"\n[{name}] submitted {self.submitted}, completed ok {self.ok}, "
            f"failed {self.failed}, requeued {self.requeued}, retried {self.retried}, "
            f"missing {len(self.missing)}, duplicated {len(self.duplicate_results)}"
            f"{extra}; {seconds:.1f}s"
        )

    def story(self, job_ids: Iterable[str]) -> str:
        """Every log event of these jobs and of the workers that held them, for a failure."""
        wanted = set(job_ids)
        pids = {e.get("worker_pid") for e in self.events if e.get("job_id") in wanted}
        pids.discard(None)
        lines = [
            json.dumps(e)
            for e in self.events
            if e.get("job_id") in wanted or (e["event"] == "worker.exited" and e.get("pid") in pids)
        ]
        return "\n" + "\n".join(lines)


def results_by_id(inst: Instance) -> tuple[dict[str, Result], list[str]]:
    """Every record in the result segment by job id, and the ids found more than once.

    Asserts that the ring never wrapped, so that a missing record means a missing result
    and not an evicted one.
    """
    store = ResultStore.open(inst.keys.results)
    try:
        header = store.header()
        assert header.next_seq <= header.slot_count, "results were evicted: enlarge the ring"
        records = store.all()
    finally:
        store.close()
    counts = Counter(r.job_id for r in records)
    return {r.job_id: r for r in records}, sorted(j for j, n in counts.items() if n > 1)


def wait_results(inst: Instance, ids: set[str], timeout: float) -> None:
    """Return once every job in ``ids`` has a result, or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        found, _ = results_by_id(inst)
        if ids <= found.keys() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


def tally(inst: Instance, ids: set[str], *, timeout: float = 30.0) -> Tally:
    """Wait (up to ``timeout``) for every job to have a result, then count what happened."""
    wait_results(inst, ids, timeout)
    results, duplicates = results_by_id(inst)
    events = inst.log_events()
    done = Counter(str(e["job_id"]) for e in events if e["event"] == "job.done")
    mine = [r for job_id, r in results.items() if job_id in ids]
    return Tally(
        submitted=len(ids),
        ok=sum(r.ok for r in mine),
        failed=sum(not r.ok for r in mine),
        missing=sorted(ids - results.keys()),
        duplicate_results=[j for j in duplicates if j in ids],
        done_not_once={j: done[j] for j in ids if done[j] != 1},
        requeued=sum(e["event"] == "job.requeued" and e["job_id"] in ids for e in events),
        retried=sum(e["event"] == "job.retry" and e["job_id"] in ids for e in events),
        results=results,
        events=events,
    )


def failed_list(inst: Instance) -> dict[str, dict[str, object]]:
    """``ipcctl failed --json`` by job id; asserts that the list dropped nothing."""
    shown = inst.ipcctl("failed", "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["dropped"] == 0
    return {str(entry["id"]): entry for entry in doc["failed"]}
