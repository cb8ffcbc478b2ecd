"""ipcctl's operator commands, answered by the daemon from its job store: ``list``,
``show``, ``tail``, ``cancel``, ``pause``, ``resume``, ``purge``, ``failed``, ``retry``,
``wait`` and ``schedules``.

Each asks the daemon over its control socket (ipcd.client.control); handler names become
message types here, from the configuration, so that the daemon only ever sees numbers.
Imported by ipcctl only for these commands: ``submit`` never pays for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ipcd.cli import control_socket_path
from ipcd.cli.ipcctl_args import WAIT_TIMEOUT
from ipcd.client.control import ControlClient
from ipcd.config import Config
from ipcd.errors import ConfigError, ExitCode, IpcdError, NoResultError, WaitTimeoutError
from ipcd.layout.results import Kind
from ipcd.wire.control import JobInfo, Output, Progress, StoredResult

#: A held job's due time (ipcd.store.chains.HELD; not imported: ipcctl loads no store).
HELD = 1e12

#: How often ``pause --wait`` asks whether the handlers' jobs still run.
DRAIN_POLL = 0.2
#: How often ``tail`` asks for more of a running job's output.
TAIL_POLL = 0.2
#: How long ``result --output`` waits for a worker to record an ended job's outcome.
RECORD_WAIT = 5.0


def main(config: Config, args: argparse.Namespace) -> int:
    """Run one of the store's commands; returns the exit status."""
    client = ControlClient(control_socket_path(config), group=config.ipc.group)
    command = args.command
    if command == "list":
        return _list(config, client, args)
    if command == "show":
        return _show(config, client, args)
    if command == "tail":
        return _tail(client, args.job_id, args.json)
    if command == "cancel":
        return _cancel(config, client, args)
    if command in ("pause", "resume"):
        return _pause_or_resume(config, client, args)
    if command == "purge":
        purged = client.purge(args.state, args.older_than)
        _say(args.json, {"purged": purged}, f"purged {purged} job{_s(purged)}")
        return 0
    if command == "failed":
        return _failed(client, args.json)
    if command == "wait":
        return _wait(config, client, args)
    if command == "schedules":
        return _schedules(client, args.json)
    # retry
    print(client.retry(args.job_id).id)
    return 0


def _list(config: Config, client: ControlClient, args: argparse.Namespace) -> int:
    jobs, waits, progress = client.list_more(
        states=args.state or (),
        types=_types(config, args.type or ()),
        unique=args.unique,
        limit=args.limit,
    )
    if args.json:
        docs = [_job_json(j, waits.get(j.id, ())) for j in jobs]
        for doc in docs:  # a running job's last job.progress(), if any
            if doc["id"] in progress:
                doc["progress"] = progress[doc["id"]]._asdict()
        print(json.dumps({"jobs": docs}))
        return 0
    now = time.time()
    rows = [
        (
            j.id,
            _handler(j),
            _state(j, waits.get(j.id, ()), progress.get(j.id)),
            str(j.attempts),
            str(j.priority),
            _age(now - j.accepted),
            _expiry(j, now),
            j.unique or "-",
            _size(j.size),
            j.preview,
        )
        for j in jobs
    ]
    if rows:
        header = (
            "ID", "HANDLER", "STATE", "ATT", "PRI", "AGE", "EXPIRES", "UNIQUE", "SIZE",
            "PREVIEW",
        )  # fmt: skip
        _table([header, *rows])
    return 0


