"""The intake (ipcd.daemon.intake), in-process: the kernel's job queue drained into the
job store, a batch per transaction, nothing lost on the way.

The queue and the intake's slots are real kernel objects at the test's own keys (the
``instance`` fixture removes them); the job store is a hand-written fake of ipcd's own
seam (tests/fakes.py), or the real SQLite store where what the store itself does counts
(skipping ids it already holds), as are the outcomes.  Messages are sent before the
intake runs, so its blocking receive never waits; a hook on the store ends each run.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
from conftest import Instance
from fakes import FakeJobStore, FakeLog, new_job

from ipcd import config as config_mod
from ipcd.daemon.doorbell import Doorbell
from ipcd.daemon.intake import Exit, Intake
from ipcd.daemon.log import Logger
from ipcd.daemon.outcomes import Outcomes
from ipcd.daemon.signals import Flags
from ipcd.errors import MessageError, StoreFullError
from ipcd.handlers.registry import Registration, Registry
from ipcd.kernel.queues import Queue, msgmax
from ipcd.layout.results import Result
from ipcd.store import Admission, Backlog, JobStore, NewJob, State, open_store
from ipcd.tables.inflight import InflightTable
from ipcd.tables.spill import KINDS
from ipcd.tables.spill.segment import Role
from ipcd.tables.spill.table import SpillTable
from ipcd.tables.spill.table import State as SpillState
from ipcd.tables.stats import STORE_ERRORS, Recorder
from ipcd.wire import protocol, split
from ipcd.wire.protocol import Job

TYPE = 7
REPLY = 4242
#: The intake's slots in these tests: the most messages one batch takes.
SLOTS = 4
#: Workers the doorbell rings for (more than any test's batch: a ring per queued job).
WORKERS = 8


class FakeOutcomes:
    """How the intake ended or confirmed each job, by id."""

    def __init__(self) -> None:
        self.rejected: list[tuple[str | None, str]] = []
        self.finished: list[tuple[str, str]] = []
        self.confirmed: list[tuple[int, str]] = []
        self.notified: list[tuple[int, str]] = []

    def reject(self, exc: MessageError, body: bytes, type_: int, **_: Any) -> None:
        self.rejected.append((exc.job_id, str(exc)))

    def finish(self, job: Job, result: Result, **_: Any) -> None:
        self.finished.append((job.id, result.error))

    def confirm(self, reply_to: int, job_id: str) -> None:
        self.confirmed.append((reply_to, job_id))

    def notify(self, reply_to: int, job_id: str) -> None:
        self.notified.append((reply_to, job_id))


class FakeRecorder:
    def __init__(self) -> None:
        self.bumped: list[int] = []

    def bump(self, counter: int, by: int = 1) -> None:
        self.bumped.extend([counter] * by)


class Rig:
    """The job queue, the intake's slots and the hand-off queue at the test's keys; an
    intake over them is made by :meth:`intake`, as the master makes one after another."""

    def __init__(self, instance: Instance, *, max_queued: int = 100_000) -> None:
        keys = instance.keys
        self.queue = Queue.create(keys.jobs, 0o600)
        self.slots, _ = InflightTable.create(keys.intake, 0o600, SLOTS, 0, msgmax())
        self.handoff = Queue.create(keys.handoff, 0o600, what="hand-off queue")
        config = config_mod.parse({"ipc": {"key": 0x1234}}, Path("/nonexistent/ipcd.toml"))
        self.config = config._replace(store=config.store._replace(max_queued=max_queued))
        self.registry = Registry({TYPE: Registration("echo", TYPE, "x:echo", lambda job: None)})
        self.jobs = FakeJobStore()
        self.outcomes = FakeOutcomes()
        self.flags = Flags()
        self.log = FakeLog()
        self.stats = FakeRecorder()
        self.wakes = 0

    def intake(self, jobs: JobStore | None = None, spills: SpillTable | None = None) -> Intake:
        return Intake(
            queue=self.queue,
            slots=self.slots,
            jobs=jobs if jobs is not None else cast(JobStore, self.jobs),
            registry=self.registry,
            config=self.config,
            outcomes=cast(Outcomes, self.outcomes),
            spills=spills,
            flags=self.flags,
            log=cast(Logger, self.log),
            stats=cast(Recorder, self.stats),
            wake_master=self._wake,
            doorbell=Doorbell(self.handoff, WORKERS),
        )

    def _wake(self) -> None:
        self.wakes += 1

    def send(self, *bodies: bytes, type_: int = TYPE) -> None:
        for body in bodies:
            assert self.queue.send_nowait(body, type_)

    def held(self) -> list[bytes]:
        """The messages the intake's slots hold, in slot order."""
        return [h.body for i in range(self.slots.workers) if (h := self.slots.held(i))]

    def stop_at_add(self, calls: int = 1) -> None:
        """Ask the intake to stop during the store's ``calls``-th add."""
        seen = [0]

        def before(method: str) -> None:
            if method == "add":
                seen[0] += 1
                if seen[0] == calls:
                    self.flags.stopping = True

        self.jobs.before = before


