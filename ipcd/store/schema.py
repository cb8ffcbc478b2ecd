"""The SQLite job store's schema: its version and the ordered migrations that reach it.

The file records its schema version in ``PRAGMA user_version`` (0 in a new file).
:func:`migrate` runs at every open: it applies, in one ``BEGIN IMMEDIATE`` transaction,
each migration above the file's version, so that a file made by an older ipcd is brought
up to date and two processes opening a new file at once migrate it once. A file whose
version is newer than :data:`VERSION` was written by a newer ipcd: it is refused
(StoreCorruptError) rather than read with the wrong idea of its columns.

A migration is a tuple of statements and is never edited once released; a change to the
schema is a new migration appended to :data:`MIGRATIONS`.

Version 1:

- ``jobs``: one row per job, the columns of ipcd.store.JobRecord (``unique_key`` for
  ``unique``, a keyword in SQL) plus ``body_size``, the length of its body.
- ``bodies`` and ``results``: the message and the stored result, by reference, so that
  listing and claiming never read a blob they do not need; deleted with their job.
- ``paused``: the paused types and since when (type 0: everything).
- ``tally``: jobs and body bytes per state, kept by triggers in the same statement as the
  change, so that the backlog and the counts are read in constant time.
- indexes, each serving its queries as one range read in the order wanted (the test
  suite checks the plans): claiming (queued jobs in dispatch order), promoting (scheduled
  jobs by due time), retention (finished jobs by state and time), listing by state and by
  type and state (newest first), and by unique key. The first three are partial, so a job
  is in each only while it is in the states it serves, and a change of state writes fewer
  index pages. They still start with ``state``: without statistics (ipcd runs no
  ``ANALYZE``) SQLite's planner prefers an index with an equality on its first column
  over a partial index's range, and would sort.

Version 2 (ipcd.store.blobs: large bodies and results as files beside the database):

- ``bodies.file`` and ``results.file``: the name of the file in ``PATH.bodies/`` that
  holds the bytes (then ``body`` or ``data`` is empty), NULL when the row holds them; a
  partial index on each, so that the sweep and ``check`` read the names without reading
  a blob.
- ``unlinked``: the names of files whose row went (a job deleted, a result replaced or
  removed), written by triggers in the same statement, so that no way of deleting a row,
  ``ON DELETE CASCADE`` included, forgets its file; the store removes those files after
  its commit and empties the table.

Version 3 (recurring schedules, ipcd.daemon.schedules):

- ``schedules``: one row per ``[schedules.NAME]`` the master has seen, the fields of
  ipcd.store.ScheduleState: its timing (``spec``), when its next run is due, its last run
  (due time, when queued, job id) and how many runs it did not queue because the last
  one still waited or ran. The master writes a run's job and this row in one
  transaction, so that a crash neither loses a run nor queues one twice.

Version 4 (per-handler limits and job expiry):

- ``buckets``: one token bucket per rate-limited type (``[handlers.NAME] rate``): the
  tokens left and when they were counted; written by the claim that spends tokens, in
  its transaction, so that every worker process draws from the one bucket. A type
  without a row has a full bucket.
- ``jobs.expires``: the Unix time after which a job not yet started is cancelled as
  expired (``--expire``), NULL for most jobs; a partial index over the jobs that have
  one, so that the master finds the next to expire without reading the others (a job
  without one is never in it).  Its condition names ``expires`` alone, never ``state``:
  a change of state (every claim and outcome) then leaves the index alone, where a
  condition on ``state`` cost every such UPDATE nine more VM steps; the master's queries
  skip the few ended jobs that keep an expiry until retention deletes them.

Version 5 (dependencies: ``--after``, ipcd.store.chains):

- ``jobs.after_ids``: the ids a job was submitted to wait for, comma-separated, as
  named (NULL: none), for ``list`` and ``show``; ``jobs.held_due``: the due time a held
  job takes once released (its ``--delay``; 0: none).
- ``waits``: one row per job held and a job it still waits for (``dependency``), keyed
  by the dependency first: recording an outcome looks up the jobs waiting for it with one
  probe of the primary key, which finds nothing for a job nobody waits for. A held job is
  SCHEDULED with ``due`` at ipcd.store.chains.HELD, beyond every real due time, so that
  neither the claim's index (queued jobs only) nor the promotion by due time ever reads
  it. A row goes when its dependency ends (the same transaction), so a row only ever
  names a job that is not final: retention and purge, which delete final jobs only, never
  delete a job that a held job waits for. ``waits_job``: a held job's rows, for ``show``
  and for removing them when it is cancelled.

Version 6 (captured output: what a job wrote to stdout and stderr, ipcd.daemon.capture):

- ``outputs``: one row per finished job that wrote something or reported progress: the
  last ``[jobs] max_output`` bytes it wrote (``data``, or a file in ``PATH.bodies/`` named
  by ``file`` when above ipcd.store.blobs.THRESHOLD), how many it wrote in all, and its
  last progress fraction and message; deleted with its job, its file by a trigger into
  ``unlinked`` as the other blobs' are. A job that wrote nothing has no row, so the common
  path's outcome writes no more than before.
- Not a table: from this version on, the body of a job whose payload came in a spill
  segment may be held *split* (ipcd.wire.split: its envelope, then the payload's raw
  bytes), which an ipcd of version 5 or older would read as a bare message; the version
  number is what keeps such an ipcd from opening the file.

Version 7 (bodies and results in the jobs row):

- ``jobs.body``, ``jobs.body_file``, ``jobs.result_data`` and ``jobs.result_file``: a
  job's body and its kept result (its kind is ``result_kind``, NULL read as 0) held in
  its own row, or in a file in ``PATH.bodies/`` named by the ``_file`` column (then the
  bytes' column is NULL); ``result_data`` and ``result_file`` both NULL: no result kept.
  Why: every job had a ``bodies`` row and most a ``results`` row, each in a B-tree of its
  own with a TEXT key's index, written and foreign-key checked in the job's add and its
  finish: a lone job's add, claim and finish wrote 29 pages, now 25. The table
  ``results`` is gone (its rows moved), with its index and triggers.
- ``bodies`` stays, for the bodies of more than 1 KiB up to ipcd.store.blobs.THRESHOLD
  (ipcd.store.sqlite.INLINE_BODY; ``jobs.body`` and ``body_file`` NULL): a claim and an
  outcome rewrite the whole row, overflow pages included, so that a body of 16 KiB held
  in the row cost its claim and its finish three times what they cost beside a row in
  ``bodies``, written once. A result is written once, by the outcome (a final job's row
  is only deleted, or cleared by ``retry``), and stays in the row at any size up to
  THRESHOLD. ``bodies.file`` is NULL from this version on (large bodies'
  files are named by ``jobs.body_file``; the index ``bodies_file`` and the trigger
  ``bodies_unlink`` are gone).
- The new columns come after all of ipcd.store.JobRecord's, the body last: a listing
  reads the row's first columns only, and reading a result never walks an inline body.
- ``jobs_body_file`` and ``jobs_result_file``: partial indexes of the file names, so that
  the sweep and ``check`` read them without reading the table (a job without a file is in
  neither).
- ``jobs_unlink`` (a job deleted) and ``jobs_unlink_result`` (a result replaced or
  forgotten: ``retry``) note the files in ``unlinked`` as the old tables' triggers did. A
  body is never replaced while its job lives.
"""

