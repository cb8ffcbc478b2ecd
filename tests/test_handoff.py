"""The hand-off message's header (ipcd.wire.handoff), which a worker writes for every job."""

from __future__ import annotations

import json

import pytest

from ipcd.wire import handoff


@pytest.mark.parametrize("job_id", ["a", "job1", "0123456789abcdef", "A-b_c.9"])
@pytest.mark.parametrize("attempt", [0, 1, 65535, 2**70])
@pytest.mark.parametrize("in_store", [False, True])
def test_the_header_is_the_compact_json_that_json_dumps_writes(
    job_id: str, attempt: int, in_store: bool
) -> None:
    """The header written out by hand has exactly json.dumps's bytes, in_store or not."""
    doc: dict[str, object] = {"id": job_id, "attempt": attempt}
    if in_store:
        doc["in_store"] = True
    expected = handoff.MAGIC + json.dumps(doc, separators=(",", ":")).encode()
    assert handoff._header(job_id, attempt, in_store=in_store) == expected


def test_an_id_that_is_no_job_id_is_still_escaped_as_json() -> None:
    """An id with characters JSON escapes (never a store's) still round-trips as JSON."""
    head = handoff._header('a"b\\ü', 2, in_store=False)
    assert json.loads(head[len(handoff.MAGIC) :]) == {"id": 'a"b\\ü', "attempt": 2}


def test_a_message_decodes_to_what_was_encoded() -> None:
    """encode and decode agree, inline and by reference."""
    assert handoff.decode(handoff.encode("job1", 3, b"body", 100)) == ("job1", 3, b"body")
    assert handoff.decode(handoff.encode("job1", 3, b"x" * 100, 50)) == ("job1", 3, None)
