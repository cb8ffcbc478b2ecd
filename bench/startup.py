"""Wall time of whole commands: ``ipcctl submit`` against a bare ``python3 -c``.

Both are timed from an *installed* copy of ipcd (:func:`installed_venv`: ``pip install``
of the checkout, not editable, into a temporary venv that also gets sysv_ipc), with the
same interpreter: an editable install's import hook adds about 12 ms to every start,
which hides what ipcctl itself costs (issue 14).

With hyperfine installed it does the timing (``--shell=none``, warm-up runs); it runs
one command after another, so it is called for several rounds with the order rotated
and the run times are pooled.  Without it, the commands are timed here, interleaved run
by run.  Either way the figure is the median wall time in seconds.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def installed_venv(root: Path, into: Path) -> Path:
    """A venv at ``into`` with the checkout at ``root`` installed as a user would install
    it (``pip install``, not ``-e``; sysv_ipc built from source as ``make venv`` does);
    the venv's ``bin`` directory.  Takes a minute (sysv_ipc compiles)."""
    import sys

    subprocess.run([sys.executable, "-m", "venv", str(into)], check=True)
    pip = [str(into / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    # A current pip, as `make venv` has: an older one writes console scripts that
    # import re (5 to 9 ms of every ipcctl start).
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "--no-binary", "sysv_ipc", str(root)], check=True)
    return into / "bin"


def installed_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` without a PYTHONPATH that would put the checkout ahead of the installed
    copy."""
    return {k: v for k, v in env.items() if k != "PYTHONPATH"}


def tool() -> str:
    """What does the timing: ``hyperfine X.Y`` or ``own timing``."""
    exe = shutil.which("hyperfine")
    if exe is None:
        return "own timing"
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "hyperfine"


def wall_times(
    commands: dict[str, list[str]], *, rounds: int, runs: int, env: dict[str, str]
) -> dict[str, list[float]]:
    """Every run's wall time in seconds, by command name."""
    exe = shutil.which("hyperfine")
    if exe is None:
        return _own(commands, rounds=rounds, runs=runs, env=env)
    return _hyperfine(exe, commands, rounds=rounds, runs=runs, env=env)


def _hyperfine(
    exe: str, commands: dict[str, list[str]], *, rounds: int, runs: int, env: dict[str, str]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    with tempfile.TemporaryDirectory(prefix="ipcd-bench-hf-") as tmp:
        out = Path(tmp) / "hyperfine.json"
        for round_ in range(rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            argv = [exe, "--shell=none", "--style=none", "--warmup=3", f"--runs={runs}"]
            argv += ["--export-json", str(out)]
            argv += [shlex.join(commands[name]) for name in order]
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"hyperfine failed: {done.stderr.strip()[-500:]}")
            for name, result in zip(order, json.loads(out.read_text())["results"], strict=True):
                times[name].extend(float(t) for t in result["times"])
    return times


def _own(
    commands: dict[str, list[str]], *, rounds: int, runs: int, env: dict[str, str]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    for index in range(3 + rounds * runs):
        for name, argv in commands.items():
            started = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
            if index >= 3:  # the first three are warm-up runs
                times[name].append(time.perf_counter() - started)
    return times
