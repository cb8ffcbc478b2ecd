"""Jobs end to end: typed dispatch, bare and PHP messages, bad input, concurrency."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest
import sysv_ipc
from conftest import DEFAULT_HANDLERS, IPCCTL, Instance

from ipcd.client import Client
from ipcd.kernel.queues import Queue, msgmax
from ipcd.layout.results import Status

PLUGINS = (
    DEFAULT_HANDLERS
    + """
[handlers.describe]
type = 10
target = "ipcd_test_plugins:describe"

[handlers.describe_ep]
type = 11

[handlers.crash]
type = 12
target = "ipcd_test_plugins:crash"

[handlers.big]
type = 13
target = "ipcd_test_plugins:big"

[handlers.not_jsonable]
type = 14
target = "ipcd_test_plugins:not_jsonable"

[handlers.unencodable]
type = 15
target = "ipcd_test_plugins:unencodable"

[handlers.treacherous]
type = 16
target = "ipcd_test_plugins:treacherous"
"""
)


@pytest.fixture
def served(instance: Instance) -> Instance:
    """A daemon with the test plugins configured."""
    instance.write(handlers=PLUGINS)
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    return instance


def _client(inst: Instance) -> Client:
    return Client(inst.config)


def _job_events(inst: Instance) -> list[dict[str, object]]:
    """Each job's one closing event (job.done, job.rejected, ...), not its debug start."""
    return [
        e
        for e in inst.log_events()
        if str(e["event"]).startswith("job.") and e["event"] != "job.started"
    ]


def test_echo_round_trip_through_cli(served: Instance) -> None:
    """`ipcctl submit echo hello --wait` prints hello and exits 0."""
    done = served.ipcctl("submit", "echo", "hello", "--wait")
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello\n", "")


def test_submit_prints_id_and_result_reads_it(served: Instance) -> None:
    """Without --wait, submit prints the job id; `ipcctl result ID --wait` prints the output."""
    submitted = served.ipcctl("submit", "describe", '{"n": 1}', "--json")
    job_id = submitted.stdout.strip()
    assert submitted.returncode == 0 and len(job_id) == 16
    shown = served.ipcctl("result", job_id, "--wait", "--timeout", "10")
    value = json.loads(shown.stdout)
    assert value["id"] == job_id and value["payload"] == {"n": 1} and value["type"] == 10
    assert value["sender_pid"] > 0 and value["bare"] is False and value["attempt"] == 1
    as_json = json.loads(served.ipcctl("result", job_id, "--json").stdout)
    assert as_json["status"] == "ok" and as_json["output"]["id"] == job_id


def test_entry_point_handler(served: Instance) -> None:
    """A handler found only through the ipcd.handlers entry-point group is dispatched."""
    done = served.ipcctl("submit", "describe_ep", "via ep", "--wait")
    assert json.loads(done.stdout)["payload"] == "via ep"


def test_numeric_type_and_stdin_payload(served: Instance) -> None:
    """TYPE may be a number and `-` reads binary payloads from stdin; bytes come back as bytes."""
    blob = bytes(range(256))
    proc = subprocess.run(
        [IPCCTL, "-c", str(served.config_path), "submit", "2", "-", "--wait"],
        input=blob,
        capture_output=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, blob)


def test_handler_exception_fails_job_not_daemon(served: Instance) -> None:
    """An unexpected exception fails that job with its text; the next job is served."""
    failed = served.ipcctl("submit", "crash", "x", "--wait")
    assert failed.returncode == 1
    assert "ZeroDivisionError: division by zero in a plugin" in failed.stderr
    assert served.ipcctl("submit", "echo", "next", "--wait").stdout == "next\n"
    tracebacks = [e for e in served.log_events() if e["event"] == "handler.exception"]
    assert len(tracebacks) == 1 and "ZeroDivisionError" in str(tracebacks[0]["traceback"])


def test_unjsonable_and_unknown_type(served: Instance) -> None:
    """A handler result that is not JSON-able and a type with no handler are error results."""
    bad = served.ipcctl("submit", "not_jsonable", "--wait")
    assert bad.returncode == 1 and "not JSON-able" in bad.stderr
    unknown = served.ipcctl("submit", "99", "x", "--wait")
    assert unknown.returncode == 1 and "no handler for message type 99" in unknown.stderr


