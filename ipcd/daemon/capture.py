"""What a job writes to stdout and stderr, and the progress it reports, caught per job.

A handler's ``print`` and the output of the programs it starts both end up in the
worker's file descriptors 1 and 2, so the capture is made there, not in ``sys.stdout``:
each worker points fds 1 and 2, for its whole life, at its own *run file* in the daemon's
run directory (``[store] path`` + ``.run/``, 0700, the daemon's user; emptied at every
start, :meth:`RunDir.prepare`).  The file (layout: ipcd.layout.runfile) is a one-page
header, which the worker rewrites in place through a shared mapping (the job it runs,
its progress), then the output, appended by the kernel (``O_APPEND``), whoever writes it.

Why one file per worker, reused, rather than one per job: a job that writes nothing
then costs no file made and removed, no ``dup2`` and no directory write; only one
``lseek`` (is there output to take) and a few stores into the header.  Per job:

1. :meth:`Capture.begin`: the output the last job left is cut off (``ftruncate``, only
   when it left some) and the header names the new job;
2. the handler runs; ``job.progress()`` goes to :meth:`Capture.progress`, which
   publishes into the header at most every :data:`PUBLISH_INTERVAL` and keeps the latest
   in memory: a shared mapping, so no lock of the store's, no system call, and a
   handler calling it in a tight loop pays a clock read;
3. :meth:`Capture.end`: Python's own buffers are flushed, and the last ``max_output``
   bytes of what was written are read back (``pread``), with the latest progress, to be
   recorded with the job's outcome in the job store (ipcd.store, table ``outputs``).

The control process (ipcd.daemon.control: ``ipcctl tail``, ``show``, ``list``) finds
a running job's file by reading the headers of the run files (one per worker slot, so a
handful) and reads the output while the worker writes it (:class:`RunFiles`), with
``pread``, never a mapping: a new worker cuts its file back to the header, and a mapping
read past a file's end is SIGBUS.

What it does not do: a program a job started and left running keeps writing to the
file after its job ended; that is dropped when the worker's next job begins if its job
wrote anything, else it is counted to the next job.  While a
job runs its file grows as the job writes; the stored copy, and what ``tail`` shows of
a job it joins late, are the last ``max_output`` bytes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from ipcd.layout import runfile
from ipcd.layout.runfile import HEADER_SIZE, Header
from ipcd.store import Captured

#: The most times per second a job's progress reaches its run file's header.
PUBLISH_INTERVAL = 0.25
#: Name of a worker slot's run file in the run directory.
_SLOT_FILE = "slot-{}"
#: The most bytes one live read returns (a control answer must stay small).
LIVE_CHUNK = 64 << 10


class RunDir:
    """The daemon's private directory of run files (``PATH.run/`` beside the store)."""

    SUFFIX = ".run"

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def beside(cls, store_path: Path) -> RunDir:
        return cls(store_path.with_name(store_path.name + cls.SUFFIX))

    def prepare(self) -> None:
        """Make the directory (0700) if missing and empty it: at start, no job runs, so
        every file there is left by a daemon that stopped.  OSError when it cannot be."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.path, 0o700)
        os.chmod(self.path, 0o700)
        for entry in os.scandir(self.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    def slot_file(self, slot: int) -> Path:
        return self.path / _SLOT_FILE.format(slot)


class Capture:
    """One worker's run file, and what its current job wrote and reported.

    Made by :meth:`open` in the worker after the fork; ``clock`` and ``monotonic`` are
    injected for tests.
    """

    def __init__(
        self,
        fd: int,
        view: mmap.mmap,
        max_output: int,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fd = fd
        self._view = view
        self._header = memoryview(view)
        self.max_output = max_output
        self._clock = clock
        self._monotonic = monotonic
        self._job_id = ""
        self._started = 0.0
        self._latest: tuple[float, str] | None = None
        self._published_at = -float("inf")
        self._unpublished = False
        #: The file holds output after its header (the last job wrote some).
        self._dirty = False

    @classmethod
    def open(cls, path: Path, max_output: int) -> Capture:
        """Make the run file anew at ``path`` (0600) with a header naming no job; OSError
        when it cannot be (a full disk: the worker then runs its jobs uncaptured)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # Never shorter than its header (a reader may be reading it: no O_TRUNC), and
            # the header's blocks allocated now, so that a store into the mapping can
            # never meet a full disk (SIGBUS): a full disk is an OSError here instead.
            os.ftruncate(fd, HEADER_SIZE)
            os.posix_fallocate(fd, 0, HEADER_SIZE)
            view = mmap.mmap(fd, HEADER_SIZE)
        except BaseException:
            os.close(fd)
            raise
        runfile.format_header(memoryview(view))
        return cls(fd, view, max_output)

    def redirect(self) -> None:
        """Point this process's fds 1 and 2 at the run file (appending), and have
        ``sys.stdout`` flush at each line, so that a ``print`` reaches the file (and
        ``ipcctl tail``) as it is made rather than when a buffer fills."""
        appending = os.open(f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_APPEND)
        try:
            for fd in (1, 2):
                os.dup2(appending, fd)
        finally:
            os.close(appending)
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                with contextlib.suppress(ValueError, OSError):
                    reconfigure(line_buffering=True)

    def begin(self, job_id: str) -> None:
        """A job starts: what the last one left is dropped, the header names it."""
        if self._dirty:
            os.ftruncate(self.fd, HEADER_SIZE)
            self._dirty = False
        self._job_id, self._started = job_id, self._clock()
        self._latest, self._unpublished = None, False
        self._published_at = -float("inf")
        runfile.write(self._header, job_id, self._started, None, 0.0, "")

    def progress(self, fraction: float, message: str) -> None:
        """The job's ``job.progress()``: kept, and published into the header unless the
        last was published less than :data:`PUBLISH_INTERVAL` ago."""
        self._latest = (fraction, message)
        now = self._monotonic()
        if now - self._published_at < PUBLISH_INTERVAL:
            self._unpublished = True
            return
        self._published_at = now
        self._unpublished = False
        runfile.write(self._header, self._job_id, self._started, fraction, self._clock(), message)

    def end(self) -> Captured | None:
        """The job's handler returned: the last ``max_output`` bytes it wrote and its
        latest progress, or None when it wrote nothing and reported none.  The output
        stays in the file (``tail`` may still read it) until the next :meth:`begin`."""
        # A handler may have closed or replaced them; try/except, not suppress(), which
        # costs a context manager per stream and job.
        for stream in (sys.stdout, sys.stderr):
            try:  # noqa: SIM105
                stream.flush()
            except Exception:
                pass
        if self._unpublished and self._latest is not None:
            fraction, message = self._latest
            runfile.write(
                self._header, self._job_id, self._started, fraction, self._clock(), message
            )
            self._unpublished = False
        # The file's end, from our own descriptor (its offset is no one else's): a
        # third of an fstat's cost, on every job.
        size = os.lseek(self.fd, 0, os.SEEK_END) - HEADER_SIZE
        if size > 0:
            self._dirty = True
        elif self._latest is None:
            return None
        output = b""
        if size > 0 and self.max_output > 0:
            keep = min(size, self.max_output)
            output = _pread_all(self.fd, keep, HEADER_SIZE + size - keep)
        if self._latest is None:
            return Captured(output, size)
        fraction, message = self._latest
        return Captured(output, max(size, 0), fraction, runfile.clip(message).decode())

    def close(self) -> None:
        self._header.release()
        self._view.close()
        os.close(self.fd)


