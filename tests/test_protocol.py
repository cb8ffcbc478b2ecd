"""Tests of ipcd.wire.protocol: envelopes round-trip, bare messages decode, bad ones are refused."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipcd.errors import MessageError, PayloadError, RefusedPayloadError
from ipcd.wire import protocol
from ipcd.wire.protocol import MAX_DEPTH, Job, Payload, SpillRef, decode, encode, new_job_id

JOB_ID_FORMAT = re.compile(r"[0-9a-f]{16}\Z")


def envelope(**fields: Any) -> bytes:
    """A hand-built envelope: ``{"ipcd": 1, "id": "abc"}`` updated with ``fields``."""
    doc: dict[str, Any] = {"ipcd": 1, "id": "abc"}
    doc.update(fields)
    return json.dumps(doc).encode()


def nested(depth: int) -> Any:
    """``depth`` lists inside one another around the number 1."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# --- envelopes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        "hello",
        "",
        "ünïcödé ✓ \x00 \n",
        None,
        True,
        False,
        0,
        -(2**70),
        1.5,
        [1, "a", None, [True]],
        {"a": {"b": [1, 2.5]}, "": "empty key"},
        b"",
        b"\x00\xff binary \n",
    ],
)
def test_envelope_round_trip_keeps_every_field(payload: Payload) -> None:
    """decode(encode(...)) gives back the payload (same type), id, reply_to, pid and
    submitted, with the type the message arrived with."""
    body = encode(payload, job_id="job-1.A_z", reply_to=7, submitted=1700000000.125, pid=4321)
    job = decode(body, 5)
    assert job == Job(
        id="job-1.A_z",
        type=5,
        payload=payload,
        submitted=1700000000.125,
        sender_pid=4321,
        reply_to=7,
        bare=False,
    )
    assert type(job.payload) is type(payload)


@pytest.mark.parametrize("payload", [b"\x01\x02", bytearray(b"\x01\x02"), memoryview(b"\x01\x02")])
def test_binary_payloads_travel_as_base64(payload: bytes | bytearray | memoryview) -> None:
    """bytes, bytearray and memoryview payloads are sent as ``payload_b64`` and arrive as
    bytes."""
    body = encode(payload, job_id="bin", submitted=1.0, pid=1)  # type: ignore[arg-type]
    assert json.loads(body) == {
        "ipcd": 1,
        "id": "bin",
        "submitted": 1.0,
        "pid": 1,
        "payload_b64": "AQI=",
    }
    assert decode(body, 2).payload == b"\x01\x02"


def test_encode_fills_in_pid_and_submitted_and_omits_reply() -> None:
    """Without pid, submitted and reply_to the envelope carries this process's pid, the
    current time and no ``reply`` field."""
    before = time.time()
    doc = json.loads(encode({"k": "v"}, job_id="abc"))
    after = time.time()
    assert set(doc) == {"ipcd", "id", "submitted", "pid", "payload"}
    assert doc["ipcd"] == 1
    assert doc["id"] == "abc"
    assert doc["pid"] == os.getpid()
    assert doc["payload"] == {"k": "v"}
    assert before - 1e-6 <= doc["submitted"] <= after + 1e-6


def test_encode_writes_compact_utf8_json() -> None:
    """The envelope is compact JSON with non-ASCII text as UTF-8, not escapes."""
    body = encode("é", job_id="abc", submitted=2.0, pid=3, reply_to=9)
    assert body == '{"ipcd":1,"id":"abc","submitted":2.0,"pid":3,"reply":9,"payload":"é"}'.encode()


@pytest.mark.parametrize(
    "payload",
    [
        object(),
        {"a": b"nested bytes"},
        [1, {2, 3}],
        float("nan"),
        float("inf"),
        {"x": [1.0, -float("inf")]},
    ],
)
def test_encode_refuses_what_json_cannot_carry(payload: object) -> None:
    """A payload JSON cannot represent (objects, nested bytes, sets, NaN, infinities) raises
    PayloadError."""
    with pytest.raises(PayloadError) as caught:
        encode(payload, job_id="abc")  # type: ignore[arg-type]
    assert str(caught.value).startswith("payload cannot be encoded as JSON: ")


