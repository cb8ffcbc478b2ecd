"""Cron-safe submission: ``ipcctl submit --unique KEY`` queues nothing while a job with
that key waits or runs, and no stale claim blocks a key for ever.

The first tests read the unique-key table's layout and operations on a real segment
without a daemon; the rest run a real daemon and ipcctl as a cron script would.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator

import pytest
from conftest import DEFAULT_HANDLERS, Instance

from ipcd.client import Client
from ipcd.daemon.uniquerelease import sweep_lost
from ipcd.errors import (
    AlreadyQueuedError,
    ExitCode,
    MessageError,
    QueueFullError,
    UsageError,
)
from ipcd.kernel.queues import Queue
from ipcd.layout.results import Kind, Result, Status
from ipcd.tables.inflight import InflightTable
from ipcd.tables.results import ResultStore
from ipcd.tables.unique import (
    ENTRY_SIZE,
    HEADER_SIZE,
    MAGIC,
    Claim,
    Entry,
    State,
    UniqueTable,
    stale_reason,
)
from ipcd.wire import protocol

HANDLERS = (
    DEFAULT_HANDLERS
    + """
[handlers.retry_once]
type = 11
target = "ipcd_test_plugins:retry_once"
"""
)


@pytest.fixture
def table(instance: Instance) -> Iterator[UniqueTable]:
    """A unique-key table of 4 entries at the instance's key (removed by ``instance``)."""
    made = UniqueTable.create(instance.keys.unique, 0o660, entries=4)
    yield made
    made.segment.close()


def _never(pid: int) -> bool:
    return False


def _always(pid: int) -> bool:
    return True


def _no_result(job_id: str) -> float | None:
    return None


# --- the table, without a daemon ----------------------------------------------------------


def test_header_layout(table: UniqueTable) -> None:
    """The header holds magic, version, header size, entry count, entry size and key limit."""
    raw = bytes(table.buf[:HEADER_SIZE])
    assert struct.unpack_from("<8sIIIII", raw) == (MAGIC, 1, 64, 4, 256, 200)
    assert raw[28:] == bytes(36)
    assert table.segment.size >= HEADER_SIZE + 4 * ENTRY_SIZE


def test_entry_layout(table: UniqueTable) -> None:
    """A claim writes state, CRC-32 of the key, pid, key length, time, job id and key."""
    before = time.time()
    assert table.claim("nightly-é", "0123456789abcdef", 4242) is None
    off = HEADER_SIZE
    state, crc, pid, length, claimed, job_id = struct.unpack_from("<IIIId16s", table.buf, off)
    key = "nightly-é".encode()
    assert (state, crc, pid, length) == (State.CLAIMING, zlib.crc32(key), 4242, len(key))
    assert before <= claimed <= time.time()
    assert job_id == b"0123456789abcdef"
    assert bytes(table.buf[off + 48 : off + 48 + len(key) + 1]) == key + b"\0"


def test_claim_conflict_confirm_release(table: UniqueTable) -> None:
    """A held key is reported to the next claimer; only its own job releases it."""
    assert table.claim("nightly", "job-a", 100) is None
    holder = table.claim("nightly", "job-b", 200)
    assert holder is not None
    assert (holder.job_id, holder.state, holder.pid, holder.key) == (
        "job-a",
        State.CLAIMING,
        100,
        "nightly",
    )
    assert table.confirm("nightly", "job-a")
    assert table.lookup("nightly") == holder._replace(state=State.QUEUED)
    assert not table.release("nightly", "job-b")
    assert table.release("nightly", "job-a")
    assert table.lookup("nightly") is None
    assert table.claim("nightly", "job-b", 200) is None


def test_keys_differ_by_text_not_only_hash(table: UniqueTable) -> None:
    """Different keys, prefixes of each other included, are held independently."""
    assert table.claim("report", "job-a", 1) is None
    assert table.claim("report2", "job-b", 1) is None
    assert table.claim("repor", "job-c", 1) is None
    assert [(e.key, e.job_id) for e in table.entries()] == [
        ("report", "job-a"),
        ("report2", "job-b"),
        ("repor", "job-c"),
    ]


