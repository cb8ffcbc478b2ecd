"""What ``ipcctl stats`` and ``ipcctl status`` show: one reading of the daemon's objects,
and its renderings (text, JSON, the Prometheus text exposition format).

A reading looks at the daemon's objects from the outside, like everything ``ipcctl``
does: the queue's ``msqid_ds``, the result, in-flight and failed segments through
ipcd.client's ``Client.status``, and the counters of the stats segment (ipcd.tables.stats).
That part works while the daemon is stopped (``ipcd_up 0``) and costs it nothing.  Only
the job store's counts per state and the paused handlers are asked of the daemon (through
its control socket), since only the daemon opens the store: a reading of a stopped daemon
has none.  The rendering functions are pure: a reading in, text out.
"""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

from ipcd.client import Client, Status
from ipcd.errors import IpcdError, NotRunningError
from ipcd.layout.stats import NO_HANDLER
from ipcd.tables.spill.table import Usage
from ipcd.tables.stats import OUTCOMES, HandlerTotals, Snapshot, StatsSegment
from ipcd.wire.control import MAX_LIMIT, LimitInfo, Progress

#: How the counts of jobs no configured handler ran (the stats segment's column 0: an
#: unknown message type, a message that could not be decoded, a handler a reload added
#: beyond the segment's room) are labelled: not "-", which reads as a missing value, and
#: with no type number, as they are many types at once (their job.done events name each).
NO_HANDLER_LABEL = "(none)"
NO_TYPE_LABEL = "(unknown)"


def handler_labels(h: HandlerTotals) -> dict[str, str]:
    """A handler's Prometheus labels: its name (``handler``) and message type (``type``)."""
    if h.name == NO_HANDLER:
        return {"handler": NO_HANDLER_LABEL, "type": NO_TYPE_LABEL}
    return {"handler": h.name, "type": str(h.type)}


class StoreReading(NamedTuple):
    """What the daemon says of its job store (through the control socket)."""

    #: Jobs per state (queued, scheduled, running, done, failed, cancelled).
    counts: dict[str, int]
    #: Paused message types and since when (type 0: everything).
    paused: dict[int, float]
    #: The limited handlers' limits and use (asked only when the configuration has some).
    limits: tuple[LimitInfo, ...] = ()
    #: The running jobs' last ``job.progress()`` by job id (asked only when a worker
    #: runs a job).
    progress: tuple[tuple[str, Progress], ...] = ()


class Reading(NamedTuple):
    """Everything one look at the daemon's objects found."""

    #: None when the job queue itself is missing (``error`` says why).
    status: Status | None
    #: None when there is no stats segment (a daemon older than it, or never started).
    stats: Snapshot | None
    #: When the look was taken: Unix time, and monotonic for rates.
    taken: float
    monotonic: float
    error: str = ""
    #: None when the daemon is down or did not answer (``store_error`` says why).
    store: StoreReading | None = None
    store_error: str = ""

    #: The configuration's handler names by type (for paused handlers).
    names: tuple[tuple[int, str], ...] = ()

    @property
    def up(self) -> bool:
        return self.status is not None and self.status.daemon_running()

    def handler_name(self, type_: int) -> str:
        return dict(self.names).get(type_, str(type_))

    def progress(self, job_id: str) -> Progress | None:
        """A running job's last ``job.progress()``, when the daemon said it."""
        return None if self.store is None else dict(self.store.progress).get(job_id)


def read(client: Client) -> Reading:
    """Look at every object once; a missing queue or segment is part of the answer."""
    now, mono = time.time(), time.monotonic()
    try:
        status = client.status()
    except NotRunningError as exc:
        return Reading(None, None, now, mono, str(exc))
    snap = None
    try:
        segment = StatsSegment.open(client.keys.stats)
    except NotRunningError:
        pass
    else:
        try:
            snap = segment.snapshot()
        finally:
            segment.segment.close()
    reading = Reading(status, snap, now, mono)
    if not reading.up:
        return reading
    names = tuple((h.type, h.name) for h in client.config.handlers)
    return reading._replace(names=names, **_store_reading(client, status))


