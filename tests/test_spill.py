"""Large payloads and results: each in a segment of its own, recorded in the spill table.

Real daemons, real segments: every test ends with no spill segment left on the host
(checked by the autouse fixture, after the instance's objects are removed) and no entry
of the spill table in use.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IPCCTL, TESTS, Instance, spill_segments

from ipcd.client import Client
from ipcd.errors import ExitCode, QueueFullError
from ipcd.kernel.queues import Queue
from ipcd.kernel.segments import Segment
from ipcd.layout.results import Kind, Result
from ipcd.store import blobs, open_store
from ipcd.tables import spill
from ipcd.tables.spill import segment as spillsegment
from ipcd.tables.spill import table as spilltable
from ipcd.tables.spill.table import SpillTable, State
from ipcd.tables.unique import UniqueTable
from ipcd.wire import protocol, split
from ipcd.wire.protocol import JSONValue

MIB = 1 << 20

HANDLERS = """
[handlers.digest]
type = 5
target = "ipcd_test_plugins:digest"

[handlers.big]
type = 6
target = "ipcd_test_plugins:big"

[handlers.digest_after_dying]
type = 7
target = "ipcd_test_plugins:digest_after_dying"

[handlers.echo]
type = 2

[handlers.crash]
type = 8
target = "ipcd_test_plugins:crash"
max_attempts = 1
"""


@pytest.fixture(autouse=True)
def no_spill_segment_left() -> Iterator[None]:
    """Set up before (so torn down after) the instance: nothing it made may remain."""
    before = spill_segments()
    yield
    left = spill_segments() - before
    for _ in range(100):  # other test runs on the host make (and soon remove) their own
        if not left:
            break
        time.sleep(0.05)
        left &= spill_segments()
    assert not left, f"spill segments left behind: {sorted(left)}"


def _start(instance: Instance, extra: str = "", size: int = 262144, results: str = "") -> Client:
    instance.write(extra, handlers=HANDLERS, results=results)
    text = instance.config_path.read_text().replace("size = 262144", f"size = {size}")
    instance.config_path.write_text(text)
    started = instance.ipcd("start")
    assert started.returncode == 0, started.stderr
    return Client(instance.config)


def _stop(instance: Instance) -> None:
    stopped = instance.ipcd("stop")
    assert stopped.returncode == 0, stopped.stderr


def _in_use(instance: Instance) -> list[spilltable.Entry]:
    """The entries naming a payload or result: not the pool's spares (tests/test_pool.py),
    nor a spare a worker is making (CLAIMING with no job id: SpillTable.refill), which it
    does after its reply, so that a test that has its result may see it."""
    table = SpillTable.open(instance.keys.spill)
    return [
        e
        for e in table.entries()
        if e.state is not State.FREE
        and not e.spare
        and not (e.state is State.CLAIMING and not e.job_id)
    ]


def _digest(data: bytes) -> dict[str, object]:
    return {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _digested(client: Client, data: bytes) -> Result:
    """The result of the digest handler for ``data``, checked to be ``data``'s."""
    result = client.call("digest", data, timeout=60)
    assert result.ok, result.error
    value = result.value()
    assert isinstance(value, dict)
    assert {k: value[k] for k in ("kind", "length", "sha256")} == {"kind": "bytes", **_digest(data)}
    return result


def _stored_body(instance: Instance, job_id: str) -> bytes | None:
    """The job's message as the job store holds it (None: not there)."""
    jobs = open_store(str(instance.config.store.path))
    try:
        return jobs.body(job_id)
    finally:
        jobs.close()


def _stored_payload(instance: Instance, job_id: str) -> JSONValue | bytes:
    """The payload of the job's message in the job store: a spilled one is held split,
    its bytes after the envelope (ipcd.wire.split)."""
    body = _stored_body(instance, job_id)
    assert body is not None, f"job {job_id} is not in the job store"
    job = split.decode(body, 1)
    assert job.spill is None  # whole, not a reference to a segment
    return job.payload


def test_spilled_payload_is_stored_split_unencoded(instance: Instance) -> None:
    """A spilled bytes payload is kept in the store's file as its raw bytes after the
    client's envelope (no base64), and the handler gets those bytes whole."""
    client = _start(instance)
    try:
        data = os.urandom(2 * MIB)
        result = _digested(client, data)
        body = _stored_body(instance, result.job_id)
        assert body is not None
        found = split.parts(body)
        assert found is not None and found[1] == data
        head = protocol.decode(found[0], 5)
        assert head.id == result.job_id and head.spill is not None
        assert (head.spill.size, head.spill.kind) == (len(data), "bytes")
        assert _in_use(instance) == []
    finally:
        _stop(instance)


def test_100_mib_payload_round_trip(instance: Instance) -> None:
    """A 100 MiB bytes payload reaches the handler whole; its segment and entry then go."""
    client = _start(instance)
    try:
        data = os.urandom(100 * MIB)
        result = _digested(client, data)
        assert _in_use(instance) == []
        # The intake wrote the payload from its segment into the store, split after the
        # envelope: the worker read it from there; the size the store records is the payload's.
        done = instance.wait_events(lambda e: e.get("event") == "job.done", 1)
        assert done[0]["bytes_in"] == len(_stored_body(instance, result.job_id) or b"")
        shown = json.loads(instance.ipcctl("show", result.job_id, "--json").stdout)
        assert shown["job"]["size"] == 100 * MIB
    finally:
        _stop(instance)


