"""A log file that cannot be written (a full disk) costs log lines, never jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import IPCD, TESTS, Instance

from ipcd.daemon.log import Sink

#: The notice the daemon writes on stderr (the journal) when it drops log lines.
NOTICE = "log events could not be written"


def _log_at(instance: Instance, path: str) -> None:
    """Point the instance's ``[log] file`` at ``path``."""
    text = instance.config_path.read_text()
    instance.config_path.write_text(text.replace('file = "ipcd.log"', f'file = "{path}"'))


def _start(instance: Instance, argv: list[str], stderr: Path) -> subprocess.CompletedProcess[str]:
    """``ipcd start`` through ``argv``, with stderr a file that ``$JOURNAL_STREAM`` names
    as systemd's journal stream does, so the daemon keeps it as it would the journal."""
    with stderr.open("w") as err:
        st = os.fstat(err.fileno())
        env = {
            **os.environ,
            "PYTHONPATH": str(TESTS / "plugins"),
            "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
        }
        return subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=60
        )


def _told(stderr: Path, timeout: float = 10.0) -> list[str]:
    """The notices on stderr, once there is one: the master looks at each turn."""
    deadline = time.monotonic() + timeout
    while True:
        told = [line for line in stderr.read_text().splitlines() if NOTICE in line]
        if told or time.monotonic() > deadline:
            return told
        time.sleep(0.05)


def _dropped(instance: Instance) -> int:
    stats = instance.ipcctl("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    dropped: int = json.loads(stats.stdout)["master"]["log_dropped"]
    return dropped


def test_the_sink_gives_each_dropped_line_to_its_taker_once(tmp_path: Path) -> None:
    """A line the sink cannot write is dropped without raising and counted once, for the
    process that takes the count (each of the daemon's processes counts its own)."""
    full = Sink(Path("/dev/full"), None)
    fine = Sink(tmp_path / "ipcd.log", None)
    try:
        for n in range(3):
            full.write("info", "job.done", {"role": "worker"}, {"n": n})
            fine.write("info", "job.done", {"role": "worker"}, {"n": n})
        assert (full.take_dropped(), full.drop_reason) == (3, "No space left on device")
        assert full.take_dropped() == 0
        assert fine.take_dropped() == 0
        assert len((tmp_path / "ipcd.log").read_text().splitlines()) == 3
    finally:
        full.close()
        fine.close()


def test_a_log_on_an_always_full_device_drops_lines_and_serves(instance: Instance) -> None:
    """With ``[log] file = "/dev/full"`` the daemon starts, runs jobs, counts the dropped
    lines in stats and Prometheus, and says so once on stderr (the journal)."""
    _log_at(instance, "/dev/full")
    stderr = instance.dir / "journal.txt"
    started = _start(instance, [IPCD, "-c", str(instance.config_path), "start"], stderr)
    assert started.returncode == 0, stderr.read_text()
    for text in ("one", "two", "three"):
        done = instance.ipcctl("submit", "echo", text, "--wait", "--timeout", "10")
        assert (done.returncode, done.stdout) == (0, f"{text}\n"), done.stderr
    assert _dropped(instance) >= 6  # daemon.started, worker.started, three job.done...
    prom = instance.ipcctl("stats", "--prometheus").stdout
    sample = next(x for x in prom.splitlines() if x.startswith("ipcd_log_events_dropped_total "))
    assert int(sample.split()[1]) >= 6
    assert "lost       " in instance.ipcctl("stats").stdout
    assert _told(stderr)
    for text in ("four", "five"):  # more dropped lines, over more turns of the master's loop
        done = instance.ipcctl("submit", "echo", text, "--wait", "--timeout", "10")
        assert done.returncode == 0, done.stderr
        time.sleep(1.5)
    assert instance.ipcd("status").returncode == 0
    told = _told(stderr)
    assert len(told) == 1, stderr.read_text()  # at most once a minute
    assert "/dev/full (No space left on device)" in told[0]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to mount a small tmpfs in a private mount namespace",
)
def test_a_full_log_disk_at_start_and_after(instance: Instance) -> None:
    """The daemon starts on a log file system that is already full, serves while it is
    full, and logs again (with a ``log.resumed`` event) once space is given back."""
    disk = instance.dir / "logs"
    disk.mkdir()
    _log_at(instance, str(disk / "ipcd.log"))
    # A private mount namespace: the tmpfs exists for the daemon (started in it) alone;
    # the test reaches it through /proc/PID/root.
    script = (
        f"mount -t tmpfs -o size=64k none {disk} && "
        f"(head -c 1M /dev/zero > {disk}/fill; true) && "
        f"exec {IPCD} -c {instance.config_path} start"
    )
    stderr = instance.dir / "journal.txt"
    started = _start(instance, ["unshare", "--mount", "sh", "-c", script], stderr)
    assert started.returncode == 0, stderr.read_text()
    seen = Path(f"/proc/{instance.pid()}/root") / str(disk).lstrip("/")
    assert os.statvfs(seen).f_bavail == 0  # the daemon's log disk is full
    done = instance.ipcctl("submit", "echo", "full", "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "full\n"), done.stderr
    assert _dropped(instance) >= 3
    assert _told(stderr), stderr.read_text()
    (seen / "fill").unlink()  # space comes back
    done = instance.ipcctl("submit", "echo", "room", "--wait", "--timeout", "10")
    assert (done.returncode, done.stdout) == (0, "room\n"), done.stderr
    events = [json.loads(line) for line in (seen / "ipcd.log").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "log.resumed"]
    assert resumed and all(int(e["dropped"]) >= 1 for e in resumed)
    assert any(e["event"] == "job.done" and e["outcome"] == "ok" for e in events)
    stopped = instance.ipcd("stop")
    assert stopped.returncode == 0, stopped.stderr