def _store_reading(client: Client, status: Status) -> dict[str, Any]:
    """The job store's counts and paused handlers, asked of the daemon; the limits of
    limited handlers and the progress of running jobs when there are some."""
    from ipcd.client.control import ControlClient

    try:
        control = ControlClient(client.config.control_socket, timeout=5.0)
        limited = any(h.concurrency is not None or h.rate for h in client.config.handlers)
        limits = tuple(control.limits()) if limited else ()
        progress: tuple[tuple[str, Progress], ...] = ()
        if any(w.job_id for w in status.workers):
            found = control.list_more(states=("running",), limit=MAX_LIMIT)[2]
            progress = tuple(found.items())
        return {"store": StoreReading(control.counts(), control.paused(), limits, progress)}
    except IpcdError as exc:
        return {"store_error": str(exc)}


def store_doc(reading: Reading) -> dict[str, object] | None:
    """The job store's counts per state and the paused handlers, for ``--json`` (None
    when the daemon did not answer)."""
    if reading.store is None:
        return None
    return {
        "jobs": reading.store.counts,
        "paused": [
            {"type": t, "handler": "*" if t == 0 else reading.handler_name(t), "since": s}
            for t, s in sorted(reading.store.paused.items())
        ],
        "limits": [
            {"handler": reading.handler_name(limit.type), **limit._asdict()}
            for limit in reading.store.limits
        ],
    }


def store_text(reading: Reading) -> list[str]:
    """The job store's lines: jobs per state, and what is paused (or why the store did
    not answer)."""
    store = reading.store
    if store is None:
        return [f"store      no answer: {reading.store_error}"]
    c = store.counts
    lines = [
        f"jobs       {c.get('queued', 0)} queued, {c.get('scheduled', 0)} delayed or "
        f"waiting to retry, {c.get('running', 0)} running, {c.get('done', 0)} done, "
        f"{c.get('failed', 0)} failed, {c.get('cancelled', 0)} cancelled (job store)"
    ]
    if store.paused:
        lines.append(f"paused     {', '.join(_paused_names(reading))}")
    lines += [f"limit      {limit_text(reading, limit)}" for limit in store.limits]
    return lines


def limit_text(reading: Reading, limit: LimitInfo) -> str:
    """One limited handler: ``report: 1 of 1 running, 3 queued, rate 10/min (burst 1, 0
    tokens)``."""
    running = f"{limit.running} of {limit.concurrency}" if limit.concurrency else limit.running
    text = f"{reading.handler_name(limit.type)}: {running} running, {limit.queued} queued"
    if limit.rate is not None:
        text += (
            f", rate {rate_text(limit.rate)} (burst {limit.burst}, "
            f"{count(limit.tokens or 0, 'token')} now)"
        )
    return text


def rate_text(per_second: float) -> str:
    """A rate as the configuration spells it, in the unit that shows it whole if any."""
    for unit, seconds in (("s", 1), ("min", 60), ("h", 3600)):
        value = per_second * seconds
        if value >= 1 and abs(value - round(value)) < 1e-6:
            return f"{round(value)}/{unit}"
    return f"{per_second * 3600:.6g}/h"


def _paused_names(reading: Reading) -> list[str]:
    """The paused handlers by name where the configuration knows them (0: everything)."""
    assert reading.store is not None
    names = []
    for type_, since in sorted(reading.store.paused.items()):
        when = time.strftime("%H:%M:%S", time.localtime(since))
        what = "everything" if type_ == 0 else reading.handler_name(type_)
        names.append(f"{what} (since {when})")
    return names


def spill_doc(spill: Usage) -> dict[str, int]:
    """The spill table's use, for ``--json``."""
    return {
        "slots": spill.slots,
        "used": spill.used,
        "results": spill.results,
        "payloads": spill.payloads,
        "failed": spill.failed,
        "bytes": spill.bytes,
        "result_bytes": spill.result_bytes,
        "evicted": spill.evicted,
        "spares": spill.spares,
        "spare_bytes": spill.spare_bytes,
        "pool_bytes": spill.pool_bytes,
    }