def _envelope(job_id: str, **fields: Any) -> bytes:
    return protocol.encode({"n": job_id}, job_id=job_id, **fields)


def test_a_batch_of_messages_is_committed_in_one_add(instance: Instance) -> None:
    """What waits on the queue is taken into the slots and committed to the store in one
    add, in the order sent; then the submitter that asked is confirmed, workers are rung
    for the queued jobs, the master woken for the delayed one, and the slots freed."""
    rig = Rig(instance)
    bodies = [
        _envelope("j1"),
        _envelope("j2", confirm=REPLY, reply_to=REPLY),
        _envelope("j3", due=time.time() + 60),
    ]
    rig.send(*bodies)
    rig.stop_at_add()
    assert rig.intake().serve() == Exit.STOPPED
    (batch,) = rig.jobs.batches
    assert [(j.id, j.type, j.handler, j.state, j.body) for j in batch] == [
        ("j1", TYPE, "echo", State.QUEUED, bodies[0]),
        ("j2", TYPE, "echo", State.QUEUED, bodies[1]),
        ("j3", TYPE, "echo", State.SCHEDULED, bodies[2]),
    ]
    assert batch[1].reply_to == REPLY
    assert rig.outcomes.confirmed == [(REPLY, "j2")]
    assert rig.handoff.depth() == 2  # a ring per queued job
    assert rig.wakes == 1
    assert rig.held() == []
    assert rig.queue.depth() == 0


def test_every_field_of_a_vetted_envelope_lands_in_its_own_record_field(
    instance: Instance,
) -> None:
    """An envelope with every optional field set, each to a value of its own, is vetted
    into the NewJob those values name (vet builds the record positionally)."""
    due = time.time() + 60
    body = protocol.encode(
        "payload", job_id="all", reply_to=11, submitted=1700000000.5, pid=os.getpid(),
        attempt=13, timeout=14.5, unique="u", confirm=15, due=due, priority=17,
        expire=18.5, after=("a1", "a2"),
    )  # fmt: skip
    record = Rig(instance).intake().vet(body, TYPE).record
    assert record == NewJob(
        id="all", type=TYPE, handler="echo", body=body, bare=False,
        accepted=record.accepted, size=7, preview="payload", submitted=1700000000.5,
        due=round(due, 6), priority=17, unique="u", sender_pid=os.getpid(),
        sender_uid=os.getuid(), reply_to=11, timeout=14.5, attempts=12,
        state=State.SCHEDULED, error=None, expires=round(due, 6) + 18.5,
        after=("a1", "a2"), tail=b"",
    )  # fmt: skip
    assert time.time() - 5 < record.accepted <= time.time()


def test_an_unwritable_store_keeps_the_messages_in_the_slots_until_it_takes_them(
    instance: Instance,
) -> None:
    """A store that refuses the batch (full) leaves every message in the intake's slots;
    the error is counted each time and logged once (store.unwritable), and the intake
    tries again until the store takes the batch whole, then says store.writable."""
    rig = Rig(instance)
    bodies = [_envelope("j1"), _envelope("j2"), _envelope("j3")]
    rig.send(*bodies)
    full = StoreFullError("jobs.db: database or disk is full")
    rig.jobs.errors["add"] = [full, full]
    at_add: list[list[bytes]] = []

    def before(method: str) -> None:
        if method == "add":
            at_add.append(rig.held())
            rig.flags.stopping = len(at_add) == 3

    rig.jobs.before = before
    assert rig.intake().serve() == Exit.STOPPED
    assert at_add == [bodies] * 3
    assert [[j.id for j in batch] for batch in rig.jobs.batches] == [["j1", "j2", "j3"]]
    assert rig.stats.bumped == [STORE_ERRORS, STORE_ERRORS]
    assert rig.log.names() == [("error", "store.unwritable"), ("info", "store.writable")]
    assert rig.log.events[0][2]["error"] == "jobs.db: database or disk is full"
    assert rig.held() == []


