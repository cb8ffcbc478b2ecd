"""The control socket's protocol: one JSON request line in, one JSON answer out.

``ipcctl list``, ``cancel``, ``pause`` and the other operator commands ask the daemon,
which alone opens the job store (ipcd.daemon.control serves them; ipcd.client.control
asks).  One request per connection: the client writes one line of JSON, at most
:data:`MAX_REQUEST` bytes with its newline, and the daemon answers with one JSON object of
any length and closes the connection.  An answer is ``{"ok": true, ...}`` with the op's
fields, or ``{"ok": false, "error": "...", "status": N}`` where N is the exit status of
ipcd.errors that ``ipcctl`` exits with.

Pure: no sockets, and no ipcd.store either (that would tie the lean client to sqlite3).
A job record crosses the socket as a plain dict of :class:`JobInfo`'s fields, which are
the store's ``JobRecord`` fields by name, with the state as its string value.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from ipcd.errors import ControlError, UsageError
from ipcd.wire.protocol import MAX_TYPE, is_job_id

#: The largest request, its newline included (a cancel of a thousand ids fits easily).
MAX_REQUEST = 64 * 1024
#: Bytes an AF_UNIX socket path may have (sun_path is 108 bytes with its NUL).
MAX_SOCKET_PATH = 107
#: Every state a job can be in, as the store names them (``ipcd.store.State`` values).
STATES = ("queued", "scheduled", "running", "done", "failed", "cancelled")
#: What ``cancel`` takes without ``kill``: jobs that wait (``kill`` adds running ones).
WAITING = ("queued", "scheduled")
#: What ``purge`` removes: jobs whose outcome is final.
FINAL = ("done", "failed", "cancelled")
#: The most records one ``list`` or ``failed`` answer carries.
MAX_LIMIT = 100_000
#: The most jobs one ``jobs`` request names (``ipcctl wait``).
MAX_IDS = 1000


class Request(NamedTuple):
    """One control request.  Which fields an op reads is :data:`FIELDS`."""

    op: str
    id: str = ""
    ids: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    types: tuple[int, ...] = ()
    unique: str | None = None
    limit: int = 50
    kill: bool = False
    older_than: float | None = None
    #: ``tail``: the first byte of the job's output wanted.
    offset: int = 0


#: The fields each op takes; any other field in a request is refused (a typo, or a
#: client newer than the daemon: better an error than a field silently ignored).
FIELDS: dict[str, tuple[str, ...]] = {
    "list": ("states", "types", "unique", "limit"),
    "show": ("id",),
    "result": ("id",),
    "cancel": ("ids", "types", "states", "kill"),
    "pause": ("types",),
    "resume": ("types",),
    "paused": (),
    "running": ("types",),
    "purge": ("states", "older_than"),
    "failed": ("limit",),
    "retry": ("id",),
    "counts": (),
    "jobs": ("ids",),
    "schedules": (),
    "limits": (),
    "tail": ("id", "offset"),
}


class JobInfo(NamedTuple):
    """A job's record as the store keeps it (``ipcd.store.JobRecord``, field by field)."""

    id: str
    type: int
    handler: str
    state: str
    attempts: int
    priority: int
    unique: str | None
    submitted: float
    accepted: float
    due: float
    started: float | None
    finished: float | None
    sender_pid: int
    sender_uid: int | None
    reply_to: int | None
    timeout: float | None
    bare: bool
    size: int
    preview: str
    worker_pid: int | None
    error: str | None
    result_kind: int | None
    result_size: int | None
    #: Not started by then, the job is cancelled as expired; None: no expiry.
    expires: float | None = None
    #: The jobs it was submitted to wait for (``--after``).
    after: tuple[str, ...] = ()


class Progress(NamedTuple):
    """A job's last ``job.progress()``: ``list`` gives the running jobs' beside their
    records, ``show`` and ``tail`` give it with the output."""

    fraction: float
    message: str

    def text(self) -> str:
        """As ``list``, ``status`` and ``tail`` show it: ``40% message``."""
        return f"{self.fraction * 100:.0f}%{' ' + self.message if self.message else ''}"


class StoredResult(NamedTuple):
    """A finished job's result data as the store keeps it: kind (ipcd.layout.results.Kind)
    and bytes."""

    kind: int
    data: bytes


class Output(NamedTuple):
    """What a job wrote to stdout and stderr (``show``, ``tail``): the bytes from
    ``offset`` on of the ``size`` it wrote in all, and its last progress."""

    data: bytes
    size: int
    offset: int
    fraction: float | None
    message: str
    #: True: read from the running job's run file; False: as the store kept it.
    live: bool


