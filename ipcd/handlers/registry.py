"""Finding handlers: entry points and ``module:function`` paths, mapped to message types.

Everything is imported when the registry is built, which the daemon does before it
detaches, so that a handler that fails to import is reported to the operator running
``ipcd start`` rather than to a log nobody reads yet.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from ipcd.config import Config, ExecConfig, JobsConfig
from ipcd.errors import ConfigError
from ipcd.handlers import Handler, HandlerResult

ENTRY_POINT_GROUP = "ipcd.handlers"


@dataclass(frozen=True, slots=True)
class Registration:
    """A handler bound to its name and message type."""

    name: str
    type: int
    target: str
    func: Handler
    timeout: float | None = None
    max_attempts: int | None = None
    retry_delay: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often a job may run, and how long to wait before attempt n + 1."""

    max_attempts: int
    base_delay: float

    def delay(self, attempt: int) -> float:
        """Exponential back-off: base, 2 * base, 4 * base ... capped at an hour."""
        return float(min(self.base_delay * 2 ** (attempt - 1), 3600.0))


@dataclass(frozen=True, slots=True)
class Registry:
    """Handlers by message type."""

    by_type: dict[int, Registration]

    def lookup(self, type_: int) -> Registration | None:
        return self.by_type.get(type_)

    def policy(self, type_: int, defaults: JobsConfig) -> RetryPolicy:
        """The handler's retry policy, falling back to the [jobs] defaults."""
        reg = self.by_type.get(type_)
        attempts = reg.max_attempts if reg and reg.max_attempts else defaults.max_attempts
        delay = reg.retry_delay if reg and reg.retry_delay is not None else defaults.retry_delay
        return RetryPolicy(attempts, delay)


def build(config: Config) -> Registry:
    """Import every configured handler; raises ConfigError naming the one that fails."""
    installed = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    by_type: dict[int, Registration] = {}
    for handler in config.handlers:
        target = handler.target or installed.get(handler.name)
        if target is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigError(
                f"handler {handler.name!r}: no target set and no installed handler of that "
                f"name (entry points in {ENTRY_POINT_GROUP!r}: {known})"
            )
        func = load_target(target, handler.name)
        wants = getattr(func, "needs_config", None)
        if wants == "exec":
            if not config.exec.enabled:
                raise ConfigError(
                    f"handler {handler.name!r} runs commands, and [exec] enabled is false: "
                    "set it to true and list the allowed commands in [exec.commands]"
                )
            func = _with_config(func, config.exec)
        by_type[handler.type] = Registration(
            handler.name,
            handler.type,
            target,
            func,
            timeout=handler.timeout,
            max_attempts=handler.max_attempts,
            retry_delay=handler.retry_delay,
        )
    return Registry(by_type)


def _with_config(func: Callable[..., HandlerResult], options: ExecConfig) -> Handler:
    """Bind a handler that declares ``needs_config`` to its section of the config."""
    return functools.partial(func, config=options)


def load_target(target: str, name: str) -> Handler:
    """Import ``package.module:function`` and check that it is callable."""
    module_name, _, attr_path = target.partition(":")
    try:
        obj: object = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            obj = getattr(obj, attr)
    except Exception as exc:  # any import-time failure of plugin code is a config problem
        raise ConfigError(
            f"handler {name!r}: cannot load {target!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(obj):
        raise ConfigError(f"handler {name!r}: {target!r} is not callable")
    return obj
