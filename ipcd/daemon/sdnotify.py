"""systemd's watchdog (sd_notify(3), sd_watchdog_enabled(3)): keep-alives from the master.

With ``WatchdogSec=`` in the unit, systemd expects ``WATCHDOG=1`` at least that often from
the service's main process and restarts a service that stops sending (``Restart=``).  The
master sends it from its loop, so a master that stops turning (a deadlock, a SIGSTOP, a
wait that never ends) is restarted, while a busy worker is not the master's problem.

Written here rather than taken from a library: the protocol is one datagram on the
AF_UNIX socket that ``$NOTIFY_SOCKET`` names (a leading ``@`` names an abstract one), which
is less code than the glue a dependency would need.  The maintained implementation is
libsystemd's (python-systemd and pystemd need it to build); the pure-Python packages on
PyPI (sdnotify, sd-notify, systemd-watchdog) would all decide in the master that the
watchdog is not meant for it: for a ``Type=forking`` service systemd sets
``WATCHDOG_PID`` to the process it started, ``ipcd start``, which is not the master.  So
the starting process reads the environment (:meth:`Watchdog.from_environment`) and the
master it starts carries the watchdog on.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, MutableMapping

#: The variables systemd sets for the watchdog; removed once read, so that workers and
#: the commands handlers run do not inherit them (as sd_notify's unset_environment).
VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Watchdog:
    """Sends ``WATCHDOG=1`` to ``address`` every ``interval`` seconds (half the timeout
    systemd gave, as sd_watchdog_enabled(3) advises)."""

    def __init__(self, address: str, interval: float) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.interval = interval
        self.next_due = 0.0
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], pid: int) -> Watchdog | None:
        """The watchdog systemd asked ``pid`` (the starting process) for, if it did.

        None unless ``NOTIFY_SOCKET`` and a positive ``WATCHDOG_USEC`` are set, and
        ``WATCHDOG_PID``, when set, is ``pid``: otherwise the variables were inherited
        from some other watched service and are not ours to answer.
        """
        address = environ.get("NOTIFY_SOCKET", "")
        try:
            usec = int(environ.get("WATCHDOG_USEC", ""))
            watched = int(environ.get("WATCHDOG_PID", str(pid)))
        except ValueError:
            return None
        if not address or usec <= 0 or watched != pid:
            return None
        return cls(address, usec / 2e6)

    @staticmethod
    def take_environment(environ: MutableMapping[str, str]) -> None:
        """Remove the variables (after :meth:`from_environment` read them)."""
        for name in VARIABLES:
            environ.pop(name, None)

    def until_due(self, now: float) -> float:
        """Seconds until the next keep-alive is due (``now``: time.monotonic())."""
        return max(self.next_due - now, 0.0)

    def keepalive(self, now: float) -> None:
        """Send ``WATCHDOG=1`` if it is due; raises OSError when it cannot be sent."""
        if now < self.next_due:
            return
        self.next_due = now + self.interval
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.sendto(b"WATCHDOG=1", self.address)

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def from_process_environment() -> Watchdog | None:
    """The watchdog meant for this process, taken out of its environment."""
    watchdog = Watchdog.from_environment(os.environ, os.getpid())
    Watchdog.take_environment(os.environ)
    return watchdog
