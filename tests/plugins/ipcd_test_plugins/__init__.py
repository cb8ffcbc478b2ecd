"""Handlers used by the end-to-end tests, loaded by the daemon through ``target`` paths."""

from __future__ import annotations

import hashlib
import json
import os
import signal

from ipcd.handlers import HandlerResult, Job


def describe(job: Job) -> HandlerResult:
    """Return what the handler was given, so tests can check the Job fields."""
    payload = job.payload
    return {
        "id": job.id,
        "type": job.type,
        "payload": payload.hex() if isinstance(payload, bytes) else payload,
        "payload_is_bytes": isinstance(payload, bytes),
        "attempt": job.attempt,
        "sender_pid": job.sender_pid,
        "bare": job.bare,
        "handler_pid": os.getpid(),
    }


def crash(job: Job) -> HandlerResult:
    """Raise an unexpected exception (not a HandlerError)."""
    raise ZeroDivisionError("division by zero in a plugin")


def big(job: Job) -> HandlerResult:
    """Return as many bytes as the payload asks for."""
    assert isinstance(job.payload, str)
    return b"x" * int(job.payload)


def not_jsonable(job: Job) -> HandlerResult:
    """Return something that cannot be a result."""
    return {"a set": {1, 2}}  # type: ignore[dict-item]


#: What ``unencodable`` returns, by payload: values no result can hold as they are.
UNENCODABLE: dict[str, object] = {
    "surrogate-text": "bad \ud800 text",
    "surrogate-json": {"k": ["ok", "\udfff"]},
    "surrogate-key": {"\ud800": 1},
    "nan": float("nan"),
    "object": {"o": object()},
}


def unencodable(job: Job) -> HandlerResult:
    """Return the value of UNENCODABLE that the payload names."""
    return UNENCODABLE[str(job.payload)]  # type: ignore[return-value]


class _Treacherous(dict):  # type: ignore[type-arg]
    """A mapping that fails when JSON encoding asks for its items: an error ipcd does not
    expect while storing a result (not a TypeError or ValueError)."""

    def items(self):  # type: ignore[no-untyped-def]
        raise LookupError("items() refuses")


def treacherous(job: Job) -> HandlerResult:
    """Return a value whose encoding raises an unexpected exception inside ipcd."""
    return _Treacherous(a=1)


def flaky(job: Job) -> HandlerResult:
    """Ask for a retry until the attempt named by the payload (an int), then succeed."""
    from ipcd.handlers import Retry

    succeed_on = int(str(job.payload))
    if job.attempt < succeed_on:
        raise Retry(f"not yet (attempt {job.attempt})", delay=0.05)
    return f"ok on attempt {job.attempt}"


def exit_hard(job: Job) -> HandlerResult:
    """Leave the process at once, as a C extension calling exit() would."""
    os._exit(3)


def segfault(job: Job) -> HandlerResult:
    """Die of SIGSEGV, as a crashing C extension would."""
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
    return "unreachable"


def hang(job: Job) -> HandlerResult:
    """Start a child that sleeps, then sleep forever: only a group kill ends both."""
    import subprocess
    import time

    child = subprocess.Popen(["sleep", "600"])
    path = str(job.payload)
    with open(path, "w") as fh:
        fh.write(str(child.pid))
    while True:
        time.sleep(1)


def busy(job: Job) -> HandlerResult:
    """Burn CPU for the payload's number of milliseconds (a CPU-bound handler)."""
    import time

    end = time.perf_counter() + float(str(job.payload)) / 1000
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def store_then_die(job: Job) -> HandlerResult:
    """Store this job's own ok result, then SIGKILL the worker: a worker killed in the
    window after its result is stored and before the job is finished (event, reply).

    The payload is the result segment's key.
    """
    import signal
    import time

    from ipcd.layout.results import Kind, Result, Status
    from ipcd.tables.results import ResultStore

    now = time.time()
    result = Result(job.id, job.type, Status.OK, Kind.TEXT, b"stored", job.attempt, now, now)
    ResultStore.open(int(str(job.payload))).put(result)
    os.kill(os.getpid(), signal.SIGKILL)
    return "unreachable"


