"""The control socket's protocol (ipcd.wire.control) as pure functions of bytes."""

from __future__ import annotations

import json

import pytest

from ipcd.errors import ControlError, ExitCode, UsageError
from ipcd.store.model import FINAL, WAITING, JobRecord, State
from ipcd.wire import control as wire
from ipcd.wire.control import JobInfo, Request

JOB = JobInfo(
    "j1", 2, "echo", "done", 1, 0, None, 1.0, 2.0, 0.0, 3.0, 4.0, 99, 0, None, None, False,
    2, "hi", 1234, None, 1, 2,
)  # fmt: skip


def test_requests_round_trip() -> None:
    """Each op's request encodes to one line of its own fields and decodes back."""
    for request in (
        Request("list", states=("queued",), types=(2, 3), unique="k", limit=7),
        Request("show", id="j1"),
        Request("cancel", ids=("a", "b"), kill=True),
        Request("cancel", types=(2,), states=("scheduled",)),
        Request("purge", states=("done", "failed"), older_than=3600.0),
        Request("counts"),
    ):
        line = wire.encode_request(request)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert set(json.loads(line)) == {"op", *wire.FIELDS[request.op]}
        assert wire.decode_request(line) == request


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (Request("retry", id=""), "is not a job id"),
        (Request("cancel", ids=("x" * 17,)), "is not a job id"),
        (Request("cancel"), "cancel needs job ids or types"),
        (Request("cancel", ids=("a",), states=("running",)), "is not one of queued, scheduled"),
        (Request("purge"), "purge needs states"),
        (Request("list", states=("lost",)), "state 'lost' is not one of"),
        (Request("list", types=(0,)), "out of range"),
        (Request("failed", limit=0), "limit 0 is out of range"),
        (Request("purge", states=("done",), older_than=-1.0), "must be a finite number"),
        (Request("cancel", ids=tuple(f"{n:016x}" for n in range(4000))), "over 65536 bytes"),
    ],
)
def test_bad_requests_are_usage_errors(request_: Request, problem: str) -> None:
    """A request the daemon could not carry out is refused before it is sent."""
    with pytest.raises(UsageError, match=problem):
        wire.encode_request(request_)


def test_field_types_are_checked() -> None:
    """Wrong JSON types are named by field, booleans are not integers."""
    for line, problem in (
        (b'{"op": "list", "types": [true]}', "'types' must be a list of integers"),
        (b'{"op": "cancel", "ids": "j1"}', "'ids' must be a list of strings"),
        (b'{"op": "cancel", "ids": ["j1"], "kill": 1}', "'kill' must be true or false"),
        (b'{"op": "purge", "states": ["done"], "older_than": "1h"}', "'older_than' must be"),
        (b"[1]", "not a JSON object"),
        (b"\xff", "not a JSON line"),
    ):
        with pytest.raises(UsageError, match=problem):
            wire.decode_request(line)


def test_answers() -> None:
    """An ok answer gives its fields; an error answer raises with its status; an answer
    that is not one raises ControlError 70."""
    assert wire.decode_answer(wire.encode_answer({"purged": 3}))["purged"] == 3
    with pytest.raises(ControlError) as raised:
        wire.decode_answer(wire.encode_error("no job x", 66))
    assert (str(raised.value), raised.value.status, raised.value.exit_code) == (
        "no job x", 66, ExitCode.NO_RESULT,
    )  # fmt: skip
    assert raised.value.holder is None
    with pytest.raises(ControlError) as raised:  # a held unique key names its holder
        wire.decode_answer(wire.encode_error("already queued", 4, ("job9", "nightly")))
    assert (raised.value.status, raised.value.holder) == (4, ("job9", "nightly"))
    assert ControlError("store broke", 74).status == 74
    for raw in (b"", b"{}", b'{"ok": false}', b"[]"):
        with pytest.raises(ControlError) as raised:
            wire.decode_answer(raw)
        assert raised.value.exit_code == ExitCode.SOFTWARE


def test_records_and_results_round_trip() -> None:
    """A record crosses as a dict of its fields (a state enum as its value); result data
    as base64; a record with a field of the wrong type is refused."""

    class Stateful:
        value = "done"

    doc = wire.job_to_dict(JOB._replace(state=Stateful()))  # type: ignore[arg-type]
    assert wire.job_from_dict(json.loads(json.dumps(doc))) == JOB
    with pytest.raises(ControlError, match="bad 'attempts'"):
        wire.job_from_dict({**doc, "attempts": "1"})
    with pytest.raises(ControlError, match="bad 'started'"):
        wire.job_from_dict({**doc, "started": float("nan")})
    stored = wire.result_to_dict((0, b"\x00\xff"))
    assert wire.result_from_dict(json.loads(json.dumps(stored))) == (0, b"\x00\xff")
    assert wire.result_from_dict(None) is None
    assert wire.paused_from({"paused": wire.paused_to_list({3: 5.0, 0: 1.0})}) == {0: 1.0, 3: 5.0}


def test_states_and_fields_are_the_stores() -> None:
    """The wire's state names and record fields (kept apart so that the client never
    loads the store) are the store's, and so are the waiting and final sets."""
    assert tuple(s.value for s in State) == wire.STATES
    assert set(wire.WAITING) == {s.value for s in WAITING}
    assert set(wire.FINAL) == {s.value for s in FINAL}
    assert JobRecord._fields == JobInfo._fields  # a record crosses the socket field by field
