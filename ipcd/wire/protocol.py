"""The wire format: how a job travels as one SysV message, and how bare messages are read.

An *envelope* is a UTF-8 JSON object with ``"ipcd": 1``; any language builds it with its
standard library.  Anything else on the queue is a *bare* message: its body is the payload
and its type selects the handler.  Bare bodies in PHP's ``serialize()`` format (what
``msg_send`` sends by default) are decoded safely by :mod:`ipcd.wire.phpserial`; other bodies
are passed on as text when they are UTF-8, else as bytes.  Nothing is ever unpickled or
evaluated.  docs/protocol.md is the contract; this module is its implementation.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import math
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

from ipcd.errors import MessageError, PayloadError, RefusedPayloadError
from ipcd.wire import jsoncodec
from ipcd.wire.submitting import Template

if TYPE_CHECKING:
    from ipcd.wire.phpserial import PhpValue

VERSION = 1
#: Nesting depth allowed in payloads, JSON or PHP: enough for real data, bounded for safety.
MAX_DEPTH = 32
#: Largest message type a job can have: what a handler's ``type`` and ipcctl allow (a C
#: int; the kernel takes any positive C long, which PHP's msg_send can send).
MAX_TYPE = 2**31 - 1
#: Largest ``submitted`` (Unix time, the year 2286) and ``timeout`` (about 31 years) an
#: envelope may carry: far beyond any real job, and finite, so that every sum and
#: conversion the daemon makes with them stays a number.
MAX_SUBMITTED = 1e10
MAX_TIMEOUT = 1e9
#: Largest pid, shmid and spill-table entry: each is a C int to the kernel.
MAX_INT32 = 2**31 - 1
#: Largest spilled payload size the header of a spill segment can state (u64 there, but
#: [jobs] max_payload bounds it long before).
MAX_SIZE = 2**63 - 1

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
Payload: TypeAlias = "JSONValue | bytes"

_JOB_ID = re.compile(r"[0-9A-Za-z_.-]{1,16}\Z")
_ENVELOPE_ID = re.compile(rb'"id"\s*:\s*"([0-9A-Za-z_.-]{1,16})"')
_ENVELOPE_REPLY = re.compile(rb'"reply"\s*:\s*([1-9][0-9]{0,9})(?=\s*[,}])')
_ENVELOPE_KEYS = frozenset(
    {
        "ipcd", "id", "payload", "payload_b64", "submitted", "pid", "reply", "attempt",
        "timeout", "unique", "spill", "confirm", "due", "priority", "expire", "after",
    }
)  # fmt: skip
#: Longest unique key, in UTF-8 bytes: it is stored in a fixed field of the unique-key table.
MAX_UNIQUE = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: How a confirmation on the reply queue begins (then the job id): the job is committed to
#: the job store.  A result's notification is the bare job id.
CONFIRMED = b"+"
#: Bounds of a job's ``priority``: higher runs first among jobs of one type.
MIN_PRIORITY, MAX_PRIORITY = -100, 100
#: The longest ``expire`` (seconds): a year; longer is no expiry worth keeping.
MAX_EXPIRE = 366 * 86400.0
#: Characters of a payload ``ipcctl list`` shows (:func:`preview`).
PREVIEW = 80
#: The most jobs one job may wait for (the envelope's ``after``, ``--after``).
MAX_AFTER = 64
#: How a confirmation on the reply queue says the job was refused as a usage error (then
#: the job id): it names an unknown job in ``after``.  Its error result is stored.
REFUSED = b"-"
#: How a spilled payload's bytes are to be read (the envelope's ``spill.kind``).
SPILL_KINDS = ("bytes", "text", "json")


class SpillRef(NamedTuple):
    """Where a payload too large for a message waits: its own segment (ipcd.tables.spill)."""

    shmid: int
    size: int
    #: The spill-table entry that records the segment.
    slot: int
    kind: str

    def as_json(self) -> dict[str, object]:
        return {"shmid": self.shmid, "size": self.size, "slot": self.slot, "kind": self.kind}


class Job(NamedTuple):
    """One unit of work, as a handler receives it (:meth:`running` knows the places of
    ``id``, ``attempt`` and ``reporter``: first, fourth and last)."""

    id: str
    type: int
    payload: Payload
    attempt: int = 1
    submitted: float = 0.0
    sender_pid: int = 0
    #: Reply-queue message type to notify when the result is stored (None: nobody waits).
    reply_to: int | None = None
    #: True when the job came as a bare message (no envelope).
    bare: bool = False
    #: Seconds this job may run (the submitter's ``--timeout-job``); None: the handler's.
    timeout: float | None = None
    #: The submitter's unique key (``--unique``): released once the outcome is final.
    unique: str | None = None
    #: The payload's segment when it was too large for the message (ipcd.tables.spill loads it).
    spill: SpillRef | None = None
    #: Reply-queue message type to tell once the job is committed to the job store.
    confirm: int | None = None
    #: Unix time before which the job does not run (``--delay``); 0: at once.
    due: float = 0.0
    #: Higher first among queued jobs of one type (MIN_PRIORITY … MAX_PRIORITY).
    priority: int = 0
    #: Seconds after its acceptance (or its due time) by which it must have started, else
    #: it is cancelled as expired (``--expire``); None: no expiry.
    expire: float | None = None
    #: The jobs this one waits for (``--after``): it runs once all of them succeeded.
    after: tuple[str, ...] = ()
    #: Where :meth:`progress` goes: the worker's (ipcd.daemon.capture), run_handler's
    #: list (ipcd.testing); None: nowhere (a job built by hand).
    reporter: Callable[[float, str], None] | None = None

    def progress(self, fraction: float, message: str = "") -> None:
        """Say how far the job got: ``fraction`` from 0.0 to 1.0, and a short message
        (its first 256 bytes are kept).  ``ipcctl list``, ``show`` and ``tail`` show the
        last one while the job runs, and ``show`` keeps it once it ended.  Cheap enough
        for a tight loop: the worker publishes a few per second and keeps the latest.
        ValueError for a fraction that is not a number from 0 to 1."""
        if not (isinstance(fraction, int | float) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"progress fraction {fraction!r} is not a number from 0 to 1")
        if self.reporter is not None:
            self.reporter(float(fraction), str(message))

    def running(
        self, job_id: str, attempt: int, reporter: Callable[[float, str], None] | None
    ) -> Job:
        """This job as a worker runs it: the store's id and attempt, its progress going to
        ``reporter``.  One tuple built from a list, a quarter of ``_replace``'s cost, on
        every job a worker runs."""
        values = list(self)
        values[0], values[3], values[-1] = job_id, attempt, reporter
        return Job._make(values)


def is_job_id(text: str) -> bool:
    """Whether ``text`` can be a job id: 1 to 16 of [0-9A-Za-z_.-]."""
    return _JOB_ID.match(text) is not None


def new_job_id() -> str:
    """A fresh job id: 16 hex digits from the kernel's random source."""
    return os.urandom(8).hex()


