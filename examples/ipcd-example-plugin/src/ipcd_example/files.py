"""``compress``: gzip a file in place, as a log-shipping or archiving job would.

It shows the two ways a handler ends a job early: ``HandlerError`` for a job that can
never succeed (a bad payload, a missing file), ``Retry`` for one that may succeed later
(the file is still being written, the disk is full). It is also safe to run twice, as
every handler must be: ipcd delivers a job at least once, and runs it again when its
worker died before the result was stored.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
from pathlib import Path

import structlog

from ipcd.handlers import HandlerError, HandlerResult, Job, Retry

log = structlog.get_logger()

#: A producer that is still writing FILE holds FILE.lock.
LOCK_SUFFIX = ".lock"


def compress(job: Job) -> HandlerResult:
    """Compress ``{"path": "/abs/file"}`` to ``/abs/file.gz`` and remove the original.

    Optional keys: ``"level"`` (1 to 9, default 6) and ``"keep"`` (keep the original).
    The output is ``{"path": ..., "bytes_in": ..., "bytes_out": ...}``.
    """
    source, level, keep = _arguments(job.payload)
    target = source.with_name(source.name + ".gz")
    if not source.exists():
        if target.exists():
            # An earlier run of this job compressed it, and its result was lost.
            log.info("compress.already_done", job_id=job.id, path=str(target))
            return {"path": str(target), "bytes_in": None, "bytes_out": target.stat().st_size}
        raise HandlerError(f"no such file: {source}")
    if source.with_name(source.name + LOCK_SUFFIX).exists():
        raise Retry(f"{source} is still being written", delay=10.0)
    try:
        size_in, size_out = _gzip(source, target, level)
        if not keep:
            source.unlink()
    except PermissionError as exc:
        raise HandlerError(f"permission denied: {exc.filename}") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Retry(f"no space left for {target}", delay=60.0) from None
        raise
    log.info("compress.done", job_id=job.id, path=str(target), bytes_in=size_in, bytes_out=size_out)
    return {"path": str(target), "bytes_in": size_in, "bytes_out": size_out}


def _arguments(payload: object) -> tuple[Path, int, bool]:
    if not isinstance(payload, dict) or not isinstance(payload.get("path"), str):
        raise HandlerError('compress needs {"path": "/absolute/file"}')
    path = Path(payload["path"])
    if not path.is_absolute():
        raise HandlerError(f"path must be absolute: {path}")
    level = payload.get("level", 6)
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 9:
        raise HandlerError("level must be an integer from 1 to 9")
    return path, level, bool(payload.get("keep", False))


def _gzip(source: Path, target: Path, level: int) -> tuple[int, int]:
    """Write ``target`` through a temporary file, so that it is never seen half written."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with source.open("rb") as src, gzip.open(partial, "wb", compresslevel=level) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return source.stat().st_size, target.stat().st_size