def test_new_job_id_is_16_random_hex_digits() -> None:
    """new_job_id() returns 16 lower-case hex digits, different on every call, that an
    envelope accepts as its id."""
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100
    for job_id in ids:
        assert JOB_ID_FORMAT.match(job_id)
    job_id = ids.pop()
    assert decode(encode("x", job_id=job_id), 2).id == job_id


def test_every_envelope_field_lands_in_its_own_job_field() -> None:
    """An envelope with every optional field set, each to a value of its own, decodes to
    the Job those values name (decode builds the Job positionally)."""
    body = encode(
        "p", job_id="all", reply_to=11, submitted=1700000000.5, pid=12, attempt=13,
        timeout=14.5, unique="u", confirm=15, due=1700000016.0, priority=17, expire=18.5,
        after=("a1", "a2"),
    )  # fmt: skip
    assert decode(body, 19) == Job(
        id="all", type=19, payload="p", attempt=13, submitted=1700000000.5, sender_pid=12,
        reply_to=11, bare=False, timeout=14.5, unique="u", spill=None, confirm=15,
        due=1700000016.0, priority=17, expire=18.5, after=("a1", "a2"), reporter=None,
    )  # fmt: skip
    spilled = encode(None, job_id="big", spill=SpillRef(20, 21, 22, "json"), pid=23)
    assert decode(spilled, 24).spill == SpillRef(20, 21, 22, "json")


def test_envelope_fields_default_when_absent() -> None:
    """An envelope with only ``ipcd`` and ``id`` is a job with a null payload, submitted 0,
    pid 0 and nobody waiting."""
    assert decode(b'{"ipcd":1,"id":"abc"}', 3) == Job(id="abc", type=3, payload=None)


def test_payload_nested_to_max_depth_is_accepted() -> None:
    """A payload nested exactly MAX_DEPTH levels deep is accepted."""
    assert decode(envelope(payload=nested(MAX_DEPTH)), 2).payload == nested(MAX_DEPTH)


