"""Resident memory of the daemon's processes, from /proc."""

from __future__ import annotations

from typing import NamedTuple


class Memory(NamedTuple):
    """One process's memory in KiB: resident now, peak resident, proportional share."""

    rss: int
    hwm: int
    pss: int


def memory(pid: int) -> Memory:
    """VmRSS and VmHWM from /proc/PID/status, Pss from smaps_rollup (0 where unreadable).

    RSS counts pages a worker still shares with the master since the fork in full, in
    both; PSS splits them, so it says what a process really adds.
    """
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return Memory(fields.get("VmRSS", 0), fields.get("VmHWM", 0), pss)