def spill_text(spill: Usage) -> str:
    """The spill table's use in one line."""
    return (
        f"{spill.used} of {spill.slots} slots used ({spill.results} results, "
        f"{spill.payloads} payloads, {spill.failed} failed), {spill.bytes} bytes; "
        f"{spill.evicted} results evicted for room; pool: {spill.spares} spare segments, "
        f"{spill.spare_bytes} of {spill.pool_bytes} bytes"
    )


class Rate(NamedTuple):
    """Jobs finished per second, and over what span."""

    per_second: float
    seconds: float
    #: "start" (since the counting started) or "interval" (since the previous reading).
    over: str


def job_rate(current: Reading, previous: Reading | None = None) -> Rate | None:
    """Over the last interval when there is a previous reading, else since the start."""
    if current.stats is None:
        return None
    if previous is not None and previous.stats is not None:
        span = current.monotonic - previous.monotonic
        done = current.stats.finished - previous.stats.finished
        if span > 0 and done >= 0 and previous.stats.created == current.stats.created:
            return Rate(done / span, span, "interval")
    span = current.taken - current.stats.created
    if span <= 0:
        return None
    return Rate(current.stats.finished / span, span, "start")


# --- the Prometheus text exposition format ---------------------------------------------


def _label(value: str) -> str:
    """A label value, escaped as the exposition format asks (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")

    def gauge(self, name: str, help_: str, value: float) -> None:
        self.family(name, "gauge", help_)
        self.sample(name, value)

    def counter(self, name: str, help_: str, value: float) -> None:
        self.family(name, "counter", help_)
        self.sample(name, value)


def prometheus(reading: Reading) -> str:
    """The reading in the Prometheus text format (version 0.0.4), for node_exporter's
    textfile collector.  Counters are cumulative since the daemon started."""
    out = _Exposition()
    out.gauge("ipcd_up", "1 if a live ipcd daemon serves the queue, else 0.", int(reading.up))
    status = reading.status
    if status is None:
        return "\n".join(out.lines) + "\n"
    header = status.results
    if reading.up and header is not None:
        out.gauge(
            "ipcd_start_time_seconds", "When the daemon started, in Unix time.", header.started
        )
    q = status.queue
    out.gauge("ipcd_queue_messages", "Jobs waiting in the job queue.", q.messages)
    out.gauge("ipcd_queue_bytes", "Bytes of the jobs waiting in the job queue.", q.bytes)
    out.gauge("ipcd_queue_max_bytes", "Capacity of the job queue in bytes.", q.max_bytes)
    busy = sum(1 for w in status.workers if w.job_id)
    out.gauge("ipcd_workers", "Live worker processes.", len(status.workers))
    out.gauge("ipcd_workers_busy", "Workers running a job.", busy)
    if header is not None:
        used = min(header.next_seq, header.slot_count)
        out.gauge("ipcd_results_slots", "Slots of the result segment.", header.slot_count)
        out.gauge("ipcd_results_slots_used", "Slots of the result segment holding a result.", used)
    out.gauge(
        "ipcd_failed_jobs",
        "Jobs on the failed list in shared memory (the job store's failed jobs, bounded "
        "by [jobs] failed_size).",
        status.failed,
    )
    if reading.store is not None:
        out.family(
            "ipcd_store_jobs",
            "gauge",
            "Jobs in the job store by state: queued, scheduled (delayed or waiting to "
            "retry), running, done, failed, cancelled.",
        )
        for state, jobs in reading.store.counts.items():
            out.sample("ipcd_store_jobs", jobs, state=state)
        out.gauge(
            "ipcd_handlers_paused",
            "Pauses in force (ipcctl pause): one per paused handler, one for a pause of all.",
            len(reading.store.paused),
        )
    spill = status.spill
    if spill is not None:
        out.gauge(
            "ipcd_spill_slots", "Entries of the spill table ([jobs] spill_slots).", spill.slots
        )
        out.gauge(
            "ipcd_spill_slots_used",
            "Entries of the spill table naming a large payload or result.",
            spill.used,
        )
        out.gauge("ipcd_spill_bytes", "Bytes in large payloads and results.", spill.bytes)
        out.gauge(
            "ipcd_spill_spare_bytes",
            "Bytes of spare segments kept for large results ([results] pool_bytes).",
            spill.spare_bytes,
        )
        out.counter(
            "ipcd_spill_evicted_total",
            "Large results evicted from the spill table to make room.",
            spill.evicted,
        )
    snap = reading.stats
    if snap is None:
        return "\n".join(out.lines) + "\n"
    _counters(out, snap)
    return "\n".join(out.lines) + "\n"


def _counters(out: _Exposition, snap: Snapshot) -> None:
    out.family(
        "ipcd_jobs_total",
        "counter",
        "Jobs by handler and outcome: ok and error are final results, retried an attempt "
        "that asked for another run, rejected a message that could not be decoded.",
    )
    for h in snap.handlers:
        for outcome in OUTCOMES:
            out.sample("ipcd_jobs_total", h.outcomes[outcome], **handler_labels(h), outcome=outcome)
    out.family(
        "ipcd_job_duration_seconds",
        "histogram",
        "How long the jobs workers finished took, from receipt to result.",
    )
    for h in snap.handlers:
        labels = handler_labels(h)
        running = 0
        for bound, count in zip((*snap.bounds, math.inf), h.buckets, strict=True):
            running += count
            out.sample("ipcd_job_duration_seconds_bucket", running, **labels, le=_le(bound))
        out.sample("ipcd_job_duration_seconds_sum", h.seconds, **labels)
        out.sample("ipcd_job_duration_seconds_count", running, **labels)
    m = snap.master
    out.counter(
        "ipcd_worker_restarts_total",
        "Workers that died without being asked to (and were replaced).",
        m["worker_restarts"],
    )
    out.counter("ipcd_workers_started_total", "Workers forked.", m["workers_started"])
    out.counter(
        "ipcd_jobs_recovered_total",
        "Jobs found held by a dead worker and finished or run again by the master.",
        m["jobs_recovered"],
    )
    out.counter(
        "ipcd_jobs_requeued_total",
        "Jobs the master put back for another run after their worker died or at stop.",
        m["jobs_requeued"],
    )
    out.counter("ipcd_reloads_total", "Configuration reloads.", m["reloads"])
    out.counter(
        "ipcd_log_events_dropped_total",
        "Log events the log file refused (a full disk, a quota, an I/O error); jobs ran on.",
        m["log_dropped"],
    )
    out.counter(
        "ipcd_results_lost_total",
        "Results of jobs that ran but could not be kept: the result segment was removed or "
        "overwritten by another program.",
        m["results_lost"],
    )
    out.counter(
        "ipcd_store_errors_total",
        "Writes the job store refused (full disk, read-only, corrupt); jobs waited in the "
        "kernel queue meanwhile.",
        m["store_errors"],
    )
    out.gauge(
        "ipcd_stats_created_seconds",
        "When the counters started at zero (the daemon's start), in Unix time.",
        snap.created,
    )


def figure(value: float) -> str:
    """A measured number for people: three significant digits and never an exponent
    (``2830``, ``28.3``, ``0.283``, ``0.00283``), where ``:.3g`` would print ``2.83e+03``."""
    if value == 0 or not math.isfinite(value) or abs(value) >= 100:
        return f"{value:.0f}"
    digits = min(6, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def count(number: int, noun: str, plural: str | None = None) -> str:
    """``1 reload``, ``2 reloads``: a number and its noun in the number's grammatical form."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


