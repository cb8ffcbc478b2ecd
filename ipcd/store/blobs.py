"""Large bodies and results kept beside the job store, one file each, by reference.

A job's body or result larger than :data:`THRESHOLD` bytes is a file in the store's own
directory ``PATH.bodies/`` (``PATH`` the database file), and its row in the database holds
the file's name instead of the bytes. SQLite keeps a large blob as a chain of overflow
pages: it is written twice (into the ``-wal`` file at the commit, into the database at the
checkpoint), read back page by page, and its pages are freed and reused page by page
when the job goes. A file is written once, read in one call, and removed in one unlink.

The rules that keep a file and its row in step (ipcd.store.sqlite follows them):

- **A file is complete before the row that names it commits**: written (and, with
  ``[store] sync = "full"``, fsync'd with its directory) inside the write transaction,
  before ``COMMIT``. A process killed in between leaves a file no row names (an
  *orphan*), never a row without its file.
- **A file goes after the row that names it is deleted**: the schema's triggers note the
  name of every file whose row goes (table ``unlinked``), and the store removes those files
  after its commit. A process killed in between leaves orphans again.
- **Orphans are swept at the daemon's start** (:meth:`BlobDir.sweep`), under the store's
  write lock, which every writer holds while it writes a file: the sweep never takes the
  file of a transaction still under way.
- Names are never reused (the job's id and 64 random bits), so a late removal can only
  ever take the file it means.

The directory is the store's own (the operator makes the database's directory): made
0700 at the first large body, its files 0600, under umask 077, as the database file is.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

#: Bodies and results larger than this many bytes are kept as files, not in the database
#: (64 KiB: above it SQLite's overflow pages cost more than a file's open and unlink).
THRESHOLD = 64 * 1024
#: The directory beside the database file ``PATH``: ``PATH`` + this.
SUFFIX = ".bodies"


class BlobDir:
    """The files of one job store's large bodies and results (``PATH.bodies/``).

    ``sync``: fsync each file and the directory before the row naming it commits
    (``[store] sync = "full"``: it then survives a power cut as its row does).
    """

    def __init__(self, path: str, *, sync: bool) -> None:
        self.path = path
        self._sync = sync

    @classmethod
    def beside(cls, store_path: str, *, sync: bool) -> BlobDir:
        """The directory of the store whose database file is ``store_path``."""
        return cls(store_path + SUFFIX, sync=sync)

    def write(self, job_id: str, data: bytes, tail: bytes | memoryview = b"") -> str:
        """Write ``data`` and then ``tail`` to a new file for ``job_id`` (one ``writev``:
        a large ``tail`` goes from where it is, a segment say, to the file uncopied); its
        name. The directory is made (0700) when missing. OSError (the caller names the
        store) when it cannot be."""
        name = f"{job_id}~{os.urandom(8).hex()}"
        path = os.path.join(self.path, name)
        with _umask(0o077):
            try:
                fd = os.open(path, _CREATE, 0o600)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.path, 0o700)
                    if self._sync:  # the directory's own entry, in the database's directory
                        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
                fd = os.open(path, _CREATE, 0o600)
            try:
                _write_all(fd, [memoryview(data), memoryview(tail).cast("B")])
                if self._sync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            os.close(fd)
        return name

    def settle(self, names: Iterable[str]) -> None:
        """With ``sync``: make the new entries of ``names`` in the directory durable (one
        fsync of the directory for all of them), before the rows that name them commit."""
        if self._sync and any(True for _ in names):
            _fsync_dir(self.path)

    def read(self, name: str) -> bytes | None:
        """The file's bytes; None when it is gone (its job was purged meanwhile). OSError
        when it cannot be read."""
        try:
            with open(os.path.join(self.path, name), "rb", buffering=0) as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.path, name))

    def remove(self, names: Iterable[str]) -> None:
        """Remove the files ``names`` (no row names them any more); one already gone, or
        one that cannot be removed, is left to the next :meth:`sweep`."""
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.path, name))

    def names(self) -> Iterator[str]:
        """Every file in the directory (none when it does not exist yet)."""
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return
        for entry in entries:
            yield entry.name

    def sweep(self, referenced: set[str]) -> int:
        """Remove every file not in ``referenced``; how many. The caller holds the store's
        write lock, so no file of a transaction under way is taken."""
        orphans = [name for name in self.names() if name not in referenced]
        self.remove(orphans)
        return len(orphans)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write_all(fd: int, views: list[memoryview]) -> None:
    """``writev`` until every byte of ``views`` is written (a write may be short)."""
    views = [v for v in views if v]
    while views:
        done = os.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if views:
            views[0] = views[0][done:]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """umask is per process; ipcd's processes are single-threaded."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)
