"""Tests of ipcd.wire.phpserial: what PHP's serialize() writes is decoded, all else refused."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipcd.errors import MessageError, PayloadError, RefusedPayloadError
from ipcd.wire.phpserial import PhpValue, dumps, loads, looks_serialized


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"N;", None),
        (b"b:1;", True),
        (b"b:0;", False),
        (b"i:0;", 0),
        (b"i:-42;", -42),
        (b"i:9223372036854775807;", 2**63 - 1),
        (b"i:-9223372036854775808;", -(2**63)),
        (b"i:+7;", 7),
        (b"i:-0;", 0),
        (b"i:123456789012345678901234567890;", 123456789012345678901234567890),
        (b"d:0.1;", 0.1),
        (b"d:0.30000000000000004;", 0.1 + 0.2),
        (b"d:1;", 1.0),
        (b"d:100;", 100.0),
        (b"d:-2.5;", -2.5),
        (b"d:1.0E+25;", 1e25),
        (b"d:1.2345678901234568E+17;", 1.2345678901234568e17),
        (b"d:-1.25E-5;", -1.25e-5),
        (b"d:5.0E-324;", 5e-324),
        (b"d:1.7976931348623157E+308;", 1.7976931348623157e308),
        (b"d:INF;", math.inf),
        (b"d:-INF;", -math.inf),
        (b"d:.5;", 0.5),
        (b"d:5.;", 5.0),
        (b"d:1e5;", 1e5),
        (b"d:1E+500;", math.inf),
        (b's:5:"hello";', "hello"),
        (b's:0:"";', ""),
        (b's:3:"q"x";', 'q"x'),
        (b's:9:"a";s:1:"x";', 'a";s:1:"x'),
        (b's:2:"\xc3\xa9";', "é"),
        (b's:4:"\xf0\x9f\x98\x80";', "😀"),
        (b's:3:"\x00\n\t";', "\x00\n\t"),
        (b's:01:"a";', "a"),
        (b's:2:"\xff\xfe";', b"\xff\xfe"),
        (b's:2:"\xe2\x82";', b"\xe2\x82"),
    ],
)
def test_scalars_decode_to_the_matching_python_value(data: bytes, expected: PhpValue) -> None:
    """Each scalar PHP writes (and PHP's unserialize accepts) decodes to the equal Python value
    of the same type."""
    value = loads(data)
    assert value == expected
    assert type(value) is type(expected)


def test_nan_decodes_to_nan() -> None:
    """``d:NAN;`` decodes to a float NaN."""
    value = loads(b"d:NAN;")
    assert isinstance(value, float)
    assert math.isnan(value)


def test_negative_zero_keeps_its_sign() -> None:
    """``d:-0;`` decodes to -0.0, not 0.0."""
    value = loads(b"d:-0;")
    assert value == 0.0
    assert isinstance(value, float)
    assert math.copysign(1.0, value) == -1.0


def test_string_length_counts_bytes_not_characters() -> None:
    """The length of ``s:`` counts UTF-8 bytes, so "é" is ``s:2:`` and ``s:1:`` is malformed."""
    assert loads('s:2:"é";'.encode()) == "é"
    with pytest.raises(MessageError) as caught:
        loads('s:1:"é";'.encode())
    assert str(caught.value) == "malformed PHP serialize data at offset 6: expected '\"'"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a:0:{}", []),
        (b'a:3:{i:0;s:1:"a";i:1;i:2;i:2;N;}', ["a", 2, None]),
        (b'a:2:{s:4:"name";s:3:"bob";s:3:"age";i:30;}', {"name": "bob", "age": 30}),
        (b'a:2:{i:1;s:1:"b";i:0;s:1:"a";}', {"1": "b", "0": "a"}),
        (b'a:1:{i:1;s:1:"a";}', {"1": "a"}),
        (b"a:1:{i:-1;N;}", {"-1": None}),
        (b'a:2:{i:0;b:1;s:1:"x";b:0;}', {"0": True, "x": False}),
        (b'a:2:{s:1:"0";s:1:"a";s:1:"1";s:1:"b";}', ["a", "b"]),
        (b'a:2:{s:2:"00";i:0;s:2:"-0";i:1;}', {"00": 0, "-0": 1}),
        (b'a:1:{s:19:"9223372036854775808";N;}', {"9223372036854775808": None}),
        (b"a:2:{i:0;a:1:{i:0;i:1;}i:1;a:0:{}}", [[1], []]),
        (
            b'a:2:{i:0;a:2:{i:0;i:1;i:1;i:2;}s:1:"k";a:1:{s:1:"z";N;}}',
            {"0": [1, 2], "k": {"z": None}},
        ),
        (
            b'a:1:{s:5:"\xc3\xa9t\xc3\xa9";a:1:{s:1:"d";d:0.5;}}',
            {"été": {"d": 0.5}},
        ),
    ],
)
def test_arrays_become_lists_or_dicts_with_string_keys(data: bytes, expected: PhpValue) -> None:
    """An array keyed exactly 0..n-1 in order is a list; any other is a dict keyed by strings."""
    value = loads(data)
    assert value == expected
    assert type(value) is type(expected)


#: PHP 8.2's serialize() of an array mixing the key kinds PHP normalises, and its decoding.
_PHP_MIXED_KEYS = (
    b'a:15:{i:1;s:1:"b";s:2:"01";s:1:"c";i:-5;i:1;s:2:"-0";i:2;s:19:"9223372036854775808";'
    b'i:4;s:2:" 1";i:5;s:3:"1.5";i:6;i:2;b:1;i:3;N;i:4;s:2:"\xc3\xa9";i:5;s:3:"q"x";'
    b'i:9223372036854775807;i:3;i:-9223372036854775808;i:7;i:0;i:8;s:2:"+1";i:9;}'
)
_MIXED_KEYS: dict[str, PhpValue] = {
    "1": "b",
    "01": "c",
    "-5": 1,
    "-0": 2,
    "9223372036854775808": 4,
    " 1": 5,
    "1.5": 6,
    "2": True,
    "3": None,
    "4": "é",
    "5": 'q"x',
    "9223372036854775807": 3,
    "-9223372036854775808": 7,
    "0": 8,
    "+1": 9,
}


def test_php_key_normalisation_survives_decoding_and_encoding() -> None:
    """Int keys and numeric-looking string keys from real PHP output decode to the expected
    dict, and dumps() writes that dict back to the same bytes."""
    assert loads(_PHP_MIXED_KEYS) == _MIXED_KEYS
    assert dumps(_MIXED_KEYS) == _PHP_MIXED_KEYS


_REFUSED = [
    pytest.param(b'O:8:"stdClass":1:{s:1:"x";s:1:"y";}', id="object"),
    pytest.param(b'O:1:"P":1:{s:4:"\x00*\x00b";i:2;}', id="object-protected"),
    pytest.param(b'C:11:"ArrayObject":21:{x:i:0;a:0:{};m:a:0:{}}', id="custom-object"),
    pytest.param(b'E:11:"Suit:Hearts";', id="enum"),
    pytest.param(b"r:1;", id="object-reference"),
    pytest.param(b"R:1;", id="reference"),
]


@pytest.mark.parametrize("payload", _REFUSED)
def test_objects_enums_and_references_are_refused(payload: bytes) -> None:
    """A top-level object, enum or reference raises RefusedPayloadError naming offset 0."""
    with pytest.raises(RefusedPayloadError) as caught:
        loads(payload)
    assert str(caught.value).startswith("refused PHP serialize data at offset 0: PHP ")
    assert str(caught.value).endswith(" is never instantiated")


@pytest.mark.parametrize("payload", _REFUSED)
@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"a:1:{i:0;", b"}"),
        (b'a:2:{s:1:"k";N;s:1:"v";', b"}"),
        (b'a:1:{i:0;a:2:{i:0;s:3:"abc";i:1;', b"}}"),
    ],
)
def test_refusal_reaches_inside_arrays(payload: bytes, before: bytes, after: bytes) -> None:
    """An object, enum or reference nested in arrays is refused at its own offset."""
    with pytest.raises(RefusedPayloadError) as caught:
        loads(before + payload + after)
    assert str(caught.value).startswith(f"refused PHP serialize data at offset {len(before)}: ")


@pytest.mark.parametrize(
    "data",
    [
        b"a:2:{i:0;a:1:{i:0;i:1;}i:1;R:2;}",  # serialize([&$a, &$a]) in PHP 8.2
        b'a:2:{i:0;O:8:"stdClass":0:{}i:1;r:2;}',  # serialize([$o, $o]) in PHP 8.2
    ],
)
def test_real_php_output_with_references_is_refused(data: bytes) -> None:
    """Real serialize() output that shares a value by reference is refused, not half-decoded."""
    with pytest.raises(RefusedPayloadError):
        loads(data)


def test_non_utf8_array_key_is_refused() -> None:
    """A binary string key cannot be a Python dict key, so it is refused rather than mangled."""
    with pytest.raises(RefusedPayloadError) as caught:
        loads(b'a:1:{s:1:"\xff";i:1;}')
    assert str(caught.value) == (
        "refused PHP serialize data at offset 5: array key is not valid UTF-8"
    )


def _nested(depth: int) -> bytes:
    return b"a:1:{i:0;" * depth + b"N;" + b"}" * depth


def test_nesting_up_to_max_depth_decodes() -> None:
    """Arrays nested exactly max_depth (32) deep decode."""
    value = loads(_nested(32))
    for _ in range(32):
        assert isinstance(value, list)
        assert len(value) == 1
        value = value[0]
    assert value is None


def test_nesting_beyond_max_depth_is_refused() -> None:
    """The 33rd nested array is refused at its own offset."""
    with pytest.raises(RefusedPayloadError) as caught:
        loads(_nested(33))
    assert str(caught.value) == (
        "refused PHP serialize data at offset 288: arrays nested deeper than 32 levels"
    )


def test_max_depth_is_configurable() -> None:
    """max_depth=0 allows scalars only, and a larger max_depth admits deeper arrays."""
    assert loads(b"i:1;", max_depth=0) == 1
    with pytest.raises(RefusedPayloadError):
        loads(b"a:0:{}", max_depth=0)
    expected: PhpValue = None
    for _ in range(40):
        expected = [expected]
    assert loads(_nested(40), max_depth=40) == expected


def test_negative_max_depth_is_a_caller_bug() -> None:
    """A negative max_depth raises ValueError, not a message error."""
    with pytest.raises(ValueError, match="max_depth must be >= 0"):
        loads(b"N;", max_depth=-1)


def test_hostile_nesting_is_refused_at_the_limit() -> None:
    """A message opening 100 000 arrays is refused at the depth limit, without recursion."""
    with pytest.raises(RefusedPayloadError, match="deeper than"):
        loads(b"a:1:{i:0;" * 100_000)


def test_deep_nesting_never_hits_the_recursion_limit() -> None:
    """With a huge max_depth, 10 000 nested arrays decode; the parser does not recurse."""
    value = loads(_nested(10_000), max_depth=100_000)
    for _ in range(10_000):
        assert isinstance(value, list)
        value = value[0]
    assert value is None


_MALFORMED = [
    # nothing, or not a PHP value at all
    (b"", 0, "expected a value, found end of data"),
    (b"x", 0, "expected a value, found 'x'"),
    (b"\x00", 0, "expected a value, found '\\x00'"),
    (b'{"json": 1}', 0, "expected a value, found '{'"),
    (b'S:1:"\\61";', 0, "expected a value, found 'S'"),
    (b"n;", 0, "expected a value, found 'n'"),
    (b"}", 0, "expected a value, found '}'"),
    # null
    (b"N", 1, "expected ';', found end of data"),
    (b"N:", 1, "expected ';'"),
    # bool
    (b"b:2;", 2, "expected 0 or 1"),
    (b"b:01;", 3, "expected ';'"),
    (b"b:+1;", 2, "expected 0 or 1"),
    (b"b:true;", 2, "expected 0 or 1"),
    (b"b:;", 2, "expected 0 or 1"),
    (b"b:1", 3, "expected ';', found end of data"),
    (b"b1;", 1, "expected ':'"),
    # int
    (b"i:5", 3, "expected ';', found end of data"),
    (b"i:5x", 3, "expected ';'"),
    (b"i:;", 2, "expected a decimal integer"),
    (b"i:-;", 2, "expected a decimal integer"),
    (b"i: 5;", 2, "expected a decimal integer"),
    (b"i:5.0;", 3, "expected ';'"),
    (b"i:0x10;", 3, "expected ';'"),
    (b"i:1_000;", 3, "expected ';'"),
    (b"i:" + b"9" * 5000 + b";", 2, "integer has too many digits"),
    (b"i", 1, "expected ':', found end of data"),
    # float
    (b"d:;", 2, "expected a float"),
    (b"d:1.5", 5, "expected ';', found end of data"),
    (b"d:1.5e+;", 5, "expected ';'"),
    (b"d:.;", 2, "expected a float"),
    (b"d:inf;", 2, "expected a float"),
    (b"d:infinity;", 2, "expected a float"),
    (b"d:-NAN;", 2, "expected a float"),
    (b"d:+INF;", 2, "expected a float"),
    (b"d:1_0;", 3, "expected ';'"),
    (b"d:0x10;", 3, "expected ';'"),
    (b"d: 1;", 2, "expected a float"),
    # string
    (b's:5:"hello"', 11, "expected ';', found end of data"),
    (b's:5:"hello"x', 11, "expected ';'"),
    (b's:5:"hell";', 10, "expected '\"'"),
    (b's:3:"hello";', 8, "expected '\"'"),
    (b's:5:"hello', 10, "expected '\"', found end of data"),
    (b's:6:"hello', 0, "string length 6 exceeds the remaining input"),
    (b"s:5:hello;", 3, "expected ':\"'"),
    (b's:5"hello";', 3, "expected ':\"'"),
    (b's:-1:"";', 2, "expected a string length"),
    (b's:+1:"a";', 2, "expected a string length"),
    (b's::"";', 2, "expected a string length"),
    (b's:1:"a";;', 8, "trailing bytes after the value"),
    (b's:999999999:"', 0, "string length 999999999 exceeds the remaining input"),
    (b"s:" + b"9" * 40 + b':"a";', 2, "string length exceeds the remaining input"),
    # array
    (b"a:1:{i:0;i:1;", 13, "expected an array key (i: or s:) or '}', found end of data"),
    (b"a:1:{i:0;i:1;;", 13, "expected an array key (i: or s:) or '}', found ';'"),
    (b"a:1:i:0;i:1;}", 3, "expected ':{'"),
    (b"a:1{i:0;i:1;}", 3, "expected ':{'"),
    (b"a:-1:{}", 2, "expected an array count"),
    (b"a::{}", 2, "expected an array count"),
    (b"a:0:{", 5, "expected an array key (i: or s:) or '}', found end of data"),
    (b"a:999999999:{", 13, "array count 999999999 exceeds the remaining input"),
    (b"a:2:{i:0;i:1;}", 5, "array count 2 exceeds the remaining input"),
    (b'a:2:{i:0;s:10:"xxxxxxxxxx";}', 27, "array count 2 but '}' after 1 entries"),
    (b"a:1:{i:0;i:1;i:1;i:2;}", 13, "expected '}' after 1 entries (the array count)"),
    (b"a:1:{i:0;}", 5, "array count 1 exceeds the remaining input"),
    (b'a:1:{i:0;s:3:"abc";}}', 20, "trailing bytes after the value"),
    (b"a:1:{b:1;i:1;}", 5, "expected an array key (i: or s:) or '}', found 'b'"),
    (b"a:1:{d:1.5;i:1;}", 5, "expected an array key (i: or s:) or '}', found 'd'"),
    (b"a:1:{N;i:1;}", 5, "expected an array key (i: or s:) or '}', found 'N'"),
    (b"a:1:{a:0:{}i:1;}", 5, "expected an array key (i: or s:) or '}', found 'a'"),
    (b"a:1:{r:1;i:1;}", 5, "expected an array key (i: or s:) or '}', found 'r'"),
    (b"a:1:{i:0;}i:1;", 9, "expected a value, found '}'"),
    (b'a:2:{s:1:"a";i:1;s:1:"a";i:2;}', 17, "duplicate array key 'a'"),
    (b'a:2:{i:1;i:1;s:1:"1";i:2;}', 13, "duplicate array key 1"),
    (b"a:1:{i:99999999999999999999;i:1;}", 5, "integer array key outside PHP's 64-bit range"),
    # one value, then more
    (b"N;N;", 2, "trailing bytes after the value"),
    (b"i:1;\n", 4, "trailing bytes after the value"),
    (b"a:1:{i:0;i:1;};", 14, "trailing bytes after the value"),
]


@pytest.mark.parametrize(("data", "offset", "reason"), _MALFORMED)
def test_malformed_input_names_offset_and_reason(data: bytes, offset: int, reason: str) -> None:
    """Malformed input raises MessageError (not a refusal) naming the offset and the reason."""
    with pytest.raises(MessageError) as caught:
        loads(data)
    assert type(caught.value) is MessageError
    assert str(caught.value) == f"malformed PHP serialize data at offset {offset}: {reason}"


@pytest.mark.parametrize(
    "data",
    [b's:999999999:"', b"a:999999999:{", b"s:" + b"9" * 40 + b':"', b's:4294967295:"' + b"x" * 64],
)
def test_huge_declared_lengths_fail_without_allocating(data: bytes) -> None:
    """A declared length or count larger than the input fails before anything is allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(MessageError, match="exceeds the remaining input"):
            loads(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@pytest.mark.parametrize(
    "data",
    [b"N;", b's:0:"";', b"i:1;", b"d:1;", b"b:1;", b"a:0:{}", b"O:", b"C:", b"E:", b"r:", b"R:"],
)
def test_looks_serialized_accepts_php_prefixes(data: bytes) -> None:
    """Data starting like any PHP serialized value, refused kinds included, looks serialized."""
    assert looks_serialized(data)


@pytest.mark.parametrize(
    "data", [b"", b"N", b"n;", b"s", b"hello", b'{"a": 1}', b"\x80\x04K\x01.", b"S:1:", b"x:"]
)
def test_looks_serialized_rejects_other_data(data: bytes) -> None:
    """Empty data, plain text, JSON, pickles and unknown tags do not look serialized."""
    assert not looks_serialized(data)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"N;"),
        (True, b"b:1;"),
        (False, b"b:0;"),
        (0, b"i:0;"),
        (-42, b"i:-42;"),
        (2**63 - 1, b"i:9223372036854775807;"),
        (0.1, b"d:0.1;"),
        (0.1 + 0.2, b"d:0.30000000000000004;"),
        (1.0, b"d:1;"),
        (-0.0, b"d:-0;"),
        (0.0, b"d:0;"),
        (100.0, b"d:100;"),
        (1e15, b"d:1000000000000000;"),
        (1e16, b"d:10000000000000000;"),
        (1e17, b"d:1.0E+17;"),
        (123456789012345678.0, b"d:1.2345678901234568E+17;"),
        (1e25, b"d:1.0E+25;"),
        (1e-4, b"d:0.0001;"),
        (1e-5, b"d:1.0E-5;"),
        (-1.25e-5, b"d:-1.25E-5;"),
        (5e-324, b"d:5.0E-324;"),
        (1.7976931348623157e308, b"d:1.7976931348623157E+308;"),
        (math.inf, b"d:INF;"),
        (-math.inf, b"d:-INF;"),
        (math.nan, b"d:NAN;"),
        ("hello", b's:5:"hello";'),
        ("é", b's:2:"\xc3\xa9";'),
        ('q"x', b's:3:"q"x";'),
        (b"\xff\xfe", b's:2:"\xff\xfe";'),
        (b"", b's:0:"";'),
        ([], b"a:0:{}"),
        ({}, b"a:0:{}"),
        ([1, "a"], b'a:2:{i:0;i:1;i:1;s:1:"a";}'),
        ({"a": 1}, b'a:1:{s:1:"a";i:1;}'),
        ({"7": 1, "-7": 2}, b"a:2:{i:7;i:1;i:-7;i:2;}"),
        ({"07": 1, "-0": 2, "+7": 3}, b'a:3:{s:2:"07";i:1;s:2:"-0";i:2;s:2:"+7";i:3;}'),
        ({"9223372036854775808": 1}, b'a:1:{s:19:"9223372036854775808";i:1;}'),
        ({"-9223372036854775808": 1}, b"a:1:{i:-9223372036854775808;i:1;}"),
        ({"k": [None, {"z": 0.5}]}, b'a:1:{s:1:"k";a:2:{i:0;N;i:1;a:1:{s:1:"z";d:0.5;}}}'),
    ],
)
def test_dumps_writes_what_php_serialize_writes(value: PhpValue, expected: bytes) -> None:
    """dumps() produces PHP 8's serialize() bytes, floats and integer-like keys included."""
    assert dumps(value) == expected