# --- JSON and text --------------------------------------------------------------------


def stats_doc(reading: Reading) -> dict[str, object]:
    """``ipcctl stats --json``."""
    doc: dict[str, object] = {"up": reading.up}
    status = reading.status
    if status is None:
        doc["error"] = reading.error
        return doc
    q = status.queue
    doc["queue"] = {"messages": q.messages, "bytes": q.bytes, "max_bytes": q.max_bytes}
    doc["workers"] = len(status.workers)
    doc["workers_busy"] = sum(1 for w in status.workers if w.job_id)
    if status.results is not None:
        doc["results_slots"] = status.results.slot_count
        doc["results_slots_used"] = min(status.results.next_seq, status.results.slot_count)
        if reading.up:
            doc["start_time"] = status.results.started
    doc["failed"] = status.failed
    doc["store"] = store_doc(reading)
    doc["store_error"] = reading.store_error or None
    if status.spill is not None:
        doc["spill"] = spill_doc(status.spill)
    snap = reading.stats
    if snap is not None:
        doc["counted_since"] = snap.created
        doc["jobs"] = {
            handler_labels(h)["handler"]: {
                "type": None if h.name == NO_HANDLER else h.type,
                **h.outcomes,
                "seconds": h.seconds,
                "buckets": _cumulative(snap.bounds, h.buckets),
            }
            for h in snap.handlers
        }
        doc["master"] = snap.master
    return doc


