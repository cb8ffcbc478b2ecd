"""Per-handler limits and job expiry under the real daemon, tried as an operator would:
``[handlers.NAME] concurrency`` and ``rate`` in the config, jobs from ``ipcctl submit``
in shell loops, ``--expire``, and what ``ipcctl status``/``list``/``show`` say.

A job's ``started`` in the store is when a worker claimed it (RUNNING from then on) and
its ``finished`` when its handler ended, so ``[started, finished]`` holds the real run:
two such spans of a ``concurrency = 1`` handler must never overlap.
(tests/test_store_limits.py holds the claim's decisions with an injected clock.)
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time

from conftest import IPCCTL, Instance
from test_jobstore import store_of, wait_state

from ipcd.store import JobRecord, State

HANDLERS = """
[handlers.echo]
type = 2

[handlers.sleep]
type = 3
{sleep}
"""


def _daemon(instance: Instance, sleep: str) -> Instance:
    instance.write(handlers=HANDLERS.format(sleep=sleep))
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    return instance


def _records(inst: Instance, handler: str) -> list[JobRecord]:
    with store_of(inst) as jobs:
        found = jobs.list(types=[inst.config.handler_type(handler)], limit=10_000)
    return sorted(found, key=lambda r: (r.started or 0.0, r.id))


def _wait_running(inst: Instance, handler: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.state is State.RUNNING for r in _records(inst, handler)):
        assert time.monotonic() < deadline, f"no {handler} job running"
        time.sleep(0.02)


def _wait_done(inst: Instance, handler: str, count: int, timeout: float = 60.0) -> list[JobRecord]:
    deadline = time.monotonic() + timeout
    while True:
        found = _records(inst, handler)
        done = [r for r in found if r.state is State.DONE]
        if len(done) >= count:
            return done
        assert time.monotonic() < deadline, f"{len(done)} of {count} {handler} jobs done"
        time.sleep(0.05)


def test_concurrency_1_never_runs_two_at_once_under_four_shell_loops(instance: Instance) -> None:
    """Four shell loops flood a ``concurrency = 1`` handler with ``ipcctl submit``: its
    jobs run one after another, never two at once, while the other handler's jobs,
    submitted meanwhile, all finish before the capped handler's backlog does; ``status``
    shows the limit and at most one running."""
    inst = _daemon(instance, "concurrency = 1")
    submit = f'"{IPCCTL}" -c "{inst.config_path}" submit sleep 0.1'
    loop = f"for i in 1 2 3 4 5 6; do {submit} || exit 1; done"
    shells = [subprocess.Popen(["sh", "-c", loop]) for _ in range(4)]
    try:
        _wait_running(inst, "sleep")
        echoed = [
            inst.ipcctl("submit", "echo", str(n), check=True).stdout.strip() for n in range(5)
        ]
        status = json.loads(inst.ipcctl("status", "--json").stdout)
    finally:
        codes = [shell.wait(timeout=60) for shell in shells]
    assert codes == [0, 0, 0, 0]
    [limit] = status["store"]["limits"]
    assert (limit["handler"], limit["concurrency"], limit["rate"]) == ("sleep", 1, None)
    assert limit["running"] <= 1
    capped = _wait_done(inst, "sleep", 24)
    for before, after in itertools.pairwise(capped):
        assert before.finished is not None and after.started is not None
        assert after.started >= before.finished, (before, after)
    echo = [wait_state(inst, job_id, State.DONE) for job_id in echoed]
    last_capped = max(r.finished or 0.0 for r in capped)
    assert all((r.finished or 0.0) < last_capped for r in echo)
    text = inst.ipcctl("status").stdout
    assert "limit      sleep: 0 of 1 running, 0 queued" in text
    inst.ipcd("stop", check=True)


def test_a_rate_spaces_starts_and_a_token_due_wakes_a_worker(instance: Instance) -> None:
    """``rate = "4/s"`` with ``burst = 1``: six jobs submitted at once start at least a
    quarter second apart, and all run (the master rings when each next token is due:
    nothing else would wake the idle workers)."""
    inst = _daemon(instance, 'rate = "4/s"\nburst = 1')
    ids = [inst.ipcctl("submit", "sleep", "0", check=True).stdout.strip() for _ in range(6)]
    done = _wait_done(inst, "sleep", 6)
    assert sorted(r.id for r in done) == sorted(ids)
    starts = [r.started or 0.0 for r in done]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert all(gap >= 0.25 - 1e-6 for gap in gaps), gaps
    status = json.loads(inst.ipcctl("status", "--json").stdout)
    [limit] = status["store"]["limits"]
    assert (limit["rate"], limit["burst"], limit["concurrency"]) == (4.0, 1, None)
    assert "rate 4/s (burst 1," in inst.ipcctl("status").stdout
    inst.ipcd("stop", check=True)


def test_a_reload_applies_new_limits(instance: Instance) -> None:
    """A handler paused behind ``concurrency = 1`` (one job holding it) runs the rest
    side by side once a reload lifts the limit."""
    inst = _daemon(instance, "concurrency = 1")
    # 5 s: the reload, its new workers and the second claim must all come while the first
    # still runs, which a loaded host may stretch to seconds.
    ids = [inst.ipcctl("submit", "sleep", "5", check=True).stdout.strip() for _ in range(2)]
    wait_state(inst, ids[0], State.RUNNING)
    inst.write(handlers=HANDLERS.format(sleep=""))
    assert inst.ipcd("reload").returncode == 0
    second = wait_state(inst, ids[1], State.RUNNING)
    first = wait_state(inst, ids[0], State.DONE, timeout=30)
    assert second.started is not None and first.finished is not None
    assert second.started < first.finished
    inst.ipcd("stop", check=True)


def test_an_expired_job_is_cancelled_never_run_and_frees_its_key(daemon: Instance) -> None:
    """``--expire 1`` on a paused handler: the master cancels the job (error "expired",
    one ``job.expired`` event), ``list``/``show`` say so, its unique key is free again,
    and resuming the handler never runs it."""
    assert daemon.ipcctl("pause", "echo").returncode == 0
    job_id = daemon.ipcctl(
        "submit", "echo", "late", "--expire", "1", "--unique", "k1", check=True
    ).stdout.strip()
    listed = json.loads(daemon.ipcctl("list", "--json").stdout)["jobs"]
    [waiting] = [j for j in listed if j["id"] == job_id]
    assert waiting["expires"] == waiting["accepted"] + 1
    record = wait_state(daemon, job_id, State.CANCELLED)
    assert record.error == "expired"
    events = daemon.wait_events(lambda e: e.get("event") == "job.expired", 1)
    assert [e["job_id"] for e in events] == [job_id]
    shown = daemon.ipcctl("show", job_id).stdout
    assert "state:" in shown and "cancelled" in shown and "(expired)" in shown
    table = daemon.ipcctl("list").stdout.splitlines()
    assert table[0].split()[4:7] == ["PRI", "AGE", "EXPIRES"]
    assert [line.split()[6] for line in table[1:] if line.startswith(job_id)] == ["expired"]
    again = daemon.ipcctl("submit", "echo", "again", "--unique", "k1")
    assert again.returncode == 0, again.stderr
    assert daemon.ipcctl("resume", "echo").returncode == 0
    wait_state(daemon, again.stdout.strip(), State.DONE)
    assert wait_state(daemon, job_id, State.CANCELLED).started is None


def test_priority_orders_jobs_within_a_handler_and_is_listed(daemon: Instance) -> None:
    """``--priority``: of one handler's queued jobs the higher runs first; ``list`` and
    ``show`` show it."""
    assert daemon.ipcctl("pause", "echo").returncode == 0
    low = daemon.ipcctl("submit", "echo", "low", "--priority", "-5", check=True).stdout.strip()
    high = daemon.ipcctl("submit", "echo", "high", "--priority", "7", check=True).stdout.strip()
    table = daemon.ipcctl("list", "--state", "queued").stdout.splitlines()
    rows = {line.split()[0]: line.split()[4] for line in table[1:]}
    assert rows == {high: "7", low: "-5"}
    assert "\npriority:  7\n" in daemon.ipcctl("show", high).stdout
    assert daemon.ipcctl("resume", "echo").returncode == 0
    first, second = (wait_state(daemon, i, State.DONE) for i in (high, low))
    assert (first.started or 0.0) <= (second.started or 0.0)


def test_bad_expire_and_limits_are_usage_and_config_errors(instance: Instance) -> None:
    """``--expire 0`` is a usage error (64); a rate the config cannot read stops the
    start with a config error (78) naming the key."""
    bad = instance.ipcctl("submit", "echo", "x", "--expire", "0")
    assert bad.returncode == 64 and "--expire" in bad.stderr
    instance.write(handlers=HANDLERS.format(sleep='rate = "fast"'))
    start = instance.ipcd("start")
    assert start.returncode == 78
    assert "handlers.sleep.rate" in start.stderr and "not a rate" in start.stderr