def test_dumps_allows_a_shared_value_that_is_not_a_cycle() -> None:
    """The same list twice in a value is written twice, as PHP does without references."""
    shared: list[PhpValue] = [1]
    assert dumps([shared, shared]) == b"a:2:{i:0;a:1:{i:0;i:1;}i:1;a:1:{i:0;i:1;}}"


def _cycle() -> object:
    looped: list[object] = []
    looped.append({"self": looped})
    return looped


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1, 2}, "cannot serialize set as PHP data"),
        ((1, 2), "cannot serialize tuple as PHP data"),
        (bytearray(b"x"), "cannot serialize bytearray as PHP data"),
        ({1: "a"}, "PHP array keys are strings, not int"),
        ("\ud800", "string cannot be encoded as UTF-8: surrogates not allowed"),
        ({"\ud800": 1}, "string cannot be encoded as UTF-8: surrogates not allowed"),
        pytest.param(10**5000, "integer has too many digits to serialize", id="huge-int"),
        pytest.param(_cycle(), "cannot serialize an array that contains itself", id="cycle"),
    ],
)
def test_dumps_refuses_what_php_data_cannot_hold(value: object, message: str) -> None:
    """Values outside PhpValue, unencodable strings and cycles raise PayloadError."""
    with pytest.raises(PayloadError) as caught:
        dumps(value)  # type: ignore[arg-type]
    assert str(caught.value) == message