def test_large_payload_and_result_are_files_beside_the_store_until_purged(
    instance: Instance,
) -> None:
    """A spilled payload and a result above the store's file threshold are kept as files
    in the store's own directory (ipcd.store.blobs), read back whole by the worker and the
    client, found sound by ``ipcd check``, and removed by ``ipcctl purge``."""
    client = _start(instance)
    bodies = Path(f"{instance.config.store.path}{blobs.SUFFIX}")
    try:
        data = os.urandom(MIB)
        done = client.call("digest", data, timeout=30)
        assert done.ok, done.error
        value = done.value()
        assert isinstance(value, dict) and value["sha256"] == _digest(data)["sha256"]
        size = 2 * blobs.THRESHOLD
        made = client.call("big", str(size), timeout=30)
        assert made.ok and made.data == b"x" * size, made.error
        # The payload's body and the result, each a file named for its job; the first
        # result (a digest) and the second job's body are small: in the database.
        named = sorted(name.split("~")[0] for name in os.listdir(bodies))
        assert named == sorted([done.job_id, made.job_id])
        assert stat.S_IMODE(bodies.stat().st_mode) == 0o700
        assert _stored_payload(instance, done.job_id) == data
        checked = instance.ipcd("check")
        assert checked.returncode == 0, checked.stderr
        purged = instance.ipcctl("purge", "--state", "done")
        assert purged.returncode == 0, purged.stderr
        assert os.listdir(bodies) == []
    finally:
        _stop(instance)


def test_large_text_and_json_payloads_keep_their_kind(instance: Instance) -> None:
    """A large str arrives as str and a large JSON value as that value."""
    client = _start(instance)
    try:
        text = "é" * (2 * MIB)
        value = client.call("digest", text, timeout=30).value()
        assert isinstance(value, dict)
        assert (value["kind"], value["sha256"]) == ("str", _digest(text.encode())["sha256"])
        doc: JSONValue = {"rows": list(range(100_000))}
        value = client.call("digest", doc, timeout=30).value()
        assert isinstance(value, dict) and value["kind"] == "dict"
        raw = json.dumps(doc, separators=(",", ":")).encode()
        assert value["sha256"] == _digest(raw)["sha256"]
        assert _in_use(instance) == []
    finally:
        _stop(instance)


def test_100_mib_result(instance: Instance) -> None:
    """A 100 MiB result is stored in its own segment and read back whole."""
    client = _start(instance)
    try:
        result = client.call("big", str(100 * MIB), timeout=60)
        assert result.ok, result.error
        assert len(result.data) == 100 * MIB and result.data == b"x" * (100 * MIB)
        assert [(e.state, e.size) for e in _in_use(instance)] == [(State.RESULT, 100 * MIB)]
        again = client.result(result.job_id)  # read as often as it is asked for
        assert again is not None and len(again.data) == 100 * MIB
    finally:
        _stop(instance)


def test_result_above_max_result_is_an_error(instance: Instance) -> None:
    """A result larger than [results] max_result fails the job, saying why."""
    client = _start(instance, results="max_result = 100000")
    try:
        result = client.call("big", "200000", timeout=30)
        assert not result.ok
        assert "result too large: 200000 bytes" in result.error
        assert _in_use(instance) == []
    finally:
        _stop(instance)


def test_ring_eviction_removes_a_spilled_result(instance: Instance) -> None:
    """When the ring overwrites a spilled result, its segment and entry go with it (with
    no pool to keep it as a spare)."""
    client = _start(instance, size=64 + 4 * 2048, results="pool_bytes = 0")  # four slots
    try:
        big = client.call("big", str(MIB), timeout=30)
        assert big.ok and len(big.data) == MIB
        (entry,) = _in_use(instance)
        for n in range(4):
            assert client.call("echo", f"small {n}", timeout=30).ok
        assert client.result(big.job_id) is None
        assert _in_use(instance) == []
        assert not _segment_exists(entry.shmid)
    finally:
        _stop(instance)


def test_failed_list_keeps_a_spilled_payload_until_it_drops_the_job(instance: Instance) -> None:
    """A spilled job that failed for good keeps its payload in the job store, not in a
    segment (the intake released that): ``ipcctl retry`` runs it again with the payload
    whole, and the payload goes with the job when the store drops it (purge, retention)."""
    client = _start(instance)
    try:
        data = os.urandom(MIB)
        failed = client.call("crash", data, timeout=30)
        assert not failed.ok and "ZeroDivisionError" in failed.error
        assert _in_use(instance) == []
        assert _stored_payload(instance, failed.job_id) == data
        assert instance.ipcctl("retry", failed.job_id).returncode == 0
        again = client.wait(failed.job_id, 30)
        assert not again.ok and again.finished > failed.finished
        assert _in_use(instance) == []
        assert _stored_payload(instance, failed.job_id) == data
        listed = json.loads(instance.ipcctl("failed", "--json").stdout)["failed"]
        assert [(f["id"], f["bytes"]) for f in listed] == [(failed.job_id, MIB)]
        purged = instance.ipcctl("purge", "--state", "failed")
        assert (purged.returncode, purged.stdout) == (0, "purged 1 job\n"), purged.stderr
        assert json.loads(instance.ipcctl("failed", "--json").stdout)["failed"] == []
        assert _stored_body(instance, failed.job_id) is None
    finally:
        _stop(instance)