def encode(
    payload: Payload,
    *,
    job_id: str,
    reply_to: int | None = None,
    submitted: float | None = None,
    pid: int | None = None,
    attempt: int = 1,
    timeout: float | None = None,
    unique: str | None = None,
    spill: SpillRef | None = None,
    confirm: int | None = None,
    due: float | None = None,
    priority: int = 0,
    expire: float | None = None,
    after: tuple[str, ...] = (),
) -> bytes:
    """The envelope for one job: compact JSON, bytes payloads as base64; with ``spill``
    the payload is in that segment and the envelope names it instead."""
    doc: dict[str, Any] = {
        "ipcd": VERSION,
        "id": job_id,
        "submitted": round(time.time() if submitted is None else submitted, 6),
        "pid": os.getpid() if pid is None else pid,
    }
    if reply_to is not None:
        doc["reply"] = reply_to
    if attempt != 1:
        doc["attempt"] = attempt
    if timeout is not None:
        doc["timeout"] = timeout
    if unique is not None:
        doc["unique"] = unique
    if confirm is not None:
        doc["confirm"] = confirm
    if due:
        doc["due"] = round(due, 6)
    if priority:
        doc["priority"] = priority
    if expire is not None:
        doc["expire"] = expire
    if after:
        doc["after"] = list(after)
    if spill is not None:
        doc["spill"] = spill.as_json()
    elif isinstance(payload, bytes | bytearray | memoryview):
        # The last field, spliced in as bytes: base64 never needs JSON's escapes, and a
        # large payload's text is then neither scanned by the encoder nor copied twice.
        head = _encode(doc).encode()
        b64 = binascii.b2a_base64(payload, newline=False)
        return b"".join((head[:-1], b',"payload_b64":"', b64, b'"}'))
    else:
        doc["payload"] = payload
    try:
        return _encode(doc).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"payload cannot be encoded as JSON: {exc}") from None