# --- malformed envelopes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason", "job_id"),
    [
        (envelope(ipcd=2), "unsupported envelope version 2 (this ipcd speaks 1)", "abc"),
        (envelope(ipcd="1"), "unsupported envelope version '1' (this ipcd speaks 1)", "abc"),
        (envelope(ipcd=None), "unsupported envelope version None (this ipcd speaks 1)", "abc"),
        (
            envelope(ipcd=2, id="bad id"),
            "unsupported envelope version 2 (this ipcd speaks 1)",
            None,
        ),
        (b'{"ipcd":1}', "envelope 'id' must be 1-16 characters of [0-9A-Za-z_.-]", None),
        (envelope(id=""), "envelope 'id' must be 1-16 characters of [0-9A-Za-z_.-]", None),
        (envelope(id="x" * 17), "envelope 'id' must be 1-16 characters of [0-9A-Za-z_.-]", None),
        (envelope(id="a/b"), "envelope 'id' must be 1-16 characters of [0-9A-Za-z_.-]", None),
        (envelope(id="abc\n"), "envelope 'id' must be 1-16 characters of [0-9A-Za-z_.-]", None),
        (envelope(id=123), "envelope 'id' must be 1-16 characters of [0-9A-Za-z_.-]", None),
        (envelope(extra=1), "unknown envelope field 'extra'", "abc"),
        (envelope(b=1, a=2), "unknown envelope field 'a'", "abc"),
        (
            envelope(payload="x", payload_b64="eA=="),
            "envelope has both 'payload' and 'payload_b64'",
            "abc",
        ),
        (envelope(payload_b64=123), "'payload_b64' must be a base64 string", "abc"),
        (envelope(payload_b64=None), "'payload_b64' must be a base64 string", "abc"),
        (envelope(payload_b64="!!!!"), "'payload_b64' is not valid base64", "abc"),
        (envelope(payload_b64="eA="), "'payload_b64' is not valid base64", "abc"),
        (envelope(payload_b64="é"), "'payload_b64' is not valid base64", "abc"),
        (envelope(payload_b64="QUJD="), "'payload_b64' is not valid base64", "abc"),
        (envelope(payload_b64="eA==eA=="), "'payload_b64' is not valid base64", "abc"),
        (envelope(payload_b64="eA==\n"), "'payload_b64' is not valid base64", "abc"),
        (envelope(payload_b64=" eA=="), "'payload_b64' is not valid base64", "abc"),
        (envelope(payload_b64="===="), "'payload_b64' is not valid base64", "abc"),
        (envelope(payload_b64="eA"), "'payload_b64' is not valid base64", "abc"),
        (envelope(pid="12"), "'pid' must be a non-negative integer up to 2147483647", "abc"),
        (envelope(pid=-1), "'pid' must be a non-negative integer up to 2147483647", "abc"),
        (envelope(pid=1.0), "'pid' must be a non-negative integer up to 2147483647", "abc"),
        (envelope(pid=True), "'pid' must be a non-negative integer up to 2147483647", "abc"),
        (envelope(pid=None), "'pid' must be a non-negative integer up to 2147483647", "abc"),
        (envelope(reply="7"), "'reply' must be a positive message type", "abc"),
        (envelope(reply=0), "'reply' must be a positive message type", "abc"),
        (envelope(reply=-7), "'reply' must be a positive message type", "abc"),
        (envelope(reply=2**31), "'reply' must be a positive message type", "abc"),
        (envelope(reply=True), "'reply' must be a positive message type", "abc"),
        (envelope(reply=7.0), "'reply' must be a positive message type", "abc"),
        (envelope(submitted="now"), "'submitted' must be a number", "abc"),
        (envelope(submitted=True), "'submitted' must be a number", "abc"),
        (envelope(submitted=None), "'submitted' must be a number", "abc"),
        (
            envelope(payload=nested(MAX_DEPTH + 1)),
            f"payload nested deeper than {MAX_DEPTH} levels",
            "abc",
        ),
        (
            envelope(payload={"a": [{"b": nested(MAX_DEPTH)}]}),
            f"payload nested deeper than {MAX_DEPTH} levels",
            "abc",
        ),
        # Starts as an envelope but is not JSON: refused, with the id when it can be read
        (b'{"ipcd":1', "not valid JSON: Expecting ',' delimiter: line 1 column 10 (char 9)", None),
        (b'{"ipcd":1,"id":"\xff"}', "not valid JSON: not UTF-8", None),
        (
            b'{"ipcd":1,"id":"deep1","payload":' + b"[" * 5000 + b"]" * 5000 + b"}",
            "not valid JSON: nested too deeply",
            "deep1",
        ),
        (
            b'{"ipcd":true,"id":"abc","payload":1}',
            "unsupported envelope version True (this ipcd speaks 1)",
            "abc",
        ),
        (b'{"ipcd":1,"id":"abc","submitted":NaN}', "not valid JSON: NaN is not JSON", "abc"),
        # Poison: numbers no field can hold, text no encoder takes, segment ids the kernel
        # cannot name.  Each once crashed a worker.
        (envelope(submitted=10**400), "'submitted' must be a Unix time from 0 to 1e+10", "abc"),
        (envelope(submitted=-1.0), "'submitted' must be a Unix time from 0 to 1e+10", "abc"),
        (envelope(submitted=1e11), "'submitted' must be a Unix time from 0 to 1e+10", "abc"),
        (
            b'{"ipcd":1,"id":"abc","submitted":1e999}',
            "not valid JSON: number 1e999 is out of range",
            "abc",
        ),
        (
            b'{"ipcd":1,"id":"abc","payload":[-1E+999]}',
            "not valid JSON: number -1E+999 is out of range",
            "abc",
        ),
        (
            envelope(timeout=10**400),
            "'timeout' must be a positive number of seconds up to 1e+09",
            "abc",
        ),
        (
            envelope(timeout=1e300),
            "'timeout' must be a positive number of seconds up to 1e+09",
            "abc",
        ),
        (envelope(timeout=True), "'timeout' must be a number", "abc"),
        (envelope(pid=10**400), "'pid' must be a non-negative integer up to 2147483647", "abc"),
        (envelope(pid=2**31), "'pid' must be a non-negative integer up to 2147483647", "abc"),
        (envelope(attempt=10**400), "'attempt' must be an integer from 1 to 65535", "abc"),
        (envelope(attempt=True), "'attempt' must be an integer from 1 to 65535", "abc"),
        (envelope(reply=10**400), "'reply' must be a positive message type", "abc"),
        (
            envelope(ipcd=10**400),
            f"unsupported envelope version {str(10**400)[:37]}... (this ipcd speaks 1)",
            "abc",
        ),
        *[
            (
                envelope(spill={"shmid": 5, "size": 1, "slot": 0, "kind": "text", **bad}),
                "'spill' shmid and slot must be integers from 0 to 2147483647, size a "
                "non-negative integer",
                "abc",
            )
            for bad in (
                {"shmid": 2**31},
                {"shmid": 10**400},
                {"shmid": -1},
                {"slot": 2**31},
                {"size": 2**63},
                {"size": True},
                {"shmid": 5.0},
            )
        ],
        (
            envelope(payload="\ud800"),
            "payload is not valid Unicode: lone surrogate U+D800 in '\\ud800'",
            "abc",
        ),
        (
            envelope(payload={"k": ["ok", {"\udfff x": 1}]}),
            "payload is not valid Unicode: lone surrogate U+DFFF in '\\udfff x'",
            "abc",
        ),
    ],
)
def test_malformed_envelopes_raise_message_error(
    body: bytes, reason: str, job_id: str | None
) -> None:
    """A malformed envelope raises MessageError saying why, with ``job_id`` set when the id
    was readable and None when it was not."""
    with pytest.raises(MessageError) as caught:
        decode(body, 2)
    assert type(caught.value) is MessageError
    assert str(caught.value) == f"malformed envelope: {reason}"
    assert caught.value.job_id == job_id


