"""A load for the fault tests: submitter processes that keep jobs flowing.

The jobs come from separate processes (tests/faults/submitter.py), so the load goes on
while the test process kills things, and every accepted job id is on record in a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from conftest import Instance

SUBMITTER = Path(__file__).with_name("submitter.py")


@dataclass
class Load:
    """Several submitter processes, each submitting ``count`` jobs (or until stopped)."""

    inst: Instance
    handler: str
    payload: str
    submitters: int = 4
    count: int = 750
    pause: float = 0.0
    #: Seconds each job is parked before it is queued (``submit --delay``); 0: none.
    delay: float = 0.0
    #: Names this load's files, so that two loads can run side by side.
    name: str = "load"
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def stop_file(self) -> Path:
        return self.inst.dir / f"{self.name}-stop"

    def out(self, n: int) -> Path:
        return self.inst.dir / f"{self.name}-submitted-{n}.txt"

    def start(self) -> Load:
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # each submitter imports ipcd: cache it
        self.procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    str(SUBMITTER),
                    str(self.inst.config_path),
                    self.handler,
                    self.payload,
                    str(self.count),
                    str(self.out(n)),
                    str(self.stop_file),
                    str(self.pause),
                    str(self.delay),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for n in range(self.submitters)
        ]
        return self

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        self.stop_file.touch()

    def join(self, timeout: float = 60.0) -> tuple[int, int]:
        """Wait for every submitter; returns (accepted, refused) over all of them."""
        accepted = refused = 0
        for proc in self.procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err
            counts = json.loads(out)
            accepted += counts["accepted"]
            refused += counts["refused"]
        return accepted, refused

    def kill(self) -> None:
        """For a failing test: leave no submitter behind."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def accepted(self) -> dict[str, float]:
        """Every accepted job id and when ``submit`` returned it."""
        ids: dict[str, float] = {}
        for n in range(self.submitters):
            if not self.out(n).exists():
                continue
            for line in self.out(n).read_text().splitlines():
                job_id, when = line.split()
                assert job_id not in ids, f"job id {job_id} handed out twice"
                ids[job_id] = float(when)
        return ids