def retry_once(job: Job) -> HandlerResult:
    """Ask for one retry, the payload's number of seconds later; succeed at attempt 2."""
    from ipcd.handlers import Retry

    if job.attempt < 2:
        raise Retry("once more", delay=float(str(job.payload)))
    return f"ok on attempt {job.attempt}"


def digest(job: Job) -> HandlerResult:
    """The payload's kind, length and SHA-256: a large payload in, a small result out."""
    payload = job.payload
    raw = payload.encode() if isinstance(payload, str) else payload
    if not isinstance(raw, bytes):
        raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return {
        "kind": type(payload).__name__,
        "length": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "attempt": job.attempt,
    }


def digest_after_dying(job: Job) -> HandlerResult:
    """Kill the worker on the first attempt (SIGKILL, as the OOM killer would), then
    answer as ``digest`` does."""
    if job.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return digest(job)


def die_on_cue(job: Job) -> HandlerResult:
    """SIGKILL the worker when the payload is "die" on its first attempt; otherwise
    return the payload (a quick job, so a worker claims this type in batches)."""
    if job.payload == "die" and job.attempt == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return job.payload


def fill_then_die(job: Job) -> HandlerResult:
    """With a directory as payload, on the first attempt: fill its file system (a file
    ``filler-die`` there, until ENOSPC), then SIGKILL the worker; otherwise return the
    payload."""
    payload = job.payload
    if isinstance(payload, str) and payload.startswith("/") and job.attempt == 1:
        fd = os.open(os.path.join(payload, "filler-die"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # full
        os.kill(os.getpid(), signal.SIGKILL)
    return payload


def slow_retry_once(job: Job) -> HandlerResult:
    """Run the payload's number of seconds, then ask for one retry; succeed at attempt 2."""
    import time

    from ipcd.handlers import Retry

    if job.attempt < 2:
        time.sleep(float(str(job.payload)))
        raise Retry("once more", delay=0.1)
    return f"ok on attempt {job.attempt}"


def stall_on_cue(job: Job) -> HandlerResult:
    """Sleep a minute when the payload is "stall" on its first attempt (its handler's
    timeout kills it); otherwise return the payload (a quick job, batched)."""
    import time

    if job.payload == "stall" and job.attempt == 1:
        time.sleep(60)
    return job.payload


def print_on_cue(job: Job) -> HandlerResult:
    """Print a line, report half-way progress, then wait (at most a minute) for the
    file the payload names to appear; then print its content from a child process (the
    output of programs a handler starts is the job's too), and return "done"."""
    import subprocess
    import time

    cue = str(job.payload)
    print(f"started {job.id}")
    job.progress(0.5, "waiting for the cue")
    deadline = time.monotonic() + 60
    while not os.path.exists(cue) and time.monotonic() < deadline:
        time.sleep(0.02)
    subprocess.run(["cat", cue], check=True)
    job.progress(1.0, "cued")
    return "done"


def chatter(job: Job) -> HandlerResult:
    """Write the payload's number of lines to stdout, then fail when asked to."""
    payload = job.payload if isinstance(job.payload, dict) else {}
    for n in range(int(str(payload.get("lines", 0)))):
        print(f"line {n}")
    if payload.get("fail"):
        raise RuntimeError("failed after chatter")
    return "ok"


def retry_chatter(job: Job) -> HandlerResult:
    """Attempt 1 prints a long line, lingers (so a follower sees it live) and asks for a
    retry; attempt 2 prints a short line and succeeds."""
    import time

    from ipcd.handlers import Retry

    if job.attempt == 1:
        print("first attempt, a line longer than the second's " + "x" * 40)
        time.sleep(0.5)
        raise Retry("once more", delay=0.3)
    print("second")
    return "ok"


def spew(job: Job) -> HandlerResult:
    """Write the payload's number of MiB to stdout, one a 50 ms, and say the largest the
    file behind stdout (the worker's run file) grew."""
    import time

    biggest = 0
    chunk = b"x" * (1 << 20)
    for _ in range(int(str(job.payload))):
        os.write(1, chunk)
        biggest = max(biggest, os.fstat(1).st_size)
        time.sleep(0.05)
    return {"biggest": biggest}
