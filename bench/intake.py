"""The intake keeps up (issue 12): is the kernel job queue ever full for longer than one
batch commit, while shell loops and a Python loop submit at full speed?

The load, all against one daemon with several workers:

- SHELL_LOOPS ``sh`` loops, each ``while :; do ipcctl submit --no-confirm echo x; done``:
  what a runaway cron script does, one interpreter start per job (the issue's "shell
  loops"; a loop that skips the start per job would be a second Python loop);
- one Python loop (``python -m bench.intake submit``), ``Client.submit`` unconfirmed as
  fast as it goes, blocking while the queue is full as every client does.

Meanwhile this process samples the queue's bytes from /proc/sysvipc/msg about every
SAMPLE_EVERY seconds (sysv_ipc does not expose ``msg_cbytes``), in windows of WINDOW
seconds; between two windows it times one ``store.add`` of a batch of BATCH jobs into
the daemon's own store, through the same writer lock the intake takes, under the same
load: that is one batch commit. The queue counts as full while the room left
(``msg_qbytes - msg_cbytes``) is less than one of the Python loop's messages, the larger
of the two kinds.

Before the load, :func:`cpu_per_message` says why the queue stays full or not: the CPU a
message costs the Python loop, ipcd's intake, and the least intake of the same shape
(bench.skeleton's).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from bench.cpu import run_ns
from bench.measure import PAYLOAD, completed, wait_completed
from bench.skeleton import Skeleton
from bench.store import new_jobs
from ipcd import config as config_mod
from ipcd.client import Client
from ipcd.daemon.intake import SLOTS
from ipcd.errors import QueueFullError
from ipcd.kernel.queues import SYSVIPC_MSG
from ipcd.store import JobStore
from ipcd.wire import protocol

SHELL_LOOPS = 4
#: The intake's batch: its slots.
BATCH = SLOTS
SAMPLE_EVERY = 0.001
WINDOW = 1.0
#: The handler every job of the load goes to.
HANDLER = "echo"
#: The shell loop; $0 is ipcctl and $1 the configuration, so no path is quoted into it.
SHELL_LOOP = 'while :; do "$0" -c "$1" submit --no-confirm echo x || exit; done'


class Sample(NamedTuple):
    """The queue at one moment: perf_counter seconds, bytes waiting."""

    at: float
    bytes: int


class Stretches(NamedTuple):
    """The full stretches of one or more sampling windows, in seconds."""

    stretches: list[float]
    #: Seconds sampled, and of those, how many the queue was full.
    sampled: float
    full: float
    #: Between two samples: the median, and the longest (the resolution's worst case).
    gap_median: float
    gap_longest: float


class Load(NamedTuple):
    """What the loops submitted, and in how many seconds."""

    shell_jobs: int
    shell_seconds: float
    python_jobs: int
    python_seconds: float
    #: The Python loop's submissions refused after ``[ipc] send_timeout`` (exit 75).
    refused: int

    @property
    def shell_rate(self) -> float:
        return self.shell_jobs / self.shell_seconds

    @property
    def python_rate(self) -> float:
        return self.python_jobs / self.python_seconds


class KeepsUp(NamedTuple):
    """The step's figures: full stretches, batch commit times, and the load."""

    stretches: Stretches
    commits: list[float]
    load: Load
    seconds: float
    #: The machine's 1-minute load average right after the load (other processes too).
    load_average: float


def message_size() -> int:
    """Bytes of one of the Python loop's messages (as the kernel counts them: the text)."""
    return len(protocol.encode(PAYLOAD, job_id=protocol.new_job_id()))


