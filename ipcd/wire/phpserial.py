"""Safe decoding of PHP's ``serialize()`` format, the default body of PHP's ``msg_send``.

PHP clients queue jobs with ``msg_send($queue, $type, $data)``, whose ``$serialize``
argument defaults to true: the message body is ``serialize($data)``, e.g. ``s:5:"hello";``.
This module is the one place in ipcd that reads (:func:`loads`) and writes (:func:`dumps`)
that format.

Only plain data is decoded: null, bools, ints, floats, strings and arrays. Objects (``O:``,
``C:``), enums (``E:``) and references (``r:``, ``R:``) raise :class:`RefusedPayloadError`
and nothing is ever instantiated. Unserializing attacker-chosen objects is how "PHP object
injection" runs code (through ``__wakeup`` and ``__destruct``), and ipcd keeps the same rule
for itself: it never unpickles or evals anything it takes from the queue. Anyone allowed to
write to the queue chooses these bytes, so every declared length and count is checked
against the bytes that remain before it is used, and nesting is bounded by ``max_depth``.
The parser keeps its own stack rather than recursing, so no input can reach Python's
recursion limit.

Where PHP is lenient, :func:`loads` is strict. Bytes after the value are an error (PHP
ignores them), and so are duplicate array keys (PHP keeps the last one). PHP's own
``serialize()`` never writes either.
"""

from __future__ import annotations

import math
import re
from typing import TypeAlias

from ipcd.errors import MessageError, PayloadError, RefusedPayloadError

__all__ = ["PhpValue", "dumps", "loads", "looks_serialized"]

PhpValue: TypeAlias = (
    bool | int | float | str | bytes | list["PhpValue"] | dict[str, "PhpValue"] | None
)

#: The tags ipcd recognises but refuses to decode, and the reason given for each.
_REFUSED = {
    b"O": "PHP object (O:)",
    b"C": "PHP custom-serialized object (C:)",
    b"E": "PHP enum (E:)",
    b"r": "PHP reference (r:)",
    b"R": "PHP reference (R:)",
}
_PREFIXES = frozenset({b"N;", b"s:", b"i:", b"d:", b"b:", b"a:"} | {t + b":" for t in _REFUSED})

# The grammar of PHP's unserializer (ext/standard/var_unserializer.re). The patterns exist
# because int() and float() also accept spaces, underscores and spellings like "infinity".
_INT_RE = rb"[+-]?[0-9]+"
_FLOAT_RE = rb"NAN|-?INF|[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_LENGTH_RE = rb"[0-9]+"
#: One token, matched in a single step because a Python-level step per byte is too slow.
#: A string token ends at its opening quote; the declared length finds the closing one.
_TOKEN = re.compile(
    b'i:(%s);|s:(%s):"|d:(%s);|b:([01]);|(N);|a:(%s):\\{|(\\})'
    % (_INT_RE, _LENGTH_RE, _FLOAT_RE, _LENGTH_RE)
)
_INT, _STR, _FLOAT, _BOOL, _NULL, _ARRAY, _END = range(1, 8)  # group numbers in _TOKEN
#: How each kind of token goes on after its tag, step by step, so that a token _TOKEN did
#: not match can be explained: a literal, or a pattern with what it stands for.
_STEPS: dict[bytes, tuple[bytes | tuple[re.Pattern[bytes], str], ...]] = {
    b"i": (b":", (re.compile(_INT_RE), "a decimal integer"), b";"),
    b"s": (b":", (re.compile(_LENGTH_RE), "a string length"), b':"'),
    b"d": (b":", (re.compile(_FLOAT_RE), "a float"), b";"),
    b"b": (b":", (re.compile(rb"[01]"), "0 or 1"), b";"),
    b"N": (b";",),
    b"a": (b":", (re.compile(_LENGTH_RE), "an array count"), b":{"),
}
#: How an object, enum or reference really starts: text such as "C:\\Windows" or "E:mail"
#: is not refused as an object, it is malformed PHP and so travels as plain text.
_REFUSED_HEADER = re.compile(rb'[OCE]:[0-9]+:"|[rR]:[0-9]+;')
#: A string PHP turns into an integer key ("7", "-7"; not "07", "-0" or "+7").
_INT_KEY = re.compile(r"0|-?[1-9][0-9]*")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_KEY_OR_END = "an array key (i: or s:) or '}'"
#: The shortest array entry is ``i:0;N;``; a count promising more entries than fit is a lie.
_MIN_ENTRY = 6
#: Significant digits beyond which a declared length cannot describe any real message.
_MAX_LENGTH_DIGITS = 18