def template(pid: int, *, reply: bool = False, confirm: bool = False) -> Template:
    """The envelope of a plain job from ``pid`` as a template (ipcd.wire.submitting):
    byte for byte :func:`encode`'s with ``reply`` and ``confirm`` set to ``pid`` when
    asked for, and none of the other optional fields."""
    return Template(pid, reply=reply, confirm=confirm, encode_json=_encode)


def decode(body: bytes, type_: int, *, received: float | None = None) -> Job:
    """Turn one message into a Job; raises MessageError (with ``job_id`` when known).

    Nothing else escapes, whatever the bytes (tests/test_protocol.py checks it with
    arbitrary input): every field of the Job is checked here, in type and range, so that
    no later step (a struct field, a float conversion, a kernel call, a UTF-8 encoding)
    can fail on what a sender chose.
    """
    if body[:1] == b"{":
        doc, error = _json_object(body)
        if doc is not None and "ipcd" in doc:
            return _from_envelope(doc, type_, body)
        if doc is None and body.startswith(b'{"ipcd"'):
            # Too deep for the JSON parser, or invalid: an envelope all the same, so the
            # submitter learns why (when its id can be read) instead of a bare job running.
            raise _unreadable(body, error)
    return Job(
        id=new_job_id(),
        type=_job_type(type_, None),
        payload=_bare_payload(body),
        submitted=time.time() if received is None else received,
        bare=True,
    )


def _unreadable(body: bytes, error: str) -> MessageError:
    """The rejection of an envelope that is not valid JSON, with the id and reply type
    read from its first 256 bytes where they can be, so that its waiter hears of it."""
    found = _ENVELOPE_ID.search(body, 0, 256)
    exc = _bad(f"not valid JSON: {error}", found and found[1].decode())
    reply = _ENVELOPE_REPLY.search(body, 0, 256)
    if exc.job_id is not None and reply is not None and int(reply[1]) <= MAX_TYPE:
        exc.reply_to = int(reply[1])
    return exc


def _job_type(type_: int, raw_id: object) -> int:
    """The message type, if a job can have it: handlers are mapped to 1 … MAX_TYPE."""
    if not 1 <= type_ <= MAX_TYPE:
        exc = MessageError(f"message type {type_} is outside 1..{MAX_TYPE}: no handler can have it")
        exc.job_id = raw_id if isinstance(raw_id, str) and is_job_id(raw_id) else None
        raise exc
    return type_


