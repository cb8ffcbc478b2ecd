"""Handlers that hang, exit or segfault: each job is recorded failed, its worker replaced."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import Instance

from ipcd.client import Client
from ipcd.daemon.arbiter import TICK

from .processes import alive, configure, start, wait_gone, wait_workers, workers
from .tally import failed_list, settled_events

TIMEOUT = 1.0
HANDLERS = f"""
[handlers.echo]
type = 2

[handlers.hang]
type = 20
target = "ipcd_test_plugins:hang"
timeout = {TIMEOUT}

[handlers.exit_hard]
type = 21
target = "ipcd_test_plugins:exit_hard"
max_attempts = 2
retry_delay = 0.1

[handlers.segfault]
type = 22
target = "ipcd_test_plugins:segfault"
max_attempts = 2
retry_delay = 0.1
"""


def _wait_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.01)
    return path.read_text()


def test_hang_is_killed_at_its_timeout_with_its_children(instance: Instance) -> None:
    """A hung job is killed after its 1 s timeout, with the process it started, and recorded
    failed as a timeout; its worker is replaced and echo jobs are served all along."""
    configure(instance, HANDLERS)
    master = start(instance)
    before = set(workers(master))
    client = Client(instance.config)
    pid_file = instance.dir / "hang.pid"
    began = time.monotonic()
    # Not notify=True: the echo calls below would take its notification (see
    # test_notifications.py); client.wait() watches the result gate instead.
    hung = client.submit("hang", str(pid_file))
    sleeper = int(_wait_file(pid_file))
    assert alive(sleeper)
    during = [client.call("echo", f"during {n}", timeout=5) for n in range(20)]
    outcome = client.wait(hung, timeout=10)
    took = time.monotonic() - began
    wait_gone([sleeper], timeout=2)  # the job's own child went with the process group
    after = set(wait_workers(master, 4))
    last = client.call("echo", "after", timeout=5)
    events = settled_events(instance, {hung, last.job_id})
    timeouts = [e for e in events if e["event"] == "job.timeout"]
    failed = failed_list(instance)
    print(
        f"\n[hung handler] submitted {len(during) + 2}, completed ok "
        f"{sum(r.ok for r in during) + last.ok}, failed 1 (timeout), requeued 0, missing 0; "
        f"killed {took:.2f}s after submit (timeout {TIMEOUT}s), result: {outcome.error!r}"
    )
    assert not outcome.ok and outcome.error.startswith("timeout: killed after")
    assert TIMEOUT <= took < TIMEOUT + TICK + 1.0
    assert all(r.ok for r in during) and last.ok
    assert len(timeouts) == 1 and timeouts[0]["job_id"] == hung
    assert len(before - after) == 1, "exactly the hung job's worker was replaced"
    assert failed[hung]["error"] == outcome.error
    done = [e for e in events if e["event"] == "job.done" and e["job_id"] == hung]
    assert len(done) == 1 and done[0]["outcome"] == "error"


def test_exit_and_segfault_fail_after_max_attempts(instance: Instance) -> None:
    """Jobs whose handler calls os._exit or dies of SIGSEGV are run twice (max_attempts 2),
    then recorded failed naming the exit status or signal; every dead worker is replaced
    and echo jobs are served all along."""
    configure(instance, HANDLERS)
    master = start(instance)
    before = set(workers(master))
    client = Client(instance.config)
    began = time.monotonic()
    exited = client.submit("exit_hard", None)
    crashed = client.submit("segfault", None)
    during = [client.call("echo", f"during {n}", timeout=5) for n in range(20)]
    results = {job_id: client.wait(job_id, timeout=15) for job_id in (exited, crashed)}
    took = time.monotonic() - began
    after = set(wait_workers(master, 4))
    last = client.call("echo", "after", timeout=5)
    events = settled_events(instance, {exited, crashed, last.job_id})
    requeued = [e for e in events if e["event"] == "job.requeued"]
    failed = failed_list(instance)
    deaths = [e for e in events if e["event"] == "worker.exited"]
    print(
        f"\n[os._exit and SIGSEGV handlers] submitted {len(during) + 3}, completed ok "
        f"{sum(r.ok for r in during) + last.ok}, failed 2, requeued {len(requeued)}, "
        f"missing 0; workers died {len(deaths)}, replaced {len(before - after)} of the "
        f"first 4; {took:.2f}s; errors: {results[exited].error!r}, {results[crashed].error!r}"
    )
    exit_error, segv_error = results[exited].error, results[crashed].error
    assert exit_error.startswith("worker died (exited with status 3")
    assert segv_error == "worker died (killed by SIGSEGV) on attempt 2 of 2"
    assert exit_error.endswith(") on attempt 2 of 2")
    assert all(r.ok for r in during) and last.ok and took < 8
    assert sorted(str(e["job_id"]) for e in requeued) == sorted([exited, crashed])
    assert {failed[j]["error"] for j in (exited, crashed)} == {exit_error, segv_error}
    assert {failed[j]["attempts"] for j in (exited, crashed)} == {2}
    causes = sorted(str(e["cause"]) for e in deaths)
    assert len(causes) == 4 and causes[2:] == ["killed by SIGSEGV"] * 2
    assert all(c.startswith("exited with status 3") for c in causes[:2]), causes
    assert not after & {int(str(e["pid"])) for e in deaths}
    for job_id in (exited, crashed):
        done = [e for e in events if e["event"] == "job.done" and e["job_id"] == job_id]
        assert len(done) == 1 and done[0]["attempt"] == 2