class Tail(NamedTuple):
    """``tail``: the job's state (and error), and its output from the offset asked for."""

    state: str
    error: str | None
    #: None: nothing to show yet (not begun, or ended and not yet recorded), or it
    #: ended having written nothing.
    output: Output | None
    #: The attempt the output is of: a new attempt writes its output afresh, from 0.
    attempts: int = 0


class JobDetail(NamedTuple):
    """``show`` and ``result``: the record and its stored result, if any."""

    job: JobInfo
    result: StoredResult | None
    #: The jobs it still waits for (held, ``--after``).
    waits: tuple[str, ...] = ()
    #: What it wrote (``show``; None: nothing, or a daemon older than captured output).
    output: Output | None = None


class Skipped(NamedTuple):
    """A job ``cancel`` named that was not cancelled, and its state (None: unknown id)."""

    id: str
    state: str | None


class Cancelled(NamedTuple):
    """What ``cancel`` did: the records as they were, the running jobs whose worker was
    killed, and the named jobs it left alone."""

    jobs: list[JobInfo]
    killed: list[str]
    skipped: list[Skipped]


# --- requests ---------------------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    """The request as one line; UsageError (64) when it is not a valid one."""
    check(request)
    doc: dict[str, Any] = {"op": request.op}
    for name in FIELDS[request.op]:
        value = getattr(request, name)
        doc[name] = list(value) if isinstance(value, tuple) else value
    line = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
    if len(line) > MAX_REQUEST:
        raise UsageError(f"control request of {len(line)} bytes is over {MAX_REQUEST} bytes")
    return line


def decode_request(line: bytes) -> Request:
    """A request read from the socket, validated; UsageError (64) says what is wrong."""
    try:
        doc = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"control request is not a JSON line: {str(exc)[:80]}") from None
    if not isinstance(doc, dict):
        raise UsageError("control request is not a JSON object")
    op = doc.pop("op", None)
    if not isinstance(op, str) or op not in FIELDS:
        raise UsageError(f"unknown control op {str(op)[:40]!r} (known: {', '.join(FIELDS)})")
    unknown = sorted(set(doc) - set(FIELDS[op]))
    if unknown:
        raise UsageError(f"control op {op!r} takes no field {unknown[0][:40]!r}")
    fields: dict[str, Any] = {}
    for name, value in doc.items():
        fields[name] = _field(name, value)
    request = Request(op, **fields)
    check(request)
    return request


def _field(name: str, value: object) -> object:
    """One field's value in its Python shape, or UsageError naming the field."""
    if name in ("ids", "states"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"control field {name!r} must be a list of strings")
        return tuple(value)
    if name == "types":
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise UsageError("control field 'types' must be a list of integers")
        return tuple(value)
    if name == "id":
        if not isinstance(value, str):
            raise UsageError("control field 'id' must be a string")
        return value
    if name == "unique":
        if value is not None and not isinstance(value, str):
            raise UsageError("control field 'unique' must be a string or null")
        return value
    if name == "limit":
        if not _is_int(value):
            raise UsageError("control field 'limit' must be an integer")
        return value
    if name == "offset":
        if not _is_int(value) or value < 0:  # type: ignore[operator]
            raise UsageError("control field 'offset' must be an integer, not negative")
        return value
    if name == "kill":
        if not isinstance(value, bool):
            raise UsageError("control field 'kill' must be true or false")
        return value
    # older_than
    if value is not None and not (_is_int(value) or isinstance(value, float)):
        raise UsageError("control field 'older_than' must be a number of seconds or null")
    return None if value is None else float(value)  # type: ignore[arg-type]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(request: Request) -> None:
    """Whether the request's values make sense for its op; UsageError (64) if not."""
    op = request.op
    if op not in FIELDS:
        raise UsageError(f"unknown control op {op[:40]!r}")
    named = (request.id,) if op in ("show", "result", "retry", "tail") else ()
    for job_id in named + request.ids:
        if not is_job_id(job_id):
            raise UsageError(
                f"{job_id[:40]!r} is not a job id (1 to 16 characters of 0-9, A-Z, a-z, _, . and -)"
            )
    for type_ in request.types:
        if not 1 <= type_ <= MAX_TYPE:
            raise UsageError(f"message type {type_} is out of range 1..{MAX_TYPE}")
    allowed = {"cancel": WAITING, "purge": FINAL}.get(op, STATES)
    for state in request.states:
        if state not in allowed:
            raise UsageError(f"{op}: state {state[:40]!r} is not one of {', '.join(allowed)}")
    if not 1 <= request.limit <= MAX_LIMIT:
        raise UsageError(f"limit {request.limit} is out of range 1..{MAX_LIMIT}")
    if request.older_than is not None and not (
        math.isfinite(request.older_than) and request.older_than >= 0
    ):
        raise UsageError("older_than must be a finite number of seconds, not negative")
    if op == "cancel" and not (request.ids or request.types):
        raise UsageError("cancel needs job ids or types")
    if op == "jobs" and not 1 <= len(request.ids) <= MAX_IDS:
        raise UsageError(f"jobs needs 1 to {MAX_IDS} job ids, not {len(request.ids)}")
    if op == "purge" and not request.states:
        raise UsageError(f"purge needs states ({', '.join(FINAL)})")