_keys = st.one_of(st.text(max_size=8), st.integers(-3, 12).map(str), st.just("07"))
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(st.characters(codec="utf-8")),
    st.binary(max_size=16),
)
_values: st.SearchStrategy[PhpValue] = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(_keys, inner, max_size=5),
    ),
    max_leaves=25,
)


def _as_decoded(value: PhpValue) -> PhpValue:
    """The value loads() gives back for dumps(value): UTF-8 bytes become str, and a dict keyed
    "0".."n-1" in order becomes a list, because PHP stores those keys as integers."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, list):
        return [_as_decoded(item) for item in value]
    if isinstance(value, dict):
        if list(value) == [str(i) for i in range(len(value))]:
            return [_as_decoded(item) for item in value.values()]
        return {key: _as_decoded(item) for key, item in value.items()}
    return value


def _loads_or_message_error(data: bytes) -> PhpValue | MessageError:
    try:
        return loads(data)
    except MessageError as exc:  # RefusedPayloadError is a MessageError
        return exc


@settings(max_examples=200, deadline=None)
@given(_values)
def test_roundtrip_through_dumps_and_loads(value: PhpValue) -> None:
    """loads(dumps(v)) gives v back, as PHP would normalise it."""
    assert loads(dumps(value), max_depth=64) == _as_decoded(value)


@settings(max_examples=300, deadline=None)
@given(st.floats())
def test_every_float_roundtrips_exactly(number: float) -> None:
    """Every float, NaN, infinities and -0.0 included, comes back bit for bit."""
    decoded = loads(dumps(number))
    assert isinstance(decoded, float)
    assert decoded.hex() == number.hex() or (math.isnan(decoded) and math.isnan(number))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_message_errors(data: bytes) -> None:
    """Arbitrary bytes decode or raise MessageError; nothing else escapes."""
    _loads_or_message_error(data)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet='aisdbNOCErR:;{}"0123456789.-+EINFA\xe9', max_size=48))
def test_grammar_shaped_noise_only_raises_message_errors(text: str) -> None:
    """Strings built from the format's own characters decode or raise MessageError."""
    _loads_or_message_error(text.encode())