def test_envelope_limits_are_inclusive() -> None:
    """pid 0, reply 2**31-1 and a 16-character id are all accepted."""
    job = decode(envelope(id="Z" * 16, pid=0, reply=2**31 - 1), 2)
    assert (job.id, job.sender_pid, job.reply_to) == ("Z" * 16, 0, 2**31 - 1)


def test_numeric_limits_are_inclusive_and_numbers_become_floats() -> None:
    """The largest submitted, timeout, pid, attempt and spill numbers are accepted, and an
    integer ``submitted`` or ``timeout`` arrives as a float."""
    spill = {"shmid": 2**31 - 1, "size": 2**63 - 1, "slot": 2**31 - 1, "kind": "json"}
    job = decode(
        envelope(submitted=10**10, timeout=10**9, pid=2**31 - 1, attempt=65535, spill=spill), 2
    )
    assert (job.submitted, job.timeout, job.sender_pid, job.attempt) == (
        1e10,
        1e9,
        2**31 - 1,
        65535,
    )
    assert type(job.submitted) is float and type(job.timeout) is float
    assert job.spill == protocol.SpillRef(2**31 - 1, 2**63 - 1, 2**31 - 1, "json")


def test_astral_characters_and_escaped_backslashes_are_not_surrogates() -> None:
    """A character outside the BMP (a surrogate pair in JSON) and the text backslash-u-d800
    are valid payloads."""
    assert decode(b'{"ipcd":1,"id":"a","payload":"\\ud83d\\ude00"}', 2).payload == "\U0001f600"
    assert decode(b'{"ipcd":1,"id":"a","payload":"\\\\ud800"}', 2).payload == "\\ud800"


