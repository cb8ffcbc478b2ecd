"""16 MiB in and out, today's code against a baseline commit, in one run.

``python -m bench.big [--rounds N] [--baseline REV]``: starts one daemon of this checkout
and (unless ``--baseline ''``) one of ``REV``'s ipcd (bench.daemon.export), each with one
worker, and measures interleaved: a plain copy of 16 MiB (the reference), a 16 MiB
payload through ``Client.call`` of a handler that returns its length, and a 16 MiB
result.  It prints the median of each, as bytes per second and as a ratio to the copy
measured in the same rounds.  The payload and result rows of ``make bench`` measure the
same thing (bench.run's sixteen_mib); this one is quick enough to run before and after a
change.  Run it in a private IPC namespace (``unshare --ipc``).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from statistics import median

from bench import raw
from bench.daemon import BenchDaemon, export
from bench.run import BIG


def _payload(daemon: BenchDaemon, data: bytes) -> Callable[[], float]:
    def seconds() -> float:
        import time

        started = time.perf_counter()
        result = daemon.client.call("length", data, timeout=60)
        elapsed = time.perf_counter() - started
        if not result.ok or result.value() != BIG:
            raise RuntimeError(f"payload came back wrong: {result.error[:200]}")
        return elapsed

    return seconds


def _result(daemon: BenchDaemon) -> Callable[[], float]:
    daemon.client.call("big", str(BIG), timeout=60)  # the handler makes its bytes once

    def seconds() -> float:
        import time

        started = time.perf_counter()
        result = daemon.client.call("big", str(BIG), timeout=60)
        elapsed = time.perf_counter() - started
        if not result.ok or len(result.data) != BIG:
            raise RuntimeError(f"result came back wrong: {result.error[:200]}")
        return elapsed

    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.big", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline", default="main", help="a commit; '' for none")
    args = parser.parse_args(argv)
    data = b"d" * BIG
    subjects: dict[str, Callable[[], float]] = {"copy": lambda: raw.plain_copy(data)}
    with contextlib.ExitStack() as stack:
        daemons = {"now": BenchDaemon("big-now", workers=1)}
        if args.baseline:
            into = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            rev = export(args.baseline, into)
            daemons[f"base {rev}"] = BenchDaemon("big-base", workers=1, source=into)
        for name, daemon in daemons.items():
            stack.callback(daemon.stop)
            daemon.start()
            subjects[f"{name} payload"] = _payload(daemon, data)
            subjects[f"{name} result"] = _result(daemon)
        for measure in subjects.values():  # first touches of fresh memory are page faults
            measure()
        samples: dict[str, list[float]] = {name: [] for name in subjects}
        for _ in range(args.rounds):
            for name, measure in subjects.items():
                samples[name].append(measure())
    copy = median(samples["copy"])
    for name, times in samples.items():
        ms = median(times) * 1000
        print(
            f"{name:24} median {ms:8.2f} ms  {BIG / median(times) / 2**20:8.0f} MiB/s  "
            f"{copy / median(times):6.3f}x copy  (min {min(times) * 1000:.2f} ms)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
