"""JSON encoders and a decoder made once and reused by the per-job paths.

``json.dumps``, ``json.loads`` and even a kept ``JSONEncoder`` redo set-up work on every
call: ``JSONEncoder.encode`` builds a new C encoder (and a dict for its circular-reference
check) each time, and ``JSONDecoder.decode`` wraps the C scanner in whitespace checks.
That is 3 to 4 microseconds a call, and a job is encoded or decoded four times on its way
(envelope, result, log line), which is a real share of what ipcd adds to a no-op job.
Here the C encoder is built once per configuration and called directly.

The C parts come from ``_json``, the accelerator module under ``json``, so that the
cron-facing client does not import the ``json`` package itself (3 ms of its start-up).
Without the accelerator (another Python implementation) the standard classes serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import _json
except ImportError:  # pragma: no cover - CPython has the accelerator
    _json = None  # type: ignore[assignment]

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
    if _json is None:  # pragma: no cover - CPython has the accelerator
        import json

        return json.JSONEncoder(
            separators=separators, ensure_ascii=ensure_ascii, allow_nan=allow_nan, default=default
        ).encode
    make = _json.make_encoder
    strings = _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring
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


def object_decoder(
    parse_constant: Callable[[str], Any], parse_float: Callable[[str], Any] = float
) -> Callable[[str], Any]:
    """A decoder for a text that starts with a JSON value and has nothing after it but
    whitespace; raises ValueError (or RecursionError) like ``json.loads``.  ``parse_float``
    reads numbers with a fraction or exponent (as in ``json.loads``).

    Decoding imports ``json.decoder``: the C scanner raises its errors as that module's
    JSONDecodeError and fails oddly without it.  Only the daemon and ``--json`` decode.
    """
    import json.decoder

    if _json is None:  # pragma: no cover - CPython has the accelerator
        return json.decoder.JSONDecoder(
            parse_constant=parse_constant, parse_float=parse_float
        ).decode
    scan = _json.make_scanner(_ScannerContext(parse_constant, parse_float))  # type: ignore[arg-type]

    def decode(text: str) -> Any:
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            value, end = scan(text, start)
        except StopIteration as exc:
            raise ValueError(f"expecting a value at character {exc.value}") from None
        if end != len(text) and text[end:].strip(_WHITESPACE):
            raise ValueError(f"extra data at character {end}")
        return value

    return decode


#: What JSON counts as whitespace around a value (not all of str.isspace()).
_WHITESPACE = " \t\n\r"


class _ScannerContext:
    """What the C scanner reads from a ``json.JSONDecoder``: the defaults but for
    ``parse_constant`` (NaN, Infinity) and ``parse_float``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_int = int

    def __init__(
        self, parse_constant: Callable[[str], Any], parse_float: Callable[[str], Any]
    ) -> None:
        self.parse_constant = parse_constant
        self.parse_float = parse_float