from __future__ import annotations

import sqlite3

from ipcd.errors import StoreCorruptError

#: The schema version this ipcd writes and reads.
VERSION = 7

_V1 = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        type INTEGER NOT NULL,
        handler TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN
            ('queued', 'scheduled', 'running', 'done', 'failed', 'cancelled')),
        attempts INTEGER NOT NULL DEFAULT 0,
        priority INTEGER NOT NULL DEFAULT 0,
        unique_key TEXT,
        submitted REAL NOT NULL,
        accepted REAL NOT NULL,
        due REAL NOT NULL DEFAULT 0,
        started REAL,
        finished REAL,
        sender_pid INTEGER NOT NULL DEFAULT 0,
        sender_uid INTEGER,
        reply_to INTEGER,
        timeout REAL,
        bare INTEGER NOT NULL DEFAULT 0,
        size INTEGER NOT NULL,
        preview TEXT NOT NULL DEFAULT '',
        worker_pid INTEGER,
        error TEXT,
        result_kind INTEGER,
        result_size INTEGER,
        body_size INTEGER NOT NULL DEFAULT 0
    )
    """,
    """
    CREATE TABLE bodies (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        body BLOB NOT NULL
    )
    """,
    """
    CREATE TABLE results (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        kind INTEGER NOT NULL,
        data BLOB NOT NULL
    )
    """,
    "CREATE TABLE paused (type INTEGER PRIMARY KEY, since REAL NOT NULL)",
    """
    CREATE TABLE tally (
        state TEXT PRIMARY KEY,
        jobs INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    )
    """,
    """
    INSERT INTO tally (state, jobs, bytes) VALUES ('queued', 0, 0), ('scheduled', 0, 0),
        ('running', 0, 0), ('done', 0, 0), ('failed', 0, 0), ('cancelled', 0, 0)
    """,
    """
    CREATE TRIGGER jobs_tally_insert AFTER INSERT ON jobs BEGIN
        UPDATE tally SET jobs = jobs + 1, bytes = bytes + NEW.body_size
            WHERE state = NEW.state;
    END
    """,
    """
    CREATE TRIGGER jobs_tally_delete AFTER DELETE ON jobs BEGIN
        UPDATE tally SET jobs = jobs - 1, bytes = bytes - OLD.body_size
            WHERE state = OLD.state;
    END
    """,
    """
    CREATE TRIGGER jobs_tally_update AFTER UPDATE OF state, body_size ON jobs
    WHEN OLD.state <> NEW.state OR OLD.body_size <> NEW.body_size BEGIN
        UPDATE tally SET jobs = jobs - 1, bytes = bytes - OLD.body_size
            WHERE state = OLD.state;
        UPDATE tally SET jobs = jobs + 1, bytes = bytes + NEW.body_size
            WHERE state = NEW.state;
    END
    """,
    """
    CREATE INDEX jobs_claim ON jobs (state, type, priority DESC, accepted, id)
        WHERE state = 'queued'
    """,
    "CREATE INDEX jobs_due ON jobs (state, due) WHERE state = 'scheduled'",
    """
    CREATE INDEX jobs_finished ON jobs (state, finished, id)
        WHERE finished IS NOT NULL
    """,
    "CREATE INDEX jobs_state ON jobs (state, accepted, id)",
    "CREATE INDEX jobs_type ON jobs (type, state, accepted, id)",
    """
    CREATE INDEX jobs_unique ON jobs (unique_key, accepted, id)
        WHERE unique_key IS NOT NULL
    """,
)

_V2 = (
    "ALTER TABLE bodies ADD COLUMN file TEXT",
    "ALTER TABLE results ADD COLUMN file TEXT",
    "CREATE INDEX bodies_file ON bodies (file) WHERE file IS NOT NULL",
    "CREATE INDEX results_file ON results (file) WHERE file IS NOT NULL",
    "CREATE TABLE unlinked (file TEXT PRIMARY KEY)",
    """
    CREATE TRIGGER bodies_unlink AFTER DELETE ON bodies WHEN OLD.file IS NOT NULL BEGIN
        INSERT INTO unlinked (file) VALUES (OLD.file) ON CONFLICT (file) DO NOTHING;
    END
    """,
    """
    CREATE TRIGGER results_unlink AFTER DELETE ON results WHEN OLD.file IS NOT NULL BEGIN
        INSERT INTO unlinked (file) VALUES (OLD.file) ON CONFLICT (file) DO NOTHING;
    END
    """,
    """
    CREATE TRIGGER results_unlink_replaced AFTER UPDATE OF file ON results
    WHEN OLD.file IS NOT NULL AND OLD.file IS NOT NEW.file BEGIN
        INSERT INTO unlinked (file) VALUES (OLD.file) ON CONFLICT (file) DO NOTHING;
    END
    """,
)

_V3_SCHEDULES = (
    """
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        handler TEXT NOT NULL,
        next_due REAL NOT NULL,
        last_due REAL,
        last_fired REAL,
        last_job TEXT,
        overlaps INTEGER NOT NULL DEFAULT 0
    )
    """,
)

_V4_LIMITS = (
    "CREATE TABLE buckets (type INTEGER PRIMARY KEY, tokens REAL NOT NULL, updated REAL NOT NULL)",
    "ALTER TABLE jobs ADD COLUMN expires REAL",
    """
    CREATE INDEX jobs_expires ON jobs (expires) WHERE expires IS NOT NULL
    """,
)


_V5_CHAINS = (
    "ALTER TABLE jobs ADD COLUMN after_ids TEXT",
    "ALTER TABLE jobs ADD COLUMN held_due REAL NOT NULL DEFAULT 0",
    """
    CREATE TABLE waits (
        dependency TEXT NOT NULL,
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        PRIMARY KEY (dependency, job_id)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX waits_job ON waits (job_id)",
)