@settings(max_examples=200, deadline=None)
@given(_values, st.data())
def test_mutated_encodings_decode_or_raise_message_errors(
    value: PhpValue, data: st.DataObject
) -> None:
    """A valid encoding with one byte deleted, inserted, replaced, or cut off decodes to a
    value that re-encodes stably, or raises MessageError."""
    encoded = bytearray(dumps(value))
    index = data.draw(st.integers(0, len(encoded)))
    mutation = data.draw(st.sampled_from(["delete", "insert", "replace", "truncate"]))
    if mutation == "truncate":
        del encoded[index:]
    elif mutation == "insert":
        encoded.insert(index, data.draw(st.sampled_from(b':;{}"0123456789-aisdbNOR\xff')))
    elif index < len(encoded):
        if mutation == "delete":
            del encoded[index]
        else:
            encoded[index] = data.draw(st.integers(0, 255))
    decoded = _loads_or_message_error(bytes(encoded))
    if not isinstance(decoded, MessageError):
        assert dumps(loads(dumps(decoded), max_depth=64)) == dumps(decoded)


@pytest.fixture
def php() -> str:
    """The php-cli executable; the PHP tests are skipped where it is not installed."""
    path = shutil.which("php")
    if path is None:
        pytest.skip("php-cli not installed: no `php` executable on PATH")
    return path


