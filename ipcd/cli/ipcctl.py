"""``ipcctl``: submit jobs and read results from shells and cron scripts.

Kept lean on purpose: argparse and ipcd's client modules only (see ipcd.client).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ipcd import config as config_mod
from ipcd.cli import parser as cli_parser
from ipcd.cli import run
from ipcd.client import Client, Status
from ipcd.errors import ExitCode, JobFailedError, PayloadError
from ipcd.protocol import Payload
from ipcd.results import Kind, Result, require

EPILOG = """exit status:
  0 success, 1 the job failed, 64 usage error, 65 bad payload, 66 no such result,
  69 daemon or queue not there, 75 queue full (job not accepted), 77 permission denied,
  70 internal error (a bug: please report), 78 bad configuration, 124 timed out waiting
"""


def build_parser() -> argparse.ArgumentParser:
    parser, sub = cli_parser("ipcctl", "Submit jobs to ipcd and read their results.", EPILOG)

    submit = sub.add_parser("submit", help="queue a job; prints its id (or its output with --wait)")
    submit.add_argument("type", help="handler name or message type number")
    submit.add_argument("payload", nargs="?", help="the payload text; - reads stdin")
    submit.add_argument("--json", action="store_true", help="parse the payload as JSON")
    _wait_options(submit)
    submit.add_argument(
        "--timeout-job",
        type=_positive_seconds,
        metavar="S",
        help="kill the job if it runs longer than S seconds (default: the handler's timeout)",
    )
    submit.add_argument(
        "--delay",
        type=_positive_seconds,
        metavar="S",
        help="run the job no earlier than S seconds from now",
    )
    submit.add_argument(
        "--send-timeout",
        type=_seconds,
        metavar="S",
        help="how long to wait while the queue is full (default: [ipc] send_timeout)",
    )

    result = sub.add_parser("result", help="print a job's result")
    result.add_argument("job_id")
    _wait_options(result)
    result.add_argument("--json", action="store_true", help="print the whole result as JSON")

    status = sub.add_parser("status", help="queue depth, result segment use, daemon")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    failed = sub.add_parser("failed", help="list jobs that failed for good, and why")
    failed.add_argument("--json", action="store_true", help="one JSON document")

    retry = sub.add_parser("retry", help="put a job from the failed list back on the queue")
    retry.add_argument("job_id")

    sub.add_parser("key", help="print the IPC keys and how they are derived")
    return parser


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true", help="wait for the result and print it")
    parser.add_argument(
        "--timeout", type=_seconds, default=30.0, metavar="S", help="with --wait (default 30)"
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("seconds must not be negative")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("seconds must be more than 0")
    return value


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    client = Client(config_mod.load(config_mod.locate(args.config)))
    if args.command == "submit":
        return _submit(client, args)
    if args.command == "result":
        return _result(client, args)
    if args.command == "status":
        return _status(client, args.json)
    if args.command == "failed":
        return _failed(client, args.json)
    if args.command == "retry":
        print(client.retry(args.job_id))
        return 0
    keys = client.keys
    print(f"job queue, result segment, result semaphore: {keys.jobs:#010x}")
    print(f"reply queue:                   {keys.replies:#010x}")
    print(f"result gate (semaphore):       {keys.gate:#010x}")
    print(f"in-flight table and semaphore: {keys.inflight:#010x}")
    print(f"failed list and semaphore:     {keys.failed:#010x}")
    print(f"spill table and semaphore:     {keys.spill:#010x}")
    print(f"derived from: {keys.how}")
    return 0


def _submit(client: Client, args: argparse.Namespace) -> int:
    payload = _payload(args.payload, args.json)
    options = {
        "send_timeout": args.send_timeout,
        "job_timeout": args.timeout_job,
        "delay": args.delay,
    }
    if not args.wait:
        print(client.submit(args.type, payload, **options))
        return 0
    job_id = client.submit(args.type, payload, notify=True, **options)
    return _print_result(client.wait_submitted(job_id, args.timeout), as_json=False)


def _payload(arg: str | None, as_json: bool) -> Payload:
    if arg == "-":
        raw = sys.stdin.buffer.read()
        try:
            arg = raw.decode("utf-8")
        except UnicodeDecodeError:
            if as_json:
                raise PayloadError("stdin is not UTF-8, so it cannot be JSON") from None
            return raw
    if arg is None:
        return None
    if as_json:
        try:
            value: Payload = json.loads(arg)
        except ValueError as exc:
            raise PayloadError(f"payload is not valid JSON: {exc}") from None
        return value
    return arg


def _result(client: Client, args: argparse.Namespace) -> int:
    if args.wait:
        result = client.wait(args.job_id, args.timeout)
    else:
        result = require(client.result(args.job_id), args.job_id)
    return _print_result(result, as_json=args.json)


def _print_result(result: Result, *, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result.as_json()))
        return 0 if result.ok else int(ExitCode.JOB_FAILED)
    if not result.ok:
        raise JobFailedError(f"job {result.job_id} failed: {result.error}")
    if result.kind is Kind.BYTES:
        sys.stdout.buffer.write(result.data)
        sys.stdout.buffer.flush()
    elif result.kind is Kind.TEXT:
        text = result.data.decode("utf-8", "replace")
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        sys.stdout.write(json.dumps(result.value()) + "\n")
    return 0


def _status(client: Client, as_json: bool) -> int:
    status = client.status()
    if as_json:
        print(json.dumps(_status_doc(status)))
        return 0 if status.daemon_running() else int(ExitCode.UNAVAILABLE)
    q, header = status.queue, status.results
    print(
        f"queue      {status.keys.jobs:#010x}: {q.messages} messages, "
        f"{q.bytes} of {q.max_bytes} bytes, mode {q.mode:#o}"
    )
    if header is not None:
        print(
            f"results    {min(header.next_seq, header.slot_count)} of {header.slot_count} "
            f"slots used, {header.ok_count} ok / {header.error_count} errors since created"
        )
    if header is not None and status.daemon_running():
        print(f"daemon     pid {header.daemon_pid}, up {time.time() - header.started:.0f}s")
        now = time.time()
        for w in status.workers:
            doing = f"job {w.job_id} for {now - w.started:.1f}s" if w.job_id else "idle"
            print(f"worker     pid {w.pid}: {doing}, {w.jobs_done} jobs done")
        dropped = f" ({status.failed_dropped} older dropped)" if status.failed_dropped else ""
        print(f"jobs       {status.parked} waiting to retry, {status.failed} failed{dropped}")
        return 0
    print("daemon     not running (jobs wait in the queue for the next start)")
    return int(ExitCode.UNAVAILABLE)


def _status_doc(status: Status) -> dict[str, object]:
    header = status.results
    q = status.queue
    daemon: dict[str, object] = {"running": status.daemon_running()}
    if header is not None and status.daemon_running():
        daemon.update(pid=header.daemon_pid, uptime_s=round(time.time() - header.started, 3))
    results: dict[str, object] | None = None
    if header is not None:
        results = {
            "slots": header.slot_count,
            "slot_size": header.slot_size,
            "stored": min(header.next_seq, header.slot_count),
            "written": header.next_seq,
            "ok": header.ok_count,
            "errors": header.error_count,
            "bytes": status.results_size,
        }
    return {
        "workers": [
            {
                "pid": w.pid,
                "state": "busy" if w.job_id else "idle",
                "job_id": w.job_id or None,
                "running_s": round(time.time() - w.started, 3) if w.job_id else None,
                "jobs_done": w.jobs_done,
            }
            for w in status.workers
        ],
        "parked": status.parked,
        "failed": status.failed,
        "failed_dropped": status.failed_dropped,
        "key": f"{status.keys.jobs:#010x}",
        "queue": {
            "messages": q.messages,
            "bytes": q.bytes,
            "max_bytes": q.max_bytes,
            "mode": f"{q.mode:#o}",
        },
        "results": results,
        "daemon": daemon,
    }


def _failed(client: Client, as_json: bool) -> int:
    entries, dropped = client.failed()
    if as_json:
        print(json.dumps({"failed": [e.as_json() for e in entries], "dropped": dropped}))
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.failed_at))
        print(f"{e.job_id}  type {e.type}  {when}  attempts {e.attempts}  {e.error}")
    if dropped:
        print(f"({dropped} older entries were dropped: the list keeps the newest)")
    return 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(run("ipcctl", main))
