"""``python -m bench.compare [REV] [--rounds N] [--seconds S] [--no-capture]``: today's daemon
against commit REV's (default: the job store before issue 13, run.STORE_BASELINE_REV), on jobs
completed per second alone, confirmed and unconfirmed, unpinned and pinned.

``make bench`` has the same rows among fifty others, three rounds each; this runs only
them, for as many interleaved rounds as asked, so that a cost of a few percent stands out
of the machine's noise (a 2-CPU virtual machine moves a single round by ±10 %).  Each
daemon has 1 worker; the ratio is today's median over REV's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from bench import measure
from bench.daemon import BenchDaemon, export
from bench.measure import interleave, median, place
from bench.run import STORE_BASELINE_REV

#: Ways of submitting, as in run.SUBMISSIONS: name and Client.submit's keywords.
SUBMISSIONS: tuple[tuple[str, dict[str, bool]], ...] = (
    ("unconfirmed", {}),
    ("confirmed", {"confirm": True}),
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("rev", nargs="?", default=STORE_BASELINE_REV, help="the other commit")
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds (25)")
    parser.add_argument("--seconds", type=float, default=0.3, help="one sample's length (0.3)")
    parser.add_argument(
        "--no-capture",
        action="store_true",
        help="today's daemon with [jobs] max_output = 0: what the dispatcher's decisions "
        "alone cost, without capturing each job's output",
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        source = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ipcd-base-")))
        short = export(args.rev, source)
        extra = "\n[jobs]\nmax_output = 0\n" if args.no_capture else ""
        today = BenchDaemon("today", workers=1, extra=extra).start()
        stack.callback(today.stop)
        other = BenchDaemon("other", workers=1, source=source).start()
        stack.callback(other.stop)
        allowed = os.sched_getaffinity(0)
        print(f"ratio = today's median / {short}'s, {args.rounds} rounds of {args.seconds:g} s")
        for placement, cpus in (("unpinned", allowed), ("pinned", {min(allowed)})):
            place([os.getpid(), *today.pids(), *other.pids()], cpus)
            for name, options in SUBMISSIONS:
                samples = interleave(
                    [
                        (
                            who,
                            lambda d=daemon, o=options: measure.fire_and_forget(  # type: ignore[misc]
                                d.client, args.seconds, options=o
                            ),
                        )
                        for who, daemon in (("today", today), (short, other))
                    ],
                    args.rounds,
                )
                ours, theirs = median(samples["today"]), median(samples[short])
                print(
                    f"jobs completed/s, {name:11} {placement:8}  today {ours:7.0f}/s  "
                    f"{short} {theirs:7.0f}/s  ratio {ours / theirs:.3f}",
                    flush=True,
                )
            place([os.getpid(), *today.pids(), *other.pids()], allowed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
