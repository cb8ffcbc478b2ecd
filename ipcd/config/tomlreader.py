"""Reading a parsed TOML document setting by setting, with errors that say where.

ipcd.config describes the settings; this is how each one is taken from the file: with
its type checked (a TOML integer is a float where a float is wanted, a boolean is never
an integer), its range checked, unknown keys refused as typos, and every error naming
the file and the dotted key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipcd.errors import ConfigError


class TableReader:
    """Typed access to the TOML document with errors that name the file and the key."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {message}")

    def table(self, raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
        value = raw.get(name, {})
        if not isinstance(value, Mapping):
            raise self.error(f"[{name}] must be a table")
        return value

    def allow(self, table: Mapping[str, Any], where: str, keys: set[str]) -> None:
        unknown = sorted(set(table) - keys)
        if unknown:
            prefix = f"{where}." if where else ""
            raise self.error(f"unknown setting {prefix}{unknown[0]}")

    def get(self, table: Mapping[str, Any], dotted: str, kind: type, default: Any) -> Any:
        key = dotted.rsplit(".", 1)[-1]
        if key not in table:
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(f"{dotted} must be {kind.__name__}, not {type(value).__name__}")
        return value

    def optional(self, table: Mapping[str, Any], dotted: str, kind: type) -> Any:
        return self.get(table, dotted, kind, None)

    def bounded(
        self, table: Mapping[str, Any], dotted: str, default: Any, low: int, high: int
    ) -> Any:
        value = self.get(table, dotted, int, default)
        if value is not None and not low <= value <= high:
            raise self.error(f"{dotted} must be between {low} and {high}")
        return value

    def non_negative(self, table: Mapping[str, Any], dotted: str, default: float) -> float:
        value: float = self.get(table, dotted, float, default)
        if not 0 <= value < math.inf:
            raise self.error(f"{dotted} must be zero or a positive number of seconds")
        return value

    def positive(self, table: Mapping[str, Any], dotted: str, default: float) -> float:
        value: float = self.get(table, dotted, float, default)
        if not 0 < value < math.inf:
            raise self.error(f"{dotted} must be a positive number of seconds")
        return value