_V6_OUTPUT = (
    """
    CREATE TABLE outputs (
        job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
        data BLOB NOT NULL,
        file TEXT,
        size INTEGER NOT NULL,
        fraction REAL,
        message TEXT NOT NULL DEFAULT ''
    )
    """,
    "CREATE INDEX outputs_file ON outputs (file) WHERE file IS NOT NULL",
    """
    CREATE TRIGGER outputs_unlink AFTER DELETE ON outputs WHEN OLD.file IS NOT NULL BEGIN
        INSERT INTO unlinked (file) VALUES (OLD.file) ON CONFLICT (file) DO NOTHING;
    END
    """,
    """
    CREATE TRIGGER outputs_unlink_replaced AFTER UPDATE OF file ON outputs
    WHEN OLD.file IS NOT NULL AND OLD.file IS NOT NEW.file BEGIN
        INSERT INTO unlinked (file) VALUES (OLD.file) ON CONFLICT (file) DO NOTHING;
    END
    """,
)

_V7_INLINE = (
    # Before the data: the body last, after the columns ipcd.store.JobRecord reads.
    "ALTER TABLE jobs ADD COLUMN body_file TEXT",
    "ALTER TABLE jobs ADD COLUMN result_file TEXT",
    "ALTER TABLE jobs ADD COLUMN result_data BLOB",
    "ALTER TABLE jobs ADD COLUMN body BLOB",
    # A body of up to 1 KiB, or its file's name, into the row; larger ones stay in bodies.
    "DROP TRIGGER bodies_unlink",
    "DROP INDEX bodies_file",
    """
    UPDATE jobs SET (body, body_file) = (
        SELECT CASE WHEN file IS NULL THEN body END, file FROM bodies WHERE job_id = jobs.id
    ) WHERE id IN (
        SELECT job_id FROM bodies WHERE file IS NOT NULL OR length(body) <= 1024
    )
    """,
    "DELETE FROM bodies WHERE file IS NOT NULL OR length(body) <= 1024",
    # Only the jobs with a kept result: one whose result was too large to keep has its
    # result_kind and result_size, and no row.  A kind of 0 in results was the NULL of
    # jobs.result_kind (version 6 wrote 0 for none), which stays NULL.
    """
    UPDATE jobs SET (result_kind, result_data, result_file) = (
        SELECT COALESCE(jobs.result_kind, NULLIF(kind, 0)),
            CASE WHEN file IS NULL THEN data END, file
        FROM results WHERE job_id = jobs.id
    ) WHERE id IN (SELECT job_id FROM results)
    """,
    # The triggers first, so that dropping the table notes no file.
    "DROP TRIGGER results_unlink",
    "DROP TRIGGER results_unlink_replaced",
    "DROP INDEX results_file",
    "DROP TABLE results",
    "CREATE INDEX jobs_body_file ON jobs (body_file) WHERE body_file IS NOT NULL",
    "CREATE INDEX jobs_result_file ON jobs (result_file) WHERE result_file IS NOT NULL",
    """
    CREATE TRIGGER jobs_unlink AFTER DELETE ON jobs
    WHEN OLD.body_file IS NOT NULL OR OLD.result_file IS NOT NULL BEGIN
        INSERT INTO unlinked (file) SELECT OLD.body_file WHERE OLD.body_file IS NOT NULL
            ON CONFLICT (file) DO NOTHING;
        INSERT INTO unlinked (file) SELECT OLD.result_file WHERE OLD.result_file IS NOT NULL
            ON CONFLICT (file) DO NOTHING;
    END
    """,
    """
    CREATE TRIGGER jobs_unlink_result AFTER UPDATE OF result_file ON jobs
    WHEN OLD.result_file IS NOT NULL AND OLD.result_file IS NOT NEW.result_file BEGIN
        INSERT INTO unlinked (file) VALUES (OLD.result_file) ON CONFLICT (file) DO NOTHING;
    END
    """,
)

