"""Reading ipcd's log file for ``ipcctl logs`` and ``result --log``: the end of it, all of
it, or by name across rotations the way ``tail -F`` does.

Logs grow big (a busy daemon writes a line per job), so nothing here holds the whole file:
``-n N`` reads blocks backwards from the end until N lines matched (:func:`lines_backward`),
everything else reads forwards block by block.  Lines are bytes until ipcd.client.logformat's
:class:`~ipcd.client.logformat.Printer` chooses them, so that a ``--job`` filter can throw away the
lines about other jobs before decoding or parsing them.

This module is on ipcctl's path and must stay lean: the standard library only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import FileIO
from pathlib import Path

from ipcd.client.logformat import Filter, Printer, Shown, parse_line
from ipcd.errors import IpcPermissionError, LogFileError

#: Bytes read at a time, forwards or backwards.
BLOCK = 1 << 16
#: Seconds between looks at the file while following.
POLL_INTERVAL = 0.2
#: Seconds ``result --log`` waits for a stored result's ``job.done`` to reach the log.
SETTLE_SECONDS = 2.0
#: Seconds between looks at the log's new end while waiting for that ``job.done``.
SETTLE_POLL = 0.05
#: Seconds a file that was rotated away is still read once it stops growing: the old
#: generation of workers keeps writing to it until it exits after a reload.
DRAIN_SECONDS = 5.0


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


def lines_backward(fd: int, end: int, block: int = BLOCK) -> Iterator[bytes]:
    """The lines of the first ``end`` bytes of ``fd``, last first, without their newlines.

    The first line yielded is what follows the last newline (empty when the file ends with
    one).  Blocks are read with pread, so the file's offset is left alone and a caller may
    stop at any line having read only the blocks that line needed.
    """
    pos = end
    pieces: list[bytes] = []  # the line being put together, its last piece first
    while pos > 0:
        size = min(block, pos)
        pos -= size
        chunk = os.pread(fd, size, pos)  # short only if the file was truncated meanwhile
        first, *complete = chunk.split(b"\n")
        if complete:
            pieces.append(complete[-1])
            complete[-1] = b"".join(reversed(pieces))
            yield from reversed(complete)
            pieces = []
        pieces.append(first)
    yield b"".join(reversed(pieces))


def lines_forward(fh: FileIO) -> Iterator[bytes]:
    """The lines from ``fh``'s offset to its end, the last one even without its newline."""
    partial: list[bytes] = []
    yield from _lines(fh, partial)
    if any(partial):
        yield b"".join(partial)


def _lines(fh: FileIO, partial: list[bytes]) -> Iterator[bytes]:
    """The lines completed from ``fh``'s offset to its end, a block at a time.

    ``partial`` holds the pieces of the unfinished line, before (what a previous read
    left) and after (what is left for the next), so that a long line costs one join and
    not a copy per block.
    """
    while data := fh.read(BLOCK):
        first, *complete = data.split(b"\n")
        partial.append(first)
        if complete:
            line = b"".join(partial)
            partial[:] = [complete.pop()]
            yield line
            yield from complete


def last_shown(printer: Printer, backward: Iterable[bytes], count: int) -> list[Shown]:
    """The last ``count`` lines ``printer`` would show, in file order, from lines given
    last first: reading stops at the ``count``-th match from the end."""
    found: list[Shown] = []
    if count <= 0:
        return found
    for raw in backward:
        shown = printer.choose(raw)
        if shown is not None:
            found.append(shown)
            if len(found) == count:
                break
    found.reverse()
    return found