def test_full_table_refuses(table: UniqueTable) -> None:
    """With every entry held, a claim of a new key raises QueueFullError (exit 75)."""
    for n in range(4):
        assert table.claim(f"k{n}", f"job{n}", 1) is None
    with pytest.raises(QueueFullError, match="unique-key table is full"):
        table.claim("k4", "job4", 1)
    assert table.claim("k0", "other", 1) is not None  # a held key is still answered


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "non-empty"),
        ("x" * 201, "at most 200 bytes"),
        ("é" * 101, "at most 200 bytes"),
        ("tab\there", "control characters"),
        ("\ud800", "valid UTF-8"),
    ],
)
def test_bad_keys_are_usage_errors(table: UniqueTable, key: str, problem: str) -> None:
    """A key the table cannot hold is a usage error (exit 64)."""
    with pytest.raises(UsageError, match=problem) as info:
        table.claim(key, "job", 1)
    assert info.value.exit_code == ExitCode.USAGE


def test_longest_key_fits(table: UniqueTable) -> None:
    """A key of exactly 200 UTF-8 bytes is held and found again."""
    key = "é" * 100
    assert table.claim(key, "job", 1) is None
    found = table.lookup(key)
    assert found is not None and found.key == key


def test_restarted_daemon_keeps_the_table(instance: Instance, table: UniqueTable) -> None:
    """Creating the table again keeps its keys; one of another shape starts empty."""
    table.claim("kept", "job", 1)
    again = UniqueTable.create(instance.keys.unique, 0o660, entries=4)
    assert [e.key for e in again.entries()] == ["kept"]
    again.segment.close()
    other = UniqueTable.create(instance.keys.unique, 0o660, entries=8)
    assert other.count == 8 and other.entries() == []
    other.segment.close()


def test_stale_reasons() -> None:
    """A holder is stale when its claimer died before sending, or its result is stored."""
    claiming = Entry(0, State.CLAIMING, "k", "job", 123, 1000.0)
    queued = claiming._replace(state=State.QUEUED)
    now = 1001.0
    assert stale_reason(claiming, alive=_always, finished=None, now=now) is None
    assert stale_reason(claiming, alive=_never, finished=None, now=now) == (
        "its submitter (pid 123) died before sending it"
    )
    assert stale_reason(claiming, alive=_always, finished=None, now=1000.0 + 3601) == (
        "its submitter (pid 123) claimed it long ago and never sent it"
    )
    assert stale_reason(queued, alive=_never, finished=None, now=now) is None
    assert stale_reason(queued, alive=_always, finished=None, now=1e9) is None  # delayed
    assert stale_reason(queued, alive=_always, finished=999.0, now=now) is None  # older run
    assert stale_reason(queued, alive=_always, finished=1000.5, now=now) == (
        "its outcome is stored"
    )


def test_claim_context(table: UniqueTable) -> None:
    """A Claim confirms the key when the send succeeds and frees it when the send fails."""
    with Claim(table, "k", "job-a", alive=_always, finished=_no_result):
        pass
    held = table.lookup("k")
    assert held is not None and held.state is State.QUEUED
    with (
        pytest.raises(AlreadyQueuedError, match=r"already queued as job job-a \(unique key k\)"),
        Claim(table, "k", "job-b", alive=_always, finished=_no_result),
    ):
        pass
    table.release("k", "job-a")
    with (
        pytest.raises(QueueFullError),
        Claim(table, "k", "job-c", alive=_always, finished=_no_result),
    ):
        raise QueueFullError("the send failed")
    assert table.lookup("k") is None


def test_claim_takes_over_a_stale_holder(table: UniqueTable) -> None:
    """A Claim replaces a holder whose result is stored, and says whom it replaced."""
    table.claim("k", "old", 1, state=State.QUEUED)
    claim = Claim(table, "k", "new", alive=_always, finished=lambda job_id: time.time() + 1)
    with claim:
        pass
    assert claim.replaced is not None and claim.replaced[0].job_id == "old"
    held = table.lookup("k")
    assert held is not None and (held.job_id, held.state) == ("new", State.QUEUED)