def _run_php(php: str, code: str, stdin: bytes = b"", *, ini: bool = False) -> bytes:
    """Run PHP code; without ``ini``, php.ini is ignored so PHP's own defaults apply."""
    argv = [php, "-r", code] if ini else [php, "-n", "-r", code]
    return subprocess.run(argv, input=stdin, capture_output=True, check=True, timeout=60).stdout


_PHP_VALUES = r"""[
    "plain", 'say "hi"; s:1:"x";', "é😀 multibyte", "", "\xff\xfe binary",
    0, -1, PHP_INT_MAX, PHP_INT_MIN,
    0.1, 1e25, -1.25e-5, 1.0, -0.0, 100.0, 1e17, 0.1 + 0.2, INF, -INF,
    true, false, null,
    [], [1, 2, 3], ["a" => 1, "b" => [true, null]], [5 => "x", "07" => "y", "7" => "z"],
    ["deep" => [[["list", ["k" => 2.5]]]]],
]"""
_PYTHON_VALUES: list[PhpValue] = [
    "plain",
    'say "hi"; s:1:"x";',
    "é😀 multibyte",
    "",
    b"\xff\xfe binary",
    0,
    -1,
    2**63 - 1,
    -(2**63),
    0.1,
    1e25,
    -1.25e-5,
    1.0,
    -0.0,
    100.0,
    1e17,
    0.1 + 0.2,
    math.inf,
    -math.inf,
    True,
    False,
    None,
    [],
    [1, 2, 3],
    {"a": 1, "b": [True, None]},
    {"5": "x", "07": "y", "7": "z"},
    {"deep": [[["list", {"k": 2.5}]]]},
]


