"""Selecting and formatting ipcd's JSON log events for people: pure functions of text.

``ipcctl logs`` and ``ipcctl result --log`` read ``[log] file``, one JSON object per line
as ipcd.daemon.log writes it (``timestamp``, ``level`` and ``event`` first, then the event's
fields).  This module holds everything that does not touch the file, so that it is tested
without a daemon: :func:`parse_since` and friends turn the options into values,
:class:`Filter` decides which events to show, :func:`format_event` renders one event as a
line for a terminal and :class:`Printer` writes the chosen lines.  ipcd.client.logfile reads the
file (backwards for ``-n``, by name across rotations for ``-f``) and feeds it the lines.

This module is on ipcctl's path and must stay lean: the standard library only, never
structlog (ipcd.daemon.log writes the lines; reading them needs nothing of it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as clock_time
from typing import Any, TextIO

from ipcd.config import HandlerConfig
from ipcd.errors import UsageError

#: Levels from least to most severe; ``--level L`` shows L and those after it.
LEVELS = ("debug", "info", "warning", "error", "critical")

Event = dict[str, Any]
#: A line to print and its event (None: a line that is not JSON, printed as it is).
Shown = tuple[str, Event | None]

#: A job id that a log line holds verbatim: JSON escapes none of these characters, so the
#: id's bytes are in the raw line of every event about the job.
_PLAIN_ID = re.compile(r"[ !#-\[\]-~]+")
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: A string value printed without quotes: no blanks, quotes, ``=`` or control characters.
_BARE = re.compile(r"[^\s\"'=\\\x00-\x1f\x7f]+")

_RESET = "\x1b[0m"
_DIM = "\x1b[2m"
_BOLD = "\x1b[1m"
_KEY = "\x1b[36m"  # cyan
_LEVEL_STYLE = {
    "debug": "\x1b[2m",  # dim
    "info": "\x1b[32m",  # green
    "warning": "\x1b[33m",  # yellow
    "error": "\x1b[31m",  # red
    "critical": "\x1b[1;31m",  # bold red
}


# --- parsing --------------------------------------------------------------------------


def parse_line(text: str) -> Event | None:
    """The event a log line holds, or None for a line that is not a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def event_time(event: Mapping[str, Any]) -> datetime | None:
    """The event's ``timestamp`` as an aware datetime (ipcd writes UTC), if readable."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: a duration back from ``now`` (``30s``, ``10m``, ``2h``, ``1d``, ``1w``),
    an ISO-8601 date or time (``2026-11-27``, ``2026-11-27T13:59:29Z``; without an offset
    it is local time) or a time of day (``13:59``: today, local time).
    """
    text = text.strip()
    relative = _RELATIVE.fullmatch(text)
    if relative:
        return now - timedelta(seconds=float(relative.group(1)) * _UNITS[relative.group(2)])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        try:
            if ":" not in text:  # "10" is not 10:00 (nor 10 seconds): say which
                raise ValueError(text)
            of_day = clock_time.fromisoformat(text)
        except ValueError:
            raise UsageError(
                f"--since {text!r}: expected a duration (30s, 10m, 2h, 1d) "
                "or an ISO-8601 time (2026-11-27T13:59:29Z, 13:59)"
            ) from None
        local_now = now.astimezone()
        when = datetime.combine(local_now.date(), of_day, of_day.tzinfo or local_now.tzinfo)
    # A naive time is the user's local time, as date(1) and journalctl read it.
    return when if when.tzinfo is not None else when.astimezone()


