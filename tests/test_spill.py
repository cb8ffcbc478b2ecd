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
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import IPCCTL, TESTS, Instance, spill_segments

from ipcd import spilltable
from ipcd.client import Client
from ipcd.errors import ExitCode, QueueFullError
from ipcd.ipc import Queue
from ipcd.protocol import JSONValue
from ipcd.shm import Segment
from ipcd.spilltable import SpillTable, State

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
    table = SpillTable.open(instance.keys.spill)
    return [e for e in table.entries() if e.state is not State.FREE]


def _digest(data: bytes) -> dict[str, object]:
    return {"length": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_100_mib_payload_round_trip(instance: Instance) -> None:
    """A 100 MiB bytes payload reaches the handler whole; its segment and entry then go."""
    client = _start(instance)
    try:
        data = os.urandom(100 * MIB)
        result = client.call("digest", data, timeout=60)
        assert result.ok, result.error
        value = result.value()
        assert isinstance(value, dict)
        assert {k: value[k] for k in ("kind", "length", "sha256")} == {
            "kind": "bytes",
            **_digest(data),
        }
        assert _in_use(instance) == []
        done = instance.wait_events(lambda e: e.get("event") == "job.done", 1)
        assert done[0]["bytes_in"] == 100 * MIB
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
    """When the ring overwrites a spilled result, its segment and entry go with it."""
    client = _start(instance, size=64 + 4 * 2048)  # four slots
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
    """A spilled job that failed for good keeps its segment while listed, ``ipcctl retry``
    sends it again, and the segment goes when the list drops the job."""
    client = _start(instance, "\n[jobs]\nfailed_size = 2\n")
    try:
        data = os.urandom(MIB)
        failed = client.call("crash", data, timeout=30)
        assert not failed.ok and "ZeroDivisionError" in failed.error
        (entry,) = _in_use(instance)
        assert (entry.state, entry.job_id) == (State.FAILED, failed.job_id)
        assert instance.ipcctl("retry", failed.job_id).returncode == 0
        again = client.wait(failed.job_id, 30)
        assert not again.ok and again.finished > failed.finished
        assert [e.shmid for e in _in_use(instance)] == [entry.shmid]  # the same segment
        for n in range(2):
            assert not client.call("crash", f"small {n}", timeout=30).ok
        listed = json.loads(instance.ipcctl("failed", "--json").stdout)["failed"]
        assert failed.job_id not in [f["id"] for f in listed]
        assert _in_use(instance) == []
        assert not _segment_exists(entry.shmid)
    finally:
        _stop(instance)


def test_spilled_jobs_do_not_fill_the_queue(instance: Instance) -> None:
    """Eight 1 MiB jobs queued while no daemon serves take a few hundred bytes of queue."""
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
        assert all(e["outcome"] == "ok" and e["bytes_in"] == MIB for e in done)
        assert _in_use(instance) == []
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
        assert "exceeds [jobs] max_payload (1048576 bytes)" in refused.stderr
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


@pytest.mark.parametrize("recorded", [False, True], ids=["before-record", "after-record"])
def test_sweeper_removes_a_dead_clients_segment(instance: Instance, recorded: bool) -> None:
    """A client killed after claiming an entry and making its segment (before or after
    recording the id, before sending): the master removes the segment, frees the entry."""
    _start(instance)
    try:
        keys = instance.keys
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the doomed client
            table = SpillTable.open(keys.spill)
            index = table.claim(
                "doomed", MIB, role=spilltable.Role.PAYLOAD, refused="not accepted"
            ).slot
            segment = Segment.create_private(spilltable.DATA + MIB, 0o600)
            if recorded:
                table.record(index, segment.id)
            segment.close()
            os.kill(os.getpid(), signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        swept = instance.wait_events(lambda e: e.get("event") == "spill.swept", 1, timeout=15)
        assert swept and (swept[0]["entries"], swept[0]["segments"]) == (1, 1)
        assert _in_use(instance) == []
        assert not [f for f in _proc_shm() if f[0] == "0" and int(f[4]) == pid]
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
    from ipcd import vetting

    removed = vetting.remove_all(instance.keys.all())
    assert "1 spill segments" in removed
    assert not _segment_exists(entry.shmid)