def _json_object(body: bytes) -> tuple[dict[str, Any] | None, str]:
    """The body's JSON object, or None and why not."""
    try:
        doc = _decoder()(body.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except RecursionError:
        return None, "nested too deeply"
    except ValueError as exc:
        return None, str(exc)[:80]
    return (doc, "") if isinstance(doc, dict) else (None, "not an object")


def payload_json(payload: Payload) -> bytes:
    """A payload as the JSON the envelope would carry (for one that travels on its own,
    ipcd.tables.spill); raises PayloadError as :func:`encode` does."""
    try:
        return _encode(payload).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise PayloadError(f"payload cannot be encoded as JSON: {exc}") from None


def preview(payload: Payload) -> str:
    """A payload cut to PREVIEW printable characters, for ``ipcctl list`` (the daemon
    stores it with each job it accepts or makes)."""
    if isinstance(payload, bytes):
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = payload[: PREVIEW // 2].hex()
    elif isinstance(payload, str):
        text = payload
    else:
        try:
            text = _encode(payload)
        except (ValueError, TypeError, RecursionError):
            text = repr(payload)
    text = text[: PREVIEW + 1]
    if not text.isprintable():  # one C call for the usual payload; a loop for the rest
        text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= PREVIEW else text[: PREVIEW - 1] + "…"


def payload_from_json(text: str) -> Payload:
    """The inverse of :func:`payload_json`, with the envelope's limits: ValueError for
    invalid JSON, NaN, or nesting deeper than MAX_DEPTH."""
    value: Payload = _decoder()(text)
    if _depth(value) > MAX_DEPTH:
        raise ValueError(f"payload nested deeper than {MAX_DEPTH} levels")
    return value


def _no_constants(name: str) -> None:
    """Refuse NaN and Infinity, which Python's json accepts but JSON does not have."""
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A JSON number with a fraction or exponent; ``1e999`` would be infinity: refused."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


# Built once (see ipcd.wire.jsoncodec): the envelope is encoded and decoded for every job.
_encode = jsoncodec.encoder(ensure_ascii=False, allow_nan=False)


@functools.cache
def _decoder() -> Callable[[str], Any]:
    """Made on first use: the client only encodes, and decoding imports json.decoder."""
    return jsoncodec.object_decoder(_no_constants, parse_float=_finite)


def _from_envelope(doc: dict[str, Any], type_: int, body: bytes) -> Job:
    try:
        job = _read_envelope(doc, _job_type(type_, doc.get("id")))
        if _ESCAPED_SURROGATE.search(body) and (where := lone_surrogate(job.payload)):
            raise _bad(f"payload is not valid Unicode: {where}", job.id)
        return job
    except MessageError as exc:
        reply = doc.get("reply")
        if type(reply) is int and 0 < reply < 2**31:
            exc.reply_to = reply  # so that a waiting submitter hears of the rejection
        confirm = doc.get("confirm")
        if exc.reply_to is None and type(confirm) is int and 0 < confirm < 2**31:
            exc.reply_to = confirm  # a submitter waiting for its confirmation hears too
        if unique_key_problem(doc.get("unique")) is None:
            exc.unique = doc["unique"]  # so that the key is released
        if exc.job_id is not None and exc.spill is None and "spill" in doc:
            with contextlib.suppress(MessageError):
                exc.spill = _spill_ref(doc["spill"], exc.job_id)  # so its segment goes
        raise


def _read_envelope(doc: dict[str, Any], type_: int) -> Job:
    raw_id = doc.get("id")
    job_id = raw_id if isinstance(raw_id, str) and is_job_id(raw_id) else None
    if type(doc["ipcd"]) is not int or doc["ipcd"] != VERSION:
        shown = _shown(doc["ipcd"])
        raise _bad(f"unsupported envelope version {shown} (this ipcd speaks 1)", job_id)
    if job_id is None:
        raise _bad("envelope 'id' must be 1-16 characters of [0-9A-Za-z_.-]", None)
    if not _ENVELOPE_KEYS.issuperset(doc):
        unknown = sorted(set(doc) - _ENVELOPE_KEYS)
        raise _bad(f"unknown envelope field {unknown[0]!r}", job_id)
    spill = None
    if "spill" in doc:
        if "payload" in doc or "payload_b64" in doc:
            raise _bad("envelope has both 'spill' and a payload", job_id)
        spill = _spill_ref(doc["spill"], job_id)
        payload: Payload = None
    elif "payload_b64" in doc:
        if "payload" in doc:
            raise _bad("envelope has both 'payload' and 'payload_b64'", job_id)
        raw = doc["payload_b64"]
        if not isinstance(raw, str):
            raise _bad("'payload_b64' must be a base64 string", job_id)
        try:
            payload = _b64decode(raw)
        except (binascii.Error, ValueError):
            raise _bad("'payload_b64' is not valid base64", job_id) from None
    else:
        payload = doc.get("payload")
        if type(payload) in (list, dict) and _depth(payload) > MAX_DEPTH:
            raise _bad(f"payload nested deeper than {MAX_DEPTH} levels", job_id)
    submitted = _number(doc.get("submitted", 0.0), "submitted", job_id)
    if not 0 <= submitted <= MAX_SUBMITTED:
        raise _bad(f"'submitted' must be a Unix time from 0 to {MAX_SUBMITTED:.0e}", job_id)
    pid = doc.get("pid", 0)
    reply = doc.get("reply")
    if not _int_in(pid, 0, MAX_INT32):
        raise _bad(f"'pid' must be a non-negative integer up to {MAX_INT32}", job_id)
    if reply is not None and not _int_in(reply, 1, MAX_TYPE):
        raise _bad("'reply' must be a positive message type", job_id)
    attempt = doc.get("attempt", 1)
    if not _int_in(attempt, 1, 0xFFFF):
        raise _bad("'attempt' must be an integer from 1 to 65535", job_id)
    timeout = doc.get("timeout")
    if timeout is not None and not 0 < _number(timeout, "timeout", job_id) <= MAX_TIMEOUT:
        raise _bad(
            f"'timeout' must be a positive number of seconds up to {MAX_TIMEOUT:.0e}", job_id
        )
    unique = doc.get("unique")
    if unique is not None and (problem := unique_key_problem(unique)) is not None:
        raise _bad(f"'unique' {problem}", job_id)
    confirm = doc.get("confirm")
    if confirm is not None and not _int_in(confirm, 1, MAX_TYPE):
        raise _bad("'confirm' must be a positive message type", job_id)
    due = _number(doc.get("due", 0.0), "due", job_id)
    if not 0 <= due <= MAX_SUBMITTED:
        raise _bad(f"'due' must be a Unix time from 0 to {MAX_SUBMITTED:.0e}", job_id)
    priority = doc.get("priority", 0)
    if not _int_in(priority, MIN_PRIORITY, MAX_PRIORITY):
        raise _bad(f"'priority' must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}", job_id)
    expire = doc.get("expire")
    if expire is not None and not 0 < _number(expire, "expire", job_id) <= MAX_EXPIRE:
        raise _bad(f"'expire' must be a positive number of seconds up to {MAX_EXPIRE:.0f}", job_id)
    raw_after = doc.get("after")
    after = () if raw_after is None else _after(raw_after, job_id)
    # Job's fields in their order, positionally: a call with keywords first builds a dict
    # of them, which doubles what making the Job costs, on every job of both sides.
    return Job(
        job_id,
        type_,
        payload,
        attempt,
        float(submitted),
        pid,  # sender_pid
        reply,  # reply_to
        False,  # bare
        None if timeout is None else float(timeout),
        unique,
        spill,
        confirm,
        float(due),
        priority,
        None if expire is None else float(expire),
        after,
    )


def _after(raw: object, job_id: str) -> tuple[str, ...]:
    """The envelope's ``after``: a list of at most MAX_AFTER job ids, none its own."""
    if not isinstance(raw, list) or not all(isinstance(i, str) and is_job_id(i) for i in raw):
        raise _bad("'after' must be a list of job ids", job_id)
    if len(raw) > MAX_AFTER:
        raise _bad(f"'after' names {len(raw)} jobs, at most {MAX_AFTER}", job_id)
    if job_id in raw:
        raise _bad("'after' names the job itself", job_id)
    return tuple(dict.fromkeys(raw))


def _spill_ref(raw: object, job_id: str) -> SpillRef:
    if not isinstance(raw, dict) or set(raw) != {"shmid", "size", "slot", "kind"}:
        raise _bad("'spill' must be an object with shmid, size, slot and kind", job_id)
    if not (
        _int_in(raw["shmid"], 0, MAX_INT32)
        and _int_in(raw["slot"], 0, MAX_INT32)
        and _int_in(raw["size"], 0, MAX_SIZE)
    ):
        raise _bad(
            f"'spill' shmid and slot must be integers from 0 to {MAX_INT32}, size a "
            "non-negative integer",
            job_id,
        )
    if raw["kind"] not in SPILL_KINDS:
        raise _bad(f"'spill' kind must be one of {', '.join(SPILL_KINDS)}", job_id)
    return SpillRef(raw["shmid"], raw["size"], raw["slot"], raw["kind"])


def reencode(job: Job, *, attempt: int) -> bytes:
    """The envelope that puts ``job`` back on the queue for another attempt."""
    return encode(
        None if job.spill else job.payload,
        job_id=job.id,
        reply_to=job.reply_to,
        submitted=job.submitted,
        pid=job.sender_pid,
        attempt=attempt,
        timeout=job.timeout,
        unique=job.unique,
        spill=job.spill,
    )


def unique_key_problem(key: object) -> str | None:
    """What is wrong with a unique key, or None: 1 to MAX_UNIQUE bytes of UTF-8 text
    without control characters (it is printed in messages and logs)."""
    if not isinstance(key, str) or not key:
        return "must be a non-empty string"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid UTF-8 text"
    if size > MAX_UNIQUE:
        return f"must be at most {MAX_UNIQUE} bytes of UTF-8, not {size}"
    if _CONTROL.search(key):
        return "must not contain control characters"
    return None


def _b64decode(text: str) -> bytes:
    """Strict base64: groups of four of the alphabet, ``=`` padding only at the end.

    binascii's own ``strict_mode`` checks the alphabet and the padding in C as it decodes;
    it still takes a last group padded past four characters (``QUJD=``), which the
    length check refuses. (A regular expression did the same check before, at 30 ms per
    MiB: nine tenths of the time a 16 MiB payload spent in the daemon.) ValueError for a
    text not ASCII.
    """
    if len(text) % 4:
        raise binascii.Error("not base64")
    return binascii.a2b_base64(text, strict_mode=True)


def _bare_payload(body: bytes) -> Payload:
    # Imported here, not at the top: only the daemon decodes, and the cron-facing client
    # path that imports this module for ``encode`` should not pay for the PHP parser.
    from ipcd.wire import phpserial

    if phpserial.looks_serialized(body):
        try:
            return _php_to_payload(phpserial.loads(body, max_depth=MAX_DEPTH))
        except MessageError as exc:
            if isinstance(exc, RefusedPayloadError):
                raise
            # Not PHP after all ("i:am a plain string"): fall through to text or bytes.
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body


def _php_to_payload(value: PhpValue) -> Payload:
    """PHP values as payloads; binary strings nested in arrays become latin-1 text."""
    if isinstance(value, list):
        return [_nested(v) for v in value]
    if isinstance(value, dict):
        return {k: _nested(v) for k, v in value.items()}
    return _finite_php(value) if isinstance(value, float) else value


def _finite_php(value: float) -> float:
    """PHP's INF and NAN (``d:INF;``) have no JSON form: the job could not be put back on
    the queue for another attempt, so it is refused."""
    if not math.isfinite(value):
        raise RefusedPayloadError(f"refused PHP serialize data: float {value} has no JSON form")
    return value


def _nested(value: PhpValue) -> JSONValue:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, float):
        return _finite_php(value)
    if isinstance(value, list):
        return [_nested(v) for v in value]
    if isinstance(value, dict):
        return {k: _nested(v) for k, v in value.items()}
    return value


def _depth(value: object, limit: int = MAX_DEPTH + 1) -> int:
    """Nesting depth of a JSON value, counted only up to ``limit``."""
    depth = 0
    level: list[object] = [value]
    while level and depth < limit:
        nxt: list[object] = []
        for item in level:
            if isinstance(item, dict):
                nxt.extend(item.values())
            elif isinstance(item, list):
                nxt.extend(item)
        if not nxt:
            break
        depth += 1
        level = nxt
    return depth


def _number(value: object, name: str, job_id: str | None) -> float | int:
    """A JSON number, as it came (an int too large for a float stays an int and fails the
    caller's range check instead of raising OverflowError here)."""
    if type(value) is float or type(value) is int:  # type(), not isinstance(): True is no number
        return value
    raise _bad(f"'{name}' must be a number", job_id)


def _int_in(value: object, low: int, high: int) -> bool:
    """Whether ``value`` is an int (not a bool) from ``low`` to ``high``."""
    return type(value) is int and low <= value <= high


def _shown(value: object) -> str:
    """A sender's value in an error message: its repr, cut short."""
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


#: A JSON escape of a UTF-16 surrogate: the only way a lone one can get into decoded text
#: (raw UTF-8 cannot encode surrogates; the UTF-8 decode before parsing refuses them).
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(value: object) -> str | None:
    """Where a string in ``value`` (a JSON value) holds a lone UTF-16 surrogate, which no
    UTF-8 encoder, log line or other language's JSON parser accepts; None when none does.

    Walks without recursion: a handler's result may nest as deep as the encoder allowed.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"lone surrogate U+{ord(item[exc.start]):04X} in {_shown(item)}"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return None


def _bad(reason: str, job_id: str | None) -> MessageError:
    exc = MessageError(f"malformed envelope: {reason}")
    exc.job_id = job_id
    return exc
