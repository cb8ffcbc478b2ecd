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
from ipcd.client import Client
from ipcd.errors import ExitCode, JobFailedError, PayloadError
from ipcd.protocol import Payload
from ipcd.results import Kind, Result, require

EPILOG = """exit status:
  0 success, 1 the job failed, 4 already queued (--unique: a job with that key waits or
  runs; its id is on stderr; nothing was queued), 64 usage error, 65 bad payload,
  66 no such result, 69 daemon or queue not there (status, stats: no daemon running;
  stats --prometheus exits 0 and prints ipcd_up 0), 73 cannot write the --output file,
  75 queue full (job not accepted), 77 permission denied,
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
        "--unique",
        metavar="KEY",
        help="queue nothing (exit 4) while a job with this key waits or runs (cron-safe)",
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

    status = sub.add_parser("status", help="queue depth, result segment use, daemon, workers")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch",
        type=_positive_seconds,
        nargs="?",
        const=1.0,
        metavar="S",
        help="refresh every S seconds (default 1) until Ctrl-C, like top",
    )

    stats = sub.add_parser("stats", help="job counters and gauges (--prometheus for node_exporter)")
    form = stats.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON document")
    form.add_argument(
        "--prometheus", action="store_true", help="the Prometheus text format; exits 0 when down"
    )
    stats.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write to FILE atomically (a temporary file renamed into place)",
    )

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
    if args.command in ("status", "stats"):
        return _look(client, args)
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
    print(f"stats segment:                 {keys.stats:#010x}")
    print(f"unique keys and semaphore:     {keys.unique:#010x}")
    print(f"spill table and semaphore:     {keys.spill:#010x}")
    print(f"derived from: {keys.how}")
    return 0


def _look(client: Client, args: argparse.Namespace) -> int:
    """``status`` and ``stats``, imported here: not on the submit path cron scripts take."""
    from ipcd.cli import status as status_cli

    if args.command == "status":
        return status_cli.show_status(client, as_json=args.json, watch=args.watch)
    return status_cli.show_stats(
        client, as_json=args.json, prometheus=args.prometheus, output=args.output
    )


def _submit(client: Client, args: argparse.Namespace) -> int:
    payload = _payload(args.payload, args.json)
    options = {
        "send_timeout": args.send_timeout,
        "job_timeout": args.timeout_job,
        "delay": args.delay,
        "unique": args.unique,
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