def test_spilled_jobs_do_not_fill_the_queue(instance: Instance) -> None:
    """Eight 1 MiB jobs queued while no daemon serves take a few hundred bytes of queue;
    at the start the intake takes them into the store and their segments go."""
    client = _start(instance)
    _stop(instance)
    ids = [client.submit("digest", bytes([n]) * MIB) for n in range(8)]
    stats = Queue.open(instance.keys.jobs).stats()
    assert stats.messages == 8 and stats.bytes < 8 * 512
    assert [e.state for e in _in_use(instance)] == [State.QUEUED] * 8
    assert instance.ipcd("start").returncode == 0
    try:
        done = instance.wait_events(lambda e: e.get("event") == "job.done", 8, timeout=30)
        assert sorted(str(e["job_id"]) for e in done) == sorted(ids)
        assert all(e["outcome"] == "ok" for e in done)
        for n, job_id in enumerate(ids):  # each payload reached its handler whole
            value = client.wait(job_id, 30).value()
            assert isinstance(value, dict)
            assert value["sha256"] == _digest(bytes([n]) * MIB)["sha256"]
        # The intake took the payloads into the store and released their segments.
        assert _in_use(instance) == []
        assert _stored_payload(instance, ids[0]) == bytes([0]) * MIB
    finally:
        _stop(instance)