def test_decodes_php_serialize_output(php: str) -> None:
    """loads() of PHP's serialize() output equals the same values written in Python, and
    dumps() of those values is byte-identical to PHP's output."""
    output = _run_php(php, f"echo serialize({_PHP_VALUES});")
    assert loads(output) == _PYTHON_VALUES
    assert dumps(_PYTHON_VALUES) == output
    nan = loads(_run_php(php, "echo serialize(NAN);"))
    assert isinstance(nan, float)
    assert math.isnan(nan)


def test_php_unserializes_what_dumps_writes(php: str) -> None:
    """PHP's unserialize() accepts dumps() output and serializes it back to the same bytes,
    which checks the float format on a thousand random floats."""
    rng = random.Random(20240601)
    floats: list[PhpValue] = [rng.uniform(-1e6, 1e6) for _ in range(300)]
    floats += [rng.random() * 10.0 ** rng.randint(-330, 308) for _ in range(500)]
    floats += [float(rng.randint(-(10**18), 10**18)) for _ in range(200)]
    value: list[PhpValue] = [*_PYTHON_VALUES, floats]
    encoded = dumps(value)
    output = _run_php(php, "echo serialize(unserialize(stream_get_contents(STDIN)));", encoded)
    assert output == encoded


def test_decodes_what_php_msg_send_puts_on_a_queue(php: str) -> None:
    """The raw body PHP's msg_send() puts on a System V queue is serialize() output that
    loads() decodes."""
    if _run_php(php, 'echo function_exists("msg_send") ? "yes" : "no";', ini=True) != b"yes":
        pytest.skip("php-cli has no sysvmsg extension: msg_send() is not available")
    code = (
        "$q = msg_get_queue(0, 0600);"  # key 0 is IPC_PRIVATE: a new queue nobody else sees
        "try {"
        f" msg_send($q, 7, {_PHP_VALUES});"
        " msg_receive($q, 7, $type, 1 << 20, $raw, false);"
        " echo $raw;"
        "} finally { msg_remove_queue($q); }"
    )
    assert loads(_run_php(php, code, ini=True)) == _PYTHON_VALUES
