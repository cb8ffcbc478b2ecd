"""Instructions per confirmed job, by process, today's code against a baseline commit.

``python -m bench.instructions [REV] [--jobs SHORT LONG]`` runs a one-worker daemon of this
checkout, and one of ``REV``'s ipcd (default: the store baseline, run.STORE_BASELINE_REV;
``''`` for none), under valgrind's callgrind, submits jobs confirmed one after another
(``Client.submit(confirm=True)``, as the jobs-completed rows do), and counts the
instructions the intake and the worker executed.  Each daemon runs twice, with SHORT and
with LONG jobs, and the difference divided by LONG - SHORT is the cost of one job: start-up,
warm-up and shutdown cancel out.

Why: on a 2-CPU virtual machine a throughput round moves by ±10 % and the median of 41
still by about 2 %, so a cost of a few percent (issue 13 may cost a plain job at most
5 %) is hard to show.  An instruction count does not move with the machine's load; it
does not see cache misses or waits either, so it is a second witness beside the
jobs-completed rows, not a replacement.  It needs valgrind (``apt-get install valgrind``)
and takes a few minutes (callgrind runs the daemon some 50 times slower).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.daemon import IPCD, BenchDaemon, child_env, compile_bytecode, export
from bench.run import STORE_BASELINE_REV

#: The processes counted: the one that commits each job and the one that runs it.
ROLES = ("intake", "worker")
#: How long a daemon under callgrind may take to answer its first job.
START_PATIENCE = 300.0


def count(daemon: BenchDaemon, jobs: int) -> dict[str, int]:
    """Run ``daemon``'s configuration under callgrind for ``jobs`` confirmed jobs (after
    one warm-up call); the instructions each of ROLES executed over its whole life.

    The daemon is started with ``ipcd start``, as systemd's unit does, not ``ipcd run``:
    ``run`` also draws every event for the terminal (structlog's console renderer, about
    a fifth of a worker's instructions per job), which a service never pays."""
    out = daemon.dir / "callgrind"
    out.mkdir()
    said = daemon.dir / "start.out"
    with said.open("wb") as fh:  # a file, not a pipe: the daemon keeps valgrind's copy
        started = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "-q",
                f"--callgrind-out-file={out}/cg.%p",
                IPCD,
                "-c",
                str(daemon.config_path),
                "start",
            ],
            env=child_env(daemon.source),
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=START_PATIENCE,
            check=False,
        )
    if started.returncode != 0:
        raise RuntimeError(f"{daemon.name}: ipcd start under callgrind: {said.read_text()}")
    try:
        _first_job(daemon)
        ids = [daemon.client.submit("echo", "x", confirm=True) for _ in range(jobs)]
        deadline = time.monotonic() + START_PATIENCE
        while daemon.client.result(ids[-1]) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{daemon.name}: the last job did not finish")
            time.sleep(0.05)
    finally:
        daemon.ipcd("stop")
    pids = _pids(daemon.dir / "ipcd.log")
    return {role: _total(out / f"cg.{pids[role]}") for role in ROLES}


def _first_job(daemon: BenchDaemon) -> None:
    deadline = time.monotonic() + START_PATIENCE
    while True:
        with contextlib.suppress(Exception):  # not up yet: no queue, no reply
            if daemon.client.call("echo", "warm-up", timeout=5.0).ok:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{daemon.name}: no answer under callgrind: {daemon.log_tail()}")
        time.sleep(0.5)


def _pids(log: Path) -> dict[str, int]:
    """The PID of each of ROLES, from the master's ``ROLE.exited`` events."""
    found: dict[str, int] = {}
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            role = str(event.get("event", "")).removesuffix(".exited")
            if role in ROLES and role not in found:
                found[role] = int(event["pid"])
    missing = set(ROLES) - set(found)
    if missing:
        raise RuntimeError(f"no exit event for {', '.join(sorted(missing))} in {log}")
    return found


def _total(path: Path) -> int:
    """The instructions (Ir) a callgrind output file counts in all, once the exited
    process's file is whole (callgrind writes it as the process ends)."""
    deadline = time.monotonic() + START_PATIENCE
    while True:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                if line.startswith(("totals:", "summary:")):
                    return int(line.split()[1])
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path}: no totals line")
        time.sleep(0.5)


def per_job(name: str, source: Path | None, short: int, long: int) -> dict[str, float]:
    """Instructions per job for each of ROLES: the slope between a SHORT and a LONG run."""
    compile_bytecode(source)  # else a run that compiles ipcd's modules counts the compiler
    runs = []
    for jobs in (short, long):
        daemon = BenchDaemon(name, workers=1, source=source)
        try:
            runs.append(count(daemon, jobs))
        finally:
            daemon.stop()  # its objects and directory; the daemon itself has stopped
    return {role: (runs[1][role] - runs[0][role]) / (long - short) for role in ROLES}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("rev", nargs="?", default=STORE_BASELINE_REV, help="the other commit")
    parser.add_argument("--jobs", type=int, nargs=2, default=(300, 1300), metavar=("SHORT", "LONG"))
    args = parser.parse_args(argv)
    short, long = args.jobs
    if not 0 <= short < long:
        parser.error("--jobs: SHORT must be below LONG")
    if shutil.which("valgrind") is None:
        print("bench.instructions: valgrind is not installed (apt-get install valgrind)")
        return 2
    with contextlib.ExitStack() as stack:
        sides: list[tuple[str, Path | None]] = [("today", None)]
        if args.rev:
            source = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ipcd-base-")))
            sides.append((export(args.rev, source), source))
        counted = {label: per_job(label, source, short, long) for label, source in sides}
    print(f"instructions per confirmed job, {long} - {short} jobs, one worker")
    for role in (*ROLES, "together"):
        cells = []
        for label in counted:
            value = sum(counted[label].values()) if role == "together" else counted[label][role]
            cells.append(f"{label} {value:11,.0f}")
        line = f"{role:9} " + "  ".join(cells)
        if len(counted) == 2:
            today, other = (
                sum(c.values()) if role == "together" else c[role] for c in counted.values()
            )
            line += f"  ratio {today / other:.3f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