class Live(NamedTuple):
    """A running job's output as a live read found it."""

    header: Header
    #: The bytes from ``offset`` on (at most LIVE_CHUNK).
    data: bytes
    #: Where ``data`` starts in all the job wrote (later than asked when the bytes
    #: asked for are older than the last ``max_output``).
    offset: int
    #: How many bytes the job has written so far.
    size: int


class RunFiles:
    """The control process's view of the workers' run files: which job each runs, its
    progress, its output so far."""

    def __init__(self, run_dir: RunDir, slots: int, max_output: int) -> None:
        self.run_dir = run_dir
        self.slots = slots
        self.max_output = max_output

    def headers(self) -> dict[str, Header]:
        """Each running job's header, by job id (what ``list`` shows of its progress)."""
        found: dict[str, Header] = {}
        for slot in range(self.slots):
            with self._opened(slot) as opened:
                if opened is not None and opened[1].job_id:
                    found[opened[1].job_id] = opened[1]
        return found

    def live(self, job_id: str, offset: int, limit: int = LIVE_CHUNK) -> Live | None:
        """What the running job ``job_id`` has written from ``offset`` on; None when no
        run file names it (it has not started, or its worker moved on to another job)."""
        for slot in range(self.slots):
            with self._opened(slot) as opened:
                if opened is None or opened[1].job_id != job_id:
                    continue
                fd = opened[0]
                size = max(os.fstat(fd).st_size - HEADER_SIZE, 0)
                start = min(max(offset, size - self.max_output, 0), size)
                data = _pread_all(fd, min(size - start, limit), HEADER_SIZE + start)
                again = read_header(fd)
                if again is None or again.job_id != job_id:
                    return None  # the worker began another job while we read
                return Live(again, data, start, size)
        return None

    def left(self, job_id: str) -> Captured | None:
        """What ``job_id`` wrote and reported before its worker died (a timeout, the OOM
        killer): its last ``max_output`` bytes, how many in all and its last progress, as
        the dead worker's run file holds them until its slot's next job begins; None when
        no run file names it or it wrote and reported nothing.  The master records it
        with the job's outcome, as a worker would have."""
        live = self.live(job_id, 0, limit=self.max_output)
        if live is None or (live.size == 0 and live.header.fraction is None):
            return None
        return Captured(live.data, live.size, live.header.fraction, live.header.message)

    @contextlib.contextmanager
    def _opened(self, slot: int) -> Iterator[tuple[int, Header] | None]:
        """The slot's run file open and its header read: (fd, header), or None when
        there is no such file (no worker has had the slot since the start) or no whole
        header could be read."""
        try:
            fd = os.open(self.run_dir.slot_file(slot), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield None
            return
        try:
            header = read_header(fd)
            yield None if header is None else (fd, header)
        finally:
            os.close(fd)


def read_header(fd: int, tries: int = 100) -> Header | None:
    """The header of the run file open at ``fd``, read with ``pread`` rather than
    mapped (a mapping read while the file is cut short raises SIGBUS): two reads alike,
    with an even sequence, are a whole one (ipcd.layout.runfile)."""
    for _ in range(tries):
        first = os.pread(fd, HEADER_SIZE, 0)
        if first != os.pread(fd, HEADER_SIZE, 0):
            continue
        if not runfile.readable(first):
            return None
        header = runfile.read(first, tries=1)
        if header is not None:
            return header
    return None


def _pread_all(fd: int, count: int, offset: int) -> bytes:
    """``count`` bytes at ``offset`` (fewer if the file is shorter)."""
    chunks: list[bytes] = []
    while count > 0:
        chunk = os.pread(fd, count, offset)
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)