#: ``MIGRATIONS[i]`` takes a file from version ``i`` to ``i + 1``.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    _V1,
    _V2,
    _V3_SCHEDULES,
    _V4_LIMITS,
    _V5_CHAINS,
    _V6_OUTPUT,
    _V7_INLINE,
)

assert len(MIGRATIONS) == VERSION


def version(conn: sqlite3.Connection) -> int:
    """The file's schema version (``PRAGMA user_version``)."""
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0])


def newer_error(path: str, found: int) -> StoreCorruptError:
    """The error for a file written by a newer ipcd."""
    return StoreCorruptError(
        f"job store {path}: schema version {found} is newer than this ipcd knows ({VERSION}) "
        "(run the ipcd that wrote it, or move the file aside; ipcd makes a new one)"
    )


def migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring the file at ``path`` (open on ``conn``, in autocommit mode) to :data:`VERSION`.

    In order: read the version without a transaction (the usual case, nothing to do,
    takes no write lock); refuse a newer one; otherwise take the write lock
    (``BEGIN IMMEDIATE``), read the version again (another process may have migrated
    meanwhile), apply the missing migrations, set the version, and commit. sqlite3 errors
    are the caller's to map; the transaction is rolled back on any failure.
    """
    found = version(conn)
    if found > VERSION:
        raise newer_error(path, found)
    if found == VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = version(conn)
        if found > VERSION:
            raise newer_error(path, found)
        for steps in MIGRATIONS[found:]:
            for statement in steps:
                conn.execute(statement)
        # PRAGMA takes no parameters; VERSION is this module's own integer.
        conn.execute(f"PRAGMA user_version = {VERSION:d}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