def _cumulative(bounds: tuple[float, ...], buckets: tuple[int, ...]) -> dict[str, int]:
    out, running = {}, 0
    for bound, count in zip((*bounds, math.inf), buckets, strict=True):
        running += count
        out[_le(bound)] = running
    return out


def stats_text(reading: Reading) -> list[str]:
    """``ipcctl stats``: a table of the counters, and the gauges."""
    status = reading.status
    if status is None:
        return [f"daemon     not reachable: {reading.error}"]
    lines = []
    header = status.results
    if reading.up and header is not None:
        lines.append(
            f"daemon     pid {header.daemon_pid}, up {reading.taken - header.started:.0f}s"
        )
    else:
        lines.append("daemon     not running (jobs wait in the queue for the next start)")
    q = status.queue
    lines.append(
        f"queue      {count(q.messages, 'message')}, {q.bytes} of {count(q.max_bytes, 'byte')}"
    )
    busy = sum(1 for w in status.workers if w.job_id)
    lines.append(f"workers    {len(status.workers)} live, {busy} busy")
    if reading.up:
        lines.extend(store_text(reading))
    lines.append(f"failed     {count(status.failed, 'job')} on the failed list in shared memory")
    if status.spill is not None:
        lines.append(f"spill      {spill_text(status.spill)}")
    snap = reading.stats
    if snap is None:
        lines.append("counters   none (no stats segment)")
        return lines
    m = snap.master
    lines.append(
        f"master     {count(m['workers_started'], 'worker')} started, "
        f"{count(m['worker_restarts'], 'restart')}, "
        f"{count(m['jobs_recovered'], 'job')} recovered, {m['jobs_requeued']} requeued, "
        f"{count(m['reloads'], 'reload')}"
    )
    lines.append(
        f"lost       {count(m['log_dropped'], 'log event')} dropped (log file not writable), "
        f"{count(m['results_lost'], 'result')} lost (result segment damaged), "
        f"{count(m['store_errors'], 'store error')}"
    )
    # A stopped daemon finishes nothing: an average since its start would only decay.
    rate = job_rate(reading) if reading.up else None
    if rate is not None:
        lines.append(f"rate       {figure(rate.per_second)} jobs/s since the start")
    else:
        lines.append("rate       -")
    lines.append("")
    lines.append(
        f"{'handler':<16} {'ok':>9} {'error':>9} {'retried':>9} {'rejected':>9} {'mean ms':>9}"
    )
    for h in snap.handlers:
        timed = sum(h.buckets)
        mean = figure(1000 * h.seconds / timed) if timed else "-"
        o = h.outcomes
        name = handler_labels(h)["handler"]
        lines.append(
            f"{name[:16]:<16} {o['ok']:>9} {o['error']:>9} {o['retried']:>9} "
            f"{o['rejected']:>9} {mean:>9}"
        )
    return lines
