"""Structured logging: one JSON object per line in ``[log] file``, readable on a terminal.

This is the only module that configures structlog.  Events are dictionaries all the way to
the sink, which writes them twice at most: as a JSON line to the log file (for ``tail -f``
and ``jq``) and, when ``ipcd run`` has a terminal, through structlog's console renderer.
``reopen()`` is what SIGHUP calls after logrotate has moved the file away.

Jobs matter more than log lines: a write the kernel refuses (a full disk, a quota, an I/O
error) drops that line, counts it (:meth:`Sink.take_dropped`, which each of the daemon's
processes adds to its own stats record) and never raises, so the daemon keeps serving and
the next line is tried as usual: logging resumes by itself when space returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from ipcd.config import LogConfig
from ipcd.wire import jsoncodec

Logger = FilteringBoundLogger
# json.dumps's look (", " and ": "), which `tail -f` readers are used to; any value that
# is not JSON (an exception, a path) is written as its str().
_encode = jsoncodec.encoder(
    ensure_ascii=False, allow_nan=True, default=str, separators=(", ", ": ")
)


def _take_back(fd: int, written: int) -> None:
    """Remove the start of a line that a full disk cut short, so that the log stays one
    JSON object a line for ``jq`` and ``ipcctl logs`` (the next line would otherwise be
    glued to the fragment).

    With O_APPEND our fragment ends where our file offset now is; it is cut off only
    while it is still the end of the file: when another process has appended since,
    cutting would take its line too, and the fragment stays (one unreadable line).
    """
    with contextlib.suppress(OSError):
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if written and os.fstat(fd).st_size == end:
            os.ftruncate(fd, end - written)


class Sink:
    """Where rendered events go; owns the log file so that it can be reopened."""

    def __init__(self, path: Path | None, console: TextIO | None) -> None:
        self.path = path
        self.console = console
        #: The log file as a bare descriptor: one write(2) per line, whatever its length
        #: (a buffered text file splits long lines and costs two layers of Python).
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._clock = _IsoClock()
        self._console_render = (
            structlog.dev.ConsoleRenderer(colors=_wants_color(console)) if console else None
        )
        #: Lines this process could not write to the log file (the disk was full...) and
        #: has not yet been asked about (take_dropped).
        self._dropped = 0
        #: Why the last line was dropped (``strerror``), for the daemon's stderr notice.
        self.drop_reason = ""
        #: Dropped lines this process has not yet said it dropped (see _say_resumed).
        self._unreported = 0
        self.reopen()

    def reopen(self) -> None:
        """Open (again) the log file by name, so writes follow a rotation."""
        if self.path is None:
            return
        fresh = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        with self._lock:
            old, self._fd = self._fd, fresh
        if old is not None:
            os.close(old)

    def keep_console(self) -> None:
        """Write the console (``ipcd run``'s stderr) through a descriptor of its own, so
        that it stays where it is when this process points fds 1 and 2 elsewhere (a
        worker's, at its run file: ipcd.daemon.capture)."""
        if self.console is None:
            return
        try:
            fd = self.console.fileno()
        except (AttributeError, OSError, ValueError):
            return  # not a file (a test's StringIO): nothing to keep
        if fd in (1, 2):
            self.console = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8")

    def fileno(self) -> int | None:
        """The log file's descriptor, which the daemonizer must keep open."""
        return self._fd

    def emit(self, method: str, event: EventDict) -> None:
        # When, how bad and what first, so that a line reads well before it reaches jq.
        ordered = {
            "timestamp": event.pop("timestamp", None),
            "level": event.pop("level", method),
            "event": event.pop("event", None),
            **event,
        }
        self._put(method, ordered)

    def write(
        self, level: str, event: str, context: dict[str, Any], fields: dict[str, Any]
    ) -> None:
        """Write one event that skips structlog's processors: the per-job hot path.

        The line has the same shape as every other event (timestamp, level, event, the
        bound context, then the fields in order); only the work of getting there is shorter.
        """
        line = {"timestamp": self._clock.now(), "level": level, "event": event, **context, **fields}
        self._put(level, line)

    def _put(self, method: str, ordered: dict[str, Any]) -> None:
        with self._lock:
            if self._fd is not None:
                # backslashreplace: a lone surrogate (a handler's undecodable bytes) must
                # not cost the event.  O_APPEND keeps lines of concurrent workers whole.
                line = (_encode(ordered) + "\n").encode("utf-8", "backslashreplace")
                if self._write_line(self._fd, line) and self._unreported:
                    self._say_resumed(self._fd)
            if self.console is not None and self._console_render is not None:
                rendered = self._console_render(None, method, _for_console(ordered))
                self.console.write(f"{rendered}\n")
                self.console.flush()

    def _write_line(self, fd: int, line: bytes) -> bool:
        """One write(2) of one line; a refused one is counted and dropped (the caller
        holds the lock)."""
        try:
            written = os.write(fd, line)
            if written == len(line):
                return True
            _take_back(fd, written)
            reason = "short write (the disk filled up within the line)"
        except OSError as exc:  # ENOSPC, EDQUOT, EIO, EFBIG...: drop the line, never stop
            reason = exc.strerror or type(exc).__name__
        self._dropped += 1
        self._unreported += 1
        self.drop_reason = reason
        return False

    def take_dropped(self) -> int:
        """The lines this process dropped since the last call.  Each of the daemon's
        processes counts them in its own stats record: the sink, which every part of a
        process shares and a worker inherits across fork, cannot know whose record that
        is.  A worker takes (and leaves to the master) what it inherited, first thing."""
        if not self._dropped:  # the usual case, once per job: no lock to take
            return 0
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        return dropped

    def _say_resumed(self, fd: int) -> None:
        """After lines were dropped, the first line written again is followed by one
        ``log.resumed`` event saying how many this process lost, so that whoever reads
        the log knows of the gap."""
        event = {
            "timestamp": self._clock.now(),
            "level": "warning",
            "event": "log.resumed",
            "pid": os.getpid(),
            "dropped": self._unreported,
            "reason": self.drop_reason,
        }
        line = (_encode(event) + "\n").encode("utf-8", "backslashreplace")
        try:
            if os.write(fd, line) == len(line):
                self._unreported = 0
        except OSError:
            pass  # said with the next line that gets through

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _for_console(ordered: dict[str, Any]) -> dict[str, Any]:
    """The event for structlog's console renderer, which takes an ``exception`` as text:
    dict_tracebacks made it a list of stacks for the JSON line (a list here made every
    event logged with ``exc_info`` raise TypeError under ``ipcd run``).

    Changed in place: the line is encoded for the file before, the renderer pops what it
    renders anyway, and the dict is the sink's own (a copy cost every event a dict)."""
    event = ordered
    stacks = event.get("exception")
    if isinstance(stacks, list):
        lines = []
        for stack in stacks:
            lines.append("Traceback (most recent call last):")
            for f in stack.get("frames", ()):
                lines.append(
                    f'  File "{f.get("filename")}", line {f.get("lineno")}, in {f.get("name")}'
                )
            lines.append(f"{stack.get('exc_type')}: {stack.get('exc_value')}")
        event["exception"] = "\n".join(lines)
    return event


class DropNotice:
    """The daemon's word about log lines it dropped, on stderr (the journal under
    systemd, see ipcd.daemon.detach), at most once per ``interval`` seconds: the log file
    itself is where nothing more can be said."""

    def __init__(self, path: Path | None, *, interval: float = 60.0, fd: int = 2) -> None:
        self._path = path
        self._interval = interval
        self._fd = fd
        self._told = 0
        self._told_at: float | None = None

    def update(self, dropped: int, reason: str) -> None:
        """``dropped``: the daemon's count so far (every process's); says how many more
        were dropped since it last spoke, if it may speak again."""
        now = time.monotonic()
        if dropped <= self._told or (
            self._told_at is not None and now - self._told_at < self._interval
        ):
            return
        because = f" ({reason})" if reason else ""
        text = (
            f"ipcd: {dropped - self._told} log events could not be written to "
            f"{self._path}{because}, {dropped} since start; jobs keep running and logging "
            f"resumes when the file can be written again\n"
        )
        with contextlib.suppress(OSError):
            os.write(self._fd, text.encode("utf-8", "replace"))
        self._told, self._told_at = dropped, now


class _SinkLogger:
    """The wrapped logger structlog calls; each method receives the event as keywords."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def _method(name: str) -> Any:  # type: ignore[misc]  # a factory used in the class body
        def emit(self: _SinkLogger, **event: Any) -> None:
            self._sink.emit(name, event)

        return emit

    debug = _method("debug")
    info = _method("info")
    warning = _method("warning")
    error = _method("error")
    critical = _method("critical")
    exception = _method("error")
    msg = _method("info")


class Events:
    """The one event per job, written straight to the sink.

    structlog's bound logger and processor chain cost about as much as the rest of a
    no-op job together; this writes the same JSON line, with the same bound context, for
    the events a worker writes for every job.  Other events keep going through structlog.
    """

    def __init__(self, sink: Sink, level: str, **context: Any) -> None:
        self._sink = sink
        self._context = context
        threshold = logging.getLevelNamesMapping()[level.upper()]
        #: Whether debug events are written: callers test it before building one.
        self.debugging = threshold <= logging.DEBUG
        self._info = threshold <= logging.INFO

    def info(self, event: str, fields: dict[str, Any]) -> None:
        if self._info:
            self._sink.write("info", event, self._context, fields)

    def debug(self, event: str, fields: dict[str, Any]) -> None:
        if self.debugging:
            self._sink.write("debug", event, self._context, fields)


class _IsoClock:
    """The time as structlog's ISO stamper writes it, formatting the date once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._text}.{int((now - second) * 1e6):06d}Z"


def _as_keywords(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Final processor: hand the event dict over unrendered (the sink renders it)."""
    return event


def configure(config: LogConfig, *, console: TextIO | None = None) -> Sink:
    """Set up structlog for the daemon process and return the sink."""
    sink = Sink(config.file, console)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            _as_keywords,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[config.level.upper()]
        ),
        logger_factory=lambda *args: _SinkLogger(sink),
        cache_logger_on_first_use=True,
    )
    return sink


def get_logger(**context: Any) -> Logger:
    logger: Logger = structlog.get_logger(**context)
    return logger


def _wants_color(stream: TextIO | None) -> bool:
    return (
        stream is not None
        and stream.isatty()
        and "NO_COLOR" not in os.environ
        and os.environ.get("TERM") != "dumb"
    )