def parse_count(text: str) -> int | None:
    """``-n``: a number of lines, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        count = int(text)
    except ValueError:
        raise UsageError(f"-n {text!r}: expected a number of lines or 'all'") from None
    if count < 0:
        raise UsageError("-n must not be negative")
    return count


def parse_level(text: str) -> str:
    """``--level``: one of :data:`LEVELS` (``warn`` is accepted for ``warning``)."""
    level = {"warn": "warning"}.get(text.lower(), text.lower())
    if level not in LEVELS:
        raise UsageError(f"--level {text!r}: expected one of {', '.join(LEVELS)}")
    return level


def type_selector(text: str, handlers: Iterable[HandlerConfig]) -> tuple[set[int], set[str]]:
    """What ``--type T`` matches: message type numbers and handler names.

    A configured name also matches its type (events about a job that never reached its
    handler carry only the number) and a number also matches its configured handler's
    name.  An unknown name still matches by name: the log may be older than the config.
    """
    handlers = tuple(handlers)
    for handler in handlers:
        if handler.name == text:
            return {handler.type}, {handler.name}
    try:
        number = int(text, 0)
    except ValueError:
        return set(), {text}
    return {number}, {h.name for h in handlers if h.type == number}


# --- selecting ------------------------------------------------------------------------


def level_rank(level: object) -> int:
    """Severity order of a level name; an unknown level ranks above every known one,
    so that an odd line is never hidden by ``--level``."""
    try:
        return LEVELS.index(str(level).lower())
    except ValueError:
        return len(LEVELS)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events to show; every condition given must hold (values within one: any)."""

    jobs: frozenset[str] = frozenset()
    types: frozenset[int] = frozenset()
    handlers: frozenset[str] = frozenset()
    level: str | None = None
    since: datetime | None = None
    #: The ``jobs`` as bytes, for :meth:`may_match`; empty when any of them would be
    #: escaped in JSON (then every line is parsed).
    _needles: tuple[bytes, ...] = field(init=False, default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.jobs and all(_PLAIN_ID.fullmatch(job) for job in self.jobs):
            object.__setattr__(self, "_needles", tuple(job.encode() for job in self.jobs))

    @property
    def active(self) -> bool:
        """Whether anything is selected at all (a line that is not JSON can never match)."""
        return bool(self.jobs or self.types or self.handlers or self.level or self.since)

    def may_match(self, raw: bytes) -> bool:
        """Whether a raw line can match at all: a line about one of ``jobs`` holds the id's
        bytes.  Testing that is far cheaper than decoding and parsing the line, and with
        ``--job`` nearly every line of a big log is about other jobs."""
        return not self._needles or any(needle in raw for needle in self._needles)

    def matches(self, event: Mapping[str, Any]) -> bool:
        if self.jobs and event.get("job_id") not in self.jobs:
            return False
        if (self.types or self.handlers) and not self._type_matches(event):
            return False
        if self.level is not None and level_rank(event.get("level")) < level_rank(self.level):
            return False
        if self.since is not None:
            when = event_time(event)
            if when is None or when < self.since:
                return False
        return True

    def _type_matches(self, event: Mapping[str, Any]) -> bool:
        type_ = event.get("type")
        if isinstance(type_, int) and not isinstance(type_, bool) and type_ in self.types:
            return True
        return event.get("handler") in self.handlers


# --- formatting -----------------------------------------------------------------------


def want_color(mode: str, isatty: bool, environ: Mapping[str, str]) -> bool:
    """``--color auto|always|never``; auto means a terminal, no ``NO_COLOR`` (set and not
    empty, as no-color.org says) and a ``TERM`` other than ``dumb``."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return isatty and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"


def format_value(value: object) -> str:
    """A field's value as ``key=value`` shows it: bare words bare, anything else as JSON."""
    if isinstance(value, str) and _BARE.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def format_time(when: datetime | None, raw: object, tz: tzinfo | None, today: date) -> str:
    """``13:59:29.478`` in the reader's time zone, with the date for another day's events."""
    if when is None:
        return str(raw) if raw is not None else "-"
    local = when.astimezone(tz)
    shown = local.strftime("%H:%M:%S.") + f"{local.microsecond // 1000:03d}"
    return shown if local.date() == today else f"{local.date().isoformat()} {shown}"


def format_event(
    event: Mapping[str, Any],
    *,
    color: bool = False,
    tz: tzinfo | None = None,
    today: date | None = None,
) -> str:
    """One event as ``13:59:29.478 info     job.done  job_id=… handler=echo ms=0.2``.

    Times are shown in ``tz`` (default: the local zone), with the date when it is not
    ``today``.  Fields follow in the log's order; an ``exception`` (a traceback that
    structlog's dict_tracebacks wrote) and a ``traceback`` (a handler's, as text: the
    one thing a person reads when a job failed) are shown on the lines after it,
    indented, as Python prints them, not as one line of ``\\n`` escapes.
    """
    when = event_time(event)
    if today is None:
        today = datetime.now(tz).date() if tz is not None else date.today()
    stamp = format_time(when, event.get("timestamp"), tz, today)
    level = str(event.get("level", "-"))
    name = str(event.get("event", "-"))
    blocks = [key for key in _BLOCKS if _is_block(key, event.get(key))]
    fields = [
        (key, value)
        for key, value in event.items()
        if key not in ("timestamp", "level", "event") and key not in blocks
    ]
    if color:
        style = _LEVEL_STYLE.get(level.lower(), _BOLD)
        head = f"{_DIM}{stamp}{_RESET} {style}{level:<8}{_RESET} {_BOLD}{name}{_RESET}"
        parts = [f"{_KEY}{key}{_RESET}={_styled(key, value)}" for key, value in fields]
    else:
        head = f"{stamp} {level:<8} {name}"
        parts = [f"{key}={format_value(value)}" for key, value in fields]
    line = f"{head}  {' '.join(parts)}" if parts else head
    for key in blocks:
        line += "".join(f"\n{text}" for text in _block(format_exception(event[key]), color))
    return line


#: Fields shown as a block of lines under their event rather than as ``key=value``.
_BLOCKS = ("exception", "traceback")


def _is_block(key: str, value: object) -> bool:
    """``exception`` in any form; ``traceback`` when it is text (the worker's
    ``handler.exception`` writes ``traceback.format_exc()``)."""
    return value is not None and (key == "exception" or isinstance(value, str))


def _block(lines: list[str], color: bool) -> list[str]:
    """A traceback's lines indented under the event; in colour, the frames dim and the
    last line (the exception and its message) red, as it is what went wrong."""
    indented = [f"    {text}" for text in lines]
    if not color or not indented:
        return indented
    *frames, last = indented
    return [f"{_DIM}{text}{_RESET}" for text in frames] + [f"{_LEVEL_STYLE['error']}{last}{_RESET}"]


def _styled(key: str, value: object) -> str:
    """A value in colour: what went wrong in red, so that a failed job stands out."""
    text = format_value(value)
    if key == "error" or (key == "outcome" and value == "error"):
        return f"{_LEVEL_STYLE['error']}{text}{_RESET}"
    return text


def format_exception(exception: object) -> list[str]:
    """A traceback's lines, from structlog's dict_tracebacks form or from plain text."""
    if isinstance(exception, str):
        return exception.rstrip("\n").splitlines()
    if not isinstance(exception, list) or not all(isinstance(e, dict) for e in exception):
        return [format_value(exception)]
    lines: list[str] = []
    for stack in exception:
        for frame in stack.get("frames", ()):
            if isinstance(frame, dict):
                lines.append(
                    f'File "{frame.get("filename")}", line {frame.get("lineno")}, '
                    f"in {frame.get('name')}"
                )
        lines.append(f"{stack.get('exc_type')}: {stack.get('exc_value')}")
    return lines


# --- showing --------------------------------------------------------------------------


@dataclass
class Printer:
    """Writes the lines that pass the filter: formatted, or raw JSON lines with ``json``.

    A line that is not a JSON object is printed as it is in readable mode when nothing is
    selected (it cannot match a filter), and skipped and counted with ``json``, so that
    jq never sees it.
    """

    out: TextIO
    filter: Filter = Filter()
    json: bool = False
    color: bool = False
    tz: tzinfo | None = None
    skipped: int = 0

    def select(self, lines: Iterable[bytes]) -> Iterator[Shown]:
        """The lines to show with their events (None: not JSON, shown as it is)."""
        for raw in lines:
            shown = self.choose(raw)
            if shown is not None:
                yield shown

    def choose(self, raw: bytes) -> Shown | None:
        """One raw line (without its newline) as it is to be shown, or None to hide it.

        A line that cannot match the filter (:meth:`Filter.may_match`) is not decoded, not
        parsed and, with ``json``, not counted as skipped either.
        """
        if not self.filter.may_match(raw):
            return None
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return None
        event = parse_line(text)
        if event is None:
            if self.json:
                self.skipped += 1
            elif not self.filter.active:
                return text, None
            return None
        return (text, event) if self.filter.matches(event) else None

    def write(self, selected: Iterable[Shown]) -> None:
        today = datetime.now(self.tz).date() if self.tz is not None else date.today()
        for text, event in selected:
            if event is None or self.json:
                self.out.write(text + "\n")
            else:
                self.out.write(
                    format_event(event, color=self.color, tz=self.tz, today=today) + "\n"
                )
        self.out.flush()
