"""``ipcctl``'s entry point and its lean path: the common ``submit``, ``submit --wait`` and
``result`` command lines, run with ``sysv_ipc``, ``_json``, ``marshal`` and built-in
modules only; everything else runs the full CLI (ipcd.cli.ipcctl), unchanged.

Why: a cron job's ``ipcctl submit`` used to spend four times an interpreter's start-up
on imports (argparse, tomllib and the configuration's validation, ipcd's client modules
with their enums, NamedTuples and ``typing``) for one ``msgsnd`` and one ``msgrcv``.

The rule that keeps both paths alike: the lean path *handles* only a command line it
recognises exactly and an outcome it expects, and *hands over* everything else.
  - Before the job is sent, handing over means running the full CLI on the same
    arguments (:func:`_full`): an unknown option or handler, a bare type number no
    handler has, ``--json``, ``--unique`` and every other option, a payload too large
    for one message, no compiled configuration (ipcd.lean.cache), a missing, planted or
    full queue.  Nothing was sent, so the full CLI does it all again, and says and exits
    exactly what it always does.  stdin already read (``-``) is given back to it.
  - After the job is sent, handing over means finishing the command the full way
    (ipcd.cli.ipcctl.submitted) from the point reached, with the same deadline, and with
    any reply the lean path took off the reply queue put back for the full client to
    take: not confirmed, refused, no daemon serving, a failed job, a result not in the
    ring or spilled, a timeout, a signal.
So every message and exit status comes from the full CLI's code; the lean path prints
only a job id (``submit``) and a successful result (``--wait``, ``result``).
"""

from __future__ import annotations

import os
import sys
import time

import ipcd
from ipcd.lean import cache

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ipcd.kernel.bare import MessageQueue

#: What ``ipcctl -c``, ``$IPCD_CONFIG`` and the default name (ipcd.config.locate).
DEFAULT_CONFIG = "/etc/ipcd/ipcd.toml"
#: --wait's default timeout (ipcd.cli.ipcctl_args.WAIT_TIMEOUT).
WAIT_TIMEOUT = 30.0
#: Job id characters (ipcd.wire.protocol.is_job_id).
_ID_CHARS = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_.-")
#: Key offset of the reply queue (ipcd.kernel.keys.REPLY_KEY_OFFSET).
_REPLY_KEY_OFFSET = 0x01000000


class _Line:
    """A command line the lean path runs."""

    def __init__(self) -> None:
        self.config: str | None = None
        self.command = ""
        self.positionals: list[str] = []
        self.wait = False
        self.no_confirm = False
        self.timeout: float | None = None


def parse(argv: list[str]) -> _Line | None:
    """The command line if the lean path runs it exactly as the full CLI would; None for
    anything else (any other option, abbreviation, ``--``, a value that starts with
    ``-``, positionals split by an option, which argparse refuses)."""
    line = _Line()
    args = iter(argv)
    gap = False  # an option came after the positionals began
    for arg in args:
        if arg in ("-c", "--config"):
            value = next(args, None)
            if value is None or value.startswith("-"):
                return None
            line.config = value
        elif arg.startswith("--config="):
            line.config = arg[9:]
        elif not line.command:
            if arg not in ("submit", "result"):
                return None
            line.command = arg
        elif arg == "--wait":
            line.wait = True
        elif arg == "--no-confirm" and line.command == "submit":
            line.no_confirm = True
        elif arg == "--timeout" or arg.startswith("--timeout="):
            text = arg[10:] if "=" in arg else next(args, None)
            line.timeout = _seconds(text)
            if line.timeout is None:
                return None
        elif arg.startswith("-") and not (arg == "-" and len(line.positionals) == 1):
            return None
        else:
            if gap:
                return None
            line.positionals.append(arg)
            continue
        gap = bool(line.positionals)
    wanted = (1, 2) if line.command == "submit" else (1,)
    if len(line.positionals) not in wanted or (line.timeout is not None and not line.wait):
        return None
    if line.command == "result" and not _is_job_id(line.positionals[0]):
        return None
    return line


def _seconds(text: str | None) -> float | None:
    """--timeout's value as ipcd.cli.ipcctl_args reads it; None where it refuses it."""
    if text is None or text.startswith("-"):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 <= value < float("inf") else None


def _is_job_id(text: str) -> bool:
    return 1 <= len(text) <= 16 and _ID_CHARS.issuperset(text)


