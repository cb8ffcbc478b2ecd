"""Jobs that follow jobs: dependencies (``--after``) and completion hooks, decided in the
job store's own transactions.

Why here, in the store: a dependent is released or cancelled, and a follow-up job is
queued, in the same transaction that records the outcome it follows
(ipcd.store.sqlite: ``exchange``, ``finish``, ``cancel``, ``add``), so that no crash
between the two can leave a dependent waiting for a job that already ended, nor an
outcome without its hook job.  The schema is ipcd.store.schema's version 5.

How a dependency is kept:

- A job submitted with ``after`` names jobs that exist (an unknown one fails it at once,
  so cycles cannot be built: a job can only name jobs older than itself).  When all of
  them are DONE it is queued as usual; when one of them FAILED or was CANCELLED it is
  stored CANCELLED with the reason; otherwise it is *held*: SCHEDULED with ``due`` at
  :data:`HELD`, beyond every real due time, its own due time kept in ``held_due``, and
  one row in ``waits`` per job it still waits for.
- When a job ends, the jobs waiting for it are looked up by one probe of ``waits``'s
  primary key (:func:`settle`); nothing else is read or written for a job nobody waits
  for.  DONE: its rows go, and each dependent without rows left is released (QUEUED, or
  SCHEDULED until its ``--delay``).  FAILED for good or CANCELLED: each dependent is
  cancelled ("dependency ID failed"), and so, in turn, are the jobs waiting for it.

Completion hooks (:func:`follow_up`): a job of a handler with ``on_success`` or
``on_failure`` that ends DONE or FAILED (not CANCELLED: a cancellation is an operator's
decision, or follows a failure whose own hook already ran) queues one job of the hook's
handler, whose payload is the outcome.  The configuration refuses hooks on a handler that
is itself a hook (ipcd.config), so a follow-up job never has a follow-up of its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ipcd.store.model import Hooks, JobRecord, NewJob, State, own_job
from ipcd.wire import protocol

if TYPE_CHECKING:
    import sqlite3

#: A held job's ``due``: beyond every due time an envelope may carry (protocol's
#: MAX_SUBMITTED), so that promotion by due time never picks it.
HELD = 1e12
#: The most jobs one job may wait for (the envelope's ``after``).
MAX_AFTER = protocol.MAX_AFTER
#: Characters of a failed job's error a hook's payload carries.
MAX_HOOK_ERROR = 2000
#: How many ids one ``IN (...)`` list holds (SQLite allows 32766 parameters).
CHUNK = 500


@dataclasses.dataclass
class Chain:
    """What one transaction decided besides what it was asked (its caller's to act on
    after the commit): jobs released, cancelled and queued on their own."""

    queued: int = 0
    scheduled: int = 0
    cancelled: list[str] = dataclasses.field(default_factory=list)
    #: The jobs that ended in the transaction, and how: their dependents are settled
    #: (:func:`settle`) before the transaction claims anything.
    ended: list[tuple[str, State]] = dataclasses.field(default_factory=list)


class Decision(NamedTuple):
    """How a new job with ``after`` is stored."""

    state: State
    due: float
    held_due: float = 0.0
    error: str | None = None
    #: The jobs it is held for (the rows of ``waits``).
    pending: tuple[str, ...] = ()


def decide(db: sqlite3.Connection, job: NewJob) -> Decision:
    """The state of ``job`` (which names ``after``) from the states of the jobs it names,
    read in the caller's write transaction: FAILED when one is unknown (a usage error:
    its submitter is told), CANCELLED when one failed or was cancelled, held while some
    are not final, else as asked."""
    after = list(dict.fromkeys(job.after))
    found: dict[str, str] = {}
    for chunk in chunks(after):
        found.update(db.execute(f"SELECT id, state FROM jobs WHERE id IN ({marks(chunk)})", chunk))
    for dependency in after:
        if dependency not in found:
            return Decision(State.FAILED, job.due, error=unknown_error(dependency))
    for dependency in after:
        if found[dependency] in (State.FAILED.value, State.CANCELLED.value):
            return Decision(State.CANCELLED, job.due, error=_reason(dependency, found[dependency]))
    pending = tuple(d for d in after if found[d] != State.DONE.value)
    if pending:
        return Decision(State.SCHEDULED, HELD, held_due=job.due, pending=pending)
    return Decision(job.state, job.due)


def unknown_error(dependency: str) -> str:
    """The error of a job that names a job the store does not hold."""
    return f"unknown dependency {dependency}: no such job in the job store"


def is_unknown_error(error: str | None) -> bool:
    """Whether ``error`` is :func:`unknown_error`'s (a usage error for its submitter)."""
    return error is not None and error.startswith("unknown dependency ")


def hold(db: sqlite3.Connection, job_id: str, pending: Sequence[str]) -> None:
    """The rows that hold ``job_id`` until each of ``pending`` is DONE."""
    db.executemany(
        "INSERT INTO waits (dependency, job_id) VALUES (?, ?)", [(d, job_id) for d in pending]
    )


