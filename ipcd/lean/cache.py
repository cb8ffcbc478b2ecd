"""The compiled configuration: what ``ipcctl submit`` needs from the TOML file, kept as a
``marshal`` file so that a cron job's submit neither imports ``tomllib`` nor validates
the whole file again (together a third of an interpreter's start-up).

What it holds: the IPC key (or the key file and proj_id that ftok turns into it), ``[ipc]
send_timeout``, ``[jobs] max_payload`` and the handlers' names and types; and what it
was made from: the TOML file's path, device, inode, size, mtime and ctime (nanoseconds),
with ipcd's version and this format's number.

Never stale: it is used only while the file's ``stat`` still gives all of those
(an edit in place changes mtime and ctime, even one that keeps the size and sets the
mtime back; a replaced file has another inode), and it is not written at all while
the file changed within :data:`SETTLE` seconds (a timestamp is coarse: a second edit
within one clock tick could otherwise keep every field the same).

Never another user's settings: the cache lives in the caller's own cache directory
(``$XDG_CACHE_HOME/ipcd``, else ``$HOME/.cache/ipcd``), which must be a real directory
owned by the caller and not writable by group or others; a cache file is read only when
it is a regular file owned by the caller or root and not group- or world-writable.
Root therefore never reads a cache a user could have written (``sudo`` keeping the
user's ``$HOME`` finds that user's directory: not root's, so no cache).  A cron job
without ``$HOME`` uses ``/var/tmp/ipcd-EUID``: another user can make that name first
(``/var/tmp`` is world-writable), but not make it pass the checks, so the worst they can
do is that ipcctl reads the TOML file every time, as it does whenever a check fails.

Anything off (missing, foreign, corrupt, stale, another version) means no cache: the
caller takes the full path, which reads the TOML file and says what is wrong with it.
Reading imports ``marshal`` and ``os`` only; writing (:func:`refresh`) loads the file
with ipcd.config, imported then.
"""

from __future__ import annotations

import marshal
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

#: This file format's number: a change to what is stored gives another number.
FORMAT = 1
#: Seconds a configuration file must have been left alone before it is compiled.
SETTLE = 1.0
#: The longest cache file name: a longer configuration path is not cached.
MAX_NAME = 240
#: Where a caller with neither ``$XDG_CACHE_HOME`` nor ``$HOME`` keeps its cache
#: (``ipcd-EUID``): sticky and world-writable, so its directory is vetted as any other.
SHARED_ROOT = "/var/tmp"


def directory(env: dict[str, str] | os._Environ[str], shared_root: str = SHARED_ROOT) -> str | None:
    """The caller's cache directory for ipcd, from the environment: in
    ``$XDG_CACHE_HOME``, else ``$HOME/.cache``, else (a cron job that sets neither)
    ``ipcd-EUID`` in ``shared_root``, which another user may have made first: the
    directory checks of :func:`read` and :func:`refresh` refuse one that is not the
    caller's, and ipcctl then reads the TOML file, as without a cache."""
    base = env.get("XDG_CACHE_HOME", "")
    if not base.startswith("/"):
        home = env.get("HOME", "")
        if not home.startswith("/"):
            return f"{shared_root.rstrip('/')}/ipcd-{os.geteuid()}"
        base = home.rstrip("/") + "/.cache"
    return base.rstrip("/") + "/ipcd"


def config_key(given: str) -> str | None:
    """The absolute path the cache knows a configuration file by; None for paths the
    lean path leaves to the full one (``~``)."""
    if not given or given.startswith("~"):
        return None
    return given if given.startswith("/") else os.getcwd() + "/" + given


def _name(path: str) -> str | None:
    name = path.replace("%", "%25").replace("/", "%2F") + ".marshal"
    return name if len(name) <= MAX_NAME else None


def _stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _safe_dir(path: str, euid: int) -> bool:
    """A real directory owned by the caller, not writable by group or others."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_mode & 0o170000 == 0o040000 and st.st_uid == euid and not st.st_mode & 0o022


def read(path: str, cache_dir: str, version: str) -> dict[str, Any] | None:
    """The compiled configuration of the file at ``path`` (absolute), if the cache holds
    a current one that may be trusted; else None."""
    name = _name(path)
    euid = os.geteuid()
    if name is None or not _safe_dir(cache_dir, euid):
        return None
    try:
        st = os.stat(path)
        if not os.access(path, os.R_OK):
            return None  # the full path says "permission denied reading configuration"
        fd = os.open(cache_dir + "/" + name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        own = os.fstat(fd)
        if (
            own.st_mode & 0o170000 != 0o100000
            or own.st_uid not in (euid, 0)
            or own.st_mode & 0o022
            or own.st_size > 1 << 20
        ):
            return None
        raw = os.read(fd, own.st_size + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        doc = marshal.loads(raw)
    except (ValueError, EOFError, TypeError):
        return None
    if (
        type(doc) is not dict
        or doc.get("format") != FORMAT
        or doc.get("version") != version
        or doc.get("path") != path
        or doc.get("stamp") != _stamp(st)
    ):
        return None
    return doc


def refresh(path: str, cache_dir: str, version: str, *, now: float | None = None) -> bool:
    """Compile the file at ``path`` into the cache, if it loads and has settled and the
    directory is the caller's (made 0700 if missing); True when a cache was written.
    Never raises for a file that does not load: the full path reports that."""
    from ipcd.config import load

    name = _name(path)
    if name is None:
        return False
    try:
        before = os.stat(path)
    except OSError:
        return False
    now_ns = int((now if now is not None else _time()) * 1e9)
    if now_ns - max(before.st_mtime_ns, before.st_ctime_ns) < SETTLE * 1e9:
        return False
    try:
        config = load(path)
    except ValueError:  # ipcd.errors.ConfigError: the full path says what is wrong
        return False
    try:
        after = os.stat(path)
    except OSError:
        return False
    if _stamp(after) != _stamp(before):
        return False  # changed while it was read
    doc = {
        "format": FORMAT,
        "version": version,
        "path": path,
        "stamp": _stamp(before),
        "key": config.ipc.key,
        "key_path": None if config.ipc.key_path is None else str(config.ipc.key_path),
        "proj_id": config.ipc.proj_id,
        "send_timeout": config.ipc.send_timeout,
        "max_payload": config.jobs.max_payload,
        "handlers": {h.name: h.type for h in config.handlers},
    }
    return _write(cache_dir, name, marshal.dumps(doc))


def _time() -> float:
    import time

    return time.time()


def _write(cache_dir: str, name: str, data: bytes) -> bool:
    """Write ``data`` as ``name`` atomically (a new file renamed into place), only into a
    directory that is the caller's own."""
    euid = os.geteuid()
    try:
        os.makedirs(cache_dir, 0o700, exist_ok=True)
    except OSError:
        return False
    if not _safe_dir(cache_dir, euid):
        return False
    temp = f"{cache_dir}/.{os.getpid()}.{name}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(temp, f"{cache_dir}/{name}")
    except OSError:
        import contextlib  # only when the write failed

        with contextlib.suppress(OSError):
            os.unlink(temp)
        return False
    return True