def main(argv: list[str]) -> int:
    """Run ``argv`` the lean way when it can be, else the full CLI."""
    line = parse(argv)
    if line is None:
        return _full(argv)
    given = line.config or os.environ.get("IPCD_CONFIG") or DEFAULT_CONFIG
    path = cache.config_key(given)
    cache_dir = cache.directory(os.environ)
    if path is None or cache_dir is None:
        return _full(argv)
    config = cache.read(path, cache_dir, ipcd.__version__)
    if config is None:
        cache.refresh(path, cache_dir, ipcd.__version__)
        return _full(argv)
    jobs_key = _jobs_key(config)
    if jobs_key is None:
        return _full(argv)
    if line.command == "result":
        return _result(line, jobs_key, argv)
    return _submit(line, config, jobs_key, argv)


def _jobs_key(config: dict[str, Any]) -> int | None:
    """The job queue's key: the explicit one, or ftok of the key file
    (ipcd.kernel.keys.ftok); None when the key file cannot be looked at."""
    if config["key"] is not None:
        return int(config["key"])
    try:
        st = os.stat(config["key_path"])
    except (OSError, TypeError):
        return None
    proj_id = int(config["proj_id"])
    return ((proj_id & 0xFF) << 24) | ((st.st_dev & 0xFF) << 16) | (st.st_ino & 0xFFFF)


def _handler_type(text: str, handlers: dict[str, int]) -> int | None:
    """The message type for a handler name or a number a configured handler has; None
    for anything else (the full CLI refuses it or warns of it)."""
    if text in handlers:
        return handlers[text]
    try:
        number = int(text, 0)
    except ValueError:
        return None
    return number if number in handlers.values() else None


def _submit(line: _Line, config: dict[str, Any], jobs_key: int, argv: list[str]) -> int:
    from ipcd.kernel import bare

    type_ = _handler_type(line.positionals[0], config["handlers"])
    if type_ is None:
        return _full(argv)
    payload: str | bytes | None = line.positionals[1] if len(line.positionals) > 1 else None
    limit: int = config["max_payload"]
    raw: bytes | None = None  # stdin as read, for the full CLI should it take over
    if payload == "-":
        if sys.stdin is None:
            return _full(argv)
        raw = sys.stdin.buffer.read(limit + 1)
        try:
            payload = raw.decode("utf-8") if len(raw) <= limit else None
        except UnicodeDecodeError:
            payload = raw
        if payload is None:
            return _full(argv, stdin=raw)
    msgmax = bare.msgmax()
    job_id = os.urandom(8).hex()  # ipcd.wire.protocol.new_job_id
    pid = os.getpid()
    body = _envelope(
        payload, job_id, pid, reply=line.wait, confirm=not (line.wait or line.no_confirm)
    )
    if body is None or len(body) > msgmax or len(body) > limit:
        return _full(argv, stdin=raw)
    queue = bare.open_queue(jobs_key, msgmax)
    replies = None
    if line.wait or not line.no_confirm:
        replies = bare.open_queue((jobs_key + _REPLY_KEY_OFFSET) & 0xFFFFFFFF, msgmax)
    if (
        queue is None
        or (replies is None and not line.no_confirm)
        or (line.wait and replies is None)
    ):
        return _full(argv, stdin=raw)
    if not bare.send_nowait(queue, body, type_):
        return _full(argv, stdin=raw)
    # Sent: from here on, whatever is not the common outcome is finished the full way.
    if line.wait:
        assert replies is not None
        wait = WAIT_TIMEOUT if line.timeout is None else line.timeout
        return _await_result(line, replies, jobs_key, job_id, pid, wait)
    if line.no_confirm:
        print(job_id, flush=True)
        if _serving(jobs_key):
            return 0
        return _finish(line, job_id, wait=None, confirm=False, deadline=time.monotonic())
    assert replies is not None
    deadline = time.monotonic() + config["send_timeout"]
    if not _serving(jobs_key):
        return _finish(line, job_id, wait=None, confirm=True, deadline=deadline)
    got = bare.receive(replies, pid, deadline, 0.0)
    if got == b"+" + job_id.encode():
        print(job_id)
        return 0
    _put_back(replies, got, pid)
    return _finish(line, job_id, wait=None, confirm=True, deadline=deadline)