def test_sweep_frees_only_lost_entries(instance: Instance, table: UniqueTable) -> None:
    """At start, QUEUED keys of jobs neither queued nor in flight are freed, as are the
    claims of dead submitters; parked jobs and live claimers keep theirs."""
    keys = instance.keys
    queue = Queue.create(keys.jobs, 0o660)
    inflight, _ = InflightTable.create(keys.inflight, 0o660, 2, 2, 8192)
    dead = _dead_pid()
    body = protocol.encode("x", job_id="parkedjob", unique="parked")
    assert inflight.park(3, body, "parkedjob", 1, time.time() + 60)
    table.claim("parked", "parkedjob", os.getpid(), state=State.QUEUED)
    table.claim("lost", "lostjob", os.getpid(), state=State.QUEUED)
    table.claim("claiming", "c1", os.getpid())
    table.claim("dead", "c2", dead)
    freed = sweep_lost(table, queue=queue, inflight=inflight)
    assert sorted((e.key, reason) for e, reason in freed) == [
        ("dead", "its submitter died before sending it"),
        ("lost", "its job is neither queued nor in flight"),
    ]
    assert sorted(e.key for e in table.entries()) == ["claiming", "parked"]
    # With a message in the queue, QUEUED keys cannot be judged and stay.
    table.claim("lost", "lostjob", os.getpid(), state=State.QUEUED)
    queue.send(b"anything", 3, timeout=1)
    assert sweep_lost(table, queue=queue, inflight=inflight) == []
    inflight.segment.close()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- the envelope -----------------------------------------------------------------------


def test_envelope_carries_the_key() -> None:
    """The key travels as "unique" and survives re-encoding for a retry."""
    body = protocol.encode("p", job_id="abc", unique="nightly report")
    assert json.loads(body)["unique"] == "nightly report"
    job = protocol.decode(body, 3)
    assert job.unique == "nightly report"
    assert protocol.decode(protocol.reencode(job, attempt=2), 3).unique == "nightly report"
    assert protocol.decode(protocol.encode("p", job_id="abc"), 3).unique is None


def test_bad_key_in_envelope_is_rejected() -> None:
    """An envelope whose "unique" is not a valid key is rejected, naming the field."""
    body = json.dumps({"ipcd": 1, "id": "abc", "unique": "x" * 201}).encode()
    with pytest.raises(MessageError, match="'unique' must be at most 200 bytes"):
        protocol.decode(body, 3)


def test_rejected_envelope_still_names_its_key() -> None:
    """An envelope rejected for another field still tells the daemon its key to free."""
    body = json.dumps({"ipcd": 1, "id": "abc", "unique": "k", "timeout": -1}).encode()
    with pytest.raises(MessageError) as info:
        protocol.decode(body, 3)
    assert (info.value.job_id, info.value.unique) == ("abc", "k")


