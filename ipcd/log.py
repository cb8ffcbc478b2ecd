"""Structured logging: one JSON object per line in ``[log] file``, readable on a terminal.

This is the only module that configures structlog.  Events are dictionaries all the way to
the sink, which writes them twice at most: as a JSON line to the log file (for ``tail -f``
and ``jq``) and, when ``ipcd run`` has a terminal, through structlog's console renderer.
``reopen()`` is what SIGHUP calls after logrotate has moved the file away.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

from ipcd import jsoncodec
from ipcd.config import LogConfig

Logger = FilteringBoundLogger
# json.dumps's look (", " and ": "), which `tail -f` readers are used to; any value that
# is not JSON (an exception, a path) is written as its str().
_encode = jsoncodec.encoder(
    ensure_ascii=False, allow_nan=True, default=str, separators=(", ", ": ")
)


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
        line = {"timestamp": self._clock.now(), "level": level, "event": event}
        line.update(context)
        line.update(fields)
        self._put(level, line)

    def _put(self, method: str, ordered: dict[str, Any]) -> None:
        with self._lock:
            if self._fd is not None:
                # backslashreplace: a lone surrogate (a handler's undecodable bytes) must
                # not cost the event.  O_APPEND keeps lines of concurrent workers whole.
                os.write(self._fd, (_encode(ordered) + "\n").encode("utf-8", "backslashreplace"))
            if self.console is not None and self._console_render is not None:
                rendered = self._console_render(None, method, dict(ordered))
                self.console.write(f"{rendered}\n")
                self.console.flush()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


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