def test_payload_above_max_payload_exits_65(instance: Instance, tmp_path: Path) -> None:
    """ipcctl refuses a payload over [jobs] max_payload with status 65, leaving nothing."""
    _start(instance, "\n[jobs]\nmax_payload = 1048576\n")
    try:
        big = tmp_path / "big"
        big.write_bytes(b"\xff" * (MIB + 1))
        with big.open("rb") as fh:
            refused = subprocess.run(
                [IPCCTL, "-c", str(instance.config_path), "submit", "digest", "-"],
                stdin=fh, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        assert refused.returncode == ExitCode.DATA
        assert "[jobs] max_payload (1048576 bytes)" in refused.stderr
        assert _in_use(instance) == []
    finally:
        _stop(instance)


def test_ipcctl_submits_from_stdin_and_prints_a_big_result(
    instance: Instance, tmp_path: Path
) -> None:
    """``ipcctl submit TYPE - < file`` spills a large file; ``ipcctl result`` prints a big
    result whole."""
    _start(instance)
    try:
        data = os.urandom(20 * MIB)
        path = tmp_path / "payload"
        path.write_bytes(data)
        with path.open("rb") as fh:
            waited = subprocess.run(
                [IPCCTL, "-c", str(instance.config_path), "submit", "digest", "-", "--wait"],
                stdin=fh, capture_output=True, text=True, timeout=60,
                env={**os.environ, "PYTHONPATH": str(TESTS / "plugins")},
            )  # fmt: skip
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["sha256"] == _digest(data)["sha256"]
        submitted = instance.ipcctl("submit", "big", str(20 * MIB), "--wait", "--timeout", "60")
        assert submitted.returncode == 0, submitted.stderr
        job_id = instance.ipcctl("submit", "big", str(20 * MIB)).stdout.strip()
        instance.wait_events(lambda e: e.get("job_id") == job_id, 1)
        printed = subprocess.run(
            [IPCCTL, "-c", str(instance.config_path), "result", job_id],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert printed.returncode == 0 and printed.stdout == b"x" * (20 * MIB)
    finally:
        _stop(instance)


def test_worker_killed_on_a_spilled_job_runs_it_again(instance: Instance) -> None:
    """A worker SIGKILLed while running a spilled job: the job runs again from the same
    segment and succeeds; then the segment goes."""
    client = _start(instance, "\n[jobs]\nretry_delay = 0\n")
    try:
        data = os.urandom(3 * MIB)
        result = client.call("digest_after_dying", data, timeout=30)
        assert result.ok, result.error
        value = result.value()
        assert isinstance(value, dict)
        assert (value["attempt"], value["sha256"]) == (2, _digest(data)["sha256"])
        assert _in_use(instance) == []
    finally:
        _stop(instance)


def _die_claiming(key: int, *, recorded: bool) -> None:  # pragma: no cover - in a child
    """Be a client killed in a large submission: claim an entry, make the segment (and
    record it, or not), then SIGKILL this process before anything else."""
    table = SpillTable.open(key)
    claim = table.claim("doomed", MIB, role=spillsegment.Role.PAYLOAD, refused="not accepted")
    segment = Segment.create_private(spillsegment.DATA + MIB, 0o600)
    if recorded:
        table.record(claim.slot, segment.id)
    segment.close()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("recorded", [False, True], ids=["before-record", "after-record"])
def test_sweeper_removes_a_dead_clients_segment(instance: Instance, recorded: bool) -> None:
    """A client killed after claiming an entry and making its segment (before or after
    recording the id, before sending): the master removes the segment, frees the entry."""
    _start(instance)
    try:
        keys = instance.keys
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the doomed client
            _die_claiming(keys.spill, recorded=recorded)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        swept = instance.wait_events(lambda e: e.get("event") == "spill.swept", 1, timeout=15)
        assert swept and (swept[0]["entries"], swept[0]["segments"]) == (1, 1)
        assert _in_use(instance) == []
        assert not [f for f in _proc_shm() if f[0] == "0" and int(f[4]) == pid]
    finally:
        _stop(instance)


@pytest.mark.parametrize("recorded", [False, True], ids=["before-record", "after-record"])
def test_sweep_keeps_the_queued_payloads_of_a_client_that_died_claiming(
    instance: Instance, recorded: bool
) -> None:
    """A client that queued three large jobs and was killed during its fourth (after
    making the segment, before or after recording it): the sweep removes only that
    segment, and the three accepted jobs run with their payloads."""
    client = _start(instance)
    _stop(instance)  # the jobs wait in the queue, their segments unattached
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the doomed client
        try:
            mine = Client(instance.config)
            ids = [mine.submit("digest", bytes([n]) * MIB) for n in range(3)]
            os.write(write_end, " ".join(ids).encode())
            _die_claiming(instance.keys.spill, recorded=recorded)
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        ids = fh.read().decode().split()
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert len(ids) == 3
    assert instance.ipcd("start").returncode == 0
    try:
        swept = instance.wait_events(lambda e: e.get("event") == "spill.swept", 1, timeout=15)
        assert swept and (swept[0]["entries"], swept[0]["segments"]) == (1, 1)
        for n, job_id in enumerate(ids):
            result = client.wait(job_id, 30)
            assert result.ok, result.error
            assert result.value() == {**_digest(bytes([n]) * MIB), "kind": "bytes", "attempt": 1}
        assert not [f for f in _proc_shm() if f[0] == "0" and int(f[4]) == pid]
        instance.wait_events(lambda e: e.get("event") == "job.done", 3)
        assert _in_use(instance) == []
    finally:
        _stop(instance)


def test_sweep_frees_a_queued_entry_whose_job_was_never_sent(instance: Instance) -> None:
    """A client killed after marking its entry QUEUED and before its send (or while
    blocked on a full queue): once the queue is empty the running daemon's sweep removes
    the segment and frees the entry; a job that was sent keeps its own."""
    client = _start(instance)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the doomed client
            try:
                table = SpillTable.open(instance.keys.spill)
                index, shmid, _ = table.put(
                    b"u" * MIB, job_id="unsent", kind=Kind.BYTES,
                    role=spillsegment.Role.PAYLOAD, mode=0o600, owner=None, refused="no",
                )  # fmt: skip
                table.mark(index, State.QUEUED, shmid)
                os.kill(os.getpid(), signal.SIGKILL)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        (entry,) = _in_use(instance)
        assert (entry.state, entry.pid, entry.job_id) == (State.QUEUED, pid, "unsent")
        assert client.call("digest", b"s" * MIB, timeout=30).ok  # sent: its entry is kept
        swept = instance.wait_events(lambda e: e.get("event") == "spill.swept", 1, timeout=15)
        assert swept and (swept[0]["entries"], swept[0]["segments"]) == (1, 1)
        assert _in_use(instance) == []
        assert not _segment_exists(entry.shmid)
    finally:
        _stop(instance)


def test_refused_spilled_job_leaves_nothing(instance: Instance) -> None:
    """A large job the full queue refuses (status 75): its segment and entry go at once."""
    client = _start(instance)
    _stop(instance)
    try:
        for filler in ("x" * 2000, ""):  # large jobs, then the smallest, till none fits
            with pytest.raises(QueueFullError):
                for _ in range(10_000):
                    client.submit("echo", filler, send_timeout=0)
        with pytest.raises(QueueFullError):
            client.submit("digest", b"y" * MIB, send_timeout=0.2)
        assert _in_use(instance) == []
    finally:
        Queue.open(instance.keys.jobs).remove()


def test_segment_missing_fails_the_job_cleanly(instance: Instance) -> None:
    """A spilled job whose segment was removed fails with a clear error; the worker lives."""
    client = _start(instance)
    _stop(instance)
    job_id = client.submit("digest", b"z" * MIB, notify=True)
    (entry,) = _in_use(instance)
    subprocess.run(["ipcrm", "-m", str(entry.shmid)], check=True)  # as an operator would
    assert instance.ipcd("start").returncode == 0
    try:
        result = client.wait_submitted(job_id, 30)
        assert not result.ok and f"segment {entry.shmid} does not exist" in result.error
        assert client.call("echo", "still serving", timeout=30).value() == "still serving"
        assert _in_use(instance) == []
    finally:
        _stop(instance)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run client and daemon as users")
def test_non_root_client_hands_its_segment_to_the_daemons_user(tmp_path: Path) -> None:
    """A client running as another user than the daemon (nobody) hands its segment over,
    so the worker can read and remove it; and it can read a big result the worker made."""
    import shutil
    import tempfile

    from conftest import remove_objects

    path = Path(tempfile.mkdtemp(prefix="ipcd-spill-", dir="/tmp"))
    path.chmod(0o777)
    inst = Instance(path, path / "ipcd.toml")
    inst.write(handlers=HANDLERS)
    text = inst.config_path.read_text().replace(
        "workers = 2\n", 'workers = 2\nuser = "nobody"\ngroup = "nogroup"\n'
    )
    inst.config_path.write_text(text)
    inst.config_path.chmod(0o644)
    try:
        assert inst.ipcd("start").returncode == 0
        client = Client(inst.config)
        client.keys  # noqa: B018 - derived while root may still read everything
        data = os.urandom(2 * MIB)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the client, as uid 1 (daemon) in nogroup
            code = 1
            try:
                os.setgroups([65534])
                os.setgid(65534)
                os.setuid(1)
                sent = client.call("digest", data, timeout=30)
                big = client.call("big", str(MIB), timeout=30)
                answer = {
                    "digest": sent.value() if sent.ok else sent.error,
                    "big": big.data == b"x" * MIB,
                    "error": big.error,
                }
                os.write(write_end, json.dumps(answer).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as fh:
            answer = json.loads(fh.read() or b"{}")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, answer
        assert isinstance(answer["digest"], dict), answer["digest"]
        assert answer["digest"]["sha256"] == _digest(data)["sha256"]
        assert answer["big"] is True, answer["error"]
        assert [e.state for e in _in_use(inst)] == [State.RESULT]
        assert inst.ipcd("stop").returncode == 0
    finally:
        if inst.pid_file.exists():
            inst.ipcd("stop")
        remove_objects(inst)
        shutil.rmtree(path)


def _proc_shm() -> list[list[str]]:
    return [line.split() for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]]


def _segment_exists(shmid: int) -> bool:
    return any(int(f[1]) == shmid for f in _proc_shm())


def test_purge_removes_listed_segments(instance: Instance) -> None:
    """Removing the daemon's objects removes the spill segments its table lists."""
    client = _start(instance)
    _stop(instance)
    client.submit("digest", b"p" * MIB)
    (entry,) = _in_use(instance)
    from ipcd.tables.purge import remove_all

    removed = remove_all(instance.keys.all())
    assert "1 spill segments" in removed
    assert not _segment_exists(entry.shmid)


def _spill_jobs(extra: str) -> str:
    return f"\n[jobs]\n{extra}\n"


def test_spilled_results_are_a_cache_not_a_limit(instance: Instance, tmp_path: Path) -> None:
    """More large results than spill slots: the oldest are evicted (spill.evicted) and
    gone from the ring; ``ipcctl result`` reads them from the job store when it kept
    them (up to [store] max_result), else says there is none (exit 66); and a large
    payload is still accepted."""
    store = '\n[store]\npath = "jobs.db"\nmax_result = 10000\n'
    client = _start(instance, _spill_jobs("spill_slots = 4") + store)
    try:
        ids = []
        for n in range(10):
            result = client.call("big", str(10_000 + n), timeout=30)
            assert result.ok, result.error
            ids.append(result.job_id)
        in_use = _in_use(instance)
        assert sorted(e.job_id for e in in_use) == sorted(ids[-4:])
        assert {e.state for e in in_use} == {State.RESULT}
        assert client.result(ids[0]) is None and client.result(ids[1]) is None
        newest = client.result(ids[-1])
        assert newest is not None and newest.data == b"x" * 10_009
        kept = instance.ipcctl("result", ids[0])  # 10000 bytes: the store kept it
        assert (kept.returncode, kept.stdout.rstrip("\n")) == (0, "x" * 10_000), kept.stderr
        shown = instance.ipcctl("result", ids[1])  # 10001 bytes: the store kept its size
        assert shown.returncode == ExitCode.NO_RESULT, shown.stderr
        assert f"no result for job {ids[1]}" in shown.stderr
        evicted = instance.wait_events(lambda e: e.get("event") == "spill.evicted", 6)
        assert [e["evicted"] for e in evicted] == [[i] for i in ids[:6]]
        # A payload claim evicts a result too: results never starve payloads.
        digest = client.call("digest", b"p" * MIB, timeout=30)
        assert digest.ok, digest.error
        assert len(_in_use(instance)) == 3  # the payload's entry went with its job
        logged = instance.wait_events(lambda e: e.get("by") == "payloads", 1, timeout=15)
        assert logged and logged[0]["event"] == "spill.evicted" and logged[0]["results"] == 1
        # Large payloads with large results (payload and result entries at once).
        for n in range(10):
            echoed = client.call("echo", bytes([65 + n]) * 10_000, timeout=30)
            assert echoed.ok and echoed.data == bytes([65 + n]) * 10_000, echoed.error
    finally:
        _stop(instance)


def test_ring_eviction_does_not_free_a_reused_entry(instance: Instance) -> None:
    """A result evicted from the table and its entry reused by another job's: when the
    ring later drops the first record, the other job's entry and segment stay."""
    client = _start(instance, _spill_jobs("spill_slots = 2"), size=64 + 4 * 2048)
    try:
        first, second, third = (client.call("big", str(10_000 + n), timeout=30) for n in range(3))
        assert first.ok and second.ok and third.ok
        held = {e.job_id: e for e in _in_use(instance)}
        assert set(held) == {second.job_id, third.job_id}  # the first's entry was reused
        assert client.call("echo", "small", timeout=30).ok  # the ring drops the first's record
        assert {e.job_id: e for e in _in_use(instance)} == held
        again = client.result(third.job_id)
        assert again is not None and again.data == b"x" * 10_002
    finally:
        _stop(instance)


def test_spill_bytes_caps_the_results_kept(instance: Instance) -> None:
    """[results] spill_bytes: the oldest results go while the kept ones would exceed it;
    a result larger than it alone fails."""
    client = _start(instance, results="spill_bytes = 25000")
    try:
        ids = [client.call("big", "10000", timeout=30).job_id for _ in range(4)]
        in_use = _in_use(instance)
        assert sorted(e.job_id for e in in_use) == sorted(ids[-2:])
        assert sum(e.size for e in in_use) <= 25_000
        too_big = client.call("big", "30000", timeout=30)
        assert too_big.error == (
            "result too large: 30000 bytes, more than [results] spill_bytes (25000)"
        )
    finally:
        _stop(instance)


def test_failed_list_holds_at_most_half_the_table(instance: Instance) -> None:
    """Spilled jobs that failed for good hold no entry of the spill table at all (their
    payloads are in the job store), so any number of them can be retried, and large
    payloads of jobs still to run are never refused for them."""
    client = _start(instance, _spill_jobs("spill_slots = 4"))
    try:
        failed = [client.call("crash", bytes([n]) * MIB, timeout=30).job_id for n in range(3)]
        instance.wait_events(lambda e: e.get("event") == "job.done", 3)
        assert _in_use(instance) == []
        listed = json.loads(instance.ipcctl("failed", "--json").stdout)["failed"]
        assert sorted(f["id"] for f in listed) == sorted(failed)
        for job_id in failed:
            assert instance.ipcctl("retry", job_id).returncode == 0
        for n, job_id in enumerate(failed):
            again = client.wait(job_id, 30)
            assert not again.ok and "ZeroDivisionError" in again.error
            assert _stored_payload(instance, job_id) == bytes([n]) * MIB
        assert _in_use(instance) == []
        assert client.call("digest", b"q" * MIB, timeout=30).ok
    finally:
        _stop(instance)


def test_a_result_refused_for_room_says_so(instance: Instance) -> None:
    """With every entry held by payloads, a result is refused with its own message, not
    the one a refused submission gets."""
    from ipcd.layout.results import Kind, Result, Status

    table = SpillTable.create(instance.keys.spill, 0o600, 2, max_result=MIB)
    try:
        for n in range(2):
            table.claim(f"payload{n}", MIB, role=spillsegment.Role.PAYLOAD, refused="not accepted")
        result = Result("job1", 2, Status.OK, Kind.BYTES, b"r" * 5000)
        stored, evicted = spill.spill_result(table, result)
        assert (stored.status, evicted) == (Status.ERROR, ())
        assert stored.error.endswith("the result of 5000 bytes was not stored")
        assert "was not accepted" not in stored.error
        with pytest.raises(QueueFullError, match="the large job was not accepted"):
            table.claim(
                "job2",
                MIB,
                role=spillsegment.Role.PAYLOAD,
                refused="the large job was not accepted",
            )
    finally:
        table.segment.close()


def test_queued_payloads_leave_the_results_their_share(instance: Instance, tmp_path: Path) -> None:
    """Large payloads hold spill entries only until the intake stores them.  With the
    intake held up (stopped here, as a store that cannot be written would hold it) and
    the payloads' share taken by jobs waiting in the kernel queue, the next large
    submission gets exit status 75 at once, naming the share, and a job's large result
    is still stored; once the intake goes on, those jobs run and their entries go."""
    # One worker: the results come one after the other, each evicting the one before (two
    # at once could each find the other's entry not yet a result, and one be refused).
    instance.write(_spill_jobs("spill_slots = 4"), handlers=HANDLERS)  # one kept for results
    text = instance.config_path.read_text().replace("workers = 2\n", "workers = 1\n")
    instance.config_path.write_text(text)
    assert instance.ipcd("start").returncode == 0
    client = Client(instance.config)
    [intake] = instance.wait_events(lambda e: e.get("event") == "intake.started", 1)
    # Stored before the intake stops, paused so that they run only later.
    assert instance.ipcctl("pause", "big").returncode == 0
    bigs = [client.submit("big", str(MIB + n), confirm=True) for n in range(3)]
    os.kill(int(str(intake["pid"])), signal.SIGSTOP)
    try:
        waiting = [client.submit("digest", bytes([n]) * MIB) for n in range(3)]
        assert [e.state for e in _in_use(instance)] == [State.QUEUED] * 3
        big = tmp_path / "big"
        big.write_bytes(b"\xfe" * MIB)
        with big.open("rb") as fh:
            refused = subprocess.run(
                [IPCCTL, "-c", str(instance.config_path), "submit", "digest", "-"],
                stdin=fh, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        assert refused.returncode == ExitCode.QUEUE_FULL, refused.stderr
        assert "spill table's 3 slots for large payloads are taken" in refused.stderr
        assert "[results] spill_reserved = 1" in refused.stderr
        assert instance.ipcctl("resume", "big").returncode == 0
        # Each result evicts the one before (the share left to results is one entry).
        done = instance.wait_events(
            lambda e: e.get("event") == "job.done" and e["job_id"] in bigs, 3
        )
        assert sorted((e["outcome"], e["bytes_out"]) for e in done) == [
            ("ok", MIB + n) for n in range(3)
        ]
        in_use = _in_use(instance)
        assert sorted(e.state for e in in_use) == [State.QUEUED] * 3 + [State.RESULT]
        (kept,) = (e for e in in_use if e.state is State.RESULT)
        newest = client.result(kept.job_id)
        assert newest is not None and newest.data == b"x" * (MIB + bigs.index(kept.job_id))
    finally:
        os.kill(int(str(intake["pid"])), signal.SIGCONT)
    try:
        for n, job_id in enumerate(waiting):
            value = client.wait(job_id, 30).value()
            assert isinstance(value, dict)
            assert value["sha256"] == _digest(bytes([n]) * MIB)["sha256"]
        assert [e.state for e in _in_use(instance)] == [State.RESULT]
    finally:
        _stop(instance)


def test_status_and_stats_show_the_spill_table(instance: Instance) -> None:
    """``ipcctl status`` (text and JSON) and ``stats --prometheus`` show the table's use,
    the pool's spare (made after the 1 MiB result's reply) among the slots used."""
    client = _start(instance)
    try:
        assert client.call("big", str(MIB), timeout=30).ok
        doc = json.loads(instance.ipcctl("status", "--json").stdout)["spill"]
        assert (doc["slots"], doc["used"], doc["results"], doc["bytes"]) == (64, 2, 1, MIB)
        assert (doc["spares"], doc["spare_bytes"], doc["pool_bytes"]) == (1, MIB, 64 * MIB)
        text = instance.ipcctl("status").stdout
        assert (
            f"spill      2 of 64 slots used (1 results, 0 payloads, 0 failed), {MIB} bytes" in text
        )
        assert f"pool: 1 spare segments, {MIB} of {64 * MIB} bytes" in text
        prom = instance.ipcctl("stats", "--prometheus").stdout.splitlines()
        assert "ipcd_spill_slots_used 2" in prom and f"ipcd_spill_bytes {MIB}" in prom
        assert "ipcd_spill_slots 64" in prom and f"ipcd_spill_spare_bytes {MIB}" in prom
    finally:
        _stop(instance)


def test_a_rejected_spilled_job_releases_its_unique_key(instance: Instance) -> None:
    """A spilled job whose segment is gone is rejected, and its --unique key is free again."""
    client = _start(instance)
    _stop(instance)
    job_id = client.submit("digest", b"k" * MIB, unique="nightly")
    (entry,) = _in_use(instance)
    SpillTable.open(instance.keys.spill).release(entry.shmid, job_id, entry.slot)
    assert instance.ipcd("start").returncode == 0
    try:
        rejected = client.wait(job_id, 30)
        assert not rejected.ok and "does not exist" in rejected.error
        # Freed by the rejection itself, not only seen stale by the next submit.
        assert UniqueTable.open(instance.keys.unique).lookup("nightly") is None
        again = instance.ipcctl("submit", "--unique", "nightly", "echo", "next")
        assert again.returncode == 0, again.stderr
    finally:
        _stop(instance)


def test_clearing_a_spilled_result_removes_its_segment(instance: Instance) -> None:
    """ResultStore.clear (what ipcctl retry does first) takes a spilled result's segment
    and entry with it: the ring would never release them afterwards."""
    client = _start(instance)
    try:
        result = client.call("big", str(64 * 1024), timeout=30)
        assert result.ok and len(result.data) == 64 * 1024
        (entry,) = _in_use(instance)
        assert entry.state is State.RESULT
        assert client.store.clear(result.job_id) == 1
        assert _in_use(instance) == []
        assert not _segment_exists(entry.shmid)
        assert client.result(result.job_id) is None
    finally:
        _stop(instance)


def test_max_payload_holds_for_payloads_that_fit_a_message(instance: Instance) -> None:
    """[jobs] max_payload is the largest payload, however it would travel: an argument
    of 3000 bytes is refused (65) as stdin is, and nothing is queued."""
    _start(instance, "\n[jobs]\nmax_payload = 1000\n")
    try:
        refused = instance.ipcctl("submit", "echo", "x" * 3000)
        assert refused.returncode == ExitCode.DATA
        assert "exceeds [jobs] max_payload (1000 bytes)" in refused.stderr
        assert Queue.open(instance.keys.jobs).stats().messages == 0
        assert instance.ipcctl("submit", "echo", "x" * 900, "--wait").stdout == "x" * 900 + "\n"
    finally:
        _stop(instance)


def test_a_rejected_envelope_takes_its_spilled_payload_with_it(instance: Instance) -> None:
    """An envelope that points to a spilled payload but fails validation never runs:
    its segment and entry go with the rejection."""
    from ipcd.client.api import outgoing

    client = _start(instance)
    try:
        job_id = "badattempt000001"
        with outgoing(client, b"z" * MIB, None, job_id=job_id, reply_to=None, timeout=None) as body:
            doc = json.loads(body)
            doc["attempt"] = 0  # out of range: the worker rejects the envelope
            (entry,) = _in_use(instance)  # before the send: the worker may be quick
            client.queue.send(json.dumps(doc).encode(), 5, timeout=2)
        rejected = instance.wait_events(
            lambda e: e.get("event") == "job.rejected" and e.get("job_id") == job_id, 1
        )
        assert rejected and "'attempt'" in str(rejected[0]["error"])
        deadline = time.monotonic() + 10
        while _in_use(instance) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _in_use(instance) == []
        assert not _segment_exists(entry.shmid)
    finally:
        _stop(instance)


def test_a_spilled_payloads_envelope_with_newlines_runs(instance: Instance) -> None:
    """An envelope is any JSON object (docs/protocol.md): one a client of its own sends
    pretty-printed, its members on lines of their own, runs with its spilled payload
    whole, as a compact one does (the store's split body does not end its envelope at
    the first newline)."""
    from ipcd.client.api import outgoing

    client = _start(instance)
    try:
        data = b"\n" + os.urandom(MIB)
        job_id = "prettyenvelope01"
        with outgoing(client, data, None, job_id=job_id, reply_to=None, timeout=None) as body:
            pretty = json.dumps(json.loads(body), indent=1).encode()
            assert b"\n" in pretty
            client.queue.send(pretty, 5, timeout=2)
        result = client.wait(job_id, 30)
        assert result.ok, result.error
        value = result.value()
        assert isinstance(value, dict)
        assert {k: value[k] for k in ("length", "sha256")} == _digest(data)
        assert _stored_payload(instance, job_id) == data
        assert _in_use(instance) == []
    finally:
        _stop(instance)


def test_the_failed_list_drops_a_job_the_intake_failed_with_its_segment(
    instance: Instance,
) -> None:
    """A spilled job the intake fails at once (no handler takes its type) keeps its
    segment while the failed list holds it, and the segment goes when the list drops the
    job (docs/operating.md): with room for one entry, three such jobs leave one."""
    client = _start(instance, _spill_jobs("failed_size = 1"))
    try:
        ids = [client.submit(9, bytes([n]) * MIB, notify=True) for n in range(3)]
        for job_id in ids:
            result = client.wait_submitted(job_id, 30)
            assert not result.ok and "no handler for message type 9" in result.error
        assert [e.job_id for e in _in_use(instance)] == ids[-1:]
        for n, job_id in enumerate(ids):  # the store holds each payload whole
            assert _stored_payload(instance, job_id) == bytes([n]) * MIB
    finally:
        _stop(instance)


def test_a_spilled_bytes_payloads_preview_reads_as_text_when_it_is(instance: Instance) -> None:
    """``ipcctl show`` previews a large bytes payload that is UTF-8 text as its text, as
    it does one that fits a message, though the intake looks only at its first bytes
    (cut inside a character here), not the whole payload."""
    client = _start(instance)
    try:
        data = "€".encode() * 200_000
        result = _digested(client, data)
        shown = json.loads(instance.ipcctl("show", result.job_id, "--json").stdout)
        assert shown["job"]["preview"] == "€" * 79 + "…"
        assert shown["job"]["size"] == len(data)
    finally:
        _stop(instance)


def test_a_worker_killed_on_a_small_spilled_job_runs_it_again(instance: Instance) -> None:
    """A bytes payload that needs a segment only because base64 would not fit a message
    is held split in the store and handed to its worker by value (the raw bytes fit the
    worker's slot): a worker SIGKILLed while running it leaves the master's recovery a
    split body in the slot, and the job runs again with its payload whole."""
    client = _start(instance, "\n[jobs]\nretry_delay = 0\n")
    try:
        data = b"\n" + os.urandom(6200)  # base64: 8268 bytes
        result = client.call("digest_after_dying", data, timeout=30)
        assert result.ok, result.error
        value = result.value()
        assert isinstance(value, dict)
        assert (value["attempt"], value["sha256"]) == (2, _digest(data)["sha256"])
        body = _stored_body(instance, result.job_id)
        assert body is not None and body.startswith(split.MAGIC)
        assert len(body) < 8192  # by value in the slot (msgmax is at least 8192)
        assert _in_use(instance) == []
    finally:
        _stop(instance)