def full_stretches(windows: Sequence[Sequence[Sample]], max_bytes: int, message: int) -> Stretches:
    """The stretches during which fewer than ``message`` bytes were free, in each window
    of samples.

    A stretch runs from halfway between its last not-full sample and its first full one
    to halfway between its last full sample and the next not-full one (or the window's
    edge): with samples every SAMPLE_EVERY, each end is within half a gap of the truth.
    """
    stretches: list[float] = []
    gaps: list[float] = []
    sampled = 0.0
    for samples in windows:
        if len(samples) < 2:
            continue
        sampled += samples[-1].at - samples[0].at
        gaps += [b.at - a.at for a, b in itertools.pairwise(samples)]
        began: float | None = None
        for index, sample in enumerate(samples):
            full = max_bytes - sample.bytes < message
            if full and began is None:
                began = sample.at if index == 0 else (samples[index - 1].at + sample.at) / 2
            elif not full and began is not None:
                stretches.append((samples[index - 1].at + sample.at) / 2 - began)
                began = None
        if began is not None:
            stretches.append(samples[-1].at - began)
    gaps.sort()
    return Stretches(
        stretches,
        sampled,
        sum(stretches),
        gaps[len(gaps) // 2] if gaps else 0.0,
        gaps[-1] if gaps else 0.0,
    )


class QueueBytes:
    """``msg_cbytes`` of one queue, read from /proc/sysvipc/msg, kept open between reads."""

    def __init__(self, msqid: int) -> None:
        self.msqid = msqid
        self._fh = open(SYSVIPC_MSG, "rb")  # noqa: SIM115 - held open for the sampling

    def read(self) -> int:
        self._fh.seek(0)
        wanted = str(self.msqid).encode()
        for line in self._fh.read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == wanted:
                return int(fields[3])
        raise RuntimeError(f"queue id {self.msqid} is not in {SYSVIPC_MSG}")

    def sample(self, seconds: float, every: float = SAMPLE_EVERY) -> list[Sample]:
        """Samples for ``seconds``, one about every ``every`` seconds."""
        samples: list[Sample] = []
        end = time.perf_counter() + seconds
        while (now := time.perf_counter()) < end:
            samples.append(Sample(now, self.read()))
            time.sleep(every)
        return samples

    def close(self) -> None:
        self._fh.close()


def time_commit(store: JobStore, type_: int, batch: int = BATCH) -> float:
    """Seconds for one ``store.add`` of ``batch`` jobs of ``type_`` (the workers run them)."""
    jobs = new_jobs(batch, time.time(), types=(type_,))
    started = time.perf_counter()
    store.add(jobs)
    return time.perf_counter() - started


@contextlib.contextmanager
def loops(
    ipcctl: str, config: Path, env: dict[str, str], seconds: float, into: Path
) -> Iterator[list[Path]]:
    """The load running: SHELL_LOOPS shell loops and one Python loop for ``seconds``;
    yields the files in ``into`` the shell loops print their job ids to (one line a job),
    and last the one the Python loop writes its report to (JSON, once it ends, which is
    after the block)."""
    outputs = [into / f"shell-{index}.out" for index in range(SHELL_LOOPS)]
    report = into / "python.json"
    shells: list[subprocess.Popen[bytes]] = []
    python: subprocess.Popen[bytes] | None = None
    try:
        for out in outputs:
            with out.open("wb") as fh:
                shells.append(
                    subprocess.Popen(
                        ["sh", "-c", SHELL_LOOP, ipcctl, str(config)],
                        stdout=fh,
                        env=env,
                        start_new_session=True,  # its own group: stopped whole
                    )
                )
        argv = [sys.executable, "-m", "bench.intake", "submit", str(config), str(seconds)]
        with report.open("wb") as fh:
            python = subprocess.Popen(argv, stdout=fh, env=env)
        yield [*outputs, report]
        ended = [shell.returncode for shell in shells if shell.poll() is not None]
        if ended:
            raise RuntimeError(f"a shell loop ended by itself: ipcctl exited {ended[0]}")
    finally:
        for shell in shells:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.pid, signal.SIGTERM)
        for shell in shells:
            shell.wait(10)
        if python is not None and python.wait(seconds + 30) != 0:
            raise RuntimeError(f"the Python submit loop exited with {python.returncode}")


