"""The wordcount handler, run with ipcd.testing as a worker would run it."""

from __future__ import annotations

from ipcd_example.text import wordcount

from ipcd.testing import run_handler


def test_counts_text() -> None:
    """Text payloads are counted, and the most frequent words come first, case folded."""
    run = run_handler(wordcount, "The cat saw the dog.\nThe end\n")
    assert run.output == {
        "lines": 2,
        "words": 7,
        "chars": 29,
        "top": [["the", 3], ["cat", 1], ["saw", 1], ["dog", 1], ["end", 1]],
    }


def test_object_payload_with_top() -> None:
    """``{"text": ..., "top": N}`` limits the list of frequent words."""
    run = run_handler(wordcount, {"text": "a b a c a b", "top": 2})
    assert run.output == {"lines": 1, "words": 6, "chars": 11, "top": [["a", 3], ["b", 2]]}


def test_utf8_bytes_are_text() -> None:
    """Bytes from ``ipcctl submit wordcount - < file`` that are UTF-8 are counted as text."""
    run = run_handler(wordcount, "naïve café".encode())
    assert run.output == {"lines": 1, "words": 2, "chars": 10, "top": [["naïve", 1], ["café", 1]]}


def test_binary_payload_fails_the_job() -> None:
    """Bytes that are not UTF-8 fail the job with a message, not a traceback."""
    run = run_handler(wordcount, b"\xff\xfe\x00")
    assert not run.ok
    assert run.error == "wordcount needs UTF-8 text, not binary data"
    assert run.logged("handler.exception") == []


def test_bad_top_fails_the_job() -> None:
    """A ``top`` that is not a small integer fails the job."""
    for top in (-1, 51, "3", True):
        run = run_handler(wordcount, {"text": "x", "top": top})
        assert run.error == "top must be an integer from 0 to 50", top


def test_logs_one_event() -> None:
    """The handler logs what it counted, with the job's id."""
    run = run_handler(wordcount, "one two two", job_id="wc1")
    assert run.logged("wordcount.counted") == [
        {"event": "wordcount.counted", "log_level": "info", "job_id": "wc1", "words": 3,
         "distinct": 2},
    ]  # fmt: skip