def test_a_result_that_cannot_be_stored_fails_its_job_not_its_worker(served: Instance) -> None:
    """A handler's value that no result can hold (a lone surrogate in text or JSON, NaN, an
    object) fails its job at once with the cause; no worker dies, nothing runs again."""
    client = _client(served)
    errors = {
        kind: client.wait(client.submit("unencodable", kind), timeout=20).error
        for kind in ("surrogate-text", "surrogate-json", "surrogate-key", "nan", "object")
    }
    assert errors == {
        "surrogate-text": "handler returned text that is not valid Unicode: "
        "lone surrogate U+D800 at index 4",
        "surrogate-json": "handler returned a value that is not valid Unicode: "
        "lone surrogate U+DFFF in '\\udfff'",
        "surrogate-key": "handler returned a value that is not valid Unicode: "
        "lone surrogate U+D800 in '\\ud800'",
        "nan": "handler returned a value that is not JSON-able: "
        "Out of range float values are not JSON compliant",
        "object": "handler returned a value that is not JSON-able: "
        "Object of type object is not JSON serializable",
    }
    assert served.ipcctl("submit", "echo", "next", "--wait").stdout == "next\n"
    events = [e["event"] for e in served.log_events()]
    assert "worker.exited" not in events and "job.requeued" not in events
    assert events.count("job.done") == 6


def test_an_unexpected_error_inside_ipcd_fails_the_job_not_the_worker(served: Instance) -> None:
    """An exception ipcd does not expect while it handles a job (here from encoding a
    result) fails that job with the cause and a job.internal_error event; the worker lives
    on and the job does not run again."""
    failed = served.ipcctl("submit", "treacherous", "--wait")
    assert failed.returncode == 1
    assert failed.stderr.endswith(
        "ipcd failed while handling the job: LookupError: items() refuses\n"
    )
    assert served.ipcctl("submit", "echo", "next", "--wait").stdout == "next\n"
    events = [e["event"] for e in served.log_events()]
    assert events.count("job.internal_error") == 1 and events.count("job.done") == 2
    assert "worker.exited" not in events and "job.requeued" not in events


def test_result_larger_than_a_slot_is_spilled(served: Instance) -> None:
    """A result larger than a slot comes back whole, from a segment of its own."""
    fits = served.ipcctl("submit", "big", "1000", "--wait")
    assert fits.returncode == 0 and fits.stdout == "x" * 1000
    big = served.ipcctl("submit", "big", "5000", "--wait")
    assert big.returncode == 0 and big.stdout == "x" * 5000


def test_bare_message_is_a_job(served: Instance) -> None:
    """A message without envelope runs with its body as payload and its type as handler."""
    queue = Queue.open(served.keys.jobs)
    queue.send(b"plain text", 10, timeout=1)
    queue.send(b"\xff\xfe binary", 10, timeout=1)
    queue.send(b'a:2:{i:0;s:1:"a";s:1:"k";i:5;}', 10, timeout=1)
    done = served.wait_events(lambda e: e["event"] == "job.done" and bool(e.get("bare")), 3)
    assert [e["handler"] for e in done] == ["describe"] * 3
    client = _client(served)
    payloads = [
        json.loads(client.result(str(e["job_id"])).data)["payload"]  # type: ignore[union-attr]
        for e in done
    ]
    expected = ["plain text", b"\xff\xfe binary".hex(), {"0": "a", "k": 5}]
    assert sorted(map(json.dumps, payloads)) == sorted(map(json.dumps, expected))


def test_php_serialized_object_is_refused(served: Instance) -> None:
    """A PHP-serialized object is refused with a log event; nothing is instantiated."""
    queue = Queue.open(served.keys.jobs)
    queue.send(b'O:8:"stdClass":1:{s:1:"a";i:1;}', 10, timeout=1)
    rejected = served.wait_events(lambda e: e["event"] == "job.rejected", 1)
    assert len(rejected) == 1 and rejected[0]["refused"] is True
    assert "object" in str(rejected[0]["error"]).lower()