def looks_serialized(data: bytes) -> bool:
    """Tell whether ``data`` starts like a PHP serialized value, without parsing it."""
    return data[:2] in _PREFIXES


def loads(data: bytes, *, max_depth: int = 32) -> PhpValue:
    """Decode one PHP serialized value that fills all of ``data``.

    Strings that are valid UTF-8 become ``str``, other strings stay ``bytes``. An array
    whose keys are exactly ``0..n-1`` in order becomes a ``list``, any other array a
    ``dict`` whose integer keys are written as decimal strings. Raises
    :class:`RefusedPayloadError` for objects, enums, references, non-UTF-8 keys and arrays
    nested deeper than ``max_depth``, and :class:`MessageError` for anything malformed.
    """
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, not {max_depth}")
    buf = bytes(data)
    match = _TOKEN.match
    stack: list[_Array] = []
    top: _Array | None = None  # the innermost open array, stack[-1]
    want_key = False  # whether the next token is a key (or the '}') of ``top``
    key: int | str = 0  # the key of the value being read, when top is not None
    pos = 0
    while True:
        token = match(buf, pos)
        if token is None:
            raise _explain(buf, pos, want_key)
        kind = token.lastindex
        pos = token.end()
        value: PhpValue
        if want_key:
            assert top is not None
            if kind != _END:
                key, pos = top.read_key(buf, token)
                want_key = False
                continue
            if len(top.items) != top.count:
                found = len(top.items)
                raise _malformed(pos - 1, f"array count {top.count} but '}}' after {found} entries")
            value = top.finish()
            key = top.parent_key
            stack.pop()
            top = stack[-1] if stack else None
        elif kind == _STR:
            raw, pos = _read_string(buf, token)
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = raw
        elif kind == _INT:
            value = _to_int(token)
        elif kind == _FLOAT:
            value = float(token.group(_FLOAT))
        elif kind == _BOOL:
            value = token.group(_BOOL) == b"1"
        elif kind == _NULL:
            value = None
        elif kind == _ARRAY:
            count = _to_length(token, _ARRAY, "array count")
            if len(stack) >= max_depth:
                raise _refused(token.start(), f"arrays nested deeper than {max_depth} levels")
            if count and count > (len(buf) - pos - 1) // _MIN_ENTRY:
                raise _malformed(pos, f"array count {count} exceeds the remaining input")
            top = _Array(count, key)
            stack.append(top)
            want_key = True
            continue
        else:
            raise _malformed(pos - 1, "expected a value, found '}'")
        if top is None:
            break
        top.items[key] = value
        want_key = True
    if pos != len(buf):
        raise _malformed(pos, "trailing bytes after the value")
    return value


