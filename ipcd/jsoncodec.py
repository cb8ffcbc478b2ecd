"""JSON encoders and a decoder made once and reused by the per-job paths.

``json.dumps``, ``json.loads`` and even a kept ``JSONEncoder`` redo set-up work on every
call: ``JSONEncoder.encode`` builds a new C encoder (and a dict for its circular-reference
check) each time, and ``JSONDecoder.decode`` wraps the C scanner in whitespace checks.
That is 3 to 4 microseconds a call, and a job is encoded or decoded four times on its way
(envelope, result, log line), which is a real share of what ipcd adds to a no-op job.
Here the C encoder is built once per configuration and called directly.

Without the C accelerator (another Python implementation) the standard classes serve.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _encoder
from typing import Any, cast

Encode = Callable[[Any], str]


def encoder(
    *,
    ensure_ascii: bool,
    allow_nan: bool,
    default: Callable[[Any], Any] | None = None,
    separators: tuple[str, str] = (",", ":"),
) -> Encode:
    """An encoder with these options, compact unless ``separators`` say otherwise.

    There is no circular-reference check: a value that contains itself raises
    RecursionError, which callers treat like any value that cannot be encoded.
    """
    make = getattr(_encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has the accelerator
        return json.JSONEncoder(
            separators=separators, ensure_ascii=ensure_ascii, allow_nan=allow_nan, default=default
        ).encode
    strings = _encoder.encode_basestring_ascii if ensure_ascii else _encoder.encode_basestring
    # (markers, default, encoder, indent, key_separator, item_separator, sort_keys,
    #  skipkeys, allow_nan): the C signature json.encoder itself calls.
    item, key = separators
    chunks = make(None, default or _unencodable, strings, None, key, item, False, False, allow_nan)

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return str(strings(value))
        return "".join(chunks(value, 0))

    return encode


def _unencodable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def object_decoder(parse_constant: Callable[[str], Any]) -> Callable[[str], Any]:
    """A decoder for a text that starts with a JSON value and has nothing after it but
    whitespace; raises ValueError (or RecursionError) like ``json.loads``."""
    # JSONDecoder keeps its C scanner as ``scan_once`` (typeshed does not declare it).
    scan = cast(Any, json.JSONDecoder(parse_constant=parse_constant)).scan_once

    def decode(text: str) -> Any:
        try:
            value, end = scan(text, 0)
        except StopIteration as exc:
            raise ValueError(f"expecting a value at character {exc.value}") from None
        if end != len(text) and text[end:].strip():
            raise ValueError(f"extra data at character {end}")
        return value

    return decode
