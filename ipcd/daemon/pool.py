"""The master's view of its workers: who runs in which in-flight slot, and the back-off
that keeps a broken handler from making the master fork without end."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Back-off bounds for respawning workers that die soon after they start.
MIN_BACKOFF, MAX_BACKOFF = 0.1, 30.0


@dataclass
class WorkerInfo:
    pid: int
    slot: int
    generation: int
    spawned: float
    retiring: bool = False
    kill_reason: str | None = None


@dataclass
class Pool:
    """The master's view of its workers (pid -> info) and their free slots."""

    workers: dict[int, WorkerInfo] = field(default_factory=dict)
    free_slots: list[int] = field(default_factory=list)
    generation: int = 0
    backoff: float = MIN_BACKOFF
    next_spawn: float = 0.0
    restarts: int = 0
