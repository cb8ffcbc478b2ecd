"""A load generator for the fault tests, run as its own process by tests/faults/load.py.

    python submitter.py CONFIG HANDLER PAYLOAD COUNT OUT STOP PAUSE [DELAY]

Submits up to COUNT jobs through the Python client API, one every PAUSE seconds (each
parked for DELAY seconds first, when given), and stops early once the file STOP exists.
Each accepted job is written to OUT as ``ID TIME`` and flushed as soon as ``submit``
returns, so every line in OUT is a job the queue accepted.
A "queue full" refusal is counted and the job is not retried under the same id: the
client was told it was not accepted.  At the end one JSON line on stdout gives the counts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ipcd import config as config_mod
from ipcd.client import Client
from ipcd.errors import QueueFullError


def main(argv: list[str]) -> int:
    config_path, handler, payload, count, out, stop, pause, *delay = argv
    client = Client(config_mod.load(config_path))
    stop_file = Path(stop)
    accepted = refused = 0
    with open(out, "a", buffering=1) as fh:
        for _ in range(int(count)):
            if stop_file.exists():
                break
            try:
                job_id = client.submit(handler, payload, delay=float(delay[0]) if delay else None)
            except QueueFullError:
                refused += 1
                continue
            fh.write(f"{job_id} {time.time():.6f}\n")
            accepted += 1
            if float(pause):
                time.sleep(float(pause))
    print(json.dumps({"accepted": accepted, "refused": refused}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
