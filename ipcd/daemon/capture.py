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

Bounded while the job runs, too: a thread of the worker (:meth:`Capture.start_trimming`)
looks at the file's size every :data:`TRIM_EVERY` seconds, and a file past
:data:`LIVE_MAX` is cut to its last bytes (at least ``max_output``), moved to the front
(:meth:`Capture.trim`); the header counts what was cut (``dropped``), so that readers
keep their place in the job's output.  What the job appends in the moment between the
read and the cut is lost from the live file: a job that writes that much loses only the
middle of what it wrote, never its tail.

What it does not do: a program a job started and left running keeps writing to the
file after its job ended; that is dropped when the worker's next job begins if its job
wrote anything, else it is counted to the next job.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from ipcd.layout import runfile
from ipcd.layout.runfile import HEADER_SIZE, Header
from ipcd.store import Captured

#: The most times per second a job's progress reaches its run file's header.
PUBLISH_INTERVAL = 0.25
#: When a job that published no progress yet last published it.
_NEVER = -math.inf
#: Name of a worker slot's run file in the run directory.
_SLOT_FILE = "slot-{}"
#: The most bytes one live read returns (a control answer must stay small).
LIVE_CHUNK = 64 << 10
#: A run file's output past this many bytes is trimmed to its last ones while the job
#: runs: a job that writes without end does not fill the run directory's disk.
LIVE_MAX = 16 << 20
#: How often the worker's trimming thread looks at its run file's size (seconds).
TRIM_EVERY = 0.5
#: The least a trim keeps (more when ``max_output`` is more): a late ``tail`` shows it.
TRIM_KEEP = 1 << 20


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
        self._published_at = _NEVER
        self._unpublished = False
        #: The file holds output after its header (the last job wrote some).
        self._dirty = False
        #: Bytes of the current job's output trimmed from the file's front.
        self._dropped = 0
        #: What the header shows: the progress published (None: none) and its time.
        self._shown: tuple[float | None, float, str] = (None, 0.0, "")
        self._closed = False
        #: Held around every change of the file and its header: the trimming thread
        #: (:meth:`start_trimming`) and the worker's own calls take turns.
        self._lock = threading.Lock()

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
        with self._lock:
            if self._dirty:
                os.ftruncate(self.fd, HEADER_SIZE)
                self._dirty = False
            self._job_id, self._started = job_id, self._clock()
            self._latest, self._unpublished = None, False
            self._published_at = _NEVER
            self._dropped = 0
            self._publish(None, 0.0, "")

    def _publish(self, fraction: float | None, updated: float, message: str) -> None:
        """The header rewritten: the job, its progress, what was trimmed (lock held)."""
        self._shown = (fraction, updated, message)
        runfile.write(
            self._header, self._job_id, self._started, fraction, updated, message, self._dropped
        )

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
        with self._lock:
            self._publish(fraction, self._clock(), message)

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
        with self._lock:
            if self._unpublished and self._latest is not None:
                fraction, message = self._latest
                self._publish(fraction, self._clock(), message)
                self._unpublished = False
            # The file's end, from our own descriptor (its offset is no one else's): a
            # third of an fstat's cost, on every job.
            size = os.lseek(self.fd, 0, os.SEEK_END) - HEADER_SIZE
            if size > 0:
                self._dirty = True
            elif self._latest is None and not self._dropped:
                return None
            output = b""
            if size > 0 and self.max_output > 0:
                keep = min(size, self.max_output)
                output = _pread_all(self.fd, keep, HEADER_SIZE + size - keep)
            total = self._dropped + max(size, 0)
        if self._latest is None:
            return Captured(output, total)
        fraction, message = self._latest
        return Captured(output, total, fraction, runfile.clip(message).decode())

    def trim(self, limit: int = LIVE_MAX, keep: int = TRIM_KEEP) -> bool:
        """Cut the running job's output in the file to its last ``keep`` bytes (at least
        ``max_output``) when it is past ``limit``, counted in the header's ``dropped``;
        whether it did.  (Appends that
        come between the read and the cut are lost: see the module's docstring.)"""
        with self._lock:
            if self._closed:
                return False
            size = os.fstat(self.fd).st_size - HEADER_SIZE
            if not self._job_id or size <= limit:
                return False
            kept = min(size, max(self.max_output, keep))
            tail = _pread_all(self.fd, kept, HEADER_SIZE + size - kept)
            # What the job appended meanwhile is taken too: only what lands between the
            # last look and the cut is lost (and not counted), a window of microseconds.
            while (end := os.fstat(self.fd).st_size - HEADER_SIZE) > size:
                tail += _pread_all(self.fd, end - size, HEADER_SIZE + size)
                size = end
            os.pwrite(self.fd, tail, HEADER_SIZE)
            os.ftruncate(self.fd, HEADER_SIZE + len(tail))
            self._dropped += size - len(tail)
            self._dirty = True
            self._publish(*self._shown)
            return True

    def start_trimming(self, every: float = TRIM_EVERY) -> threading.Thread:
        """A daemon thread that calls :meth:`trim` every ``every`` seconds, for the
        worker's life: the handler runs in the main thread and cannot be asked to."""

        def loop() -> None:
            while True:
                time.sleep(every)
                # A file the next look may find writable again (a full disk).
                with contextlib.suppress(OSError):
                    self.trim()

        thread = threading.Thread(target=loop, name="ipcd-trim", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with self._lock:  # the trimming thread never touches a closed (or reused) fd
            self._closed = True
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
                fd, header = opened
                for _ in range(100):  # read again while a trim moves the output
                    dropped = header.dropped
                    # Positions in all the job wrote; the file holds it from ``dropped``.
                    size = dropped + max(os.fstat(fd).st_size - HEADER_SIZE, 0)
                    start = min(max(offset, size - self.max_output, dropped), size)
                    data = _pread_all(fd, min(size - start, limit), HEADER_SIZE + start - dropped)
                    again = read_header(fd)
                    if again is None or again.job_id != job_id:
                        return None  # the worker began another job while we read
                    if again.dropped == dropped:
                        return Live(again, data, start, size)
                    header = again
                return None
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