def test_a_stop_while_the_store_refuses_leaves_the_messages_to_the_next_intake(
    instance: Instance,
) -> None:
    """Asked to stop while the store refuses, the intake leaves its messages in the
    slots; the next intake commits them before it takes anything else."""
    rig = Rig(instance)
    bodies = [_envelope("j1"), _envelope("j2")]
    rig.send(*bodies)
    rig.jobs.errors["add"] = [StoreFullError("jobs.db: database or disk is full")]
    rig.stop_at_add()
    assert rig.intake().serve() == Exit.STOPPED
    assert rig.jobs.batches == []
    assert rig.held() == bodies
    rig.jobs.before = None
    rig.intake().commit_held()
    assert [[j.id for j in batch] for batch in rig.jobs.batches] == [["j1", "j2"]]
    assert rig.held() == []
    assert rig.handoff.depth() == 2


def test_a_message_without_handler_and_a_malformed_one_are_recorded_failed(
    instance: Instance,
) -> None:
    """A job of a type no handler serves, and an envelope that fails validation, are
    committed as FAILED with why (under the id that could be read); the first ends as
    a failed job, the second as a rejected message; neither is rung for."""
    rig = Rig(instance)
    doc = json.loads(_envelope("bad1", reply_to=REPLY))
    doc["attempt"] = 0
    malformed = json.dumps(doc).encode()
    with pytest.raises(MessageError) as caught:
        protocol.decode(malformed, TYPE)
    why = str(caught.value)
    rig.send(_envelope("nh1"), type_=9)
    rig.send(malformed)
    rig.stop_at_add()
    assert rig.intake().serve() == Exit.STOPPED
    (batch,) = rig.jobs.batches
    assert [(j.id, j.type, j.handler, j.state, j.error) for j in batch] == [
        ("bad1", TYPE, "-", State.FAILED, why),  # the lowest type first, as workers take them
        ("nh1", 9, "-", State.FAILED, "no handler for message type 9"),
    ]
    assert rig.outcomes.finished == [("nh1", "no handler for message type 9")]
    assert rig.outcomes.rejected == [("bad1", why)]
    assert rig.handoff.depth() == 0
    assert rig.held() == []


def test_a_backlog_over_max_queued_stops_the_draining_until_it_falls(instance: Instance) -> None:
    """With max_queued jobs waiting in the store the intake takes nothing: the message
    stays in the kernel queue (its backpressure reaches submitters), intake.store_full
    is said once; when a worker claims a job the intake resumes and commits it."""
    rig = Rig(instance, max_queued=2)
    rig.jobs.put(new_job("old1", TYPE, b"x"))
    rig.jobs.put(new_job("old2", TYPE, b"y"))
    rig.send(_envelope("j1"))
    waiting: list[int] = []

    def before(method: str) -> None:
        if method == "backlog":
            waiting.append(rig.queue.depth())
            if len(waiting) == 3:
                rig.jobs.claim(1, time.time())  # a worker takes one: below max_queued
        rig.flags.stopping = method == "add"

    rig.jobs.before = before
    assert rig.intake().serve() == Exit.STOPPED
    assert waiting == [1, 1, 1]
    assert [[j.id for j in batch] for batch in rig.jobs.batches] == [["j1"]]
    assert rig.log.names() == [("warning", "intake.store_full"), ("info", "intake.resumed")]
    assert rig.queue.depth() == 0


class KilledInAdd:
    """The real store, in a process SIGKILLed in the middle of the intake's admit: before
    its transaction (nothing committed) or just after it (committed, slots not freed)."""

    def __init__(self, store: JobStore, *, after_commit: bool) -> None:
        self.store = store
        self.after_commit = after_commit

    def backlog(self) -> Backlog:
        return self.store.backlog()

    def admit(self, jobs: Sequence[NewJob]) -> Admission:
        if self.after_commit:
            self.store.admit(jobs)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("SIGKILL returned")


