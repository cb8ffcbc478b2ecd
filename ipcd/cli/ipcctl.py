"""``ipcctl``: submit jobs and read results from shells and cron scripts.

Kept lean on purpose: argparse and ipcd's client modules only (see ipcd.client).
"""

from __future__ import annotations

import argparse
import os
import sys

from ipcd import config as config_mod
from ipcd.cli import end_on_sigterm, run
from ipcd.cli.ipcctl_args import WAIT_TIMEOUT, parse
from ipcd.client import Client
from ipcd.config import Config
from ipcd.errors import (
    AlreadyQueuedError,
    ExitCode,
    IpcdError,
    JobFailedError,
    NoResultError,
    NotConfirmedError,
    PayloadError,
    WaitTimeoutError,
)
from ipcd.layout.results import Kind, Result, require
from ipcd.wire.protocol import Payload, payload_from_json

#: The commands the daemon answers from its job store, over its control socket.
STORE_COMMANDS = frozenset(
    {"list", "show", "tail", "cancel", "pause", "resume", "purge", "failed", "retry"}
    | {"wait", "schedules"}
)


def main(argv: list[str]) -> int:
    args = parse(argv)
    config = config_mod.load(config_mod.locate(args.config))
    if args.command == "logs":
        return _logs(config, args)
    if args.command in STORE_COMMANDS:
        from ipcd.cli import jobs  # the store's commands: not on the submit path

        return jobs.main(config, args)
    client = Client(config)
    if args.command == "submit":
        return _submit(client, args)
    if args.command == "result":
        return _result(client, args)
    if args.command in ("status", "stats"):
        return _look(client, args)
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
    _warn_of_unserved_type(client.config, args.type)
    payload = _payload(args.payload, args.json, client.config.jobs.max_payload)
    options = {
        "send_timeout": args.send_timeout,
        "job_timeout": args.timeout_job,
        "delay": args.delay,
        "unique": args.unique,
        "priority": args.priority,
        "expire": args.expire,
        "after": args.after or (),
        # --wait waits for the outcome, which comes after the commit anyway.
        "confirm": not (args.wait or args.no_confirm),
    }
    try:
        job_id = client.submit(args.type, payload, notify=args.wait, **options)
    except AlreadyQueuedError:
        if not args.quiet:
            raise
        return int(ExitCode.ALREADY_QUEUED)  # --quiet: cron mails nothing for it
    except NotConfirmedError as exc:
        print(exc.job_id)  # sent all the same: the id names it once the daemon stores it
        raise
    if not args.wait:
        print(job_id)
        if args.no_confirm:
            _warn_if_unserved(client, job_id)
        return 0
    return _print_result(client.wait_submitted(job_id, _wait_timeout(args)), as_json=False)


def submitted(
    config_arg: str | None,
    job_id: str,
    *,
    wait: float | None,
    confirm: bool,
    deadline: float,
) -> int:
    """The rest of ``submit`` for a job ipcctl's lean path (ipcd.lean.ipcctl) sent when
    anything but the common outcome came (or may come): what :func:`_submit` does once
    the job is on the queue.  ``wait``: --wait's timeout (None without --wait);
    ``confirm``: wait for the store's confirmation; neither: --no-confirm, whose job id
    the lean path printed.  ``deadline`` (monotonic) is when the lean path's wait ends."""
    client = Client(config_mod.load(config_mod.locate(config_arg)))
    if wait is not None:
        return _print_result(client.wait_submitted(job_id, wait, deadline=deadline), as_json=False)
    if not confirm:
        _warn_if_unserved(client, job_id)
        return 0
    try:
        client.wait_confirmed(job_id, client.config.ipc.send_timeout, deadline=deadline)
    except NotConfirmedError as exc:
        print(exc.job_id)  # as _submit: the id names the job once the daemon stores it
        raise
    print(job_id)
    return 0


def _warn_of_unserved_type(config: Config, type_: str) -> None:
    """A bare type number that no configured handler has is queued (the daemon's
    configuration may differ from the one read here), but the job will most likely fail
    with "no handler for message type": say so on stderr."""
    number = config.handler_type(type_)  # a usage error (64) for an unknown name
    if all(h.type != number for h in config.handlers):
        print(
            f"ipcctl: warning: no handler in {config.path} has message type {number}; "
            "the job fails unless the daemon's configuration has one",
            file=sys.stderr,
        )


def _warn_if_unserved(client: Client, job_id: str) -> None:
    """A fire-and-forget job was accepted (exit 0: it waits in the queue), but if no
    daemon serves the queue, a cron job must hear that ipcd is down: a line on stderr,
    which cron mails.  -q does not silence it (it only silences "already queued")."""
    if not client.daemon_serving():
        print(
            f"ipcctl: warning: no daemon is serving the queue at key {client.keys.jobs:#010x} "
            f"({client.config.path}); job {job_id} waits in the queue until ipcd starts",
            file=sys.stderr,
        )


