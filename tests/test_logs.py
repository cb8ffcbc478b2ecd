"""``ipcctl logs`` and ``ipcctl result --log``: reading ipcd's JSON event log.

The pure parts of ipcd.client.logformat (``--since``, filters, formatting, colour choice) and
the readers of ipcd.client.logfile are tested as functions; the command against real daemons, a
real rotation and a real terminal.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import IO

import pytest
from conftest import IPCCTL, TESTS, Instance

from ipcd.client.logfile import Follower, job_lines, last_shown, lines_backward
from ipcd.client.logformat import (
    Filter,
    Printer,
    format_event,
    format_value,
    parse_count,
    parse_level,
    parse_since,
    type_selector,
    want_color,
)
from ipcd.config import HandlerConfig
from ipcd.errors import ExitCode, UsageError

NOW = datetime(2026, 11, 27, 14, 0, 0, tzinfo=UTC)
HANDLERS = (HandlerConfig("echo", 2, None), HandlerConfig("fail", 4, None))
DONE = {
    "timestamp": "2026-11-27T13:59:29.478043Z",
    "level": "info",
    "event": "job.done",
    "role": "worker",
    "pid": 27088,
    "job_id": "4d6813cc0c1e265a",
    "type": 2,
    "handler": "echo",
    "outcome": "ok",
    "ms": 0.2,
}


def event(**fields: object) -> dict[str, object]:
    return {**DONE, **fields}


# --- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("30s", timedelta(seconds=30)),
        ("10m", timedelta(minutes=10)),
        ("2h", timedelta(hours=2)),
        ("1.5h", timedelta(minutes=90)),
        ("1d", timedelta(days=1)),
        ("1w", timedelta(days=7)),
    ],
)
def test_since_relative(text: str, back: timedelta) -> None:
    """A duration means that long before now."""
    assert parse_since(text, NOW) == NOW - back


def test_since_absolute() -> None:
    """ISO-8601 times keep their offset; without one they are local time."""
    assert parse_since("2026-11-27T13:59:29Z", NOW) == datetime(
        2026, 11, 27, 13, 59, 29, tzinfo=UTC
    )
    plus_one = timezone(timedelta(hours=1))
    assert parse_since("2026-11-27T13:00:00+01:00", NOW) == datetime(
        2026, 11, 27, 12, 0, tzinfo=UTC
    )
    assert parse_since("2026-11-27 13:00", NOW) == datetime(2026, 11, 27, 13, 0).astimezone()
    assert parse_since("2026-11-27", NOW) == datetime(2026, 11, 27).astimezone()
    today = NOW.astimezone().date()
    assert (
        parse_since("13:05", NOW)
        == datetime.combine(today, datetime.strptime("13:05", "%H:%M").time()).astimezone()
    )
    assert parse_since("13:05+01:00", NOW).utcoffset() == plus_one.utcoffset(None)


@pytest.mark.parametrize("text", ["", "yesterday", "10", "5x", "-10m", "2026-13-01"])
def test_since_refuses_what_it_cannot_read(text: str) -> None:
    """A --since that is neither a duration nor an ISO time is a usage error."""
    with pytest.raises(UsageError, match="--since"):
        parse_since(text, NOW)


def test_count_and_level_options() -> None:
    """-n takes a count or 'all'; --level a level name (warn for warning)."""
    assert parse_count("5") == 5
    assert parse_count("0") == 0
    assert parse_count("all") is None
    for bad in ("-1", "ten"):
        with pytest.raises(UsageError):
            parse_count(bad)
    assert parse_level("WARN") == "warning"
    assert parse_level("error") == "error"
    with pytest.raises(UsageError, match="--level"):
        parse_level("fatal")


def test_type_selector() -> None:
    """A handler name also matches its type, a number also its configured handler's name,
    and an unknown name still matches by name."""
    assert type_selector("echo", HANDLERS) == ({2}, {"echo"})
    assert type_selector("4", HANDLERS) == ({4}, {"fail"})
    assert type_selector("0x2", HANDLERS) == ({2}, {"echo"})
    assert type_selector("99", HANDLERS) == ({99}, set())
    assert type_selector("retired", HANDLERS) == (set(), {"retired"})


def test_filter_conditions() -> None:
    """Each given condition must hold; values given for one condition are alternatives."""
    assert Filter().matches(DONE)
    assert Filter(jobs=frozenset({"4d6813cc0c1e265a", "other"})).matches(DONE)
    assert not Filter(jobs=frozenset({"other"})).matches(DONE)
    assert not Filter(jobs=frozenset({"4d6813cc0c1e265a"})).matches(event(job_id=None))
    # By number (a rejected job has no handler name) or by name.
    assert Filter(types=frozenset({2})).matches({"type": 2})
    assert Filter(handlers=frozenset({"echo"})).matches({"handler": "echo", "type": 9})
    assert not Filter(types=frozenset({4}), handlers=frozenset({"fail"})).matches(DONE)
    assert not Filter(types=frozenset({1})).matches({"type": True})
    both = Filter(jobs=frozenset({"4d6813cc0c1e265a"}), types=frozenset({4}))
    assert not both.matches(DONE)


def test_filter_level_and_since() -> None:
    """--level shows that level and worse; --since drops older and undated events."""
    warning = Filter(level="warning")
    levels = ("debug", "info", "warning", "error", "critical", "odd")
    assert [lv for lv in levels if warning.matches(event(level=lv))] == [
        "warning",
        "error",
        "critical",
        "odd",
    ]
    since = Filter(since=datetime(2026, 11, 27, 13, 59, 29, 478043, tzinfo=UTC))
    assert since.matches(DONE)
    assert not since.matches(event(timestamp="2026-11-27T13:59:29.478042Z"))
    assert not since.matches(event(timestamp="not a time"))
    assert not since.matches({"event": "x"})


def test_format_event_plain() -> None:
    """Time (reader's zone), level, event, then the fields in the log's order."""
    line = format_event(DONE, tz=UTC, today=date(2026, 11, 27))
    assert line == (
        "13:59:29.478 info     job.done  role=worker pid=27088 job_id=4d6813cc0c1e265a "
        "type=2 handler=echo outcome=ok ms=0.2"
    )
    other_day = format_event(DONE, tz=UTC, today=date(2026, 11, 28))
    assert other_day.startswith("2026-11-27 13:59:29.478 info ")
    in_plus_two = format_event(DONE, tz=timezone(timedelta(hours=2)), today=date(2026, 11, 27))
    assert in_plus_two.startswith("15:59:29.478 ")
    bare = {"timestamp": "?", "level": "info", "event": "daemon.stopped"}
    assert format_event(bare, tz=UTC, today=date(2026, 11, 27)) == "? info     daemon.stopped"


def test_format_values() -> None:
    """Words stay bare; anything a reader could misparse is written as JSON."""
    assert format_value("echo") == "echo"
    assert format_value("exited with status 0") == '"exited with status 0"'
    assert format_value("") == '""'
    assert format_value("a=b") == '"a=b"'
    assert format_value(None) == "null"
    assert format_value(True) == "true"
    assert format_value(0.25) == "0.25"
    assert format_value({"echo": 2}) == '{"echo":2}'
    assert format_value("naïve") == "naïve"


def test_format_exception() -> None:
    """A traceback from dict_tracebacks is shown below its event, indented."""
    crashed = {
        "timestamp": DONE["timestamp"],
        "level": "critical",
        "event": "worker.crashed",
        "exception": [
            {
                "exc_type": "ZeroDivisionError",
                "exc_value": "division by zero",
                "frames": [{"filename": "/x/h.py", "lineno": 3, "name": "run"}],
            }
        ],
    }
    assert format_event(crashed, tz=UTC, today=date(2026, 11, 27)).splitlines() == [
        "13:59:29.478 critical worker.crashed",
        '    File "/x/h.py", line 3, in run',
        "    ZeroDivisionError: division by zero",
    ]


def test_format_handler_traceback() -> None:
    """A handler's traceback (text with newlines) is shown as Python prints it, indented
    under its event, not as one line of \\n escapes; in colour, its last line is red."""
    text = (
        "Traceback (most recent call last):\n"
        '  File "/x/h.py", line 3, in run\n'
        "    return 1 / 0\n"
        "ZeroDivisionError: division by zero\n"
    )
    failed = event(level="error", event="handler.exception", traceback=text)
    del failed["outcome"], failed["ms"], failed["type"], failed["role"], failed["pid"]
    day = date(2026, 11, 27)
    assert format_event(failed, tz=UTC, today=day).splitlines() == [
        "13:59:29.478 error    handler.exception  job_id=4d6813cc0c1e265a handler=echo",
        "    Traceback (most recent call last):",
        '      File "/x/h.py", line 3, in run',
        "        return 1 / 0",
        "    ZeroDivisionError: division by zero",
    ]
    coloured = format_event(failed, color=True, tz=UTC, today=day).splitlines()
    assert coloured[-1] == "\x1b[31m    ZeroDivisionError: division by zero\x1b[0m"
    assert coloured[1] == "\x1b[2m    Traceback (most recent call last):\x1b[0m"
    # A traceback that is not text stays a field of its own.
    assert "traceback=42" in format_event(event(traceback=42), tz=UTC, today=day)


def test_logs_shows_a_handler_traceback_readably(instance: Instance) -> None:
    """ipcctl logs shows a crashed handler's traceback as indented lines under the
    handler.exception event; --json prints the log line as it is."""
    instance.write('[handlers.crash]\ntype = 9\ntarget = "ipcd_test_plugins:crash"\n')
    assert instance.ipcd("start").returncode == 0
    job_id = submit(instance, "crash", "x")
    shown = ipcctl_logs(instance, "--job", job_id)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if " handler.exception  " in line)
    assert "traceback=" not in lines[head] and "\\n" not in shown.stdout
    assert lines[head + 1] == "    Traceback (most recent call last):"
    block = lines[head + 1 : lines.index("    ZeroDivisionError: division by zero in a plugin") + 1]
    assert all(line.startswith("    ") for line in block)
    assert any(line.strip().startswith('File "') for line in block)
    raw = [line for line in instance.log_file.read_text().splitlines() if job_id in line]
    as_json = ipcctl_logs(instance, "--job", job_id, "--json")
    assert as_json.stdout.splitlines() == raw
    assert any('"traceback": "Traceback (most recent call last):\\n' in line for line in raw)


def test_format_event_colour() -> None:
    """In colour, errors are red and warnings yellow; without, no escape at all."""
    day = date(2026, 11, 27)
    assert "\x1b[31merror" in format_event(event(level="error"), color=True, tz=UTC, today=day)
    assert "\x1b[33mwarning" in format_event(event(level="warning"), color=True, tz=UTC, today=day)
    assert "\x1b[32minfo" in format_event(DONE, color=True, tz=UTC, today=day)
    failed = format_event(event(outcome="error"), color=True, tz=UTC, today=day)
    assert "outcome\x1b[0m=\x1b[31merror\x1b[0m" in failed
    assert "\x1b" not in format_event(event(level="error"), tz=UTC, today=day)


@pytest.mark.parametrize(
    ("mode", "tty", "env", "expected"),
    [
        ("auto", True, {"TERM": "xterm"}, True),
        ("auto", False, {"TERM": "xterm"}, False),
        ("auto", True, {"TERM": "xterm", "NO_COLOR": "1"}, False),
        ("auto", True, {"TERM": "xterm", "NO_COLOR": ""}, True),
        ("auto", True, {"TERM": "dumb"}, False),
        ("always", False, {"TERM": "dumb", "NO_COLOR": "1"}, True),
        ("never", True, {"TERM": "xterm"}, False),
    ],
)
def test_want_color(mode: str, tty: bool, env: dict[str, str], expected: bool) -> None:
    """--color auto colours a terminal unless NO_COLOR (non-empty) or TERM=dumb."""
    assert want_color(mode, tty, env) is expected


def test_printer_and_lines_that_are_not_json(tmp_path: Path) -> None:
    """A broken line is shown as it is, hidden by any filter, skipped and counted in JSON."""
    lines = [json.dumps(DONE).encode(), b"Traceback (most recent call last):", b"", b"[1, 2]"]
    out = tmp_path / "out"
    with out.open("w") as fh:
        printer = Printer(fh, tz=UTC)
        printer.write(printer.select(lines))
    shown = out.read_text().splitlines()
    assert shown[1:] == ["Traceback (most recent call last):", "[1, 2]"]
    with out.open("w") as fh:
        printer = Printer(fh, Filter(level="debug"), tz=UTC)
        printer.write(printer.select(lines))
    assert len(out.read_text().splitlines()) == 1
    with out.open("w") as fh:
        printer = Printer(fh, json=True)
        printer.write(printer.select(lines))
    assert out.read_text() == json.dumps(DONE) + "\n"
    assert printer.skipped == 2


def test_follower_rotation_and_truncation(tmp_path: Path) -> None:
    """The follower waits for unfinished lines, reads the end of a rotated-away file and
    then the new one, and starts over after a truncation."""
    log = tmp_path / "ipcd.log"
    notices: list[str] = []
    with Follower(log, notice=notices.append, drain=3600) as follower:
        assert list(follower.start()) == []
        assert notices == [f"waiting for {log} to appear"]
        with log.open("a") as fh:
            fh.write("one\ntw")
        assert follower.poll() == [b"one"]
        with log.open("a") as fh:
            fh.write("o\n")
        assert follower.poll() == [b"two"]
        rotated = tmp_path / "ipcd.log.1"
        log.rename(rotated)
        with rotated.open("a") as fh:  # a writer that has not reopened yet
            fh.write("three\n")
        assert follower.poll() == [b"three"]
        log.write_text("four\n")
        assert follower.poll() == [b"four"]
        with rotated.open("a") as fh:  # an old worker, still writing to the old file
            fh.write("five\n")
        assert follower.poll() == [b"five"]
        with log.open("r+") as fh:
            fh.truncate(0)
        with log.open("a") as fh:
            fh.write("six\n")
        assert follower.poll() == [b"six"]
        assert notices[1:] == [
            f"{log} has appeared; following it",
            f"{log} has been moved away; waiting for a new one",
            f"{log} has appeared; following it",
            f"{log}: file truncated",
        ]
        assert follower.close() == []


@pytest.mark.parametrize("block", [1, 3, 7, 64, 65536])
@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b"one\ntwo\n", b"one\ntwo", b"\n\nx\n", b"a" * 200 + b"\nb\n" + b"c" * 150],
)
def test_lines_backward(tmp_path: Path, data: bytes, block: int) -> None:
    """Read backwards in blocks of any size, the lines come out whole, last first, with
    what follows the last newline first of all."""
    log = tmp_path / "ipcd.log"
    log.write_bytes(data)
    with log.open("rb") as fh:
        got = list(lines_backward(fh.fileno(), len(data), block))
        assert fh.tell() == 0  # pread: the offset is the caller's
    assert got == list(reversed(data.split(b"\n")))


def test_last_lines_stop_reading_at_the_nth_match(tmp_path: Path) -> None:
    """-n N reads back from the end only until N lines matched; with --job the lines of
    other jobs are not even parsed (a line without the id is not looked at)."""
    lines = [json.dumps(event(job_id=f"job{i}")).encode() for i in range(1000)]
    drawn = 0

    def counted(source: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal drawn
        for line in source:
            drawn += 1
            yield line

    out = tmp_path / "out"
    log = tmp_path / "ipcd.log"
    log.write_bytes(b"\n".join(lines) + b"\n")
    with out.open("w") as fh, log.open("rb") as src:
        printer = Printer(fh, json=True)
        backward = counted(lines_backward(src.fileno(), log.stat().st_size))
        shown = [text for text, _ in last_shown(printer, backward, 2)]
    assert shown == [lines[-2].decode(), lines[-1].decode()]
    assert drawn == 3  # the empty text after the last newline, then two lines

    only = Filter(jobs=frozenset({"job7"}))
    assert only.may_match(lines[7]) and not only.may_match(lines[8])
    assert only.may_match(b"job7 is not JSON") and not only.may_match(b"not JSON")
    assert Filter(jobs=frozenset({'a"b'})).may_match(b"anything")  # escaped in JSON: parse
    assert Filter().may_match(b"anything")
    with out.open("w") as fh:
        printer = Printer(fh, only, json=True)
        printer.write(printer.select([*lines, b"not JSON", b"job7 but not JSON"]))
    assert out.read_text() == lines[7].decode() + "\n"
    assert printer.skipped == 1


def test_logs_tail_of_a_huge_log_reads_only_its_end(instance: Instance) -> None:
    """logs -n 2 on a log of 4 GiB (a hole, then events) under a 1 GiB address-space
    limit: reading the whole file could not even be tried; reading back from the end is
    one block."""
    with instance.log_file.open("wb") as fh:
        fh.truncate(4 << 30)
        fh.seek(4 << 30)
        for i in range(5):
            fh.write(json.dumps(event(job_id=f"job{i}")).encode() + b"\n")

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = instance.ipcctl("logs", "-n", "2", "--json", preexec_fn=limit)
    assert done.returncode == 0, done.stderr
    assert [e["job_id"] for e in json_lines(done.stdout)] == ["job3", "job4"]
    notices: list[str] = []
    with Follower(instance.log_file, notice=notices.append) as follower:
        backward = follower.start(backward=True)
        assert json.loads(next(backward))["job_id"] == "job4"
        with instance.log_file.open("ab") as fh:
            fh.write(b"six\n")
        assert follower.poll() == [b"six"]  # on from the end, whatever was read of the rest


def _reader_at_end(path: Path) -> bool:
    """Whether this process has ``path`` open with its offset at the file's end."""
    size = path.stat().st_size
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        if re.search(rf"^pos:\s+{size}$", info, re.M):
            return True
    return False


def test_job_lines_read_only_what_is_added_while_waiting(tmp_path: Path) -> None:
    """result --log waiting for job.done reads the log once, then only its new end: an
    event that was read stays read even if the part of the file it was in changes."""
    log = tmp_path / "ipcd.log"
    started = json.dumps(event(event="job.started", job_id="jobA")).encode()
    log.write_bytes(started + b"\n")
    found: queue.Queue[list[bytes]] = queue.Queue()
    reader = threading.Thread(
        target=lambda: found.put(job_lines(log, "jobA", finished=True, wait=30))
    )
    reader.start()
    deadline = time.monotonic() + 10
    while not _reader_at_end(log) and time.monotonic() < deadline:
        time.sleep(0.01)
    with log.open("r+b") as fh:  # the first line now names another job, same length
        fh.write(started.replace(b"jobA", b"jobB"))
    finished = json.dumps(event(job_id="jobA")).encode()
    with log.open("ab") as fh:
        fh.write(finished + b"\n")
    reader.join(timeout=30)
    assert found.get(timeout=1) == [started, finished]


# --- ipcctl logs against a daemon ---------------------------------------------------------


def ipcctl_logs(inst: Instance, *args: str) -> subprocess.CompletedProcess[str]:
    return inst.ipcctl("logs", "--color", "never", *args)


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def submit(inst: Instance, *args: str) -> str:
    """Submit a job, wait for its job.done in the log and return its id."""
    done = inst.ipcctl("submit", *args)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    found = inst.wait_events(lambda e: e["event"] == "job.done" and e["job_id"] == job_id, 1)
    assert found, f"no job.done for {job_id}"
    return job_id


def test_logs_by_job_and_type(daemon: Instance) -> None:
    """--job and --type select a job's and a handler's events, in readable form."""
    echo_id = submit(daemon, "echo", "hello")
    fail_id = submit(daemon, "fail", "boom")
    by_job = ipcctl_logs(daemon, "--job", echo_id)
    assert by_job.returncode == 0, by_job.stderr
    lines = by_job.stdout.splitlines()
    assert lines and all(f"job_id={echo_id}" in line for line in lines)
    assert any(" info     job.done  " in line and "outcome=ok" in line for line in lines)
    for selector in ("fail", "4"):
        by_type = ipcctl_logs(daemon, "--type", selector, "--json")
        assert by_type.returncode == 0, by_type.stderr
        events = json_lines(by_type.stdout)
        assert {e["job_id"] for e in events} == {fail_id}
        assert all(e["handler"] == "fail" or e["type"] == 4 for e in events)
    both = ipcctl_logs(daemon, "--job", echo_id, "--job", fail_id, "--json")
    assert {e["job_id"] for e in json_lines(both.stdout)} == {echo_id, fail_id}
    nothing = ipcctl_logs(daemon, "--job", echo_id, "--type", "fail")
    assert (nothing.returncode, nothing.stdout) == (0, "")


def test_logs_json_is_the_raw_lines(daemon: Instance) -> None:
    """--json prints the matching lines exactly as the log holds them, and -n the last N."""
    submit(daemon, "echo", "one")
    submit(daemon, "echo", "two")
    raw = daemon.log_file.read_text().splitlines()
    everything = ipcctl_logs(daemon, "--json")
    assert everything.stdout.splitlines() == raw
    last_two = ipcctl_logs(daemon, "--json", "-n", "2")
    assert last_two.stdout.splitlines() == raw[-2:]
    readable = ipcctl_logs(daemon, "-n", str(len(raw)))
    stamp = re.compile(r"(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d\.\d{3} (debug|info|warning) ")
    assert len(readable.stdout.splitlines()) == len(raw)
    assert all(stamp.match(line) for line in readable.stdout.splitlines())


def test_logs_level(daemon: Instance) -> None:
    """--level warning shows a job killed at its timeout, and nothing below warning."""
    killed = daemon.ipcctl("submit", "sleep", "5", "--timeout-job", "0.3", "--wait")
    assert killed.returncode == ExitCode.JOB_FAILED, killed.stderr
    daemon.wait_events(lambda e: e["event"] == "job.done", 1)
    warnings = ipcctl_logs(daemon, "--level", "warning", "--json")
    events = json_lines(warnings.stdout)
    assert "job.timeout" in {e["event"] for e in events}
    assert {e["level"] for e in events} <= {"warning", "error", "critical"}
    everything = json_lines(ipcctl_logs(daemon, "--level", "debug", "--json").stdout)
    assert len(everything) > len(events)
    bad = ipcctl_logs(daemon, "--level", "loud")
    assert bad.returncode == ExitCode.USAGE
    assert "--level 'loud'" in bad.stderr


def test_logs_since(daemon: Instance) -> None:
    """--since with an ISO time keeps only later events; a duration reaches back."""
    first = submit(daemon, "echo", "first")
    cutoff = datetime.now(UTC)
    second = submit(daemon, "echo", "second")
    later = json_lines(ipcctl_logs(daemon, "--since", cutoff.isoformat(), "--json").stdout)
    done = {e["job_id"] for e in later if e["event"] == "job.done"}
    assert done == {second}
    assert all(datetime.fromisoformat(str(e["timestamp"])) >= cutoff for e in later)
    hour = json_lines(ipcctl_logs(daemon, "--since", "1h", "--json").stdout)
    assert {first, second} <= {e.get("job_id") for e in hour}
    future = ipcctl_logs(daemon, "--since", (cutoff + timedelta(days=1)).isoformat())
    assert (future.returncode, future.stdout) == (0, "")
    bad = ipcctl_logs(daemon, "--since", "last tuesday")
    assert bad.returncode == ExitCode.USAGE


def test_logs_relative_since_and_broken_lines(instance: Instance) -> None:
    """Without a daemon: relative --since against old events, and lines that are not JSON."""
    now = datetime.now(UTC)
    old = event(timestamp=(now - timedelta(days=2)).isoformat(), job_id="old")
    new = event(timestamp=(now - timedelta(minutes=5)).isoformat(), job_id="new")
    instance.log_file.write_text(
        f"{json.dumps(old)}\nnot json at all\n{json.dumps(new)}\n" + '{"timestamp": "2026'
    )
    day = json_lines(ipcctl_logs(instance, "--since", "1d", "--json").stdout)
    assert [e["job_id"] for e in day] == ["new"]
    assert [
        e["job_id"] for e in json_lines(ipcctl_logs(instance, "--since", "3d", "--json").stdout)
    ] == ["old", "new"]
    plain = ipcctl_logs(instance)
    assert plain.returncode == 0
    assert plain.stdout.splitlines()[1] == "not json at all"
    assert plain.stdout.splitlines()[3] == '{"timestamp": "2026'
    as_json = ipcctl_logs(instance, "--json")
    assert len(as_json.stdout.splitlines()) == 2
    assert "skipped 2 lines that are not JSON objects" in as_json.stderr


def test_logs_without_a_log(instance: Instance) -> None:
    """No log file yet: 66; no [log] file in the configuration: 78."""
    missing = ipcctl_logs(instance)
    assert missing.returncode == ExitCode.NO_RESULT
    assert f"log file {instance.log_file} does not exist" in missing.stderr
    config = instance.config_path.read_text().replace('file = "ipcd.log"\n', "")
    instance.config_path.write_text(config)
    unset = ipcctl_logs(instance)
    assert unset.returncode == ExitCode.CONFIG
    assert "no [log] file is configured" in unset.stderr


def test_logs_does_not_import_structlog(instance: Instance) -> None:
    """ipcctl logs stays on the lean client path: no structlog, no daemon modules."""
    instance.log_file.write_text(json.dumps(DONE) + "\n")
    code = (
        "import sys\n"
        "from ipcd.cli import ipcctl\n"
        f"assert ipcctl.main(['-c', {str(instance.config_path)!r}, 'logs']) == 0\n"
        "heavy = {'structlog', 'daemon', 'ipcd.daemon', 'ipcd.daemon.log', "
        "'ipcd.daemon.worker', 'ipcd.daemon.arbiter'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


# --- following ----------------------------------------------------------------------------


class Lines:
    """A running ``ipcctl logs -f``'s stdout, line by line, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._queue: queue.Queue[str] = queue.Queue()
        self._stopped: tuple[int, str] | None = None
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def stop(self) -> tuple[int, str]:
        """Interrupt it as Ctrl-C would; its exit status and what it said on stderr."""
        if self._stopped is not None:
            return self._stopped
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._thread.join(timeout=10)
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self.proc.stdout.close()
            stderr = self.proc.stderr.read()
            self.proc.stderr.close()
        self._stopped = code, stderr
        return self._stopped

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._queue.put(line)

    def next(self, timeout: float = 20.0) -> dict[str, object]:
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("no line from logs -f")
        event: dict[str, object] = json.loads(line)
        return event

    def until(self, job_id: str, timeout: float = 20.0) -> list[dict[str, object]]:
        """Events read up to the job.done of ``job_id``; fails after ``timeout`` s."""
        seen: list[dict[str, object]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"no job.done for {job_id} from logs -f; saw {seen}")
            seen.append(json.loads(line))
            if seen[-1]["event"] == "job.done" and seen[-1].get("job_id") == job_id:
                return seen


@pytest.fixture
def follow(daemon: Instance) -> Iterator[Lines]:
    proc = subprocess.Popen(
        [IPCCTL, "-c", str(daemon.config_path), "logs", "-f", "-n", "1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(TESTS / "plugins")},
    )
    lines = Lines(proc)
    lines.next()  # the last event before it started: it is following now
    yield lines
    lines.stop()


def test_follow_across_rotations(daemon: Instance, follow: Lines) -> None:
    """logs -f shows new jobs' events, also after the log is renamed away and the daemon
    reopens it, after jobs logged in between, and after a copytruncate."""
    first = daemon.ipcctl("submit", "echo", "one").stdout.strip()
    follow.until(first)
    daemon.log_file.rename(daemon.dir / "ipcd.log.1")
    between = daemon.ipcctl("submit", "echo", "between").stdout.strip()
    follow.until(between)  # written to the renamed file: the daemon has not reopened yet
    assert daemon.ipcd("reload").returncode == 0
    daemon.wait_events(lambda e: e["event"] == "daemon.reloaded", 1)
    after = daemon.ipcctl("submit", "echo", "after").stdout.strip()
    events = follow.until(after)
    assert "daemon.reloaded" in {e["event"] for e in events}
    # copytruncate: the events of one job are far shorter than what the follower has
    # read, so the file is still shorter than that when it looks again.
    shutil.copy(daemon.log_file, daemon.dir / "ipcd.log.2")
    with daemon.log_file.open("r+") as fh:
        fh.truncate(0)
    truncated = daemon.ipcctl("submit", "echo", "truncated").stdout.strip()
    follow.until(truncated)
    code, notes = follow.stop()
    assert code == 130
    assert f"{daemon.log_file} has appeared; following it" in notes
    assert f"{daemon.log_file}: file truncated" in notes


def test_follow_waits_for_the_file(instance: Instance) -> None:
    """logs -f on a log that does not exist yet waits for it and then shows its events."""
    proc = subprocess.Popen(
        [IPCCTL, "-c", str(instance.config_path), "logs", "-f", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = Lines(proc)
    try:
        assert proc.stderr is not None
        waiting = proc.stderr.readline()
        assert waiting == f"ipcctl: waiting for {instance.log_file} to appear\n"
        instance.log_file.write_text(json.dumps(DONE) + "\n")
        assert lines.until(str(DONE["job_id"])) == [DONE]
    finally:
        code, notes = lines.stop()
    assert code == 130
    assert notes == f"ipcctl: {instance.log_file} has appeared; following it\n"


# --- colour on a terminal ----------------------------------------------------------------


def on_pty(inst: Instance, *args: str, **env: str) -> str:
    """What ``ipcctl logs`` writes to a pseudo-terminal."""
    master, slave = pty.openpty()
    environ = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    proc = subprocess.Popen(
        [IPCCTL, "-c", str(inst.config_path), "logs", *args],
        stdout=slave,
        stderr=subprocess.DEVNULL,
        env={**environ, "TERM": "xterm", **env},
    )
    os.close(slave)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:  # EIO: the last writer closed the terminal
            assert exc.errno == errno.EIO
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=30) == 0
    return b"".join(chunks).decode()


def test_colour_on_a_terminal_only(daemon: Instance) -> None:
    """Colour on a terminal; plain in a pipe, with NO_COLOR or TERM=dumb; --color forces."""
    fail_id = submit(daemon, "fail", "boom")
    coloured = on_pty(daemon, "--job", fail_id)
    assert "\x1b[32minfo" in coloured
    assert "\x1b[31merror\x1b[0m" in coloured  # outcome=error
    assert "\x1b[" not in on_pty(daemon, "--job", fail_id, NO_COLOR="1")
    assert "\x1b[" not in on_pty(daemon, "--job", fail_id, TERM="dumb")
    assert "\x1b[" not in on_pty(daemon, "--job", fail_id, "--color", "never")
    piped = daemon.ipcctl("logs", "--job", fail_id)
    assert "job.done" in piped.stdout and "\x1b[" not in piped.stdout
    forced = daemon.ipcctl("logs", "--job", fail_id, "--color", "always")
    assert "\x1b[32minfo" in forced.stdout


# --- ipcctl result --log ------------------------------------------------------------------


def test_result_log(daemon: Instance) -> None:
    """result --log prints the result, then the job's events; for a failed job the events
    and the failure, with the result's exit status."""
    job_id = submit(daemon, "echo", "hello")
    shown = daemon.ipcctl("result", job_id, "--log", "--color", "never")
    assert shown.returncode == 0, shown.stderr
    first, *events = shown.stdout.splitlines()
    assert first == "hello"
    assert events and all(f"job_id={job_id}" in line for line in events)
    assert any("job.done" in line for line in events)

    failed_id = daemon.ipcctl("submit", "fail", "boom").stdout.strip()
    failed = daemon.ipcctl("result", failed_id, "--wait", "--log", "--json")
    assert failed.returncode == ExitCode.JOB_FAILED
    result, *rest = json_lines(failed.stdout)
    assert (result["id"], result["status"]) == (failed_id, "error")
    assert [e["event"] for e in rest][-1] == "job.done"
    assert rest[-1]["outcome"] == "error"

    unknown = daemon.ipcctl("result", "0123456789abcdef", "--log")
    assert (unknown.returncode, unknown.stdout) == (ExitCode.NO_RESULT, "")
