"""Reading ipcd's JSON event log for people: select, format and follow its lines.

``ipcctl logs`` and ``ipcctl result --log`` read ``[log] file``, one JSON object per line
as ipcd.log writes it (``timestamp``, ``level`` and ``event`` first, then the event's
fields).  The parts are pure functions of text so that they are tested without a daemon:
:func:`parse_since` turns ``--since`` into a time, :class:`Filter` decides which events to
show, :func:`format_event` renders one event as a line for a terminal.  :class:`Follower`
is the only part that touches the file: it reads it by name the way ``tail -F`` does, so
it goes on across a rotation (the file renamed away and a new one created, or the file
truncated in place).

This module is on ipcctl's path and must stay lean: the standard library only, never
structlog (ipcd.log writes the lines; reading them needs nothing of it).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as clock_time
from io import FileIO
from pathlib import Path
from typing import Any, TextIO

from ipcd.config import HandlerConfig
from ipcd.errors import IpcPermissionError, LogFileError, UsageError

#: Levels from least to most severe; ``--level L`` shows L and those after it.
LEVELS = ("debug", "info", "warning", "error", "critical")
#: Seconds between looks at the file while following.
POLL_INTERVAL = 0.2
#: Seconds ``result --log`` waits for a stored result's ``job.done`` to reach the log.
SETTLE_SECONDS = 2.0
#: Seconds a file that was rotated away is still read once it stops growing: the old
#: generation of workers keeps writing to it until it exits after a reload.
DRAIN_SECONDS = 5.0

Event = dict[str, Any]

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

    @property
    def active(self) -> bool:
        """Whether anything is selected at all (a line that is not JSON can never match)."""
        return bool(self.jobs or self.types or self.handlers or self.level or self.since)

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
    structlog's dict_tracebacks wrote) is shown on the lines after it, indented.
    """
    when = event_time(event)
    if today is None:
        today = datetime.now(tz).date() if tz is not None else date.today()
    stamp = format_time(when, event.get("timestamp"), tz, today)
    level = str(event.get("level", "-"))
    name = str(event.get("event", "-"))
    fields = [
        (key, value)
        for key, value in event.items()
        if key not in ("timestamp", "level", "event", "exception")
    ]
    if color:
        style = _LEVEL_STYLE.get(level.lower(), _BOLD)
        head = f"{_DIM}{stamp}{_RESET} {style}{level:<8}{_RESET} {_BOLD}{name}{_RESET}"
        parts = [f"{_KEY}{key}{_RESET}={_styled(key, value)}" for key, value in fields]
    else:
        head = f"{stamp} {level:<8} {name}"
        parts = [f"{key}={format_value(value)}" for key, value in fields]
    line = f"{head}  {' '.join(parts)}" if parts else head
    if "exception" in event:
        line += "".join(f"\n    {text}" for text in format_exception(event["exception"]))
    return line


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


# --- reading --------------------------------------------------------------------------


def _open(path: Path) -> FileIO:
    """Open the log for reading as bytes, turning failures into ipcd errors."""
    try:
        return open(path, "rb", buffering=0)  # kept open while following
    except FileNotFoundError:
        raise LogFileError(f"log file {path} does not exist (yet?)") from None
    except PermissionError:
        raise IpcPermissionError(f"permission denied reading log file {path}") from None
    except OSError as exc:
        raise LogFileError(f"cannot read log file {path}: {exc.strerror}") from None


def read_lines(path: Path) -> list[str]:
    """Every line of the log file now, the last one even without its newline."""
    with _open(path) as fh:
        data = fh.readall()
    return [_decode(line) for line in data.splitlines()]


def job_lines(
    path: Path, job_id: str, *, finished: bool, wait: float = SETTLE_SECONDS
) -> list[str]:
    """The log lines of one job (``ipcctl result --log``).

    A worker stores the result and wakes its waiter before it logs ``job.done``, so a
    client that has just seen the result may read the log a moment too early: with
    ``finished`` (the result is stored and the log level shows info events) this waits up
    to ``wait`` seconds for that event.
    """
    only = Filter(jobs=frozenset({job_id}))
    deadline = time.monotonic() + wait
    while True:
        events = [(text, parse_line(text)) for text in read_lines(path)]
        mine = [(text, e) for text, e in events if e is not None and only.matches(e)]
        done = any(e.get("event") == "job.done" for _, e in mine)
        if done or not finished or time.monotonic() >= deadline:
            return [text for text, _ in mine]
        time.sleep(0.05)


def _decode(line: bytes) -> str:
    return line.decode("utf-8", "replace").rstrip("\r")