def test_malformed_envelope_gets_error_result(served: Instance) -> None:
    """An envelope with a readable id but a bad field gets an error result under that id."""
    queue = Queue.open(served.keys.jobs)
    queue.send(b'{"ipcd":1,"id":"badjob01","payload":1,"extra":2}', 2, timeout=1)
    served.wait_events(lambda e: e.get("job_id") == "badjob01", 1)
    shown = served.ipcctl("result", "badjob01")
    assert shown.returncode == 1 and "unknown envelope field 'extra'" in shown.stderr


def test_oversized_message_does_not_jam_the_queue(served: Instance) -> None:
    """A message of the kernel's maximum size (above sysv_ipc's 2048 default) is taken off."""
    mq = sysv_ipc.MessageQueue(served.keys.jobs, max_message_size=msgmax())
    mq.send(b"z" * msgmax(), type=2)
    assert served.ipcctl("submit", "echo", "after", "--wait").stdout == "after\n"
    big = served.wait_events(lambda e: e.get("bytes_in") == msgmax(), 1)
    # taken off the queue and handled; the 8 KiB echoed back is spilled past the 2 KiB slot
    assert len(big) == 1 and (big[0]["outcome"], big[0]["bytes_out"]) == ("ok", msgmax())


def test_garbage_of_any_type_and_size_leaves_daemon_serving(served: Instance) -> None:
    """Random bytes of random types and sizes are each accounted for; then a job is served."""
    rng = random.Random(1234)
    queue = Queue.open(served.keys.jobs)
    sent = 3000
    for _ in range(sent):
        body = rng.randbytes(rng.choice([1, 7, 100, 2049, msgmax()]))
        body = rng.choice([body, b"{" + body, b'{"ipcd":1,' + body, b"a:1:{" + body, b"s:9" + body])
        queue.send(body[: msgmax()], rng.choice([2, 3, 4, 10, 99, 2**31 - 1]), timeout=10)
    done = served.ipcctl("submit", "echo", "alive", "--wait", "--timeout", "60")
    assert done.stdout == "alive\n"
    events = served.wait_events(lambda e: str(e["event"]) in {"job.done", "job.rejected"}, sent + 1)
    assert len(events) == sent + 1  # one event per message: done or rejected
    assert os.path.exists(f"/proc/{served.pid()}")
    print(
        f"sent {sent} random messages: {sum(e['event'] == 'job.rejected' for e in events)} rejected"
    )


def test_thousand_jobs_from_four_shell_loops(served: Instance) -> None:
    """1,000 jobs from four concurrent shell loops all come back with their own results."""
    script = (
        'for i in $(seq 1 250); do out=$("$IPCCTL" -c "$CFG" submit echo "loop$L-job$i" --wait) '
        '|| exit 1; [ "$out" = "loop$L-job$i" ] || { echo "got $out for $L/$i"; exit 2; }; done'
    )
    env = {**os.environ, "IPCCTL": IPCCTL, "CFG": str(served.config_path)}
    started = time.monotonic()
    loops = [
        subprocess.Popen(["sh", "-c", script], env={**env, "L": str(n)}, stdout=subprocess.PIPE)
        for n in range(4)
    ]
    outputs = [p.communicate(timeout=300) for p in loops]
    assert [(p.returncode, out) for p, (out, _) in zip(loops, outputs, strict=True)] == [
        (0, b"")
    ] * 4
    assert sum(e["outcome"] == "ok" for e in _job_events(served)) == 1000
    print(f"1000 jobs from 4 shell loops in {time.monotonic() - started:.1f}s")


def test_queue_mode_has_no_world_access(served: Instance) -> None:
    """Every object is created with the configured mode (0o660 here), never world-accessible."""
    stats = Queue.open(served.keys.jobs).stats()
    assert stats.mode == 0o660
    status = json.loads(served.ipcctl("status", "--json").stdout)
    assert status["queue"]["mode"] == "0o660" and status["daemon"]["pid"] == served.pid()


def test_api_call_and_error_result(served: Instance) -> None:
    """The Python API's call() returns ok and error results with their data."""
    client = _client(served)
    ok = client.call("echo", {"k": [1, 2]}, timeout=10)
    assert ok.status is Status.OK and ok.value() == {"k": [1, 2]}
    failed = client.call("fail", "boom", timeout=10)
    assert failed.status is Status.ERROR and failed.error == "boom"