@pytest.mark.parametrize("type_", [0, -1, 2**31, 2**62, 2**63 - 1])
@pytest.mark.parametrize("body", [envelope(payload="x"), b"bare text"])
def test_a_type_no_handler_can_have_is_refused(type_: int, body: bytes) -> None:
    """A message type outside 1..2**31-1 (PHP can send any positive C long) raises
    MessageError, with the envelope's id when there is one."""
    with pytest.raises(MessageError) as caught:
        decode(body, type_)
    assert str(caught.value) == (
        f"message type {type_} is outside 1..2147483647: no handler can have it"
    )
    assert caught.value.job_id == ("abc" if body.startswith(b"{") else None)


def test_type_one_is_an_ordinary_job_type() -> None:
    """Type 1 (the PHP article's first msg_send) decodes as a job like any other type."""
    job = decode(b"i:7;", 1, received=5.0)
    assert job == Job(id=job.id, type=1, payload=7, submitted=5.0, bare=True)
    assert decode(envelope(payload="x"), 1).type == 1


# --- bare messages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "payload"),
    [
        (b"hello world", "hello world"),
        (b"", ""),
        ("grüße ✓".encode(), "grüße ✓"),
        (b"\xff\xfe\x00", b"\xff\xfe\x00"),
        (b"caf\xe9", b"caf\xe9"),
        # JSON that is not an envelope is just text
        (b'{"a":1}', '{"a":1}'),
        (b'{"IPCD":1,"id":"abc"}', '{"IPCD":1,"id":"abc"}'),
        (b"[1, 2]", "[1, 2]"),
        # text that merely starts like a PHP object or reference is text
        (b"C:\\Windows\\Temp", "C:\\Windows\\Temp"),
        (b"E:mail me", "E:mail me"),
        (b"r:ecord 5", "r:ecord 5"),
        # PHP's serialize() format, as msg_send sends by default
        (b's:5:"hello";', "hello"),
        (b's:2:"\xff\xfe";', b"\xff\xfe"),
        (b"i:42;", 42),
        (b"d:2.5;", 2.5),
        (b"b:1;", True),
        (b"N;", None),
        (b'a:2:{i:0;s:1:"a";i:1;i:2;}', ["a", 2]),
        (b'a:2:{s:1:"k";b:1;i:5;N;}', {"k": True, "5": None}),
        (b'a:1:{i:0;a:1:{s:1:"x";s:1:"\xff";}}', [{"x": "\xff"}]),
        (b"a:0:{}", []),
        # text that merely starts like PHP serialize data
        (b"i:am text", "i:am text"),
        (b's:5:"hi";', 's:5:"hi";'),
        (b"a:1:{oops", "a:1:{oops"),
        (b"N;ot php", "N;ot php"),
        (b"b:\xff", b"b:\xff"),
    ],
)
def test_bare_messages_become_payloads(body: bytes, payload: Payload) -> None:
    """A message that is not an envelope is a bare job whose payload is its PHP value, its
    UTF-8 text, or else its bytes."""
    job = decode(body, 9, received=123.5)
    assert JOB_ID_FORMAT.match(job.id)
    assert job == Job(id=job.id, type=9, payload=payload, submitted=123.5, bare=True)
    assert type(job.payload) is type(payload)


def test_bare_message_submitted_defaults_to_now() -> None:
    """A bare message decoded without ``received`` is stamped with the current time."""
    before = time.time()
    job = decode(b"hello", 2)
    assert before <= job.submitted <= time.time()


