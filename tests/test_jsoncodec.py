"""ipcd.wire.jsoncodec calls CPython's C encoder and scanner directly (a private signature):
these properties pin it to what json.dumps and json.loads do, so that a Python upgrade
that changes the accelerator fails here rather than in the envelopes and the log."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipcd.wire import jsoncodec

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)


@given(values)
def test_compact_encoder_is_json_dumps(value: object) -> None:
    for ascii_only in (True, False):
        encode = jsoncodec.encoder(ensure_ascii=ascii_only, allow_nan=False)
        assert encode(value) == json.dumps(
            value, separators=(",", ":"), ensure_ascii=ascii_only, allow_nan=False
        )


@given(values)
def test_log_encoder_is_json_dumps_with_str_default(value: object) -> None:
    encode = jsoncodec.encoder(
        ensure_ascii=False, allow_nan=True, default=str, separators=(", ", ": ")
    )
    wrapped = {"value": value, "path": ValueError("not JSON")}
    assert encode(wrapped) == json.dumps(wrapped, ensure_ascii=False, default=str)


def test_what_cannot_be_encoded_raises_as_json_does() -> None:
    encode = jsoncodec.encoder(ensure_ascii=False, allow_nan=False)
    with pytest.raises(ValueError):
        encode({"x": math.nan})
    with pytest.raises(TypeError):
        encode({"x": object()})
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(RecursionError):
        encode(loop)


def _refuse(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


decode = jsoncodec.object_decoder(_refuse)


@given(values)
def test_decoder_reads_what_json_writes(value: object) -> None:
    text = json.dumps(value)
    assert decode(text) == json.loads(text)
    assert decode(" \n" + text + " \t\r\n") == json.loads(text)


@given(st.text(max_size=40) | st.text(alphabet=' \t\n\r\u00a0{}[]":,0123456789ab', max_size=40))
def test_decoder_fails_where_json_loads_fails(text: str) -> None:
    try:
        expected = json.loads(text, parse_constant=_refuse)
    except ValueError:
        with pytest.raises(ValueError):
            decode(text)
        return
    assert decode(text) == expected