@pytest.mark.parametrize("after_commit", [False, True], ids=["before-commit", "after-commit"])
def test_commit_held_commits_what_a_killed_intake_left_once(
    instance: Instance, tmp_path: Path, after_commit: bool
) -> None:
    """An intake SIGKILLed while committing leaves its messages in its slots; the next
    intake's commit_held commits them to the (real, SQLite) store, which skips the ids
    it already holds: every job is there once, queued."""
    rig = Rig(instance)
    bodies = [_envelope("j1"), _envelope("j2"), _envelope("j3")]
    rig.send(*bodies)
    path = str(tmp_path / "jobs.db")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the intake that is killed
        try:
            killed = KilledInAdd(open_store(path), after_commit=after_commit)
            rig.intake(cast(JobStore, killed)).serve()
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert rig.held() == bodies
    store = open_store(path)
    try:
        assert len(store.list()) == (3 if after_commit else 0)
        rig.intake(store).commit_held()
        assert sorted(r.id for r in store.list()) == ["j1", "j2", "j3"]
        assert store.counts()[State.QUEUED] == 3
        assert [store.body(i) for i in ("j1", "j2", "j3")] == bodies
    finally:
        store.close()
    assert rig.held() == []


class KilledAfterWrite:
    """The real store, in a process SIGKILLed in its admit once it has written the large
    bodies' files (from the spilled payloads' segments) and before its commit."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def backlog(self) -> Backlog:
        return self.store.backlog()

    def admit(self, jobs: Sequence[NewJob]) -> Admission:
        def killed(written: list[str]) -> None:
            assert written, "no body was written to a file"
            os.kill(os.getpid(), signal.SIGKILL)

        self.store._settle = killed  # type: ignore[attr-defined]
        return self.store.admit(jobs)


@pytest.mark.parametrize("when", ["after-write", "after-commit"])
def test_a_killed_intake_leaves_a_spilled_payload_whole(
    instance: Instance, tmp_path: Path, when: str
) -> None:
    """An intake SIGKILLed with a spilled payload's body written to the store's file but
    not committed, or committed but its segment not yet removed: the next intake commits
    it once, its payload whole, and removes the segment and frees its entry; the file
    the killed one wrote goes with the store's next start."""
    rig = Rig(instance)
    spills = SpillTable.create(instance.keys.spill, 0o600, 4)
    data = os.urandom(300_000)
    index, shmid, _ = spills.put(
        data, job_id="big1", kind=KINDS["bytes"], role=Role.PAYLOAD, mode=0o600, owner=None,
        refused="refused",
    )  # fmt: skip
    spills.mark(index, SpillState.QUEUED, shmid)
    ref = protocol.SpillRef(shmid, len(data), index, "bytes")
    envelope = protocol.encode(None, job_id="big1", spill=ref)
    rig.send(envelope)
    path = str(tmp_path / "jobs.db")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the intake that is killed
        try:
            store = open_store(path)
            killed = KilledAfterWrite(store) if when == "after-write" else None
            jobs = killed or KilledInAdd(store, after_commit=True)
            rig.intake(cast(JobStore, jobs), spills).serve()
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert rig.held() == [envelope]
    assert [e.shmid for e in spills.entries() if e.state is SpillState.QUEUED] == [shmid]
    bodies = tmp_path / "jobs.db.bodies"
    store = open_store(path)
    try:
        assert len(store.list()) == (1 if when == "after-commit" else 0)
        rig.intake(store, spills).commit_held()
        assert [r.id for r in store.list()] == ["big1"]
        assert store.counts()[State.QUEUED] == 1
        body = store.body("big1")
        assert body is not None
        assert split.decode(body, TYPE).payload == data
        # What max_queued_bytes counts: the stored body, once; the size, the payload's.
        assert store.backlog() == Backlog(1, len(body))
        assert store.list()[0].size == len(data)
        assert len(list(bodies.iterdir())) == (2 if when == "after-write" else 1)
        store.reset_running()  # what the next start does: the killed intake's file goes
        assert len(list(bodies.iterdir())) == 1
        assert store.body("big1") == body
    finally:
        store.close()
    assert rig.held() == []
    assert [e for e in spills.entries() if e.state is not SpillState.FREE] == []
    assert str(shmid) not in _shm_ids()  # the segment is gone


def _shm_ids() -> set[str]:
    with open("/proc/sysvipc/shm") as f:
        return {line.split()[1] for line in f.readlines()[1:]}
