"""``ipcctl status`` and ``ipcctl stats``: render a reading (ipcd.client.metrics), once or like
top(1) with ``--watch``.

Exit statuses: 0 when a live daemon serves the queue, 69 when not (the output is still
printed), except ``stats --prometheus``, which exits 0 whenever it printed something, so
that a textfile written by a timer always holds ``ipcd_up`` (0 then).  ``--watch`` exits
0 on Ctrl-C whatever it showed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from ipcd.cli import end_on_sigterm
from ipcd.client import Client, metrics
from ipcd.client.metrics import Rate, Reading, count, figure
from ipcd.errors import ExitCode, NotRunningError, OutputError
from ipcd.wire.control import Progress

#: ANSI: cursor home, clear the screen: once, before the first frame.
CLEAR = "\x1b[H\x1b[2J"
#: ANSI: cursor home; the next frame overwrites the last in place, so it does not flicker.
HOME = "\x1b[H"
#: ANSI: clear to the end of the line (after each line of a frame: the last frame's line
#: may have been longer) and to the end of the screen (after the frame).
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"

Render = Callable[[Reading, Reading | None], str]


def status_text(reading: Reading, previous: Reading | None = None) -> str:
    """The ``ipcctl status`` lines for one reading (``previous``: the last frame's)."""
    status = reading.status
    if status is None:
        return f"daemon     not reachable: {reading.error}"
    q, header = status.queue, status.results
    lines = [
        f"queue      {status.keys.jobs:#010x}: {count(q.messages, 'message')}, "
        f"{q.bytes} of {count(q.max_bytes, 'byte')}, mode {q.mode:#o}"
    ]
    if header is not None:
        lines.append(
            f"results    {min(header.next_seq, header.slot_count)} of {header.slot_count} "
            f"slots used, {header.ok_count} ok / {header.error_count} errors since created"
        )
    if header is None or not reading.up:
        lines.append("daemon     not running (jobs wait in the queue for the next start)")
        return "\n".join(lines)
    now = reading.taken
    lines.append(f"daemon     pid {header.daemon_pid}, up {now - header.started:.0f}s")
    for w in status.workers:
        doing = f"job {w.job_id} for {now - w.started:.1f}s" if w.job_id else "idle"
        progress = reading.progress(w.job_id) if w.job_id else None
        if progress is not None:
            doing += f" ({progress.text()})"
        lines.append(f"worker     pid {w.pid}: {doing}, {count(w.jobs_done, 'job')} done")
    if status.spill is not None:
        lines.append(f"spill      {metrics.spill_text(status.spill)}")
    lines.extend(metrics.store_text(reading))
    snap = reading.stats
    if snap is not None:
        lines.append(
            f"counts     {snap.total('ok')} ok, {snap.total('error')} failed, "
            f"{snap.total('retried')} retried, {snap.total('rejected')} rejected, "
            f"{count(snap.master['worker_restarts'], 'worker restart')} since start"
        )
    rate = metrics.job_rate(reading, previous)
    if rate is not None:
        lines.append(f"rate       {figure(rate.per_second)} jobs/s {_over(rate)}")
    return "\n".join(lines)


def _over(rate: Rate) -> str:
    if rate.over == "interval":
        return f"over the last {rate.seconds:.1f}s"
    return "since start"


def status_doc(reading: Reading, previous: Reading | None = None) -> dict[str, object]:
    """``ipcctl status --json``."""
    status = reading.status
    if status is None:
        return {"daemon": {"running": False}, "error": reading.error}
    header = status.results
    q = status.queue
    now = reading.taken
    daemon: dict[str, object] = {"running": reading.up}
    if header is not None and reading.up:
        daemon.update(pid=header.daemon_pid, uptime_s=round(now - header.started, 3))
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
    snap = reading.stats
    counts: dict[str, int] | None = None
    if snap is not None:
        counts = {outcome: snap.total(outcome) for outcome in ("ok", "error", "retried")}
        counts["rejected"] = snap.total("rejected")
        counts["worker_restarts"] = snap.master["worker_restarts"]
    rate = metrics.job_rate(reading, previous) if reading.up else None
    return {
        "workers": [
            {
                "pid": w.pid,
                "state": "busy" if w.job_id else "idle",
                "job_id": w.job_id or None,
                "running_s": round(now - w.started, 3) if w.job_id else None,
                "jobs_done": w.jobs_done,
                "progress": _progress_doc(reading.progress(w.job_id)) if w.job_id else None,
            }
            for w in status.workers
        ],
        "store": metrics.store_doc(reading),
        "store_error": reading.store_error or None,
        "key": f"{status.keys.jobs:#010x}",
        "queue": {
            "messages": q.messages,
            "bytes": q.bytes,
            "max_bytes": q.max_bytes,
            "mode": f"{q.mode:#o}",
        },
        "results": results,
        "spill": None if status.spill is None else metrics.spill_doc(status.spill),
        "daemon": daemon,
        "counts": counts,
        "rate": None
        if rate is None
        else {
            "jobs_per_second": round(rate.per_second, 6),
            "over": rate.over,
            "seconds": round(rate.seconds, 3),
        },
    }


def _progress_doc(progress: Progress | None) -> dict[str, object] | None:
    return None if progress is None else progress._asdict()


def show_status(client: Client, *, as_json: bool, watch: float | None) -> int:
    """``ipcctl status [--json] [--watch [S]]``."""
    if as_json:

        def render(reading: Reading, previous: Reading | None) -> str:
            return json.dumps(status_doc(reading, previous))
    else:
        render = status_text
    if watch is not None:
        return watch_loop(client, render, watch, sys.stdout, frames=not as_json)
    reading = _read_once(client)
    print(render(reading, None))
    return _code(reading)


def show_stats(client: Client, *, as_json: bool, prometheus: bool, output: str | None) -> int:
    """``ipcctl stats [--json | --prometheus] [--output FILE]``."""
    reading = metrics.read(client)
    client.close()
    if prometheus:
        text = metrics.prometheus(reading)
    elif as_json:
        text = json.dumps(metrics.stats_doc(reading)) + "\n"
    else:
        if reading.status is None:
            raise NotRunningError(reading.error)
        text = "\n".join(metrics.stats_text(reading)) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomically(Path(output), text)
    return 0 if prometheus else _code(reading)


def _read_once(client: Client) -> Reading:
    reading = metrics.read(client)
    client.close()
    if reading.status is None:
        raise NotRunningError(reading.error)
    return reading


def _code(reading: Reading) -> int:
    return int(ExitCode.OK) if reading.up else int(ExitCode.UNAVAILABLE)


def watch_loop(
    client: Client, render: Render, interval: float, out: TextIO, *, frames: bool = True
) -> int:
    """Show a reading every ``interval`` seconds until Ctrl-C or SIGTERM, which exit 0.

    On a terminal each frame is drawn over the last with ANSI codes: the screen is cleared
    once, then each frame starts at the top-left corner and clears what the last left
    beyond its lines, so the screen never goes blank between frames (no flicker).  Into a
    pipe or file, frames follow each other separated by a blank line, each starting with
    the time it was taken (or, for JSON, one document per line).  The objects are opened
    anew for each frame, so a restarted daemon is picked up, and detached after it.
    """
    end_on_sigterm()
    tty = out.isatty()
    previous: Reading | None = None
    first = True
    try:
        while True:
            reading = metrics.read(client)
            client.close()
            text = render(reading, previous)
            if tty:
                drawn = "".join(f"{line}{CLEAR_LINE}\n" for line in text.split("\n"))
                out.write((CLEAR if first else "") + HOME + drawn + CLEAR_BELOW)
            elif frames:
                taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(reading.taken))
                out.write(("" if first else "\n") + f"time       {taken}\n{text}\n")
            else:
                out.write(text + "\n")
            out.flush()
            first = False
            previous = reading
            time.sleep(interval)
    except KeyboardInterrupt:
        return int(ExitCode.OK)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place, so a
    reader (node_exporter's textfile collector) never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