class _Array:
    """An array being decoded: its declared count and the entries read so far."""

    __slots__ = ("count", "is_list", "items", "parent_key")

    def __init__(self, count: int, parent_key: int | str) -> None:
        self.count = count
        self.parent_key = parent_key  # where the finished array goes in the enclosing one
        self.items: dict[int | str, PhpValue] = {}
        self.is_list = True

    def read_key(self, buf: bytes, token: re.Match[bytes]) -> tuple[int | str, int]:
        """Turn ``token`` into a key the way PHP stores it; return it and the next offset."""
        start = token.start()
        if len(self.items) == self.count:
            raise _malformed(start, f"expected '}}' after {self.count} entries (the array count)")
        key: int | str
        if token.lastindex == _INT:
            key, end = _to_int(token), token.end()
            if not _INT64_MIN <= key <= _INT64_MAX:
                raise _malformed(start, "integer array key outside PHP's 64-bit range")
        elif token.lastindex == _STR:
            raw, end = _read_string(buf, token)
            try:
                key = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _refused(start, "array key is not valid UTF-8") from None
            if _INT_KEY.fullmatch(key) and _INT64_MIN <= int(key) <= _INT64_MAX:
                key = int(key)
        else:
            raise _malformed(start, f"expected {_KEY_OR_END}, found {_shown(buf, start)}")
        if key in self.items:
            raise _malformed(start, f"duplicate array key {key!r}")
        self.is_list = self.is_list and key == len(self.items)
        return key, end

    def finish(self) -> PhpValue:
        """Return the decoded array: a list if its keys were 0..n-1 in order, else a dict."""
        if self.is_list:
            return list(self.items.values())
        return {str(k): v for k, v in self.items.items()}


def _read_string(buf: bytes, token: re.Match[bytes]) -> tuple[bytes, int]:
    """Read the bytes of the string whose ``s:<length>:"`` is ``token``, and the ``";``."""
    length = _to_length(token, _STR, "string length")
    start = token.end()
    stop = start + length
    if stop > len(buf):
        raise _malformed(token.start(), f"string length {length} exceeds the remaining input")
    if not buf.startswith(b'";', stop):
        quoted = buf.startswith(b'"', stop)
        raise _missing(buf, stop + 1, b";") if quoted else _missing(buf, stop, b'"')
    return buf[start:stop], stop + 2


def _to_int(token: re.Match[bytes]) -> int:
    try:
        return int(token.group(_INT))
    except ValueError:  # sys.get_int_max_str_digits() guards int() against quadratic time
        raise _malformed(token.start(_INT), "integer has too many digits") from None


def _to_length(token: re.Match[bytes], group: int, what: str) -> int:
    """Read a declared length, refusing one too long to describe any real input."""
    digits = token.group(group)
    if len(digits) > _MAX_LENGTH_DIGITS:
        digits = digits.lstrip(b"0") or b"0"
        if len(digits) > _MAX_LENGTH_DIGITS:
            raise _malformed(token.start(group), f"{what} exceeds the remaining input")
    return int(digits)


def _explain(buf: bytes, pos: int, want_key: bool) -> MessageError:
    """Say why no token starts at ``pos``: the first step of PHP's grammar that fails."""
    tag = buf[pos : pos + 1]
    wanted = _KEY_OR_END if want_key else "a value"
    if tag in _REFUSED and not want_key and _REFUSED_HEADER.match(buf, pos):
        return _refused(pos, f"{_REFUSED[tag]} is never instantiated")
    if tag not in _STEPS or (want_key and tag not in b"is"):
        return _malformed(pos, f"expected {wanted}, found {_shown(buf, pos)}")
    pos += 1
    for step in _STEPS[tag]:
        if isinstance(step, bytes):
            if not buf.startswith(step, pos):
                return _missing(buf, pos, step)
            pos += len(step)
        else:
            found = step[0].match(buf, pos)
            if found is None:
                return _malformed(pos, f"expected {step[1]}")
            pos = found.end()
    return _malformed(pos, "invalid token")  # unreachable while _STEPS mirrors _TOKEN


def _shown(buf: bytes, pos: int) -> str:
    """Name the byte at ``pos`` for an error message."""
    return repr(buf[pos : pos + 1].decode("latin-1")) if pos < len(buf) else "end of data"


def _missing(buf: bytes, pos: int, token: bytes) -> MessageError:
    """Report that ``token`` is not at ``pos``, saying so when the data simply stops."""
    rest = buf[pos : pos + len(token)]
    found = ", found end of data" if len(rest) < len(token) and token.startswith(rest) else ""
    return _malformed(pos, f"expected {token.decode()!r}{found}")


