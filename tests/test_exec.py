"""The exec handler: off by default, allow-listed argv only, scrubbed, bounded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import Instance

from ipcd.config import ExecConfig
from ipcd.errors import ExitCode
from ipcd.handlers import HandlerError, Job
from ipcd.handlers.exec import handler, notify
from ipcd.wire.protocol import JSONValue

EXEC = """
[exec]
enabled = true
timeout = 2.0
max_output = 100

[exec.commands]
hello = ["/bin/echo", "hello from exec"]
env = ["/usr/bin/env"]
fail = ["/bin/sh", "-c", "echo broken; exit 3"]
spam = ["/bin/sh", "-c", "yes spam | head -c 100000"]
stall = ["/bin/sh", "-c", "sleep 60 & echo $! > \\"$0\\"; wait", "PIDFILE"]
"""

HANDLER = "\n[handlers.exec]\ntype = 20\n"


def _run(payload: object, **options: object) -> object:
    config = ExecConfig(
        enabled=True,
        commands={"hello": ("/bin/echo", "hi"), "printf": ("/usr/bin/printf", "%s|")},
        **options,  # type: ignore[arg-type]
    )
    return handler(Job(id="j1", type=20, payload=payload), config=config)  # type: ignore[arg-type]


def test_runs_an_allowed_command() -> None:
    """A listed command runs with its configured argv; its output is the result."""
    assert _run("hello") == {"exit": 0, "output": "hi\n", "truncated": False}


def test_refuses_unlisted_commands_and_arguments() -> None:
    """A name not in [exec.commands], or arguments without allow_args, are refused."""
    with pytest.raises(HandlerError, match="'rm' is not allowed"):
        _run("rm")
    with pytest.raises(HandlerError, match="arguments are not allowed"):
        _run({"command": "printf", "args": ["; rm -rf /"]})
    with pytest.raises(HandlerError, match="'/bin/echo' is not allowed"):
        _run("/bin/echo")


def test_arguments_when_allowed_are_argv_not_shell() -> None:
    """With allow_args, arguments are appended as argv entries: no shell expands them."""
    out = _run({"command": "printf", "args": ["a b", "$(id)", ";x"]}, allow_args=True)
    assert out == {"exit": 0, "output": "a b|$(id)|;x|", "truncated": False}


def test_disabled_exec_refuses_even_when_called() -> None:
    """With [exec] enabled = false the handler refuses to run anything."""
    config = ExecConfig(enabled=False, commands={"hello": ("/bin/echo",)})
    with pytest.raises(HandlerError, match="disabled"):
        handler(Job(id="j", type=20, payload="hello"), config=config)


def test_configuring_exec_without_enabling_it_fails_start(instance: Instance) -> None:
    """Mapping the exec handler while [exec] is not enabled fails `ipcd start` (78)."""
    instance.write(extra=HANDLER)
    failed = instance.ipcd("start")
    assert failed.returncode == ExitCode.CONFIG and "[exec] enabled is false" in failed.stderr


def test_exec_through_the_daemon(instance: Instance) -> None:
    """Through the daemon: output, scrubbed environment, failures, cap and timeout."""
    pidfile = instance.dir / "stall.pid"
    instance.write(extra=EXEC.replace("PIDFILE", str(pidfile)) + HANDLER)
    assert instance.ipcd("start").returncode == 0
    try:
        hello = instance.ipcctl("submit", "exec", "hello", "--wait")
        assert json.loads(hello.stdout)["output"] == "hello from exec\n"
        env = json.loads(instance.ipcctl("submit", "exec", "env", "--wait").stdout)["output"]
        names = sorted(line.split("=", 1)[0] for line in env.splitlines())
        assert names == ["HOME", "IPCD_JOB_ID", "LANG", "PATH"]
        failed = instance.ipcctl("submit", "exec", "fail", "--wait")
        assert failed.returncode == 1 and "exited with status 3: broken" in failed.stderr
        spam = json.loads(instance.ipcctl("submit", "exec", "spam", "--wait").stdout)
        assert spam["truncated"] is True and len(spam["output"]) == 100
        stalled = instance.ipcctl("submit", "exec", "stall", "--wait", "--timeout", "20")
        assert stalled.returncode == 1 and "timed out after 2s" in stalled.stderr
        status = Path(f"/proc/{int(pidfile.read_text())}/status")
        assert not status.exists() or "State:\tZ" in status.read_text()  # killed with it
    finally:
        instance.ipcd("stop")


def test_job_timeout_kills_the_command_too(instance: Instance) -> None:
    """When the handler's timeout kills the worker, the command it ran dies with it."""
    pidfile = instance.dir / "cmd.pid"
    nap = f'["/bin/sh", "-c", "echo $$ > {pidfile}; exec sleep 30"]'
    commands = f"\n[exec]\nenabled = true\n[exec.commands]\nnap = {nap}\n"
    instance.write(extra=commands + "\n[handlers.exec]\ntype = 20\ntimeout = 1.0\n")
    assert instance.ipcd("start").returncode == 0
    try:
        killed = instance.ipcctl("submit", "exec", "nap", "--wait", "--timeout", "20")
        assert killed.returncode == 1 and "timeout: killed after" in killed.stderr
        status = Path(f"/proc/{int(pidfile.read_text())}/status")
        deadline = time.monotonic() + 5
        while status.exists() and "State:\tZ" not in status.read_text():
            assert time.monotonic() < deadline, "the command outlived its worker"
            time.sleep(0.05)
    finally:
        instance.ipcd("stop")


def test_notify_gives_the_outcome_on_stdin_and_in_the_environment() -> None:
    """The notify handler runs ``[exec] notify``'s command, whatever the payload says,
    with the outcome as JSON on stdin and its fields in IPCD_OUTCOME_* variables."""
    config = ExecConfig(
        enabled=True,
        commands={"alert": ("/bin/sh", "-c", "cat; echo; env | grep ^IPCD_ | sort")},
        notify="alert",
        max_output=4096,
    )
    outcome: dict[str, JSONValue] = {
        "id": "a1",
        "handler": "backup",
        "state": "failed",
        "attempts": 3,
        "error": "x" * 1500,
        "duration": 1.5,
        "result_size": None,
        "command": "rm",
    }
    result = notify(Job(id="h1", type=31, payload=outcome), config=config)
    assert isinstance(result, dict) and result["exit"] == 0
    stdin, env = str(result["output"]).split("\n", 1)
    assert json.loads(stdin) == outcome
    assert env.splitlines() == [
        "IPCD_JOB_ID=h1",
        "IPCD_OUTCOME_ATTEMPTS=3",
        "IPCD_OUTCOME_DURATION=1.5",
        "IPCD_OUTCOME_ERROR=" + "x" * 1000,
        "IPCD_OUTCOME_HANDLER=backup",
        "IPCD_OUTCOME_ID=a1",
        "IPCD_OUTCOME_RESULT_SIZE=",
        "IPCD_OUTCOME_STATE=failed",
        "IPCD_OUTCOME_TYPE=",
    ]


def test_notify_without_a_command_or_with_exec_disabled_fails_the_job() -> None:
    """No [exec] notify, or [exec] enabled = false: the hook job fails, saying why."""
    job = Job(id="h1", type=31, payload={"id": "a1"})
    with pytest.raises(HandlerError, match=r"needs \[exec\] notify"):
        notify(job, config=ExecConfig(enabled=True, commands={"a": ("/bin/true",)}))
    with pytest.raises(HandlerError, match="enabled is false"):
        notify(job, config=ExecConfig(commands={"a": ("/bin/true",)}, notify="a"))
