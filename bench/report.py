"""The table of ratios, and its JSON form."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Unit = Literal["rate", "seconds", "kib", "bytes", "bytes_rate", "us", "none"]


@dataclass(frozen=True)
class Target:
    """A ratio the spec asks for: ``ratio >= value`` or ``ratio <= value``."""

    op: Literal[">=", "<="]
    value: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    def __str__(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'}{self.value:g}x"


@dataclass
class Row:
    """One line of the table: a baseline, ipcd's figure, and their ratio (ipcd / base)."""

    what: str
    placement: str
    base_label: str
    base: float | None
    ipcd: float | None
    unit: Unit
    target: Target | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: For rows without a baseline (memory, the store): ipcd's figure must stay under
    #: this, in the row's unit, instead of a ratio.
    limit: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.base is None or self.ipcd is None or self.base == 0:
            return None
        return self.ipcd / self.base

    @property
    def ok(self) -> bool | None:
        if self.limit is not None and self.ipcd is not None:
            return self.ipcd < self.limit
        ratio = self.ratio
        if self.target is None or ratio is None:
            return None
        return self.target.met(ratio)


def fmt(value: float | None, unit: Unit) -> str:
    """A figure with its unit, as the table shows it."""
    if value is None or math.isnan(value):
        return "-"
    if unit == "rate":
        return f"{value / 1000:.2f} k/s" if value >= 1000 else f"{value:.0f} /s"
    if unit == "seconds":
        return f"{value * 1000:.1f} ms"
    if unit == "kib":
        return f"{value / 1024:.1f} MiB"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    if unit == "us":
        return f"{value:.1f} us"
    if unit == "bytes_rate":
        return f"{value / 2**30:.2f} GiB/s"
    return f"{value:g}"


def table(rows: list[Row]) -> str:
    """Fixed-width text, one row per measurement, notes after the ratio."""
    header = ("measurement", "placement", "baseline", "base", "ipcd", "ratio", "target", "")
    lines = [header]
    for row in rows:
        ratio = row.ratio
        if row.limit is not None:
            target = f"<{fmt(row.limit, row.unit)}"
        else:
            target = str(row.target) if row.target else ""
        verdict = {True: "ok", False: "MISSED", None: ""}[row.ok]
        lines.append(
            (
                row.what,
                row.placement,
                row.base_label,
                fmt(row.base, row.unit),
                fmt(row.ipcd, row.unit) if row.ipcd is not None else "-",
                f"{ratio:.3f}x" if ratio is not None else "-",
                target,
                verdict,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=True)]
        text = "  ".join(cells).rstrip()
        note = rows[index - 1].note if index else ""
        out.append(f"{text}   {note}" if note else text)
        if index == 0:
            out.append("-" * len(text))
    return "\n".join(out)


def machine(build: dict[str, Any]) -> dict[str, Any]:
    """Where the figures come from; ``build`` says which sysv_ipc (bench.raw.build_info)."""
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        **build,
        "cpus": os.cpu_count(),
        "allowed_cpus": sorted(os.sched_getaffinity(0)),
        "loadavg_at_end": os.getloadavg(),
    }


def write_json(path: Path, rows: list[Row], extra: dict[str, Any]) -> None:
    doc = {
        "rows": [
            {
                **dataclasses.asdict(row),
                "ratio": row.ratio,
                "ok": row.ok,
                "target": str(row.target) if row.target else None,
            }
            for row in rows
        ],
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