def test_bare_messages_get_fresh_ids() -> None:
    """Two identical bare messages become two jobs with different ids."""
    assert decode(b"same", 2).id != decode(b"same", 2).id


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'O:8:"stdClass":0:{}', "offset 0: PHP object (O:) is never instantiated"),
        (b'a:1:{i:0;O:8:"stdClass":0:{}}', "offset 9: PHP object (O:) is never instantiated"),
        (
            b'C:11:"ArrayObject":0:{}',
            "offset 0: PHP custom-serialized object (C:) is never instantiated",
        ),
        (b"a:1:{i:0;r:1;}", "offset 9: PHP reference (r:) is never instantiated"),
        (
            b"a:1:{i:0;" * (MAX_DEPTH + 1) + b"N;" + b"}" * (MAX_DEPTH + 1),
            f"offset {9 * MAX_DEPTH}: arrays nested deeper than {MAX_DEPTH} levels",
        ),
    ],
)
def test_php_objects_are_refused(body: bytes, reason: str) -> None:
    """A bare PHP object, reference or over-deep array raises RefusedPayloadError (a
    MessageError without a job id)."""
    with pytest.raises(RefusedPayloadError) as caught:
        decode(body, 2)
    assert str(caught.value) == f"refused PHP serialize data at {reason}"
    assert caught.value.job_id is None


@pytest.mark.parametrize(
    ("body", "shown"),
    [(b"d:INF;", "inf"), (b"d:-INF;", "-inf"), (b"d:NAN;", "nan"), (b"a:1:{i:0;d:NAN;}", "nan")],
)
def test_php_infinities_are_refused(body: bytes, shown: str) -> None:
    """PHP's INF and NAN floats, which no JSON can carry, are refused (RefusedPayloadError)."""
    with pytest.raises(RefusedPayloadError) as caught:
        decode(body, 2)
    assert str(caught.value) == f"refused PHP serialize data: float {shown} has no JSON form"


# --- arbitrary input -------------------------------------------------------------------------

_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)
_json_values = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
_envelope_docs = st.fixed_dictionaries(
    {
        "ipcd": st.one_of(st.just(1), _json_leaf),
        "id": st.one_of(st.from_regex(r"[0-9A-Za-z_.-]{1,16}", fullmatch=True), _json_leaf),
    },
    optional={
        "payload": _json_values,
        "payload_b64": st.one_of(
            st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode()), _json_leaf
        ),
        "submitted": _json_leaf,
        "pid": st.one_of(st.integers(), _json_leaf),
        "reply": st.one_of(st.integers(), _json_leaf),
        "x": _json_leaf,
    },
).map(lambda doc: json.dumps(doc).encode())
_php_like = st.tuples(
    st.sampled_from([b"N;", b"s:", b"i:", b"d:", b"b:", b"a:", b"O:", b"r:", b"{", b"["]),
    st.binary(max_size=40),
).map(b"".join)
_messages = st.one_of(st.binary(max_size=200), _envelope_docs, _php_like)


