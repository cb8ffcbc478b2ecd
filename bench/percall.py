"""CPU per ``Client.call`` round trip, for several commits of ipcd in the same run.

    unshare --ipc python -m bench.percall [--rounds N] [--seconds S] REV [REV ...]

Each revision (``.`` is this checkout) runs in a child process of its own whose ipcd
(client and daemon) is that commit's (bench.daemon.export), under ``taskset -c 0`` so
that the client and every daemon process share one CPU and nothing runs in parallel.
The children run round after round, the order reversed every other round, and the
medians are printed: CPU microseconds per round trip of the client, of the worker, of
the rest of the daemon (master, intake), and round trips per second.  A tool for issue
14's per-call items, where a change of a few microseconds must show through the noise of
a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS = ("client_us", "worker_us", "daemon_rest_us", "per_s")


def child(seconds: float, windows: int, source: str) -> None:
    """In the child: one daemon with one worker, ``windows`` windows of round trips."""
    from bench.cpu import run_ns
    from bench.daemon import BenchDaemon
    from bench.measure import round_trips

    daemon = BenchDaemon("percall", workers=1, source=Path(source) if source else None)
    try:
        daemon.start()
        (worker,) = [w.pid for w in daemon.client.status().workers]
        daemon.client.close()
        others = [pid for pid in daemon.pids() if pid != worker]
        out: dict[str, list[float]] = {row: [] for row in ROWS}
        me = os.getpid()
        for _ in range(windows):
            before = [run_ns(p) for p in (me, worker, *others)]
            started = time.perf_counter()
            rate = round_trips(daemon.client, seconds)
            elapsed = time.perf_counter() - started
            after = [run_ns(p) for p in (me, worker, *others)]
            trips = rate * elapsed
            used = [(a - b) / trips / 1000 for a, b in zip(after, before, strict=True)]
            out["client_us"].append(used[0])
            out["worker_us"].append(used[1])
            out["daemon_rest_us"].append(sum(used[2:]))
            out["per_s"].append(rate)
        print(json.dumps(out))
    finally:
        daemon.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.percall")
    parser.add_argument("revs", nargs="+")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.seconds, args.windows, args.child)
        return 0
    from bench.daemon import ROOT, export

    with tempfile.TemporaryDirectory(prefix="ipcd-percall-") as tmp:
        sources: dict[str, str] = {}
        for rev in args.revs:
            if rev == ".":
                sources[rev] = ""
                continue
            into = Path(tmp) / rev.replace("/", "_")
            into.mkdir()
            sources[f"{rev}({export(rev, into)})"] = str(into)
        samples: dict[str, dict[str, list[float]]] = {
            name: {row: [] for row in ROWS} for name in sources
        }
        names = list(sources)
        for round_ in range(args.rounds):
            for name in names if round_ % 2 == 0 else reversed(names):
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [sources[name], str(ROOT)]))
                done = subprocess.run(
                    ["taskset", "-c", "0", sys.executable, "-m", "bench.percall",
                     "--seconds", str(args.seconds), "--windows", str(args.windows),
                     "--child", sources[name], "x"],
                    env=env, capture_output=True, text=True, check=False, cwd=ROOT,
                )  # fmt: skip
                if done.returncode != 0:
                    print(f"{name}: {done.stderr.strip()[-2000:]}", file=sys.stderr)
                    return 1
                for row, values in json.loads(done.stdout.splitlines()[-1]).items():
                    samples[name][row].extend(values)
        print(f"{'revision':<28}" + "".join(f"{row:>16}" for row in ROWS))
        for name in names:
            cells = "".join(f"{statistics.median(samples[name][row]):>16.2f}" for row in ROWS)
            print(f"{name:<28}{cells}")
        print(json.dumps(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
