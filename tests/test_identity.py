"""Privileges: a root-started daemon drops to [daemon] user; objects get [ipc] group."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Instance, remove_objects

from ipcd.errors import ExitCode
from ipcd.kernel.queues import Queue

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")


@pytest.fixture
def open_instance() -> Iterator[Instance]:
    """An instance in a directory the dropped user can write to (tmp_path is root's)."""
    path = Path(tempfile.mkdtemp(prefix="ipcd-id-", dir="/tmp"))
    path.chmod(0o777)
    inst = Instance(path, path / "ipcd.toml")
    inst.write()
    inst.config_path.chmod(0o644)
    try:
        yield inst
    finally:
        if inst.pid_file.exists():
            inst.ipcd("stop")
        remove_objects(inst)
        shutil.rmtree(path)


def _uids(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            real, effective = line.split()[1:3]
            return int(real), int(effective)
    raise AssertionError("no Uid line")


def test_root_start_drops_to_configured_user(open_instance: Instance) -> None:
    """Started as root with daemon.user, master and workers run as that user, objects too."""
    inst = open_instance
    text = inst.config_path.read_text().replace(
        "workers = 2\n", 'workers = 2\nuser = "nobody"\ngroup = "nogroup"\n'
    )
    inst.config_path.write_text(text)
    started = inst.ipcd("start")
    assert started.returncode == 0, started.stderr
    master = inst.pid()
    assert _uids(master) == (65534, 65534)
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert children and all(_uids(int(c)) == (65534, 65534) for c in children)
    stats = Queue.open(inst.keys.jobs).stats()
    assert (stats.uid, stats.gid, stats.mode) == (65534, 65534, 0o660)
    assert inst.ipcctl("submit", "echo", "dropped", "--wait").stdout == "dropped\n"
    assert inst.ipcd("stop").returncode == 0  # the user could remove its own PID file
    assert not inst.pid_file.exists()
    again = inst.ipcd("start")  # objects now owned by nobody are still trusted
    assert again.returncode == 0, again.stderr


def test_ipc_group_and_widened_mode_apply_to_existing_objects(instance: Instance) -> None:
    """[ipc] group and a widened mode reach objects a previous run made (jobs kept)."""
    text = instance.config_path.read_text()
    instance.config_path.write_text(text.replace("mode = 0o660\n", "mode = 0o600\n"))
    assert instance.ipcd("start").returncode == 0
    instance.ipcd("stop")
    instance.ipcctl("submit", "echo", "kept")
    assert Queue.open(instance.keys.jobs).stats().mode == 0o600
    instance.config_path.write_text(
        text.replace("mode = 0o660\n", 'mode = 0o660\ngroup = "nogroup"\n')
    )
    assert instance.ipcd("start").returncode == 0
    try:
        stats = Queue.open(instance.keys.jobs).stats()
        assert (stats.gid, stats.mode) == (65534, 0o660)
        done = instance.wait_events(lambda e: e["event"] == "job.done", 1)
        assert len(done) == 1
    finally:
        instance.ipcd("stop")


def test_unknown_user_is_a_config_error(instance: Instance) -> None:
    """A daemon.user that does not exist fails the start with status 78, naming it."""
    text = instance.config_path.read_text().replace(
        "workers = 2\n", 'workers = 2\nuser = "no-such-user-ipcd"\n'
    )
    instance.config_path.write_text(text)
    failed = instance.ipcd("start")
    assert failed.returncode == ExitCode.CONFIG and "no-such-user-ipcd" in failed.stderr


def test_status_notices_a_killed_daemon(daemon: Instance) -> None:
    """After the master is SIGKILLed, `ipcctl status` says not running (69) and the
    workers leave by themselves."""
    master = daemon.pid()
    workers = [int(c) for c in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    os.kill(master, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    gone = [w for w in workers if not Path(f"/proc/{w}/status").exists()]
    alive = [w for w in workers if w not in gone]
    zombies = [w for w in alive if "State:\tZ" in Path(f"/proc/{w}/status").read_text()]
    assert sorted(gone + zombies) == sorted(workers)
    status = daemon.ipcctl("status")
    assert status.returncode == ExitCode.UNAVAILABLE and "not running" in status.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_hand_over_gives_a_directory_and_its_files_to_the_daemons_user(tmp_path: Path) -> None:
    """The store's directory of large bodies and the files an earlier run as root wrote
    in it (0600) go to the user the daemon drops to, which must read them; a symlink in
    it is not followed."""
    from ipcd.daemon.identity import Identity, hand_over

    bodies = tmp_path / "jobs.db.bodies"
    bodies.mkdir(mode=0o700)
    kept = bodies / "job1~0123456789abcdef"
    kept.write_bytes(b"x" * 10)
    kept.chmod(0o600)
    outside = tmp_path / "elsewhere"
    outside.write_bytes(b"")
    (bodies / "link").symlink_to(outside)
    nobody = 65534
    hand_over(Identity(None, nobody, nobody, "nobody"), [bodies])
    assert (bodies.stat().st_uid, kept.stat().st_uid, kept.stat().st_gid) == (nobody,) * 3
    assert outside.stat().st_uid == 0