def _payload(arg: str | None, as_json: bool, limit: int) -> Payload:
    if arg == "-":
        # Read no more than can be accepted: a runaway producer must not fill our memory.
        raw = sys.stdin.buffer.read(limit + 1)
        if len(raw) > limit:
            raise PayloadError(
                f"stdin holds more than [jobs] max_payload ({limit} bytes); nothing was queued"
            )
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
            value: Payload = payload_from_json(arg)
        except (ValueError, RecursionError) as exc:
            raise PayloadError(f"payload is not valid JSON: {exc}") from None
        return value
    return arg


def _result(client: Client, args: argparse.Namespace) -> int:
    if args.output:  # what the job wrote, once its outcome is in the store
        from ipcd.cli.jobs import print_output

        result = _get_result(client, args)
        return print_output(client.config, args.job_id, as_json=args.json, ok=result.ok)
    if not args.log:
        return _print_result(_get_result(client, args), as_json=args.json)
    # --log: the job's events are worth most when there is no good result to print, so
    # they are printed after the result or in place of it, and the status stays the
    # result's own.
    try:
        result = _get_result(client, args)
    except (NoResultError, WaitTimeoutError) as exc:
        _print_job_log(client.config, args, finished=False)
        raise exc from None
    try:
        code = _print_result(result, as_json=args.json)
    finally:
        _print_job_log(client.config, args, finished=True)
    return code


def _wait_timeout(args: argparse.Namespace) -> float:
    return WAIT_TIMEOUT if args.timeout is None else float(args.timeout)


def _get_result(client: Client, args: argparse.Namespace) -> Result:
    if args.wait:
        try:
            return client.wait(args.job_id, _wait_timeout(args))
        except WaitTimeoutError:
            stored = _stored_result(client.config, args.job_id)
            if stored is None:
                raise
            return stored
    found = client.result(args.job_id)
    if found is None:
        found = _stored_result(client.config, args.job_id)
    return require(found, args.job_id)


def _stored_result(config: Config, job_id: str) -> Result | None:
    """A finished job's result from the job store, through the daemon: what the result
    ring no longer holds (evicted by newer results, or gone with a reboot).  None when
    the job has not finished, is unknown, its result was too large for the store, or the
    daemon cannot be asked."""
    from ipcd.cli import control_socket_path
    from ipcd.client.control import ControlClient
    from ipcd.layout.results import Status

    try:
        detail = ControlClient(control_socket_path(config)).result(job_id)
    except IpcdError:
        return None
    job = detail.job
    if job.state not in ("done", "failed", "cancelled"):
        return None
    if job.state == "done" and detail.result is None:
        return None  # larger than [store] max_result: the store kept only its size
    if detail.result is not None:
        kind, data = Kind(detail.result.kind), detail.result.data
    else:
        kind, data = Kind.TEXT, (job.error or "").encode()
    status = Status.OK if job.state == "done" else Status.ERROR
    if status is Status.ERROR and job.error is not None:
        kind, data = Kind.TEXT, job.error.encode()
    return Result(
        job.id, job.type, status, kind, data, max(job.attempts, 1), job.submitted,
        job.finished or 0.0,
    )  # fmt: skip


def _print_job_log(config: Config, args: argparse.Namespace, *, finished: bool) -> None:
    from ipcd.cli.jobs import print_job_log

    print_job_log(config, args.job_id, as_json=args.json, color=args.color, finished=finished)


def _logs(config: Config, args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from ipcd.cli.jobs import log_path
    from ipcd.client import logfile, logformat  # only the log readers pay for their import

    path = log_path(config)
    types: set[int] = set()
    names: set[str] = set()
    for text in args.type or ():
        more_types, more_names = logformat.type_selector(text, config.handlers)
        types |= more_types
        names |= more_names
    selected = logformat.Filter(
        jobs=frozenset(args.job or ()),
        types=frozenset(types),
        handlers=frozenset(names),
        level=logformat.parse_level(args.level) if args.level else None,
        since=logformat.parse_since(args.since, datetime.now(UTC)) if args.since else None,
    )
    if args.lines is not None:
        last = logformat.parse_count(args.lines)
    else:
        last = 10 if args.follow else None
    color = not args.json and logformat.want_color(args.color, sys.stdout.isatty(), os.environ)
    printer = logformat.Printer(sys.stdout, selected, json=args.json, color=color)
    if args.follow:
        end_on_sigterm()
    try:
        logfile.show(path, printer, last=last, follow=args.follow, notice=_notice)
    finally:
        if printer.skipped:
            _notice(f"skipped {printer.skipped} lines that are not JSON objects")
    return 0


def _notice(text: str) -> None:
    print(f"ipcctl: {text}", file=sys.stderr, flush=True)


def _print_result(result: Result, *, as_json: bool) -> int:
    import json  # here, not at the top: submit's start-up does not pay for it

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


def entry() -> None:
    """Console-script entry point."""
    sys.exit(run("ipcctl", main))