@settings(
    max_examples=600,
    deadline=timedelta(seconds=1),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(_messages, st.integers(min_value=2, max_value=2**31 - 1))
def test_decode_returns_a_job_or_raises_message_error(body: bytes, type_: int) -> None:
    """Any bytes given to decode() either become a Job of that type or raise MessageError;
    nothing else escapes."""
    try:
        job = decode(body, type_)
    except MessageError:
        return
    assert isinstance(job, Job)
    assert job.type == type_
    assert re.fullmatch(r"[0-9A-Za-z_.-]{1,16}", job.id)


#: JSON texts that a hostile sender puts where a number, string or object belongs.
_HOSTILE = [
    "1e999", "-1e999", "1E400", "1e-999", "9" * 400, "-" + "9" * 400, "-1", "0", "-0", "0.0",
    "2147483647", "2147483648", "4294967296", "9223372036854775807", "9223372036854775808",
    "65535", "65536", "1e10", "10000000001", "1e9", "1000000001", "5e-324", "true", "false",
    "null", '"1"', '""', '"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude00"', '"\\u0000"',
    "[]", "{}", '{"\\ud800":1}', "[" * 40 + "]" * 40, '{"a":' * 40 + "1" + "}" * 40,
]  # fmt: skip
_raw_json = st.one_of(
    st.sampled_from(_HOSTILE),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=6).map(json.dumps),
)
_raw_spill = st.fixed_dictionaries(
    {"shmid": _raw_json, "size": _raw_json, "slot": _raw_json},
    optional={"kind": st.sampled_from(['"text"', '"json"', '"bytes"', '"x"', "1"])},
).map(lambda d: "{" + ",".join(f'"{k}":{v}' for k, v in d.items()) + "}")
_FIELDS = ["submitted", "pid", "reply", "attempt", "timeout", "unique", "payload", "payload_b64"]
_hostile_envelopes = st.tuples(
    st.one_of(st.just("1"), _raw_json),
    st.one_of(st.just('"abc"'), _raw_json),
    st.dictionaries(
        st.sampled_from([*_FIELDS, "spill"]),
        st.one_of(_raw_json, _raw_spill),
        max_size=4,
    ),
).map(
    lambda t: (
        '{"ipcd":' + t[0] + ',"id":' + t[1] + "".join(f',"{k}":{v}' for k, v in t[2].items()) + "}"
    ).encode()
)
_hostile_php = st.one_of(
    st.sampled_from(
        [b"d:INF;", b"d:-INF;", b"d:NAN;", b"a:1:{i:0;d:NAN;}", b"i:" + b"9" * 400 + b";",
         b"a:1:{i:" + b"9" * 400 + b";i:1;}", b'a:1:{s:1:"\xff";i:1;}', b'a:1:{i:0;s:1:"\xed";}',
         b's:3:"\xed\xa0\x80";', b"d:1e999;", b"d:-0;", b"a:2:{i:0;i:1;i:0;i:2;}"]
    ),
    st.tuples(st.sampled_from([b"a:1:{i:0;", b"a:1:{s:1:\"k\";"]), _raw_json.map(str.encode)).map(
        lambda t: t[0] + b"d:" + t[1] + b";}"
    ),
)  # fmt: skip
_kernel_types = st.one_of(
    st.integers(min_value=1, max_value=2**31 - 1),
    st.sampled_from([1, 2**31 - 1, 2**31, 2**63 - 1, 0, -1]),
)


def assert_in_range(job: Job, type_: int) -> None:
    """Every field of a decoded job holds what the daemon's later steps can take: the
    type a handler can have, bounded finite numbers, valid Unicode, a payload that can be
    put back on the queue for another attempt."""
    assert job.type == type_ and 1 <= type_ <= protocol.MAX_TYPE
    assert protocol.is_job_id(job.id)
    assert type(job.attempt) is int and 1 <= job.attempt <= 0xFFFF
    assert type(job.submitted) is float and 0 <= job.submitted <= protocol.MAX_SUBMITTED
    assert type(job.sender_pid) is int and 0 <= job.sender_pid <= protocol.MAX_INT32
    assert job.reply_to is None or (
        type(job.reply_to) is int and 1 <= job.reply_to <= protocol.MAX_TYPE
    )
    assert job.timeout is None or (
        type(job.timeout) is float and 0 < job.timeout <= protocol.MAX_TIMEOUT
    )
    assert job.unique is None or protocol.unique_key_problem(job.unique) is None
    if job.spill is not None:
        shmid, size, slot, kind = job.spill
        assert all(type(n) is int for n in (shmid, size, slot))
        assert 0 <= shmid <= protocol.MAX_INT32 and 0 <= slot <= protocol.MAX_INT32
        assert 0 <= size <= protocol.MAX_SIZE and kind in protocol.SPILL_KINDS
        assert job.payload is None
    assert protocol.lone_surrogate(job.payload) is None
    again = decode(protocol.reencode(job, attempt=job.attempt), type_)
    assert again.payload == job.payload and again.id == job.id