def _table(rows: Sequence[Sequence[str]]) -> None:
    """Rows in columns as wide as their widest cell, the last one left as it is."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _show(config: Config, client: ControlClient, args: argparse.Namespace) -> int:
    detail = client.show(args.job_id)
    job = detail.job
    if args.json:
        doc = {
            "job": _job_json(job, detail.waits),
            "result": _result_json(detail.result),
            "output": _output_json(detail.output),
            "events": _events(config, job.id),
        }
        print(json.dumps(doc))
        return 0
    lines = [
        ("id", job.id),
        ("handler", f"{_handler(job)} (type {job.type})"),
        ("state", job.state),
        ("attempts", str(job.attempts)),
        ("priority", str(job.priority)),
        ("unique", job.unique or "-"),
        ("submitted", _when(job.submitted)),
        ("accepted", _when(job.accepted)),
        ("due", _when(job.due) if job.accepted < job.due < HELD else "-"),
        ("after", _after(job, detail.waits)),
        ("started", _when(job.started)),
        ("finished", _when(job.finished)),
        ("sender", f"pid {job.sender_pid}, uid {_or_dash(job.sender_uid)}"),
        ("reply to", _or_dash(job.reply_to)),
        ("timeout", "-" if job.timeout is None else f"{job.timeout:g} s"),
        ("expires", "-" if job.expires is None else f"{_when(job.expires)} ({_expiry(job)})"),
        ("payload", f"{_size(job.size)}{' (bare message)' if job.bare else ''}: {job.preview}"),
        ("worker", _or_dash(job.worker_pid)),
        ("error", job.error or "-"),
        ("progress", _progress_line(*_progress_of(detail.output))),
        ("output", _output_line(detail.output)),
        ("result", _result_line(job, detail.result)),
    ]
    width = max(len(name) for name, _ in lines) + 1
    for name, value in lines:
        print(f"{name + ':':<{width}} {value}")
        if name == "output" and detail.output is not None:  # what it wrote, under its line
            for line in detail.output.data.decode("utf-8", "replace").splitlines():
                print(f"  {line}")
    _print_result_data(detail.result)
    print("events:")
    sys.stdout.flush()
    print_job_log(config, job.id, as_json=False, color=args.color, finished=False)
    return 0


def _job_json(job: JobInfo, waits: Sequence[str]) -> dict[str, Any]:
    """A job for ``--json``: its record, and ``waiting``, the jobs it still waits for
    (``--after``; empty unless it is held)."""
    return {**job._asdict(), "after": list(job.after), "waiting": list(waits)}


def _state(job: JobInfo, waits: Sequence[str], progress: Progress | None) -> str:
    """The STATE column: a held job says what it waits for, a running one how far it got
    (its last ``job.progress()``)."""
    if progress is not None:
        return f"{job.state} {_percent(progress.fraction)}"
    if not waits:
        return job.state
    shown = ",".join(waits[:2]) + (",…" if len(waits) > 2 else "")
    return f"{job.state} (after {shown})"


def _after(job: JobInfo, waits: Sequence[str]) -> str:
    """``show``'s after line: the jobs named, and which of them it still waits for."""
    if not job.after:
        return "-"
    if not waits:
        return ", ".join(job.after)
    return f"{', '.join(job.after)} (waiting for {', '.join(waits)})"


def _tail(client: ControlClient, job_id: str, as_json: bool) -> int:
    """Follow a job's output as ``tail -f`` would: what it wrote so far (its last
    ``[jobs] max_output`` bytes), then what it writes, until it ends; then its end.
    Progress goes to stderr, on a line of its own whenever it changes (with ``--json``
    in the lines).  Returns 0 when the job is done, 1 when it failed or was cancelled
    (the error on stderr).  A new attempt (a retry) writes afresh: it is followed from its
    first byte, after an ``[attempt N]`` line on stderr."""
    offset = 0
    attempt: int | None = None
    shown: tuple[float | None, str] = (None, "")
    out = sys.stdout.buffer
    while True:
        tail = client.tail(job_id, offset)
        if attempt is not None and tail.attempts != attempt and offset:
            attempt, offset = tail.attempts, 0
            if not as_json:
                print(f"[attempt {attempt}]", file=sys.stderr, flush=True)
            continue  # ask again from the new attempt's first byte
        attempt = tail.attempts
        output = tail.output
        if output is not None:
            # Stored output ends where the live one did: print only what is new.
            data = output.data[max(offset - output.offset, 0) :]
            if data or (output.fraction, output.message) != shown:
                if as_json:
                    _json_line(output, data)
                else:
                    out.write(data)
                    out.flush()
                    if output.fraction is not None and (output.fraction, output.message) != shown:
                        print(
                            f"[{_progress_line(output.fraction, output.message)}]", file=sys.stderr
                        )
                shown = (output.fraction, output.message)
            offset = max(offset, output.offset + len(output.data))
        if tail.state in ("done", "failed", "cancelled"):
            break
        if output is None or not output.data:
            time.sleep(TAIL_POLL)
    ok = tail.state == "done"
    if as_json:
        print(json.dumps({"id": job_id, "state": tail.state, "error": tail.error}))
    elif not ok:
        print(f"ipcctl: job {job_id} {tail.state}: {tail.error or '-'}", file=sys.stderr)
    return 0 if ok else int(ExitCode.JOB_FAILED)