def settle(db: sqlite3.Connection, chain: Chain, now: float) -> None:
    """The dependents of the jobs that ended in this transaction (``chain.ended``),
    released or cancelled; ``chain`` counts and names them.  One indexed probe of
    ``waits`` when nobody waits for them."""
    ended = dict(chain.ended)
    chain.ended.clear()
    rows: list[tuple[str, str]] = []
    for chunk in chunks(list(ended)):
        rows += db.execute(
            f"SELECT dependency, job_id FROM waits WHERE dependency IN ({marks(chunk)})", chunk
        ).fetchall()
    if not rows:
        return
    freed = [job_id for dependency, job_id in rows if ended[dependency] is State.DONE]
    doomed = [
        (job_id, _reason(dependency, ended[dependency].value))
        for dependency, job_id in rows
        if ended[dependency] is not State.DONE
    ]
    done = [d for d, state in ended.items() if state is State.DONE]
    for chunk in chunks(done):
        db.execute(f"DELETE FROM waits WHERE dependency IN ({marks(chunk)})", chunk)
    cancel_dependents(db, doomed, chain, now)
    _release(db, freed, chain, now)


def cancel_dependents(
    db: sqlite3.Connection, doomed: Sequence[tuple[str, str]], chain: Chain, now: float
) -> None:
    """Cancel each held job of ``doomed`` with its reason, and in turn the jobs held for
    it; a job no longer held (cancelled meanwhile, retried) is left as it is."""
    todo = deque(doomed)
    while todo:
        job_id, reason = todo.popleft()
        changed = db.execute(
            "UPDATE jobs SET state = 'cancelled', finished = ?, error = ?, due = held_due "
            "WHERE id = ? AND state = 'scheduled' AND due >= ?",
            (now, reason, job_id, HELD),
        ).rowcount
        if changed != 1:
            continue
        chain.cancelled.append(job_id)
        db.execute("DELETE FROM waits WHERE job_id = ?", (job_id,))
        todo.extend(
            (dependent, _reason(job_id, State.CANCELLED.value))
            for (dependent,) in db.execute(
                "SELECT job_id FROM waits WHERE dependency = ?", (job_id,)
            ).fetchall()
        )


def forget(db: sqlite3.Connection, ids: Sequence[str]) -> None:
    """The rows of held jobs that were cancelled (by an operator): they wait no more."""
    for chunk in chunks(ids):
        db.execute(f"DELETE FROM waits WHERE job_id IN ({marks(chunk)})", chunk)


def _release(db: sqlite3.Connection, freed: Sequence[str], chain: Chain, now: float) -> None:
    """Each job of ``freed`` that waits for nothing more becomes QUEUED, or SCHEDULED
    until its own due time."""
    candidates = list(dict.fromkeys(freed))
    still: set[str] = set()
    ready: list[tuple[str, float]] = []
    for chunk in chunks(candidates):
        still.update(
            row[0]
            for row in db.execute(
                f"SELECT job_id FROM waits WHERE job_id IN ({marks(chunk)})", chunk
            )
        )
    free = [c for c in candidates if c not in still]
    for chunk in chunks(free):
        ready += db.execute(
            f"SELECT id, held_due FROM jobs WHERE id IN ({marks(chunk)}) "
            "AND state = 'scheduled' AND due >= ?",
            (*chunk, HELD),
        ).fetchall()
    for job_id, due in ready:
        state = State.SCHEDULED if due > now else State.QUEUED
        db.execute("UPDATE jobs SET state = ?, due = held_due WHERE id = ?", (state.value, job_id))
        if state is State.QUEUED:
            chain.queued += 1
        else:
            chain.scheduled += 1


def waits(db: sqlite3.Connection, ids: Sequence[str]) -> dict[str, list[str]]:
    """The jobs each of ``ids`` still waits for (only held jobs have any)."""
    found: dict[str, list[str]] = {}
    for chunk in chunks(list(dict.fromkeys(ids))):
        for dependency, job_id in db.execute(
            f"SELECT dependency, job_id FROM waits WHERE job_id IN ({marks(chunk)}) "
            "ORDER BY job_id, dependency",
            chunk,
        ):
            found.setdefault(job_id, []).append(dependency)
    return found


def follow_up(record: JobRecord, hooks: Mapping[str, Hooks], now: float) -> NewJob | None:
    """The follow-up job of ``record`` (just ended DONE or FAILED), or None when its
    handler has no hook for that outcome.  Its payload is the outcome, a JSON object:
    ``id``, ``handler``, ``type``, ``state``, ``attempts``, ``error`` (at most
    MAX_HOOK_ERROR characters), ``duration`` (seconds from its last start to its end,
    None when it never started), ``result_size`` and ``finished``."""
    configured = hooks.get(record.handler)
    if configured is None or record.state not in (State.DONE, State.FAILED):
        return None
    hook = configured.on_success if record.state is State.DONE else configured.on_failure
    if hook is None:
        return None
    finished = record.finished if record.finished is not None else now
    payload: dict[str, protocol.JSONValue] = {
        "id": record.id,
        "handler": record.handler,
        "type": record.type,
        "state": record.state.value,
        "attempts": record.attempts,
        "error": None if record.error is None else record.error[:MAX_HOOK_ERROR],
        "duration": None if record.started is None else round(finished - record.started, 6),
        "result_size": record.result_size,
        "finished": finished,
    }
    return own_job(hook.handler, hook.type, payload, now, pid=os.getpid())


def _reason(dependency: str, state: str) -> str:
    return f"dependency {dependency} {'failed' if state == 'failed' else 'was cancelled'}"


def marks(values: Sequence[object]) -> str:
    """The ``?`` parameters of an ``IN (...)`` list of ``values``."""
    return ", ".join("?" * len(values))


def chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    """``values`` in lists short enough for one ``IN (...)`` each."""
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]
