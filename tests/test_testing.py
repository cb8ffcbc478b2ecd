"""ipcd.testing.run_handler: a handler run in-process ends as it would in a worker."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import IPCD, TESTS, Instance

from ipcd.errors import PayloadError
from ipcd.handlers import HandlerResult, Job, Retry
from ipcd.handlers.builtin import echo, fail
from ipcd.layout.results import Kind
from ipcd.testing import DEFAULT_MAX_RESULT, run_handler

EXAMPLE_SRC = TESTS.parent / "examples" / "ipcd-example-plugin" / "src"


def test_payload_arrives_as_the_worker_decodes_it() -> None:
    """The payload travels through an envelope: a tuple arrives as a list, bytes as bytes."""
    sent = {"a": (1, 2)}  # a tuple, which JSON turns into a list
    run = run_handler(echo, sent, type=7, attempt=3, job_id="abc", timeout=2.5)  # type: ignore[arg-type]
    assert run.job == Job(
        id="abc", type=7, payload={"a": [1, 2]}, attempt=3, submitted=run.job.submitted,
        sender_pid=os.getpid(), timeout=2.5, reporter=run.job.reporter,
    )  # fmt: skip
    assert run.job.reporter is not None  # job.progress() is recorded (HandlerRun.progress)
    assert run.output == {"a": [1, 2]}
    assert run.result is not None
    assert (run.result.kind, run.result.data, run.result.attempt) == (Kind.JSON, b'{"a":[1,2]}', 3)
    bytes_run = run_handler(echo, b"\x00\xff")
    assert bytes_run.job.payload == b"\x00\xff"
    assert bytes_run.output == b"\x00\xff"


def test_payload_a_client_cannot_send_is_refused() -> None:
    """A payload JSON cannot carry fails as ipcctl's and the client's submit would."""
    with pytest.raises(PayloadError):
        run_handler(echo, {"a set": {1}})  # type: ignore[dict-item]


def test_handler_error_and_other_exceptions() -> None:
    """HandlerError gives its message; another exception its type, and a logged traceback."""
    run = run_handler(fail, "no disk")
    assert (run.ok, run.error, run.events) == (False, "no disk", [])

    def broken(job: Job) -> HandlerResult:
        return 1 // 0

    run = run_handler(broken, name="broken", job_id="j1")
    assert run.error == "ZeroDivisionError: integer division or modulo by zero"
    (event,) = run.logged("handler.exception")
    assert (event["job_id"], event["handler"], event["log_level"]) == ("j1", "broken", "error")
    with pytest.raises(AssertionError, match="the job failed: ZeroDivisionError"):
        _ = run.output


def test_retry_is_returned_not_run() -> None:
    """A Retry is handed back with its reason and delay, and no result is stored."""

    def later(job: Job) -> HandlerResult:
        raise Retry("busy", delay=3.0)

    run = run_handler(later)
    assert (run.result, run.ok, run.error) == (None, False, "")
    assert run.retry is not None
    assert (run.retry.reason, run.retry.delay) == ("busy", 3.0)


def test_results_over_max_result_fail() -> None:
    """Output larger than a slot is fine (the daemon spills it); output over
    [results] max_result becomes the error the daemon stores, and a value JSON cannot
    represent fails the job."""
    assert DEFAULT_MAX_RESULT == 256 << 20
    big = run_handler(echo, "x" * 100_000)
    assert big.ok and big.output == "x" * 100_000
    assert run_handler(echo, "x" * 1000, max_result=1000).ok
    run = run_handler(echo, "x" * 1001, max_result=1000)
    assert run.error == "result too large: 1001 bytes, more than [results] max_result (1000)"

    def not_json(job: Job) -> HandlerResult:
        return {"x": float("nan")}

    assert run_handler(not_json).error.startswith("handler returned a value that is not JSON-able")


def test_captures_the_handlers_own_events() -> None:
    """Events the handler logs through structlog are captured with their fields."""
    import structlog

    def chatty(job: Job) -> HandlerResult:
        structlog.get_logger().warning("chatty.said", job_id=job.id, n=2)
        return "ok"

    run = run_handler(chatty, job_id="c1")
    assert run.events == [{"event": "chatty.said", "log_level": "warning", "job_id": "c1", "n": 2}]


@pytest.mark.timeout(60)
def test_same_result_as_a_real_daemon(instance: Instance) -> None:
    """The example plugin's handler, loaded by target (not installed), stores in a real
    daemon exactly the result run_handler gives for the same payload."""
    from ipcd_example.text import wordcount

    instance.write(
        handlers="""
        [handlers.wordcount]
        type = 12
        target = "ipcd_example.text:wordcount"
        """
    )
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE_SRC)}
    started = subprocess.run(
        [IPCD, "-c", str(instance.config_path), "start"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    payloads = ['{"text": "to be or not to be", "top": 2}', '{"text": "x", "top": 99}']
    stored = []
    try:
        for payload in payloads:
            submitted = instance.ipcctl("submit", "wordcount", payload, "--json")
            assert submitted.returncode == 0, submitted.stderr
            shown = instance.ipcctl("result", submitted.stdout.strip(), "--wait", "--json")
            assert shown.returncode in (0, 1), shown.stderr
            stored.append(json.loads(shown.stdout))
    finally:
        stopped = instance.ipcd("stop")
    assert stopped.returncode == 0, stopped.stderr
    for payload, doc in zip(payloads, stored, strict=True):
        local = run_handler(wordcount, json.loads(payload), type=12)
        assert local.result is not None
        expected = {**local.result.as_json(), "id": doc["id"]}
        assert {**doc, "submitted": 0, "finished": 0} == {**expected, "submitted": 0, "finished": 0}
    assert [doc["status"] for doc in stored] == ["ok", "error"]


@pytest.mark.timeout(60)
def test_large_output_as_a_real_daemon_stores_it(instance: Instance) -> None:
    """Output larger than a slot but within max_result is stored by a daemon, and output
    over max_result fails there with the error run_handler gives."""
    instance.write(results="max_result = 5000")  # slot_size 2048 in the test config
    assert instance.ipcd("start").returncode == 0
    shown = []
    try:
        for size in (3000, 6000):
            submitted = instance.ipcctl("submit", "echo", "x" * size)
            assert submitted.returncode == 0, submitted.stderr
            done = instance.ipcctl("result", submitted.stdout.strip(), "--wait", "--json")
            assert done.returncode in (0, 1), done.stderr
            shown.append(json.loads(done.stdout))
    finally:
        stopped = instance.ipcd("stop")
    assert stopped.returncode == 0, stopped.stderr
    fits, too_big = (run_handler(echo, "x" * n, max_result=5000) for n in (3000, 6000))
    assert fits.ok and shown[0]["output"] == fits.output
    assert shown[1]["status"] == "error" and shown[1]["error"] == too_big.error
