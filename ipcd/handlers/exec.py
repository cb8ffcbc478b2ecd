"""The ``exec`` handler: run one of a fixed set of commands for a job.

Cron users often want "run this script when a job arrives".  Letting a queue message name
a program would let anyone who can write to the queue run anything as the daemon, so this
handler is off unless ``[exec] enabled = true``, runs only commands listed in
``[exec.commands]`` (argv lists, no shell), in a new session with a scrubbed environment
and stdin from /dev/null, kills the command's whole process group at ``[exec] timeout``,
and keeps at most ``[exec] max_output`` bytes of its output in its result.  What the
command writes is also passed on to the worker's stdout as it comes, so that it is the
job's captured output too (``ipcctl tail`` follows it; ``[jobs] max_output`` bounds it).

The payload names the command: ``"report"``, or ``{"command": "report", "args": [...]}``
when ``[exec] allow_args = true`` (the arguments are appended to the configured argv).

The ``notify`` handler (:func:`notify`) runs the one command ``[exec] notify`` names, in
the same way, for a completion hook's job (``[handlers.NAME] on_failure = "notify"``):
the outcome it is given comes on the command's stdin as JSON, and in ``IPCD_OUTCOME_*``
environment variables; the payload never chooses the command.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import time
from typing import IO

from ipcd.config import ExecConfig
from ipcd.handlers import HandlerError, HandlerResult, Job

#: The only environment the command gets.
SCRUBBED_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/"}


def handler(job: Job, *, config: ExecConfig) -> HandlerResult:
    """Run the allow-listed command the payload names; its output is the result."""
    return _run(_argv(job, config), config, {"IPCD_JOB_ID": job.id})


handler.needs_config = "exec"  # type: ignore[attr-defined]

#: The outcome's fields a notify command gets as ``IPCD_OUTCOME_<FIELD>`` variables.
OUTCOME_FIELDS = ("id", "handler", "type", "state", "attempts", "error", "duration", "result_size")
#: Characters of the outcome's error in ``IPCD_OUTCOME_ERROR`` (stdin has all of it).
MAX_ENV_ERROR = 1000


def notify(job: Job, *, config: ExecConfig) -> HandlerResult:
    """Run ``[exec] notify``'s command for a hook job: the payload (the outcome of the job
    the hook follows, ipcd.store.chains.follow_up) as JSON on its stdin, its fields in
    ``IPCD_OUTCOME_ID``, ``_HANDLER``, ``_TYPE``, ``_STATE``, ``_ATTEMPTS``, ``_ERROR``
    (cut to MAX_ENV_ERROR characters), ``_DURATION`` and ``_RESULT_SIZE`` (empty for
    none).  A failing command fails the job, which is retried as any job is."""
    if not config.enabled:
        raise HandlerError("the notify handler runs commands: [exec] enabled is false")
    if config.notify is None or config.notify not in config.commands:
        raise HandlerError("the notify handler needs [exec] notify naming an [exec.commands] entry")
    outcome = job.payload if isinstance(job.payload, dict) else {}
    env = {"IPCD_JOB_ID": job.id}
    for name in OUTCOME_FIELDS:
        value = outcome.get(name)
        text = "" if value is None else str(value)
        env[f"IPCD_OUTCOME_{name.upper()}"] = text[:MAX_ENV_ERROR] if name == "error" else text
    stdin = json.dumps(job.payload, separators=(",", ":"), ensure_ascii=False).encode()
    return _run(list(config.commands[config.notify]), config, env, stdin)


notify.needs_config = "exec"  # type: ignore[attr-defined]


def _run(
    argv: list[str], config: ExecConfig, env: dict[str, str], stdin: bytes | None = None
) -> HandlerResult:
    """Run ``argv`` as every command of this module runs (see the module's docstring),
    with ``env`` added to the scrubbed environment and ``stdin`` written to it (else
    /dev/null); its output is the result, a non-zero exit or the timeout an error."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**SCRUBBED_ENV, **env},
        cwd="/",
        process_group=0,  # its own process group, so [exec] timeout kills all it started
        preexec_fn=_die_with_worker,
        close_fds=True,
    )
    assert proc.stdout is not None
    if proc.stdin is not None:
        _feed(proc.stdin, stdin or b"")
    output, truncated, timed_out = _collect(proc, config, started)
    code = proc.wait()
    text = output.decode("utf-8", "replace")
    if timed_out:
        raise HandlerError(f"command {argv[0]} timed out after {config.timeout:g}s")
    if code != 0:
        tail = text[-500:].strip()
        raise HandlerError(f"command {argv[0]} exited with status {code}: {tail}")
    return {"exit": code, "output": text, "truncated": truncated}


def _feed(pipe: IO[bytes], data: bytes) -> None:
    """Write ``data`` to the command's stdin and close it.  A hook's outcome is a few KiB
    at most, within a pipe's buffer, so this never waits for the command to read; a
    command that exits without reading it is no error."""
    with contextlib.suppress(BrokenPipeError):
        pipe.write(data)
    with contextlib.suppress(BrokenPipeError):
        pipe.close()


def _die_with_worker() -> None:
    """In the command, before exec: be killed when the worker dies (a job timeout, a stop).

    Its own process group keeps the command out of the worker's group, which the master
    kills on a timeout; PR_SET_PDEATHSIG makes the kernel follow up instead (it follows
    the thread that forks: the worker's main thread, which lives as long as the worker).
    preexec_fn runs between fork and exec, where a lock another thread held at the fork
    stays held for good: a worker's one other thread, the run file's trimmer
    (ipcd.daemon.capture), holds no lock but its own, imports nothing and allocates
    through no Python file object, so nothing this needs can be held.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _argv(job: Job, config: ExecConfig) -> list[str]:
    if not config.enabled:
        raise HandlerError("the exec handler is disabled ([exec] enabled = false)")
    payload = job.payload
    args: list[str] = []
    name: object = payload
    if isinstance(payload, dict):
        name = payload.get("command")
        raw_args = payload.get("args", [])
        if raw_args:
            if not config.allow_args:
                raise HandlerError("arguments are not allowed ([exec] allow_args = false)")
            if not isinstance(raw_args, list):
                raise HandlerError("'args' must be a list of strings")
            for arg in raw_args:
                if not isinstance(arg, str):
                    raise HandlerError("'args' must be a list of strings")
                args.append(arg)
    if not isinstance(name, str) or name not in config.commands:
        allowed = ", ".join(sorted(config.commands)) or "none"
        raise HandlerError(f"command {name!r} is not allowed (allowed: {allowed})")
    return [*config.commands[name], *args]


def _pass_on(chunk: bytes) -> None:
    """Write the command's output to fd 1, the job's captured output (ipcd.daemon.capture);
    where fd 1 is closed or refuses, the result still has it."""
    with contextlib.suppress(OSError):
        view = memoryview(chunk)
        while view:
            view = view[os.write(1, view) :]


def _collect(
    proc: subprocess.Popen[bytes], config: ExecConfig, started: float
) -> tuple[bytes, bool, bool]:
    """Read output up to the cap until the command ends or its time is up."""
    assert proc.stdout is not None
    chunks: list[bytes] = []
    kept = 0
    truncated = timed_out = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = config.timeout - (time.monotonic() - started)
            if left <= 0:
                timed_out = True
                break
            if not sel.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            _pass_on(chunk)
            room = config.max_output - kept
            if len(chunk) > room:
                truncated = True
            chunks.append(chunk[: max(room, 0)])
            kept += min(len(chunk), max(room, 0))
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.stdout.close()
    return b"".join(chunks), truncated, timed_out