def test_client_path_stays_lean() -> None:
    """ipcctl with --unique imports neither structlog nor the daemon's modules."""
    code = (
        "import sys, ipcd.cli.ipcctl, ipcd.tables.unique; "
        "bad = {'structlog', 'daemon', 'click', 'ipcd.daemon', 'ipcd.daemon.log', "
        "'ipcd.daemon.worker', 'ipcd.daemon.arbiter', "
        "'ipcd.daemon.startup', 'ipcd.daemon.detach', 'ipcd.daemon.outcomes', "
        "'importlib.metadata'} "
        "& set(sys.modules); "
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- with a daemon -------------------------------------------------------------------------


def _events(inst: Instance, event: str, job_id: str, count: int = 1) -> list[dict[str, object]]:
    return inst.wait_events(lambda e: e.get("event") == event and e.get("job_id") == job_id, count)


def _wait_running(inst: Instance, job_id: str) -> int:
    """The pid of the worker running the job, once it runs."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        doc = json.loads(inst.ipcctl("status", "--json").stdout)
        for worker in doc["workers"]:
            if worker["job_id"] == job_id:
                return int(worker["pid"])
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never ran")


def _already(inst: Instance, job_id: str, key: str) -> str:
    return f"ipcctl: already queued as job {job_id} (unique key {key})\n"


def test_cron_twice_while_running(daemon: Instance) -> None:
    """A second `submit --unique nightly` while the first job runs exits 4 naming it and
    queues nothing; once the job is done, the same command queues again."""
    first = daemon.ipcctl("submit", "--unique", "nightly", "sleep", "2")
    assert first.returncode == 0, first.stderr
    job_id = first.stdout.strip()
    _wait_running(daemon, job_id)
    second = daemon.ipcctl("submit", "--unique", "nightly", "sleep", "2")
    assert (second.returncode, second.stdout) == (ExitCode.ALREADY_QUEUED, "")
    assert second.stderr == _already(daemon, job_id, "nightly")
    done = _events(daemon, "job.done", job_id)
    assert done[0]["outcome"] == "ok"
    third = daemon.ipcctl("submit", "--unique", "nightly", "sleep", "0")
    assert third.returncode == 0, third.stderr
    _events(daemon, "job.done", third.stdout.strip())
    sleeps = [e for e in daemon.log_events() if e.get("event") == "job.done"]
    assert [e["job_id"] for e in sleeps] == [job_id, third.stdout.strip()]


def test_queued_job_holds_the_key_and_wait_exits_at_once(daemon: Instance) -> None:
    """A job still in the kernel queue holds its key; `--wait` on a held key exits 4 at
    once rather than wait for the other job."""
    daemon.ipcd("stop", check=True)  # nobody takes jobs: they wait in the queue
    first = daemon.ipcctl("submit", "--unique", "q", "echo", "one")
    assert first.returncode == ExitCode.NOT_CONFIRMED, first.stderr  # sent, not stored
    waited = daemon.ipcctl("submit", "--unique", "q", "--wait", "--timeout", "30", "echo", "x")
    assert waited.returncode == ExitCode.ALREADY_QUEUED
    assert waited.stderr == _already(daemon, first.stdout.strip(), "q")
    assert daemon.ipcd("start").returncode == 0
    _events(daemon, "job.done", first.stdout.strip())
    again = daemon.ipcctl("submit", "--unique", "q", "--wait", "echo", "two")
    assert (again.returncode, again.stdout) == (0, "two\n")


def test_quiet_says_nothing_when_already_queued(daemon: Instance) -> None:
    """-q: exit 4 with nothing on stderr (cron mails nothing), with or without --wait;
    other errors are still reported."""
    daemon.ipcd("stop", check=True)  # the first job waits in the queue, holding its key
    first = daemon.ipcctl("submit", "-q", "--unique", "cron", "echo", "one")
    # -q silences "already queued" only, never the news that no daemon serves the queue:
    # the job was sent but not confirmed (5).
    assert first.returncode == ExitCode.NOT_CONFIRMED, first.stderr
    assert first.stderr == (
        f"ipcctl: job {first.stdout.strip()} sent but not confirmed: ipcd is not running; "
        "it waits in the kernel queue\n"
    )
    for extra in ((), ("--wait",)):
        again = daemon.ipcctl("submit", "--quiet", "--unique", "cron", *extra, "echo", "x")
        assert (again.returncode, again.stdout, again.stderr) == (ExitCode.ALREADY_QUEUED, "", "")
    loud = daemon.ipcctl("submit", "--unique", "cron", "echo", "x")
    assert loud.stderr == _already(daemon, first.stdout.strip(), "cron")
    wrong = daemon.ipcctl("submit", "-q", "--unique", "cron", "nosuch", "x")
    assert wrong.returncode == ExitCode.USAGE and "unknown handler 'nosuch'" in wrong.stderr
    assert daemon.ipcd("start").returncode == 0
    assert _events(daemon, "job.done", first.stdout.strip())


def test_delayed_job_holds_the_key(daemon: Instance) -> None:
    """A job parked by --delay holds its key until it has run."""
    first = daemon.ipcctl("submit", "--unique", "later", "--delay", "1.5", "echo", "a")
    assert first.returncode == 0, first.stderr
    second = daemon.ipcctl("submit", "--unique", "later", "echo", "b")
    assert second.returncode == ExitCode.ALREADY_QUEUED
    assert second.stderr == _already(daemon, first.stdout.strip(), "later")
    _events(daemon, "job.done", first.stdout.strip())
    assert daemon.ipcctl("submit", "--unique", "later", "echo", "c").returncode == 0


def test_python_client_raises_already_queued(daemon: Instance) -> None:
    """Client.submit(unique=KEY) raises AlreadyQueuedError naming the holder."""
    client = Client(daemon.config)
    first = client.submit("echo", "a", unique="api", delay=30)
    with pytest.raises(AlreadyQueuedError) as info:
        client.submit("echo", "b", unique="api")
    assert (info.value.job_id, info.value.key, info.value.exit_code) == (first, "api", 4)


def test_retries_keep_the_key_and_final_failure_frees_it(instance: Instance) -> None:
    """A job waiting for a retry keeps its key; a job that failed for good frees it."""
    instance.write(handlers=HANDLERS)
    assert instance.ipcd("start").returncode == 0
    try:
        first = instance.ipcctl("submit", "--unique", "r", "retry_once", "1.5")
        job_id = first.stdout.strip()
        _events(instance, "job.retry", job_id)
        held = instance.ipcctl("submit", "--unique", "r", "echo", "x")
        assert held.returncode == ExitCode.ALREADY_QUEUED
        assert held.stderr == _already(instance, job_id, "r")
        done = _events(instance, "job.done", job_id)
        assert (done[0]["outcome"], done[0]["attempt"]) == ("ok", 2)
        failing = instance.ipcctl("submit", "--unique", "r", "--wait", "fail", "no")
        assert failing.returncode == ExitCode.JOB_FAILED
        assert instance.ipcctl("submit", "--unique", "r", "echo", "x").returncode == 0
    finally:
        instance.ipcd("stop")


def test_retry_command_reclaims_the_key(daemon: Instance) -> None:
    """`ipcctl retry` of a failed unique job claims its key again, and refuses (exit 4,
    the job kept on the failed list) while another job holds it."""
    failed = daemon.ipcctl("submit", "--unique", "again", "fail", "boom")
    job_id = failed.stdout.strip()
    _events(daemon, "job.done", job_id)
    other = daemon.ipcctl("submit", "--unique", "again", "sleep", "5")  # outlives 2 retries
    other_id = other.stdout.strip()
    refused = daemon.ipcctl("retry", job_id)
    assert refused.returncode == ExitCode.ALREADY_QUEUED
    assert refused.stderr == _already(daemon, other_id, "again")
    with pytest.raises(AlreadyQueuedError) as held:  # the Python client's own error
        Client(daemon.config).retry(job_id)
    assert (held.value.job_id, held.value.key) == (other_id, "again")
    assert job_id in daemon.ipcctl("failed").stdout
    _events(daemon, "job.done", other_id)
    retried = daemon.ipcctl("retry", job_id)
    assert (retried.returncode, retried.stdout) == (0, f"{job_id}\n")
    table = UniqueTable.open(daemon.keys.unique)
    _events(daemon, "job.done", job_id, count=2)
    assert table.lookup("again") is None
    table.segment.close()


def test_dead_claimer_does_not_block_the_key(daemon: Instance) -> None:
    """A submitter killed between claiming the key and sending the job blocks nobody;
    a live one holds the key."""
    code = (
        "import os, signal, sys\n"
        "from ipcd.tables.unique import UniqueTable\n"
        "table = UniqueTable.open(int(sys.argv[1]))\n"
        "assert table.claim('cron', 'claimer', os.getpid()) is None\n"
        "print('claimed', flush=True)\n"
        "if sys.argv[2] == 'die':\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "sys.stdin.read()\n"
    )
    argv = [sys.executable, "-c", code, str(daemon.keys.unique)]
    live = subprocess.Popen([*argv, "live"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert live.stdout is not None and live.stdout.readline() == b"claimed\n"
    blocked = daemon.ipcctl("submit", "--unique", "cron", "echo", "x")
    assert blocked.returncode == ExitCode.ALREADY_QUEUED
    assert blocked.stderr == _already(daemon, "claimer", "cron")
    live.kill()
    live.communicate()
    after_kill = daemon.ipcctl("submit", "--unique", "cron", "--wait", "echo", "x")
    assert (after_kill.returncode, after_kill.stdout) == (0, "x\n")
    died = subprocess.run([*argv, "die"], capture_output=True, check=False)
    assert died.returncode == -signal.SIGKILL and died.stdout == b"claimed\n"
    taken = daemon.ipcctl("submit", "--unique", "cron", "--wait", "echo", "y")
    assert (taken.returncode, taken.stdout) == (0, "y\n")


def test_killed_worker_keeps_the_key_until_the_rerun_ends(daemon: Instance) -> None:
    """When the worker running a unique job is SIGKILLed, the job runs again and its key
    stays held until that run has finished."""
    first = daemon.ipcctl("submit", "--unique", "w", "sleep", "4")  # the rerun outlives a submit
    job_id = first.stdout.strip()
    os.kill(_wait_running(daemon, job_id), signal.SIGKILL)
    _events(daemon, "job.requeued", job_id)
    held = daemon.ipcctl("submit", "--unique", "w", "echo", "x")
    assert held.returncode == ExitCode.ALREADY_QUEUED
    assert held.stderr == _already(daemon, job_id, "w")
    done = _events(daemon, "job.done", job_id)
    assert (done[0]["outcome"], done[0]["attempt"]) == ("ok", 2)
    assert daemon.ipcctl("submit", "--unique", "w", "echo", "x").returncode == 0


def test_rejected_envelope_frees_its_key(daemon: Instance) -> None:
    """A claimed job whose envelope the daemon rejects frees its key."""
    table = UniqueTable.open(daemon.keys.unique)
    queue = Queue.open(daemon.keys.jobs)
    body = json.dumps({"ipcd": 1, "id": "rejectme", "unique": "bad", "timeout": -1})
    with Claim(table, "bad", "rejectme", alive=_always, finished=_no_result):
        queue.send(body.encode(), 2, timeout=2)
    _events(daemon, "job.rejected", "rejectme")
    deadline = time.monotonic() + 5
    while table.lookup("bad") is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert table.lookup("bad") is None
    table.segment.close()


def test_stored_outcome_frees_a_lost_release(daemon: Instance) -> None:
    """A key whose job has a stored result is taken over, even when its release was lost
    (a worker killed between storing the result and freeing the key)."""
    table = UniqueTable.open(daemon.keys.unique)
    table.claim("lost", "finishedjob", os.getpid(), state=State.QUEUED)
    blocked = daemon.ipcctl("submit", "--unique", "lost", "echo", "x")
    assert blocked.returncode == ExitCode.ALREADY_QUEUED
    now = time.time()
    result = Result("finishedjob", 2, Status.OK, Kind.TEXT, b"done", 1, now, now)
    ResultStore.open(daemon.keys.results).put(result)
    taken = daemon.ipcctl("submit", "--unique", "lost", "--wait", "echo", "x")
    assert (taken.returncode, taken.stdout) == (0, "x\n")
    table.segment.close()


def test_restart_frees_keys_of_vanished_jobs(daemon: Instance) -> None:
    """Keys of jobs that vanished with the job queue are freed at the next start."""
    daemon.ipcd("stop", check=True)
    first = daemon.ipcctl("submit", "--unique", "gone", "echo", "x")
    assert first.returncode == ExitCode.NOT_CONFIRMED, first.stderr  # in the kernel queue
    Queue.open(daemon.keys.jobs).remove()  # an operator's ipcrm -q, the job with it
    assert daemon.ipcd("start").returncode == 0
    freed = daemon.wait_events(lambda e: e.get("event") == "unique.freed", 1)
    assert freed[0]["job_id"] == first.stdout.strip() and freed[0]["unique"] == "gone"
    again = daemon.ipcctl("submit", "--unique", "gone", "--wait", "echo", "y")
    assert (again.returncode, again.stdout) == (0, "y\n")


def test_long_key_is_a_usage_error(daemon: Instance) -> None:
    """A key over 200 bytes exits 64 and queues nothing."""
    out = daemon.ipcctl("submit", "--unique", "k" * 201, "echo", "x")
    assert out.returncode == ExitCode.USAGE
    assert out.stderr == "ipcctl: unique key must be at most 200 bytes of UTF-8, not 201\n"
    assert json.loads(daemon.ipcctl("status", "--json").stdout)["queue"]["messages"] == 0


def test_key_command_lists_the_table(instance: Instance) -> None:
    """`ipcctl key` prints the unique-key table's key, K + 6 * 0x01000000."""
    expected = (instance.keys.jobs + 0x06000000) & 0xFFFFFFFF  # makes the key file
    out = instance.ipcctl("key")
    assert f"unique keys and semaphore:     {expected:#010x}\n" in out.stdout
