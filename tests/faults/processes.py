"""The daemon under test as processes: its config, its master and workers, their fate.

The fault tests drive the real ``ipcd``: the master's workers are found as its children in
/proc and killed with real signals; what a worker holds is read from the in-flight table.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

from conftest import Instance

from ipcd.store import JobRecord, State, open_store
from ipcd.tables.inflight import InflightTable


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


def children(pid: int) -> list[int]:
    """The live children of ``pid`` (for the master: its workers, intake and control)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [child for child in map(int, text.split()) if alive(child)]


def workers(master: int) -> list[int]:
    """The master's workers: the children that lead a process group of their own (the
    intake and the control process stay in the master's)."""
    found = []
    for child in children(master):
        try:
            if os.getpgid(child) == child:
                found.append(child)
        except ProcessLookupError:
            continue
    return found


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
        found = workers(master)
        if len(found) == count:
            return found
        assert time.monotonic() < deadline, f"master has {len(found)} workers, not {count}"
        time.sleep(0.02)


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still alive: {[p for p in pids if alive(p)]}"
        time.sleep(0.02)


def wait_running(inst: Instance, job_id: str, timeout: float = 5.0) -> None:
    """Until a worker's in-flight slot shows ``job_id`` as its current job."""
    table = InflightTable.open(inst.keys.inflight)
    deadline = time.monotonic() + timeout
    try:
        while job_id not in {view.job_id for view in table.worker_views()}:
            assert time.monotonic() < deadline, f"no worker took job {job_id}"
            time.sleep(0.01)
    finally:
        table.segment.close()


def scheduled(inst: Instance) -> list[JobRecord]:
    """The jobs the job store keeps until a due time (a delay, or a retry's)."""
    jobs = open_store(str(inst.config.store.path))
    try:
        return jobs.list(states=[State.SCHEDULED], limit=1 << 20)
    finally:
        jobs.close()


def wait_parked(inst: Instance, count: int, timeout: float = 5.0) -> None:
    """Until at least ``count`` jobs wait in the job store for their due time."""
    deadline = time.monotonic() + timeout
    while len(scheduled(inst)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} jobs were scheduled"
        time.sleep(0.01)


def kill_daemon(master: int) -> list[int]:
    """SIGKILL the master and every worker at once; returns the pids killed.

    Each worker leads its own process group, so one killpg would miss them: the master is
    stopped first (SIGSTOP) so that it cannot fork a worker between the listing and the kill.
    """
    os.kill(master, signal.SIGSTOP)
    kids = children(master)
    for pid in [master, *kids]:
        os.kill(pid, signal.SIGKILL)
    wait_gone([master, *kids])
    return [master, *kids]


def crash_report(inst: Instance) -> str:
    """The daemon's crash events with the exception each one logged, for a failure message."""
    lines = ["the daemon died:"]
    for e in inst.log_events():
        if e["event"] in {"daemon.crashed", "worker.crashed"}:
            raised = e.get("exception")
            last = raised[-1] if isinstance(raised, list) and raised else {}
            where = last.get("frames", [{}])[-3:] if isinstance(last, dict) else []
            lines.append(
                f"{e['event']} {e.get('timestamp')}: {last.get('exc_type')}: "
                f"{last.get('exc_value')} at "
                + " < ".join(f"{f.get('name')}:{f.get('lineno')}" for f in reversed(where))
            )
    return "\n".join(lines)


def stall_report(inst: Instance, master: int) -> str:
    """What a daemon that stopped making progress looks like, for a failure message."""
    status = inst.ipcctl("status", "--json")
    table = InflightTable.open(inst.keys.inflight)
    try:
        parked = len(table.parked_jobs())
        views = [(v.pid, v.state.name, v.job_id) for v in table.worker_views()]
    finally:
        table.segment.close()
    tail = "\n".join(json.dumps(e)[:300] for e in inst.log_events()[-8:])
    return (
        f"no progress: master alive {alive(master)}, workers {workers(master)}, slots "
        f"{views}, parked {parked}\nstatus {status.stdout}{status.stderr}\nlast events:\n{tail}"
    )