# --- answers ----------------------------------------------------------------------------


def encode_answer(fields: Mapping[str, Any]) -> bytes:
    """A successful answer: ``{"ok": true}`` and the op's fields, as one line."""
    return (json.dumps({"ok": True, **fields}, separators=(",", ":")) + "\n").encode()


def encode_error(message: str, status: int, holder: tuple[str, str] | None = None) -> bytes:
    """An error answer, with the exit status the client exits with; ``holder``: the job
    that holds a unique key and the key, for an AlreadyQueuedError (4)."""
    doc: dict[str, Any] = {"ok": False, "error": message, "status": int(status)}
    if holder is not None:
        doc["held_by"], doc["key"] = holder
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def decode_answer(raw: bytes) -> dict[str, Any]:
    """An answer's fields when it says ok; its error as :class:`ControlError` (the
    client turns that into the class of its status) or ControlError 70 when the answer
    cannot be read at all."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ControlError(f"the daemon's answer is not JSON: {str(exc)[:80]}", 70) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise ControlError("the daemon's answer is not an ipcd control answer", 70)
    if not doc["ok"]:
        status = doc.get("status")
        message = doc.get("error")
        if not isinstance(status, int) or isinstance(status, bool) or not isinstance(message, str):
            raise ControlError("the daemon's error answer has no error or status", 70)
        held_by, key = doc.get("held_by"), doc.get("key")
        holder = (held_by, key) if isinstance(held_by, str) and isinstance(key, str) else None
        raise ControlError(message, status, holder)
    return doc


# --- records ----------------------------------------------------------------------------

#: The JSON types each JobInfo field may have (float fields also take integers).
_OPTIONAL = {
    "unique", "started", "finished", "sender_uid", "reply_to", "timeout", "worker_pid",
    "error", "result_kind", "result_size", "expires",
}  # fmt: skip
_FLOATS = {"submitted", "accepted", "due", "started", "finished", "timeout", "expires"}
_STRINGS = {"id", "handler", "state", "unique", "preview", "error"}


def job_to_dict(record: Any) -> dict[str, Any]:
    """A store record (anything with JobInfo's attribute names) as a JSON-ready dict."""
    doc = {name: getattr(record, name) for name in JobInfo._fields}
    doc["state"] = str(doc["state"].value if hasattr(doc["state"], "value") else doc["state"])
    doc["after"] = list(doc["after"])
    return doc


def job_from_dict(doc: object) -> JobInfo:
    """A record read from an answer; ControlError (70) when it is not one."""
    if not isinstance(doc, dict):
        raise ControlError("the daemon's answer holds a job that is not an object", 70)
    values: list[object] = []
    for name in JobInfo._fields:
        value = doc.get(name)
        if name == "after":  # a list of job ids; none from a daemon without --after
            values.append(_ids(value if value is not None else [], "after"))
            continue
        if not _fits(name, value):
            raise ControlError(f"the daemon's answer holds a job with a bad {name!r}", 70)
        values.append(float(value) if name in _FLOATS and value is not None else value)
    return JobInfo(*values)  # type: ignore[arg-type]


def _ids(value: object, name: str) -> tuple[str, ...]:
    """A list of job ids in an answer, as a tuple; ControlError (70) when it is not one."""
    if not isinstance(value, list) or not all(isinstance(i, str) and is_job_id(i) for i in value):
        raise ControlError(f"the daemon's answer holds a bad {name!r}", 70)
    return tuple(value)


def waits_from(doc: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """An answer's ``waits``: for each held job, the jobs it still waits for (none from
    a daemon without ``--after``)."""
    raw = doc.get("waits", {})
    if not isinstance(raw, dict):
        raise ControlError("the daemon's answer has a bad 'waits'", 70)
    return {str(job_id): _ids(ids, "waits") for job_id, ids in raw.items()}


def _fits(name: str, value: object) -> bool:
    if value is None:
        return name in _OPTIONAL
    if name in _STRINGS:
        return isinstance(value, str)
    if name == "bare":
        return isinstance(value, bool)
    if name in _FLOATS:
        return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
    return _is_int(value)


def jobs_from(doc: Mapping[str, Any], name: str = "jobs") -> list[JobInfo]:
    """The list of records under ``name`` in an answer."""
    raw = doc.get(name)
    if not isinstance(raw, list):
        raise ControlError(f"the daemon's answer has no list {name!r}", 70)
    return [job_from_dict(item) for item in raw]


def maybe_jobs_from(doc: Mapping[str, Any], name: str = "jobs") -> list[JobInfo | None]:
    """The list under ``name`` of records or nulls (``jobs``: a job the store does not
    hold)."""
    raw = doc.get(name)
    if not isinstance(raw, list):
        raise ControlError(f"the daemon's answer has no list {name!r}", 70)
    return [None if item is None else job_from_dict(item) for item in raw]


def result_to_dict(result: tuple[int, bytes] | None) -> dict[str, Any] | None:
    """A stored result (kind, data) as JSON: the data in base64, as it may be any bytes."""
    if result is None:
        return None
    kind, data = result
    return {"kind": kind, "data": base64.b64encode(data).decode("ascii")}


def result_from_dict(doc: object) -> StoredResult | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not _is_int(doc.get("kind")):
        raise ControlError("the daemon's answer holds a result that is not one", 70)
    try:
        data = base64.b64decode(str(doc.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        raise ControlError("the daemon's answer holds result data that is not base64", 70) from None
    return StoredResult(doc["kind"], data)


def output_to_dict(
    captured: Any, *, live: bool, offset: int | None = None
) -> dict[str, Any] | None:
    """What a job wrote (anything with ipcd.store.Captured's fields) as JSON; ``offset``
    where its bytes start (None: they are the last ones it wrote)."""
    if captured is None:
        return None
    data: bytes = captured.output
    return {
        "data": base64.b64encode(data).decode("ascii"),
        "size": captured.size,
        "offset": captured.size - len(data) if offset is None else offset,
        "fraction": captured.fraction,
        "message": captured.message,
        "live": live,
    }


def output_from_dict(doc: object) -> Output | None:
    if doc is None:
        return None
    if not (
        isinstance(doc, dict)
        and _is_int(doc.get("size"))
        and _is_int(doc.get("offset"))
        and (doc.get("fraction") is None or _fits("due", doc.get("fraction")))
        and isinstance(doc.get("message"), str)
        and isinstance(doc.get("live"), bool)
    ):
        raise ControlError("the daemon's answer holds an output that is not one", 70)
    try:
        data = base64.b64decode(str(doc.get("data", "")), validate=True)
    except (binascii.Error, ValueError):
        raise ControlError("the daemon's answer holds output that is not base64", 70) from None
    fraction = doc["fraction"]
    return Output(
        data, doc["size"], doc["offset"], None if fraction is None else float(fraction),
        doc["message"], doc["live"],
    )  # fmt: skip


def progress_from(doc: Mapping[str, Any]) -> dict[str, Progress]:
    """``list``'s running jobs' progress, by job id (none from an older daemon)."""
    raw = doc.get("progress", {})
    if not isinstance(raw, dict) or not all(
        isinstance(p, list) and len(p) == 2 and _fits("due", p[0]) and isinstance(p[1], str)
        for p in raw.values()
    ):
        raise ControlError("the daemon's answer has a progress that is not one", 70)
    return {job_id: Progress(float(p[0]), p[1]) for job_id, p in raw.items()}


def paused_to_list(paused: Mapping[int, float]) -> list[list[float]]:
    """``{type: since}`` as JSON pairs (JSON object keys are strings, types are numbers)."""
    return [[type_, since] for type_, since in sorted(paused.items())]


def paused_from(doc: Mapping[str, Any]) -> dict[int, float]:
    raw = doc.get("paused")
    if not isinstance(raw, list) or not all(
        isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and _fits("due", p[1]) for p in raw
    ):
        raise ControlError("the daemon's answer has no list of paused types", 70)
    return {int(p[0]): float(p[1]) for p in raw}


class LimitInfo(NamedTuple):
    """A limited handler's limits and use (``ipcd.store.LimitState``): ``limits``."""

    type: int
    #: None: no concurrency limit.
    concurrency: int | None
    #: Starts per second; None: no rate limit.
    rate: float | None
    burst: int
    running: int
    #: Whole tokens in its bucket now; None without a rate.
    tokens: int | None
    queued: int


def limits_to_list(states: Any) -> list[dict[str, Any]]:
    """``ipcd.store.LimitState`` records as JSON objects."""
    return [
        LimitInfo(
            s.type, s.limit.concurrency, s.limit.rate, s.limit.burst, s.running, s.tokens,
            s.queued,
        )._asdict()
        for s in states
    ]  # fmt: skip


def limits_from(doc: Mapping[str, Any]) -> list[LimitInfo]:
    raw = doc.get("limits")
    if not isinstance(raw, list) or not all(_limit_fits(item) for item in raw):
        raise ControlError("the daemon's answer has no list of limits", 70)
    return [
        LimitInfo(*(item[name] for name in LimitInfo._fields))._replace(
            rate=None if item["rate"] is None else float(item["rate"])
        )
        for item in raw
    ]


def _limit_fits(item: object) -> bool:
    if not isinstance(item, dict) or set(item) != set(LimitInfo._fields):
        return False
    optional = ("concurrency", "rate", "tokens")
    return all(
        (name in optional and item[name] is None)
        or (_is_int(item[name]) if name != "rate" else _fits("due", item[name]))
        for name in LimitInfo._fields
    )


def skipped_from(doc: Mapping[str, Any]) -> list[Skipped]:
    raw = doc.get("skipped")
    if not isinstance(raw, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("id"), str)
        and (s.get("state") is None or isinstance(s.get("state"), str))
        for s in raw
    ):
        raise ControlError("the daemon's answer has no list of skipped jobs", 70)
    return [Skipped(s["id"], s.get("state")) for s in raw]


def strings_from(doc: Mapping[str, Any], name: str) -> list[str]:
    raw = doc.get(name)
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise ControlError(f"the daemon's answer has no list {name!r}", 70)
    return list(raw)


class ScheduleInfo(NamedTuple):
    """``schedules``: one recurring schedule as the store keeps it
    (``ipcd.store.ScheduleState``), with its last run's job state (None: no run yet,
    or the job is no longer kept)."""

    name: str
    spec: str
    handler: str
    next_due: float
    last_due: float | None
    last_fired: float | None
    last_job: str | None
    overlaps: int
    last_state: str | None


def schedule_to_dict(state: Any, last_state: str | None) -> dict[str, Any]:
    """A store's schedule state (anything with ScheduleInfo's attribute names but the
    last) and its last job's state, as a JSON-ready dict."""
    doc = {name: getattr(state, name) for name in ScheduleInfo._fields[:-1]}
    doc["last_state"] = last_state
    return doc


def schedules_from(doc: Mapping[str, Any]) -> list[ScheduleInfo]:
    """The ``schedules`` of an answer; ControlError (70) when they are not that."""
    raw = doc.get("schedules")
    if not isinstance(raw, list):
        raise ControlError("the daemon's answer has no list 'schedules'", 70)
    found = []
    for item in raw:
        if not (
            isinstance(item, dict)
            and all(isinstance(item.get(k), str) for k in ("name", "spec", "handler"))
            and _fits("due", item.get("next_due"))
            and all(
                item.get(k) is None or _fits("due", item.get(k)) for k in ("last_due", "last_fired")
            )
            and all(
                item.get(k) is None or isinstance(item.get(k), str)
                for k in ("last_job", "last_state")
            )
            and _is_int(item.get("overlaps"))
        ):
            raise ControlError("the daemon's answer holds a schedule that is not one", 70)
        values = [item.get(name) for name in ScheduleInfo._fields]
        found.append(ScheduleInfo(*values))  # type: ignore[arg-type]
    return found


def socket_path_problem(path: str | bytes) -> str | None:
    """Why ``path`` cannot be a Unix socket's address, or None."""
    raw = path if isinstance(path, bytes) else path.encode()
    if len(raw) > MAX_SOCKET_PATH:
        return f"is {len(raw)} bytes long; a Unix socket's path has at most {MAX_SOCKET_PATH}"
    return None
