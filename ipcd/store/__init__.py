"""The job store: every job the daemon accepts, its state, body and outcome.

The store is the single source of truth for a job's state (issue 12): the intake commits
what it takes off the kernel queue here, the master claims jobs from here in dispatch
order, workers record outcomes here, and the control process answers ``ipcctl list``,
``cancel``, ``pause`` and the rest from here. The shared-memory tables that remain are
caches and hand-off points.

This package is the interface (the seam for a later PostgreSQL store behind the same
protocol): the types and :class:`JobStore` (ipcd.store.model), and :func:`open_store`,
which opens the default implementation, SQLite (ipcd.store.sqlite, with its schema in
ipcd.store.schema). It is the only package that imports ``sqlite3``; a caller that must
stay lean (ipcctl, ipcd.client) imports ipcd.store.model for :class:`State`, never this
package, whose :func:`open_store` loads ``sqlite3``.

Each process opens its own store after it forks, and never shares it with a child.
"""

from __future__ import annotations

from collections.abc import Mapping

from ipcd.store.model import (
    ALL_TYPES,
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_MAX_RESULT,
    EXPIRED,
    FINAL,
    WAITING,
    Admission,
    Admitted,
    Backlog,
    Captured,
    Chained,
    Hook,
    Hooks,
    JobRecord,
    JobStore,
    Limit,
    LimitState,
    NewJob,
    Outcome,
    Retention,
    ScheduleState,
    State,
    own_job,
)

__all__ = [
    "ALL_TYPES",
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_MAX_RESULT",
    "EXPIRED",
    "FINAL",
    "WAITING",
    "Admission",
    "Admitted",
    "Backlog",
    "Captured",
    "Chained",
    "Hook",
    "Hooks",
    "JobRecord",
    "JobStore",
    "Limit",
    "LimitState",
    "NewJob",
    "Outcome",
    "Retention",
    "ScheduleState",
    "State",
    "open_store",
    "own_job",
]


def open_store(
    path: str,
    *,
    sync: str = "normal",
    busy_timeout: int = DEFAULT_BUSY_TIMEOUT,
    max_result: int = DEFAULT_MAX_RESULT,
    limits: Mapping[int, Limit] | None = None,
    hooks: Mapping[str, Hooks] | None = None,
    migrate: bool = True,
) -> JobStore:
    """Open the job store at ``path`` for this process (``[store] path``, ``sync``,
    ``max_result``; ``busy_timeout`` in milliseconds; ``limits``: the handlers' concurrency
    and rate limits, ipcd.store.model.limits_of): the file and its directory's
    checks, creation, pragmas and migrations are ipcd.store.sqlite.connect's; bodies and
    results larger than 64 KiB are files in ``PATH.bodies/`` (ipcd.store.blobs).
    ``hooks``: the completion hooks by handler name (ipcd.store.chains).  ``migrate``:
    bring an older file's schema up to date (connect; ``ipcd check`` does not).

    Raises StoreUnavailableError, StoreCorruptError or StoreFullError (exit status 74)
    with a message naming the path, the cause and what to do; ConfigError for a ``sync``
    other than "normal" or "full".
    """
    # Imported here, not above: importing ipcd.store for its types must not load sqlite3.
    from ipcd.store.blobs import BlobDir
    from ipcd.store.sqlite import SqliteStore, connect

    conn = connect(path, sync=sync, busy_timeout=busy_timeout, migrate=migrate)
    blobs = BlobDir.beside(path, sync=sync == "full")
    return SqliteStore(conn, path, max_result=max_result, blobs=blobs, limits=limits, hooks=hooks)