def job_lines(
    path: Path, job_id: str, *, finished: bool, wait: float = SETTLE_SECONDS
) -> list[bytes]:
    """The log lines of one job (``ipcctl result --log``).

    A worker stores the result and wakes its waiter before it logs ``job.done``, so a
    client that has just seen the result may read the log a moment too early: with
    ``finished`` (the result is stored and the log level shows info events) this waits up
    to ``wait`` seconds for that event, reading only what is added to the file meanwhile.
    """
    only = Filter(jobs=frozenset({job_id}))
    mine: list[bytes] = []
    done = False
    deadline = time.monotonic() + wait
    tail = _Tail.open(path)
    try:
        while True:
            for raw in tail.lines():
                if not only.may_match(raw):
                    continue
                event = parse_line(raw.decode("utf-8", "replace"))
                if event is not None and only.matches(event):
                    mine.append(raw)
                    done = done or event.get("event") == "job.done"
            if done or not finished or time.monotonic() >= deadline:
                return mine
            time.sleep(SETTLE_POLL)
    finally:
        tail.close()


@dataclass
class _Tail:
    """One open file being read: where we are and the unfinished last line."""

    fh: FileIO
    ino: int
    dev: int
    #: The pieces of the unfinished last line.
    partial: list[bytes] = field(default_factory=list)
    grew: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, path: Path) -> _Tail:
        fh = _open(path)
        st = os.fstat(fh.fileno())
        return cls(fh, st.st_ino, st.st_dev)

    def lines(self) -> Iterator[bytes]:
        """The lines completed since the last read, read block by block; an unfinished
        one waits for its end."""
        before = self.fh.tell()
        yield from _lines(self.fh, self.partial)
        if self.fh.tell() != before:
            self.grew = time.monotonic()

    def from_end(self) -> Iterator[bytes]:
        """Skip to the end and return the complete lines before it, last first (lazily):
        later reads start at the end, whatever of this a caller reads."""
        end = os.fstat(self.fh.fileno()).st_size
        backward = lines_backward(self.fh.fileno(), end)
        self.partial = [next(backward)]  # after the last newline: its end is yet to come
        self.fh.seek(end)
        return backward

    def truncated(self) -> bool:
        return os.fstat(self.fh.fileno()).st_size < self.fh.tell()

    def rewind(self) -> None:
        self.fh.seek(0)
        self.partial = []

    def close(self) -> list[bytes]:
        """Close the file; its unfinished line, if any, is returned as it is."""
        self.fh.close()
        rest, self.partial = b"".join(self.partial), []
        return [rest] if rest else []


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

    def start(self, *, backward: bool = False) -> Iterator[bytes]:
        """Open the file if it is there and return the complete lines it already holds:
        from the first, or with ``backward`` from the last (and :meth:`poll` goes on from
        the end however few of them were read)."""
        try:
            self._current = _Tail.open(self.path)
        except LogFileError:
            if self.path.exists():
                raise
            self.notice(f"waiting for {self.path} to appear")
            self._gone = True
            return iter(())
        return self._current.from_end() if backward else self._current.lines()

    def poll(self) -> list[bytes]:
        """The lines completed since the last call, from the old files and the current."""
        lines: list[bytes] = []
        now = time.monotonic()
        for old in list(self._draining):
            lines += old.lines()
            if now - old.grew > self.drain:
                lines += old.close()
                self._draining.remove(old)
        current = self._current
        if current is not None:
            if current.truncated():
                self.notice(f"{self.path}: file truncated")
                current.rewind()
            lines += current.lines()
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
            lines += fresh.lines()
        return lines

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # an unfinished last line is not shown: it may be half an event

    def close(self) -> list[bytes]:
        """Stop following; unfinished last lines are returned as they are."""
        rest: list[bytes] = []
        for tail in [*self._draining, *([self._current] if self._current else [])]:
            rest += tail.close()
        self._draining, self._current = [], None
        return rest


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
    every new matching line until interrupted.  Only ``last=None`` reads the whole file,
    and then a block at a time."""
    if not follow:
        with _open(path) as fh:
            if last is None:
                printer.write(printer.select(lines_forward(fh)))
            else:
                end = os.fstat(fh.fileno()).st_size
                printer.write(last_shown(printer, lines_backward(fh.fileno(), end), last))
        return
    with Follower(path, notice=notice) as follower:
        if last is None:
            printer.write(printer.select(follower.start()))
        else:
            printer.write(last_shown(printer, follower.start(backward=True), last))
        while True:
            time.sleep(interval)
            printer.write(printer.select(follower.poll()))