def measure(
    client: Client, store: JobStore, *, seconds: float, ipcctl: str, env: dict[str, str]
) -> KeepsUp:
    """Run the load for ``seconds`` (plus the loops' start-up) against the daemon whose
    client is ``client`` and whose store is ``store``: sampling windows of its job queue,
    a batch commit timed between each two."""
    type_ = client.config.handler_type(HANDLER)
    windows: list[list[Sample]] = []
    commits: list[float] = []
    ramp = 0.5  # the interpreters' start
    with (
        tempfile.TemporaryDirectory(prefix="ipcd-bench-intake-") as tmp,
        contextlib.closing(QueueBytes(client.queue.id)) as queue,
    ):
        with loops(ipcctl, client.config.path, env, seconds + ramp, Path(tmp)) as outputs:
            time.sleep(ramp)
            started = time.perf_counter()
            while time.perf_counter() - started < seconds:
                windows.append(queue.sample(min(WINDOW, seconds)))
                commits.append(time_commit(store, type_))
            elapsed = time.perf_counter() - started
            load_average = os.getloadavg()[0]
        shell_jobs = sum(len(out.read_bytes().splitlines()) for out in outputs[:-1])
        python = json.loads(outputs[-1].read_text())
    load = Load(
        shell_jobs, seconds + ramp, python["submitted"], python["seconds"], python["refused"]
    )
    max_bytes = client.queue.stats().max_bytes
    stretches = full_stretches(windows, max_bytes, message_size())
    return KeepsUp(stretches, commits, load, elapsed, load_average)


class PerMessage(NamedTuple):
    """Microseconds of CPU per message: of a Python loop of ``Client.submit``
    (unconfirmed), of ipcd's intake taking those messages into its store, and of the
    skeleton's intake (bench.skeleton) taking its own client's."""

    submit: float
    intake: float
    skeleton: float


def cpu_per_message(
    client: Client, intake_pid: int, skeleton: Skeleton, seconds: float
) -> PerMessage:
    """What one message costs each side, each for about ``seconds``.

    An intake keeps up with a loop that submits as fast as it goes only if it needs less
    CPU per message than the loop does (and has a CPU to itself); this says whether
    ipcd's does, and whether the least a Python intake of the same shape does (its
    client encodes each message as ``Client.submit`` does, so it sends at about that
    pace).  CPU is the run time the scheduler charged (bench.cpu.run_ns; this process's
    own for the loop); the count ends with a confirmed submission, which the intake
    commits after every message before it.  Returns once ipcd's workers have run what
    was submitted, so that nothing of it is left to weigh on what is measured next.
    """
    done_before = completed(client)
    loop_before, intake_before = time.process_time(), run_ns(intake_pid)
    sent = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        client.submit(HANDLER, PAYLOAD)
        sent += 1
    submit = (time.process_time() - loop_before) / sent * 1e6
    client.submit(HANDLER, PAYLOAD, confirm=True)
    intake = (run_ns(intake_pid) - intake_before) / (sent + 1) / 1000
    wait_completed(client, done_before, sent + 1)
    first, skeleton_before = skeleton.sent, run_ns(skeleton.intake_pid)
    skeleton.jobs_completed(seconds, confirm=False)
    taken = skeleton.sent - first
    return PerMessage(
        submit, intake, (run_ns(skeleton.intake_pid) - skeleton_before) / taken / 1000
    )


def submit_loop(config_path: Path, seconds: float) -> dict[str, float]:
    """``Client.submit`` unconfirmed, as fast as it goes, for ``seconds``."""
    client = Client(config_mod.load(config_path))
    submitted = refused = 0
    started = time.perf_counter()
    end = started + seconds
    while time.perf_counter() < end:
        try:
            client.submit(HANDLER, PAYLOAD)
            submitted += 1
        except QueueFullError:
            refused += 1
    return {"submitted": submitted, "refused": refused, "seconds": time.perf_counter() - started}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    loop = sub.add_parser("submit", help="the Python loop: submit for SECONDS, print JSON")
    loop.add_argument("config", type=Path)
    loop.add_argument("seconds", type=float)
    args = parser.parse_args(argv)
    print(json.dumps(submit_loop(args.config, args.seconds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