def _json_line(output: Output, data: bytes) -> None:
    doc = {
        "offset": output.offset + len(output.data) - len(data),
        "output": data.decode("utf-8", "replace"),
        "progress": output.fraction,
        "message": output.message,
    }
    print(json.dumps(doc), flush=True)


def print_output(config: Config, job_id: str, *, as_json: bool, ok: bool) -> int:
    """``result ID --output``: what the ended job wrote, as the store kept it (asked
    for again for a moment while the worker has yet to record it); the status is the
    job's (0 done, 1 not)."""
    client = ControlClient(control_socket_path(config), group=config.ipc.group)
    deadline = time.monotonic() + RECORD_WAIT
    tail = client.tail(job_id)
    while tail.state not in ("done", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(TAIL_POLL)
        tail = client.tail(job_id)
    output = tail.output if tail.state in ("done", "failed", "cancelled") else None
    if as_json:
        print(json.dumps({"id": job_id, "state": tail.state, **(_output_json(output) or {})}))
    elif output is not None:
        sys.stdout.buffer.write(output.data)
        sys.stdout.flush()
    return 0 if ok else int(ExitCode.JOB_FAILED)


def _cancel(config: Config, client: ControlClient, args: argparse.Namespace) -> int:
    done = client.cancel(
        args.job_ids,
        types=_types(config, args.type or ()),
        states=args.state or (),
        kill=args.kill,
    )
    count = len(done.jobs)
    text = f"cancelled {count} job{_s(count)}"
    if done.killed:
        text += f" (killed the worker of {len(done.killed)} running)"
    doc = {
        "cancelled": [j.id for j in done.jobs],
        "killed": done.killed,
        "skipped": [s._asdict() for s in done.skipped],
    }
    _say(args.json, doc, text)
    for skipped in done.skipped:
        if skipped.state is None:
            why = "no such job in the store"
        elif skipped.state == "running":
            why = "it is running (--kill stops it)"
        else:
            why = f"it is {skipped.state}"
        print(f"ipcctl: job {skipped.id} was not cancelled: {why}", file=sys.stderr)
    if done.skipped:
        raise NoResultError(f"{len(done.skipped)} of the jobs named were not cancelled")
    return 0


def _pause_or_resume(config: Config, client: ControlClient, args: argparse.Namespace) -> int:
    types = _types(config, args.handlers)
    paused = client.pause(types) if args.command == "pause" else client.resume(types)
    doc = {"paused": [{"type": t, "since": s} for t, s in sorted(paused.items())]}
    _say(args.json, doc, f"paused: {_paused_text(config, paused)}")
    sys.stdout.flush()
    if args.command == "pause" and args.wait:
        _drain(client, types, WAIT_TIMEOUT if args.timeout is None else args.timeout)
    return 0


def _drain(client: ControlClient, types: Sequence[int], timeout: float) -> None:
    """Wait until no job of ``types`` (none: any) runs; WaitTimeoutError (124) if some
    still do after ``timeout`` seconds.  The pause stays either way."""
    deadline = time.monotonic() + timeout
    while running := client.running(types):
        if time.monotonic() >= deadline:
            ids = ", ".join(j.id for j in running[:5]) + (", ..." if len(running) > 5 else "")
            raise WaitTimeoutError(
                f"{len(running)} job{_s(len(running))} still running after {timeout:g} s "
                f"({ids}); the pause stays"
            )
        time.sleep(min(DRAIN_POLL, max(deadline - time.monotonic(), 0)))


def _failed(client: ControlClient, as_json: bool) -> int:
    """The failed jobs, newest last, as the failed list printed them."""
    jobs = list(reversed(client.failed()))
    if as_json:
        entries = [
            {
                "id": j.id,
                "type": j.type,
                "handler": j.handler,
                "attempts": j.attempts,
                "error": j.error,
                "failed_at": j.finished,
                "bytes": j.size,
            }
            for j in jobs
        ]
        print(json.dumps({"failed": entries}))
        return 0
    for j in jobs:
        when = _when(j.finished if j.finished is not None else j.accepted)
        print(f"{j.id}  type {j.type}  {when}  attempts {j.attempts}  {j.error}")
    return 0


def _wait(config: Config, client: ControlClient, args: argparse.Namespace) -> int:
    """Wait for every job named (``--any``: the first) to end, a line each as it ends;
    0 when all that ended succeeded, 1 when one failed or was cancelled, 124 (with a
    line for each job still waiting) when ``--timeout`` ran out first."""
    from ipcd.client import Client
    from ipcd.client.waiting import Waiting

    waiting = Waiting(args.job_ids, client.jobs, Client(config).await_news)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    ended: list[JobInfo] = []
    for job in waiting.ended(deadline):
        ended.append(job)
        if not args.json:
            print(_ended_line(job), flush=True)
        if args.any:
            break
    if waiting.unknown:
        raise NoResultError(
            f"no job {', '.join(waiting.unknown)} in the job store (never submitted, or "
            "purged); nothing more was waited for"
        )
    timed_out = not ended if args.any else bool(waiting.pending)
    if timed_out:
        status = int(ExitCode.TIMEOUT)
    elif any(job.state != "done" for job in ended):
        status = int(ExitCode.JOB_FAILED)
    else:
        status = 0
    if args.json:
        jobs = [waiting.last[i] for i in waiting.ids]
        doc = {
            "jobs": [job._asdict() for job in jobs if job is not None],
            "ended": [job.id for job in ended],
            "pending": waiting.pending,
            "status": status,
        }
        print(json.dumps(doc))
    elif timed_out:
        for job_id in waiting.pending:
            last = waiting.last[job_id]
            print(
                f"{job_id} {_handler(last) if last else '-'} {last.state if last else '?'} "
                "(still waiting)"
            )
    if timed_out:
        what = "any of" if args.any else "all of"
        raise WaitTimeoutError(
            f"timed out after {args.timeout:g} s waiting for {what} {len(waiting.ids)} "
            "job" + _s(len(waiting.ids)) + "; they stay queued or running"
        )
    return status


def _ended_line(job: JobInfo) -> str:
    """``ID HANDLER STATE``, with the error of a job that did not succeed."""
    line = f"{job.id} {_handler(job)} {job.state}"
    if job.state != "done":
        line += f": {job.error or job.state}"
    return line


def _schedules(client: ControlClient, as_json: bool) -> int:
    """``ipcctl schedules``: one line per schedule the daemon keeps, by name."""
    found = client.schedules()
    if as_json:
        print(json.dumps({"schedules": [s._asdict() for s in found]}))
        return 0
    rows = [
        (
            s.name,
            s.handler,
            s.spec,
            _when(s.next_due),
            _when(s.last_fired),
            s.last_job or "-",
            s.last_state or "-",
            str(s.overlaps),
        )
        for s in found
    ]
    if rows:
        header = ("NAME", "HANDLER", "WHEN", "NEXT", "LAST", "LAST JOB", "STATE", "SKIPPED")
        _table([header, *rows])
    else:
        print("no schedules ([schedules.NAME] in the configuration)", file=sys.stderr)
    return 0


def print_job_log(
    config: Config, job_id: str, *, as_json: bool, color: str, finished: bool
) -> None:
    """A job's events from the log, on stdout (``result --log``, ``show``); a log that
    cannot be read is a note on stderr, not a change of the exit status."""
    from ipcd.client import logfile, logformat  # only the log readers pay for their import

    try:
        path = log_path(config)
        shows_info = logformat.level_rank(config.log.level) <= logformat.level_rank("info")
        lines = logfile.job_lines(path, job_id, finished=finished and shows_info)
    except IpcdError as exc:
        print(f"ipcctl: no log events: {exc}", file=sys.stderr)
        return
    colored = not as_json and logformat.want_color(color, sys.stdout.isatty(), os.environ)
    printer = logformat.Printer(sys.stdout, json=as_json, color=colored)
    printer.write(printer.select(lines))


def log_path(config: Config) -> Path:
    if config.log.file is None:
        raise ConfigError(f"{config.path}: no [log] file is configured, so there is no log to read")
    return config.log.file


def _events(config: Config, job_id: str) -> list[Any]:
    """``show --json``: the job's log events as objects ([] when the log is not readable)."""
    from ipcd.client import logfile

    try:
        lines = logfile.job_lines(log_path(config), job_id, finished=False)
    except IpcdError:
        return []
    events = []
    for raw in lines:
        try:
            events.append(json.loads(raw))
        except ValueError:
            continue
    return events


def _types(config: Config, names: Iterable[str]) -> list[int]:
    """Handler names or type numbers as types (UsageError, 64, for an unknown name)."""
    return [config.handler_type(name) for name in names]


def _paused_text(config: Config, paused: dict[int, float]) -> str:
    if not paused:
        return "nothing"
    if 0 in paused:
        return "every handler"
    named = []
    for type_ in sorted(paused):
        handler = config.handler_for_type(type_)
        named.append(handler.name if handler else f"type {type_}")
    return ", ".join(named)


def _expiry(job: JobInfo, now: float | None = None) -> str:
    """When a job not yet started expires (``in 12s``), ``expired`` for one cancelled so,
    ``-`` for one without an expiry or past needing one."""
    if job.state == "cancelled" and job.error == "expired":
        return "expired"
    if job.expires is None or job.state not in ("queued", "scheduled") or job.attempts:
        return "-"
    left = job.expires - (time.time() if now is None else now)
    return f"in {_age(left)}" if left > 0 else "now"


def _handler(job: JobInfo) -> str:
    return job.handler if job.handler != "-" else f"type {job.type}"


def _result_line(job: JobInfo, result: StoredResult | None) -> str:
    if result is None:
        if job.result_size:
            return f"{_size(job.result_size)}, not kept (over [store] max_result)"
        return "-"
    return f"{_kind_name(result.kind)}, {_size(len(result.data))}"


def _print_result_data(result: StoredResult | None) -> None:
    if result is None or not result.data:
        return
    if result.kind == Kind.BYTES:
        print(f"  {result.data[:32].hex()}{'...' if len(result.data) > 32 else ''}")
        return
    text = result.data.decode("utf-8", "replace")
    for line in text.splitlines():
        print(f"  {line}")


def _result_json(result: StoredResult | None) -> dict[str, Any] | None:
    """As ``result --json`` shows data: text, a JSON value, or hex for bytes."""
    if result is None:
        return None
    doc: dict[str, Any] = {"kind": _kind_name(result.kind)}
    if result.kind == Kind.TEXT:
        doc["output"] = result.data.decode("utf-8", "replace")
    elif result.kind == Kind.JSON:
        try:
            doc["output"] = json.loads(result.data)
        except ValueError:
            doc["output_hex"] = result.data.hex()
    else:
        doc["output_hex"] = result.data.hex()
    return doc


def _output_line(output: Output | None) -> str:
    if output is None:
        return "-"
    kept = f"{_size(output.size)}" + (
        f", the last {_size(len(output.data))} kept" if len(output.data) < output.size else ""
    )
    return kept + (" so far" if output.live else "")


def _output_json(output: Output | None) -> dict[str, Any] | None:
    if output is None:
        return None
    return {
        "output": output.data.decode("utf-8", "replace"),
        "size": output.size,
        "offset": output.offset,
        "progress": output.fraction,
        "message": output.message,
        "live": output.live,
    }


def _progress_line(fraction: float | None, message: str | None) -> str:
    if fraction is None:
        return "-"
    return Progress(fraction, message or "").text()


def _progress_of(output: Output | None) -> tuple[float | None, str]:
    return (None, "") if output is None else (output.fraction, output.message)


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"


def _say(as_json: bool, doc: dict[str, Any], text: str) -> None:
    print(json.dumps(doc) if as_json else text)


def _when(moment: float | None) -> str:
    if moment is None or moment <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def _age(seconds: float) -> str:
    seconds = max(seconds, 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{count}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}GiB"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)


def _s(count: int) -> str:
    return "" if count == 1 else "s"
