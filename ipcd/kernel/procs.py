"""Whether a process is still there: the one check every table's staleness rule asks.

Light on purpose (the standard library's ``os`` only): ``ipcctl submit`` asks it when it
finds a unique key held, and its lean path (ipcd.lean) on every submit.
"""

from __future__ import annotations

import os

#: How long a waiting submitter polls the reply queue before it sleeps in msgrcv: a
#: short job's reply comes within this, and a sleeping process's wake-up on a virtual
#: machine costs as much as the job (waits.spin_wait).  ``IPCD_SPIN_US`` overrides it
#: (0 turns polling off).
SPIN_SECONDS = 0.001


def poll_seconds(default: float) -> float:
    """How long a waiting client polls the reply queue before it sleeps: ``IPCD_SPIN_US``
    when set, else ``default``, or not at all for a process that may run on one CPU
    only: its poll would take the CPU the daemon's processes (the intake, then a worker)
    need to produce the reply.  (The full client and ipcctl's lean path both ask.)"""
    try:
        return max(int(os.environ["IPCD_SPIN_US"]), 0) / 1e6
    except (KeyError, ValueError):
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = 2  # not knowable here: poll, as before
    return default if cpus > 1 else 0.0


def alive(pid: int) -> bool:
    """The process ``pid`` exists and has not exited.

    A zombie (state Z in /proc/PID/stat) counts as gone: it has exited, and its parent
    (PID 1 on some machines, which reaps lazily) may take a while to collect it.  A
    process we may not signal (another user's) is alive.  A PID of 0 or below names no
    single process (kill(2) would signal a group) and is not alive.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            # The command name (in parentheses) may hold spaces: the state follows the last ")".
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def signal_worker(pid: int, signum: int, *, group: bool = True) -> None:
    """Signal a worker, or its whole process group (the jobs' children with it).

    A worker already gone is no error; nor is a group member that changed its user.
    """
    import contextlib  # here: the lean submit path imports this module, not contextlib

    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
