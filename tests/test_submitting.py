"""Tests of ipcd.wire.submitting: counted job ids stay unique and in the documented
format, and the envelope template is byte for byte the general encoder's envelope."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipcd.errors import PayloadError
from ipcd.wire import protocol
from ipcd.wire.submitting import JobIds

JOB_ID_FORMAT = re.compile(r"[0-9a-f]{16}\Z")

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
_payloads = _json_values | st.binary() | st.binary().map(bytearray)


@given(
    _payloads,
    st.integers(min_value=1, max_value=2**31 - 1),
    st.booleans(),
    st.booleans(),
    st.floats(min_value=0, max_value=1e10),
)
def test_template_is_the_general_envelope_byte_for_byte(
    payload: Any, pid: int, reply: bool, confirm: bool, submitted: float
) -> None:
    """For any payload, PID, reply and confirm flag and time, the template's envelope is
    the bytes protocol.encode makes with the same fields."""
    template = protocol.template(pid, reply=reply, confirm=confirm)
    job_id = JobIds()(pid)
    expected = protocol.encode(
        payload, job_id=job_id, submitted=submitted, pid=pid,
        reply_to=pid if reply else None, confirm=pid if confirm else None,
    )  # fmt: skip
    assert template.encode(payload, job_id, submitted) == expected


@pytest.mark.parametrize("payload", ["\ud800", float("nan"), {1j: 1}, object()])
def test_template_refuses_what_the_general_encoder_refuses(payload: Any) -> None:
    """A payload with no JSON form (a lone surrogate, NaN, an object) raises PayloadError
    from the template too."""
    template = protocol.template(1234, reply=True, confirm=False)
    with pytest.raises(PayloadError):
        protocol.encode(payload, job_id="a", pid=1234, reply_to=1234)
    with pytest.raises(PayloadError):
        template.encode(payload, "a", 1.0)


def test_counted_ids_are_distinct_and_of_the_documented_format() -> None:
    """100000 ids of one counter are all different and each 16 lowercase hex digits; two
    counters start at different random places."""
    ids = JobIds()
    pid = os.getpid()
    made = [ids(pid) for _ in range(100_000)]
    assert len(set(made)) == len(made)
    assert all(JOB_ID_FORMAT.match(i) for i in made)
    assert int(made[-1], 16) - int(made[0], 16) == len(made) - 1
    assert JobIds()(pid) not in set(made)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    """A child forked after its parent made ids draws a new start: the ids it makes are
    none of those its parent makes next."""
    ids = JobIds()
    ids(os.getpid())
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.close(read)
            os.write(write, " ".join(ids(os.getpid()) for _ in range(100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        theirs = set(pipe.read().decode().split())
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ours = {ids(os.getpid()) for _ in range(100)}
    assert len(theirs) == 100
    assert not theirs & ours