@settings(
    max_examples=1500,
    deadline=timedelta(seconds=1),
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.one_of(_hostile_envelopes, _hostile_php, _messages), _kernel_types)
def test_hostile_messages_decode_to_jobs_in_range_or_raise_message_error(
    body: bytes, type_: int
) -> None:
    """Whatever a group member sends, decode() returns a Job whose every field is in
    range, or raises MessageError; no other exception escapes."""
    try:
        job = decode(body, type_)
    except MessageError:
        return
    assert_in_range(job, type_)


@pytest.mark.parametrize(
    ("body", "type_"),
    [
        (b'{"ipcd":1,"id":"w1","reply":77,"submitted":1e999}', 2),
        (b'{"ipcd":1,"id":"w1","reply":77,"payload":' + b"[" * 3000 + b"]" * 3000 + b"}", 2),
        (envelope(id="w1", reply=77, payload="x"), 2**31),
        (envelope(id="w1", reply=77, submitted=10**400), 2),
    ],
)
def test_a_rejected_envelope_keeps_its_waiter(body: bytes, type_: int) -> None:
    """A rejected envelope keeps its reply type, so its waiter is woken: read from the JSON,
    or from the first 256 bytes of a body that is not valid JSON."""
    with pytest.raises(MessageError) as caught:
        decode(body, type_)
    assert (caught.value.job_id, caught.value.reply_to) == ("w1", 77)


def test_a_reply_that_is_not_an_integer_wakes_nobody() -> None:
    """In a body that is not valid JSON, ``"reply":77.5`` names no waiter."""
    with pytest.raises(MessageError) as caught:
        decode(b'{"ipcd":1,"id":"w1","reply":77.5,"submitted":1e999}', 2)
    assert (caught.value.job_id, caught.value.reply_to) == ("w1", None)


def test_expire_travels_in_the_envelope_and_is_bounded() -> None:
    """``expire`` (seconds) is sent only when given, read back as a float, and a value
    outside 0 < S <= MAX_EXPIRE rejects the message naming the key."""
    plain = protocol.encode("x", job_id="a1")
    assert b"expire" not in plain
    assert protocol.decode(plain, 2).expire is None
    assert protocol.decode(protocol.encode("x", job_id="a1", expire=30), 2).expire == 30.0
    for bad in (0, -1, protocol.MAX_EXPIRE + 1, "soon"):
        body = json.dumps({"ipcd": 1, "id": "a1", "payload": "x", "expire": bad}).encode()
        with pytest.raises(MessageError, match="expire"):
            protocol.decode(body, 2)


def test_running_replaces_only_the_id_the_attempt_and_the_reporter() -> None:
    """Job.running writes fields by position: a field added before ``reporter``, or moved,
    must not shift what it writes."""
    job = protocol.decode(
        protocol.encode(
            {"n": 1}, job_id="given", reply_to=7, submitted=1.5, pid=12, attempt=2, timeout=3.0,
            unique="k", confirm=8, due=2.5, priority=4, expire=60.0, after=("a", "b"),
        ),
        2,
    )  # fmt: skip
    calls: list[tuple[float, str]] = []

    def report(fraction: float, message: str) -> None:
        calls.append((fraction, message))

    running = job.running("stored", 5, report)
    assert running == job._replace(id="stored", attempt=5, reporter=report)
    running.progress(0.5, "half")
    assert calls == [(0.5, "half")]


@given(st.text(max_size=120))
def test_preview_shows_printable_characters_and_marks_the_rest(text: str) -> None:
    """What ``ipcctl list`` shows of a payload: its first PREVIEW characters, each one
    not printable (a tab, a newline, an escape) as "?", a longer one cut with "…"."""
    shown = protocol.preview(text)
    expected = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(expected) > protocol.PREVIEW:
        expected = expected[: protocol.PREVIEW - 1] + "…"
    assert shown == expected
