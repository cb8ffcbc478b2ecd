"""ipcd.wire.split: the job store's form of a job whose payload came in a segment."""

from __future__ import annotations

import pytest

from ipcd.errors import MessageError
from ipcd.wire import protocol, split
from ipcd.wire.protocol import SpillRef


def _body(data: bytes, kind: str = "bytes", size: int | None = None) -> bytes:
    ref = SpillRef(123, len(data) if size is None else size, 4, kind)
    envelope = protocol.encode(None, job_id="J1", reply_to=77, unique="u", spill=ref)
    return split.head(envelope) + data


@pytest.mark.parametrize(
    ("data", "kind", "payload"),
    [
        (b"\n\0\xff" * 1000, "bytes", b"\n\0\xff" * 1000),
        ("zwölf\n".encode() * 100, "text", "zwölf\n" * 100),
        (b'{"a": [1, 2.5, "x"]}', "json", {"a": [1, 2.5, "x"]}),
    ],
)
def test_split_body_decodes_to_the_payload_without_its_segment(
    data: bytes, kind: str, payload: object
) -> None:
    """The payload is the tail, read as its kind; the envelope's members are kept and the
    job names no segment (the one it came in is gone)."""
    job = split.decode(_body(data, kind), 5)
    assert (job.id, job.type, job.reply_to, job.unique, job.spill) == ("J1", 5, 77, "u", None)
    assert job.payload == payload
    assert type(job.payload) is type(payload)


def test_an_envelope_that_is_not_split_decodes_as_before() -> None:
    """A body the intake did not split is protocol.decode's."""
    body = protocol.encode(b"\0abc", job_id="J2")
    job = split.decode(body, 5)
    assert (job.id, job.payload, job.spill) == ("J2", b"\0abc", None)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (_body(b"abc", size=4), "3 bytes, not 4"),
        (_body(b"\xff\xfe", "text"), "not valid text"),
        (_body(b"{nope", "json"), "not valid json"),
        (split.MAGIC + b'{"ipcd":1,"id":"J1"}', "without the length of its envelope"),
        (split.MAGIC + b'99\n{"ipcd":1,"id":"J1"}\nx', "without the end of its envelope"),
        (split.head(protocol.encode(b"x", job_id="J1")) + b"x", "names no payload size"),
    ],
)
def test_a_damaged_split_body_is_refused_with_its_job_id(body: bytes, why: str) -> None:
    """What cannot be the job is a MessageError naming why (and the job, when known)."""
    with pytest.raises(MessageError, match=why) as raised:
        split.decode(body, 5)
    if "of its envelope" not in why:
        assert raised.value.job_id == "J1"


def test_an_envelope_with_newlines_of_its_own_is_split_by_its_length() -> None:
    """An envelope is any JSON object: one pretty-printed (newlines between its members)
    ends where the head's length says, not at its first newline."""
    spill = b'{"shmid": 1, "size": 2, "slot": 0, "kind": "text"}'
    envelope = b'{\n "ipcd": 1,\n "id": "J3",\n "spill": ' + spill + b"\n}"
    body = split.head(envelope) + b"\nx"
    assert split.parts(body) == (envelope, b"\nx")
    assert split.envelope(body) == envelope
    job = split.decode(body, 5)
    assert (job.id, job.payload, job.spill) == ("J3", "\nx", None)
