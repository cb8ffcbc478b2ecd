"""Hand-written fakes of ipcd's own seams shared by the in-process tests of the daemon's
classes (test_worker_unit.py, test_outcomes.py)."""

from __future__ import annotations

from typing import Any


class FakeLog:
    """The daemon's structlog logger: every event with its level and fields, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _say(level: str) -> Any:  # type: ignore[misc]  # a factory used in the class body
        def say(self: FakeLog, event: str, **fields: Any) -> None:
            self.events.append((level, event, fields))

        return say

    info = _say("info")
    warning = _say("warning")
    error = _say("error")

    def names(self) -> list[tuple[str, str]]:
        """(level, event) of each event, in order."""
        return [(level, event) for level, event, _ in self.events]
