"""Jobs that follow jobs under the real daemon, as an operator uses them: ``ipcctl submit
--after`` (a pipeline run in order, a failure cancelling what follows it, what ``list``
and ``show`` say of a held job, an unknown id refused at submit, a restart in between)
and completion hooks (``on_failure`` running the built-in ``notify`` handler with the
outcome).  The store's decisions alone are tests/test_chains.py's."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from conftest import IPCCTL, Instance
from test_jobstore import wait_state

from ipcd.errors import ExitCode
from ipcd.store import State

PIPELINE = """
[handlers.extract]
type = 5
target = "ipcd.handlers.builtin:sleep"

[handlers.transform]
type = 6
target = "ipcd.handlers.builtin:{transform}"
max_attempts = 1
on_failure = "notify"

[handlers.load]
type = 7
target = "ipcd.handlers.builtin:echo"

[handlers.notify]
type = 8
"""

NOTIFY = """
[exec]
enabled = true
notify = "alert"

[exec.commands]
alert = ["/bin/sh", "-c", "cat > {dir}/outcome.json && env > {dir}/env.txt"]
"""


def _pipeline(instance: Instance, transform: str) -> Instance:
    instance.write(NOTIFY.format(dir=instance.dir), handlers=PIPELINE.format(transform=transform))
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    return instance


def _submit(inst: Instance, *args: str) -> str:
    done = inst.ipcctl("submit", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _show(inst: Instance, job_id: str) -> dict[str, object]:
    shown = inst.ipcctl("show", job_id, "--json")
    assert shown.returncode == 0, shown.stderr
    job: dict[str, object] = json.loads(shown.stdout)["job"]
    return job


def _wait_file(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)
    time.sleep(0.1)  # the command writes env.txt after outcome.json
    return path.read_text()


def test_a_pipeline_runs_in_order_and_list_shows_what_a_job_waits_for(instance: Instance) -> None:
    """extract → transform → load with --after: each starts only after the one before it
    succeeded (two workers would otherwise run them at once), and while extract waits
    (its handler paused), ``list`` and ``show`` say what the others wait for."""
    inst = _pipeline(instance, "echo")
    assert inst.ipcctl("pause", "extract").returncode == 0  # nothing runs until resumed
    extract = _submit(inst, "extract", "0.2")
    transform = _submit(inst, "transform", "t", "--after", extract)
    load = _submit(inst, "load", "l", "--after", transform)
    listed = inst.ipcctl("list", "--json")
    waiting = {j["id"]: j["waiting"] for j in json.loads(listed.stdout)["jobs"]}
    assert waiting[transform] == [extract] and waiting[load] == [transform]
    table = inst.ipcctl("list").stdout
    assert f"scheduled (after {extract})" in table
    shown = inst.ipcctl("show", load).stdout
    assert f"after:     {transform} (waiting for {transform})\n" in shown
    assert inst.ipcctl("resume", "extract").returncode == 0
    result = inst.ipcctl("result", load, "--wait", "--timeout", "20")
    assert result.returncode == 0, result.stderr
    steps = [_show(inst, job_id) for job_id in (extract, transform, load)]
    assert [s["state"] for s in steps] == ["done", "done", "done"]
    assert steps[0]["finished"] <= steps[1]["started"]  # type: ignore[operator]
    assert steps[1]["finished"] <= steps[2]["started"]  # type: ignore[operator]
    assert steps[2]["after"] == [transform]


def test_a_failed_step_cancels_the_rest_and_its_on_failure_hook_gets_the_outcome(
    instance: Instance,
) -> None:
    """transform fails for good: load, waiting for it, is cancelled with the reason; a job
    submitted after the failure naming it ends at once (exit 1); and transform's
    ``on_failure`` job runs the notify command with the outcome on stdin and in its
    environment."""
    inst = _pipeline(instance, "fail")
    assert inst.ipcctl("pause", "extract").returncode == 0
    extract = _submit(inst, "extract", "0")
    transform = _submit(inst, "transform", "broken input", "--after", extract)
    load = _submit(inst, "load", "l", "--after", transform)
    assert inst.ipcctl("resume", "extract").returncode == 0
    waited = inst.ipcctl("result", load, "--wait", "--timeout", "20")
    assert waited.returncode == ExitCode.JOB_FAILED
    assert f"dependency {transform} failed" in waited.stdout + waited.stderr
    record = wait_state(inst, load, State.CANCELLED)
    assert record.error == f"dependency {transform} failed"
    late = inst.ipcctl("submit", "load", "x", "--after", f"{extract},{transform}")
    assert late.returncode == ExitCode.JOB_FAILED
    assert f"dependency {transform} failed" in late.stderr
    outcome = json.loads(_wait_file(inst.dir / "outcome.json"))
    assert outcome["id"] == transform and outcome["handler"] == "transform"
    assert (outcome["state"], outcome["attempts"], outcome["error"]) == (
        "failed",
        1,
        "broken input",
    )
    assert outcome["duration"] >= 0 and outcome["type"] == 6
    env = _wait_file(inst.dir / "env.txt")
    assert f"IPCD_OUTCOME_ID={transform}\n" in env
    assert "IPCD_OUTCOME_STATE=failed\n" in env
    assert "IPCD_OUTCOME_ERROR=broken input\n" in env
    hooks = json.loads(inst.ipcctl("list", "--type", "notify", "--json").stdout)["jobs"]
    assert [(h["state"], h["handler"]) for h in hooks] == [("done", "notify")]
    events = inst.wait_events(lambda e: e.get("event") == "job.cancelled", 1)
    assert events[0]["job_id"] == load


def test_an_unknown_dependency_is_a_usage_error_at_submit(daemon: Instance) -> None:
    """A confirmed submit naming a job the store does not hold exits 64 and says which;
    unconfirmed, the job is recorded failed with that error; a malformed id or too many
    are refused before anything is sent."""
    refused = daemon.ipcctl("submit", "echo", "x", "--after", "nosuchjob")
    assert refused.returncode == ExitCode.USAGE, refused.stderr
    assert "unknown dependency nosuchjob" in refused.stderr
    job_id = refused.stdout.strip() or None
    assert job_id is None  # nothing to wait for: no id is printed
    sent = daemon.ipcctl("submit", "echo", "x", "--after", "nosuchjob", "--no-confirm", "--wait")
    assert sent.returncode == ExitCode.JOB_FAILED
    assert "unknown dependency nosuchjob" in sent.stdout + sent.stderr
    bad = daemon.ipcctl("submit", "echo", "x", "--after", "not/an/id")
    assert bad.returncode == ExitCode.USAGE and "not a job id" in bad.stderr
    many = ",".join(f"j{n}" for n in range(65))
    too_many = daemon.ipcctl("submit", "echo", "x", "--after", many)
    assert too_many.returncode == ExitCode.USAGE and "at most 64" in too_many.stderr


def test_a_held_job_waits_across_a_restart(instance: Instance) -> None:
    """The dependency and the held job are in the store: after a stop and a start the
    held job still waits, and runs once the job it waits for succeeded."""
    inst = _pipeline(instance, "echo")
    first = _submit(inst, "extract", "0", "--delay", "2")
    then = _submit(inst, "load", "after restart", "--after", first)
    assert inst.ipcd("stop").returncode == 0
    assert inst.ipcd("start").returncode == 0
    assert _show(inst, then)["state"] == "scheduled"
    result = inst.ipcctl("result", then, "--wait", "--timeout", "20")
    assert result.returncode == 0, result.stderr
    assert _show(inst, first)["finished"] <= _show(inst, then)["started"]  # type: ignore[operator]


def test_cancelling_a_step_cancels_what_waits_for_it_and_tells_its_waiter(
    daemon: Instance,
) -> None:
    """``ipcctl cancel`` of a waiting job cancels the jobs held for it too (counted in its
    answer), and a submitter waiting for one of those gets the reason as its error."""
    assert daemon.ipcctl("pause", "sleep").returncode == 0
    first = _submit(daemon, "sleep", "0")
    then = _submit(daemon, "echo", "x", "--after", first)
    waiter = subprocess.Popen(
        [IPCCTL, "-c", str(daemon.config_path), "result", then, "--wait", "--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    cancelled = daemon.ipcctl("cancel", first, "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert sorted(json.loads(cancelled.stdout)["cancelled"]) == sorted([first, then])
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == ExitCode.JOB_FAILED
    assert f"dependency {first} was cancelled" in out + err
    assert _show(daemon, then)["error"] == f"dependency {first} was cancelled"