def _envelope(
    payload: str | bytes | None, job_id: str, pid: int, *, reply: bool, confirm: bool
) -> bytes | None:
    """ipcd.wire.protocol.encode's envelope for these fields, byte for byte (None when
    the text cannot be encoded: the full CLI then says why)."""
    import _json

    head = f'{{"ipcd":1,"id":"{job_id}","submitted":{round(time.time(), 6)!r},"pid":{pid}'
    if reply:
        head += f',"reply":{pid}'
    if confirm:
        head += f',"confirm":{pid}'
    if isinstance(payload, bytes):
        import binascii

        b64 = binascii.b2a_base64(payload, newline=False)
        return b"".join((head.encode(), b',"payload_b64":"', b64, b'"}'))
    text = "null" if payload is None else _json.encode_basestring(payload)
    try:
        return (head + ',"payload":' + text + "}").encode()
    except UnicodeEncodeError:
        return None


def _serving(jobs_key: int) -> bool:
    """ipcd.client.api.Client.daemon_serving: a live master's PID in the ring's header."""
    from ipcd.kernel import bare
    from ipcd.kernel.procs import alive

    ring = bare.Ring.open(jobs_key)
    if ring is None:
        return False
    try:
        return alive(ring.daemon_pid())
    finally:
        ring.close()


def _spin_seconds() -> float:
    """As ipcd.client.api's: poll the reply queue for SPIN_SECONDS first unless the
    process may run on one CPU only (ipcd.kernel.procs.poll_seconds)."""
    from ipcd.kernel.procs import SPIN_SECONDS, poll_seconds

    return poll_seconds(SPIN_SECONDS)


def _await_result(
    line: _Line, replies: MessageQueue, jobs_key: int, job_id: str, pid: int, wait: float
) -> int:
    from ipcd.kernel import bare

    deadline = time.monotonic() + wait
    got = bare.receive(replies, pid, deadline, _spin_seconds())
    if got == job_id.encode():
        ring = bare.Ring.open(jobs_key)
        found = None
        if ring is not None:
            try:
                found = ring.find(job_id)
            finally:
                ring.close()
        if found is not None and _print(found):
            return 0
    _put_back(replies, got, pid)
    return _finish(line, job_id, wait=wait, confirm=False, deadline=deadline)


def _put_back(replies: MessageQueue, got: bytes | None, pid: int) -> None:
    """Give a reply the lean path took back to the queue, for the full client to take."""
    from ipcd.kernel import bare

    if got is not None:
        bare.send_nowait(replies, got, pid)


def _print(found: tuple[int, int, int, bytes]) -> bool:
    """Print a successful, unspilled result as ipcd.cli.ipcctl._print_result does; False
    (nothing printed) for any other."""
    _type, status, kind, data = found
    if status != 0 or kind > 2:
        return False
    if kind == 0:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif kind == 1:
        text = data.decode("utf-8", "replace")
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        import json

        sys.stdout.write(json.dumps(json.loads(data)) + "\n")
    return True


def _result(line: _Line, jobs_key: int, argv: list[str]) -> int:
    """``result ID`` (``--wait``): a successful result the ring holds now; anything else
    (not there yet, failed, only in the job store) the full CLI looks up and says."""
    from ipcd.kernel import bare

    ring = bare.Ring.open(jobs_key)
    if ring is None:
        return _full(argv)
    try:
        found = ring.find(line.positionals[0])
    finally:
        ring.close()
    if found is None or not _print(found):
        return _full(argv)
    return 0


def _full(argv: list[str], *, stdin: bytes | None = None) -> int:
    """The full CLI on the same arguments; ``stdin``: what the lean path read of it."""
    if stdin is not None:
        import io

        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    from ipcd.cli import run
    from ipcd.cli.ipcctl import main as full_main

    return run("ipcctl", full_main, argv)


def _finish(line: _Line, job_id: str, *, wait: float | None, confirm: bool, deadline: float) -> int:
    """The rest of a sent job's ``submit``, the full CLI's way (ipcd.cli.ipcctl.submitted)."""
    from ipcd.cli import run
    from ipcd.cli.ipcctl import submitted

    def rest(argv: list[str]) -> int:
        return submitted(line.config, job_id, wait=wait, confirm=confirm, deadline=deadline)

    return run("ipcctl", rest, [])


def entry() -> None:
    """Console-script entry point (``ipcctl``)."""
    try:
        code = main(sys.argv[1:])
    except KeyboardInterrupt:  # as ipcd.cli.run
        code = 130
    except BrokenPipeError:
        sys.stderr.close()
        code = 0
    except Exception as exc:  # the CLI's top level: a bug (as ipcd.cli.run says it)
        import traceback

        traceback.print_exc()
        print(f"ipcctl: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 70
    sys.exit(code)
