"""The client side: the Python client API (``from ipcd.client import Client``), the
readings behind ``ipcctl stats``/``status`` and the log readers of ``ipcctl logs``.

Never imports the daemon side, structlog or python-daemon: cron scripts pay only for
what submitting a job needs (``make lint`` checks it).
"""

from ipcd.client.api import (
    GATE_RECHECK,
    REPAIR_WAIT,
    SPIN_SECONDS,
    Client,
    Status,
    raise_for_status,
    serving,
)

__all__ = [
    "GATE_RECHECK",
    "REPAIR_WAIT",
    "SPIN_SECONDS",
    "Client",
    "Status",
    "raise_for_status",
    "serving",
]