def _malformed(pos: int, reason: str) -> MessageError:
    return MessageError(f"malformed PHP serialize data at offset {pos}: {reason}")


def _refused(pos: int, reason: str) -> RefusedPayloadError:
    return RefusedPayloadError(f"refused PHP serialize data at offset {pos}: {reason}")


def dumps(value: PhpValue) -> bytes:
    """Encode ``value`` byte for byte as PHP's ``serialize()`` would encode it.

    A list is written with keys ``0..n-1``. In a dict, a key that PHP would store as an
    integer (``"7"`` but not ``"07"``) is written as ``i:``, because ``serialize()`` writes
    it that way. Raises :class:`PayloadError` for types outside :data:`PhpValue` (dict keys
    included), for strings that cannot be encoded as UTF-8, for ints too long for ``str()``
    and for arrays that contain themselves.
    """
    out: list[bytes] = []
    _dump(value, out, set())
    return b"".join(out)


def _dump(value: PhpValue, out: list[bytes], open_ids: set[int]) -> None:
    """Append the encoding of ``value`` to ``out``; ``open_ids`` are the enclosing arrays."""
    if value is None:
        out.append(b"N;")
    elif isinstance(value, bool):
        out.append(b"b:1;" if value else b"b:0;")
    elif isinstance(value, int):
        try:
            out.append(b"i:%d;" % value)
        except ValueError:  # int→str is capped by sys.get_int_max_str_digits()
            raise PayloadError("integer has too many digits to serialize") from None
    elif isinstance(value, float):
        out.append(b"d:%s;" % _php_float(value).encode("ascii"))
    elif isinstance(value, str | bytes):
        raw = _utf8(value) if isinstance(value, str) else value
        out.append(b's:%d:"%s";' % (len(raw), raw))
    elif isinstance(value, list | dict):
        if id(value) in open_ids:
            raise PayloadError("cannot serialize an array that contains itself")
        open_ids.add(id(value))
        out.append(b"a:%d:{" % len(value))
        if isinstance(value, list):
            for index, item in enumerate(value):
                out.append(b"i:%d;" % index)
                _dump(item, out, open_ids)
        else:
            for key, item in value.items():
                out.append(_dump_key(key))
                _dump(item, out, open_ids)
        out.append(b"}")
        open_ids.discard(id(value))
    else:
        raise PayloadError(f"cannot serialize {type(value).__name__} as PHP data")


def _dump_key(key: str) -> bytes:
    """Encode an array key the way PHP stores it: integer-like strings become integers."""
    if not isinstance(key, str):
        raise PayloadError(f"PHP array keys are strings, not {type(key).__name__}")
    if _INT_KEY.fullmatch(key) and _INT64_MIN <= int(key) <= _INT64_MAX:
        return b"i:%s;" % key.encode("ascii")
    raw = _utf8(key)
    return b's:%d:"%s";' % (len(raw), raw)


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadError(f"string cannot be encoded as UTF-8: {exc.reason}") from None


def _php_float(value: float) -> str:
    """Format ``value`` as PHP 7.1+ does (serialize_precision -1, PHP's ``php_gcvt``).

    PHP writes the shortest digits that round-trip, like ``repr``, but in fixed notation
    only while the decimal exponent is within -4..16 (``0.0001``, ``1.0E-5``, ``1.0E+17``),
    and a float with no fraction loses its ``.0`` (``d:1;``, ``d:-0;``).
    """
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "INF" if value > 0 else "-INF"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    all_digits = whole + fraction
    digits = all_digits.strip("0")
    # Position of the decimal point relative to the first significant digit: 0.DIGITS x 10^point
    point = len(whole) + int(exponent or 0) - (len(all_digits) - len(all_digits.lstrip("0")))
    if point < -3 or point > 17:
        shown = point - 1
        return f"{sign}{digits[0]}.{digits[1:] or '0'}E{'+' if shown >= 0 else '-'}{abs(shown)}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"
