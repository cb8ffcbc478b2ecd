"""Other job queues on the same machine, when installed: beanstalkd and task-spooler.

- beanstalkd: a private server (a free port on 127.0.0.1, with ``-b DIR`` its binlog in a
  temporary directory removed at close) and a forked worker, over TCP; the client speaks
  the beanstalk text protocol itself (a dozen lines), so no client library needs
  installing. Two measures: request/reply through a reply tube (put, the worker's
  reserve + delete + put of the reply, the client's reserve + delete of the reply), and
  jobs completed per second (puts for a while; the worker reserves and deletes each).
- task-spooler (``tsp``): N ``tsp -n true`` commands, then ``tsp -w`` for the last job,
  on a private socket; its counterpart is N ``ipcctl submit`` commands, the last with
  ``--wait`` (one worker runs jobs in order, so the last done means all done).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

#: Bytes per request, as for the raw and ipcd round trips.
SIZE = 64


class Beanstalk:
    """One connection speaking the beanstalk protocol (protocol.txt in beanstalkd)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    def command(self, line: str, body: bytes | None = None) -> list[str]:
        data = line.encode() + b"\r\n"
        if body is not None:
            data += body + b"\r\n"
        self.sock.sendall(data)
        return self.reader.readline().decode().split()

    def use(self, tube: str) -> None:
        self._expect(self.command(f"use {tube}"), "USING")

    def watch_only(self, tube: str) -> None:
        self._expect(self.command(f"watch {tube}"), "WATCHING")
        self._expect(self.command("ignore default"), "WATCHING")

    def put(self, body: bytes) -> None:
        self._expect(self.command(f"put 0 0 60 {len(body)}", body), "INSERTED")

    def reserve(self) -> tuple[str, bytes]:
        reply = self._expect(self.command("reserve"), "RESERVED")
        size = int(reply[2])
        body = self.reader.read(size + 2)[:size]
        return reply[1], body

    def delete(self, job_id: str) -> None:
        self._expect(self.command(f"delete {job_id}"), "DELETED")

    def stats_tube(self, tube: str) -> dict[str, str]:
        """The server's counters for ``tube`` (a flat YAML mapping)."""
        reply = self._expect(self.command(f"stats-tube {tube}"), "OK")
        size = int(reply[1])
        text = self.reader.read(size + 2)[:size].decode()
        pairs = (line.split(": ", 1) for line in text.splitlines() if ": " in line)
        return {key: value.strip() for key, value in pairs}

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    @staticmethod
    def _expect(reply: list[str], word: str) -> list[str]:
        if not reply or reply[0] != word:
            raise RuntimeError(f"beanstalkd said {' '.join(reply)!r}, expected {word}")
        return reply


#: First byte of a job whose body the worker puts back into the reply tube; any other job
#: it only reserves and deletes.
WANTS_REPLY = b"r"


class BeanstalkPeer:
    """A private beanstalkd, a forked worker, and a client.

    The worker reserves each job from the ``requests`` tube and deletes it; a job whose
    body starts with WANTS_REPLY it then echoes into the ``replies`` tube. With
    ``binlog`` the server keeps every job in a binlog (``beanstalkd -b DIR``, its default
    fsync at most every 50 ms), as a durable store does.
    """

    def __init__(self, exe: str, *, binlog: bool = False) -> None:
        self.port = _free_port()
        self.binlog: Path | None = None
        argv = [exe, "-l", "127.0.0.1", "-p", str(self.port)]
        if binlog:
            self.binlog = Path(tempfile.mkdtemp(prefix="ipcd-bench-beanstalkd-"))
            argv += ["-b", str(self.binlog)]
        self.server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.worker = 0
        try:
            self.client = _connect(self.port)
            self.worker = os.fork()
            if self.worker == 0:  # pragma: no cover - the worker process
                code = 1
                try:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    _serve(self.port)
                    code = 0
                finally:
                    os._exit(code)
            self.client.use("requests")
            self.client.watch_only("replies")
        except BaseException:
            self.close()
            raise

    def pids(self) -> list[int]:
        return [os.getpid(), self.server.pid, self.worker]

    def round_trips(self, seconds: float) -> float:
        client, payload = self.client, WANTS_REPLY * SIZE
        count = 0
        started = now = time.perf_counter()
        end = started + seconds
        while now < end:
            client.put(payload)
            job_id, _ = client.reserve()
            client.delete(job_id)
            count += 1
            now = time.perf_counter()
        return count / (now - started)

    def jobs(self, seconds: float) -> float:
        """Jobs per second from the first put until the worker has deleted the last.

        Puts jobs for ``seconds``, then one that asks for a reply: the worker takes the
        jobs of one priority in the order they were put, so its reply means that every
        job before it is done.
        """
        client, payload = self.client, b"j" * SIZE
        count = 0
        started = time.perf_counter()
        end = started + seconds
        while time.perf_counter() < end:
            client.put(payload)
            count += 1
        client.put(WANTS_REPLY * SIZE)
        job_id, _ = client.reserve()
        elapsed = time.perf_counter() - started
        client.delete(job_id)
        return (count + 1) / elapsed

    def close(self) -> None:
        if self.worker > 0:
            with contextlib.suppress(OSError):
                os.kill(self.worker, signal.SIGKILL)
            os.waitpid(self.worker, 0)
            self.worker = 0
        with contextlib.suppress(AttributeError):
            self.client.close()
        self.server.terminate()
        try:
            self.server.wait(5)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        if self.binlog is not None:
            shutil.rmtree(self.binlog, ignore_errors=True)
            self.binlog = None


def _serve(port: int) -> None:  # pragma: no cover - the worker process
    conn = Beanstalk(port)
    conn.sock.settimeout(None)
    conn.use("replies")
    conn.watch_only("requests")
    while True:
        job_id, body = conn.reserve()
        conn.delete(job_id)
        if body.startswith(WANTS_REPLY):
            conn.put(body)


def _connect(port: int) -> Beanstalk:
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return Beanstalk(port)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def beanstalkd_exe() -> str | None:
    return shutil.which("beanstalkd")


def tsp_exe() -> str | None:
    return shutil.which("tsp")


def tsp_jobs(exe: str, jobs: int) -> float:
    """Jobs per second: ``jobs`` times ``tsp -n true``, then ``tsp -w`` on the last."""
    with tempfile.TemporaryDirectory(prefix="ipcd-bench-tsp-") as tmp:
        env = {**os.environ, "TS_SOCKET": str(Path(tmp) / "socket"), "TMPDIR": tmp}
        try:
            _quiet([exe, "-C"], env)  # starts its server before the clock does
            started = time.perf_counter()
            for _ in range(jobs):
                _quiet([exe, "-n", "true"], env)
            _quiet([exe, "-w"], env)
            return jobs / (time.perf_counter() - started)
        finally:
            subprocess.run([exe, "-K"], env=env, capture_output=True, check=False)


def ipcctl_jobs(ipcctl: list[str], jobs: int, env: dict[str, str]) -> float:
    """Jobs per second: ``jobs - 1`` times ``ipcctl submit echo x``, then one ``--wait``."""
    started = time.perf_counter()
    for _ in range(jobs - 1):
        _quiet([*ipcctl, "submit", "echo", "x"], env)
    _quiet([*ipcctl, "submit", "echo", "x", "--wait"], env)
    return jobs / (time.perf_counter() - started)


def _quiet(argv: list[str], env: dict[str, str]) -> None:
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