@dataclass
class _Tail:
    """One open file being read: where we are and the unfinished last line."""

    fh: FileIO
    ino: int
    dev: int
    partial: bytes = b""
    grew: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, path: Path) -> _Tail:
        fh = _open(path)
        st = os.fstat(fh.fileno())
        return cls(fh, st.st_ino, st.st_dev)

    def read(self) -> list[str]:
        """The lines completed since the last read; an unfinished one waits for its end."""
        data = self.fh.readall()
        if not data:
            return []
        self.grew = time.monotonic()
        *done, self.partial = (self.partial + data).split(b"\n")
        return [_decode(line) for line in done]

    def truncated(self) -> bool:
        return os.fstat(self.fh.fileno()).st_size < self.fh.tell()

    def rewind(self) -> None:
        self.fh.seek(0)
        self.partial = b""

    def close(self) -> list[str]:
        """Close the file; its unfinished line, if any, is returned as it is."""
        self.fh.close()
        rest, self.partial = self.partial, b""
        return [_decode(rest)] if rest else []


class Follower:
    """Reads a log file by name and goes on reading it across rotations, as ``tail -F``.

    Each :meth:`poll`, in this order: reads what was added to files that were rotated
    away (until they have not grown for ``drain`` seconds), checks the current file for
    truncation (copytruncate: read again from the start), reads it, and looks at the name:
    another file there (renamed away and created anew) is read from its start, and the
    old one drained.  A file that is missing is waited for.  ``notice`` receives one line
    for each of these changes, for stderr.
    """

    def __init__(
        self, path: Path, *, notice: Callable[[str], None], drain: float = DRAIN_SECONDS
    ) -> None:
        self.path = path
        self.notice = notice
        self.drain = drain
        self._current: _Tail | None = None
        self._draining: list[_Tail] = []
        self._gone = False

    def start(self) -> list[str]:
        """Open the file if it is there and return the complete lines it already holds."""
        try:
            self._current = _Tail.open(self.path)
        except LogFileError:
            if self.path.exists():
                raise
            self.notice(f"waiting for {self.path} to appear")
            self._gone = True
            return []
        return self._current.read()

    def poll(self) -> list[str]:
        """The lines completed since the last call, from the old files and the current."""
        lines: list[str] = []
        now = time.monotonic()
        for old in list(self._draining):
            lines += old.read()
            if now - old.grew > self.drain:
                lines += old.close()
                self._draining.remove(old)
        current = self._current
        if current is not None:
            if current.truncated():
                self.notice(f"{self.path}: file truncated")
                current.rewind()
            lines += current.read()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not self._gone:
                self._gone = True
                self.notice(f"{self.path} has been moved away; waiting for a new one")
            return lines
        if current is None or (st.st_ino, st.st_dev) != (current.ino, current.dev):
            try:
                fresh = _Tail.open(self.path)
            except LogFileError:  # gone again between stat and open: next time
                return lines
            if current is not None:
                current.grew = now
                self._draining.append(current)
            if self._gone:
                self.notice(f"{self.path} has appeared; following it")
            else:
                self.notice(f"{self.path} has been replaced; following the new file")
            self._current, self._gone = fresh, False
            lines += fresh.read()
        return lines

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # an unfinished last line is not shown: it may be half an event

    def close(self) -> list[str]:
        """Stop following; unfinished last lines are returned as they are."""
        rest: list[str] = []
        for tail in [*self._draining, *([self._current] if self._current else [])]:
            rest += tail.close()
        self._draining, self._current = [], None
        return rest


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

    def select(self, lines: Iterable[str]) -> Iterator[tuple[str, Event | None]]:
        """The lines to show with their events (None: not JSON, shown as it is)."""
        for text in lines:
            if not text.strip():
                continue
            event = parse_line(text)
            if event is None:
                if self.json:
                    self.skipped += 1
                elif not self.filter.active:
                    yield text, None
            elif self.filter.matches(event):
                yield text, event

    def write(self, selected: Iterable[tuple[str, Event | None]]) -> None:
        today = datetime.now(self.tz).date() if self.tz is not None else date.today()
        for text, event in selected:
            if event is None or self.json:
                self.out.write(text + "\n")
            else:
                self.out.write(
                    format_event(event, color=self.color, tz=self.tz, today=today) + "\n"
                )
        self.out.flush()


def show(
    path: Path,
    printer: Printer,
    *,
    last: int | None,
    follow: bool,
    notice: Callable[[str], None],
    interval: float = POLL_INTERVAL,
) -> None:
    """``ipcctl logs``: the last ``last`` matching lines (None: all), then with ``follow``
    every new matching line until interrupted."""
    if not follow:
        printer.write(_last(printer.select(read_lines(path)), last))
        return
    with Follower(path, notice=notice) as follower:
        printer.write(_last(printer.select(follower.start()), last))
        while True:
            time.sleep(interval)
            printer.write(printer.select(follower.poll()))


def _last(
    selected: Iterator[tuple[str, Event | None]], count: int | None
) -> Iterable[tuple[str, Event | None]]:
    if count is None:
        return selected
    return deque(selected, maxlen=count)
