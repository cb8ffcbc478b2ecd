"""The compress handler, run with ipcd.testing as a worker would run it."""

from __future__ import annotations

import gzip
from pathlib import Path

from ipcd_example.files import compress

from ipcd.handlers import Payload
from ipcd.testing import run_handler


def test_compresses_and_removes_the_original(tmp_path: Path) -> None:
    """The file is replaced by FILE.gz, and the output says where it is and how big."""
    source = tmp_path / "app.log"
    source.write_text("a line\n" * 1000)
    run = run_handler(compress, {"path": str(source)})
    target = tmp_path / "app.log.gz"
    assert run.output == {"path": str(target), "bytes_in": 7000, "bytes_out": target.stat().st_size}
    assert gzip.decompress(target.read_bytes()) == b"a line\n" * 1000
    assert not source.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.log.gz"]  # no temporary file
    assert [e["event"] for e in run.events] == ["compress.done"]


def test_keep(tmp_path: Path) -> None:
    """``"keep": true`` keeps the original."""
    source = tmp_path / "data.csv"
    source.write_text("1,2\n")
    assert run_handler(compress, {"path": str(source), "keep": True, "level": 9}).ok
    assert source.read_text() == "1,2\n"


def test_running_twice_is_harmless(tmp_path: Path) -> None:
    """A second run of the same job (at-least-once delivery) finds the work done."""
    source = tmp_path / "app.log"
    source.write_text("x")
    assert run_handler(compress, {"path": str(source)}, job_id="job1").ok
    again = run_handler(compress, {"path": str(source)}, job_id="job1", attempt=2)
    assert again.job.attempt == 2
    target = tmp_path / "app.log.gz"
    assert again.output == {
        "path": str(target),
        "bytes_in": None,
        "bytes_out": target.stat().st_size,
    }
    assert [e["event"] for e in again.events] == ["compress.already_done"]


def test_file_being_written_is_retried(tmp_path: Path) -> None:
    """While FILE.lock exists the handler asks for a retry in 10 s, and stores no result."""
    source = tmp_path / "app.log"
    source.write_text("x")
    (tmp_path / "app.log.lock").touch()
    run = run_handler(compress, {"path": str(source)})
    assert run.result is None
    assert run.retry is not None
    assert (run.retry.reason, run.retry.delay) == (f"{source} is still being written", 10.0)
    assert source.exists()


def test_missing_file_and_bad_payloads_fail(tmp_path: Path) -> None:
    """Jobs that can never succeed fail at once, with a message for the submitter."""
    cases: list[tuple[Payload, str]] = [
        ({"path": str(tmp_path / "nothing")}, f"no such file: {tmp_path / 'nothing'}"),
        ({"path": "relative.log"}, "path must be absolute: relative.log"),
        ("/var/log/app.log", 'compress needs {"path": "/absolute/file"}'),
        ({"path": str(tmp_path), "level": 0}, "level must be an integer from 1 to 9"),
    ]
    for payload, error in cases:
        run = run_handler(compress, payload)
        assert (run.ok, run.error) == (False, error)


def test_unexpected_error_fails_the_job_with_a_traceback_in_the_log(tmp_path: Path) -> None:
    """Any other exception (here: the path is a directory) fails the job as the worker
    would, with the exception's type in the error and its traceback logged."""
    run = run_handler(compress, {"path": str(tmp_path)}, name="compress")
    assert run.error.startswith("IsADirectoryError: ")
    (event,) = run.logged("handler.exception")
    assert event["handler"] == "compress"
    assert "IsADirectoryError" in event["traceback"]
