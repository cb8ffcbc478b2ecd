"""What a submitting process makes for every job, with what does not change made once.

A client that submits many jobs (``Client.call`` in a loop) pays for its job ids and
envelopes on every call; here both are cut to what really differs per job.

- **Job ids** (:class:`JobIds`) count up from a random start drawn once per process
  (again in a forked child, which would otherwise repeat its parent's ids): one addition
  and one format per job instead of a ``getrandom(2)`` call.  The format is unchanged, 16
  lowercase hex digits.  Two submitters' ids collide only if the ranges they counted
  through overlap, which for submitters of ``a`` and ``b`` jobs happens with probability
  about ``(a + b) / 2**63``; over all the submitters a store ever sees that is at most
  twice the chance of a collision among as many ids drawn at random each (and far less
  when few processes submit many jobs).  Nothing about a pid, a host or a restart enters
  the id, so none of them can make two ids meet.
- **Envelopes** (:class:`Template`): the envelope of a job with none of the optional
  fields but ``reply`` and ``confirm`` is the same text but for its id, its submission
  time and its payload; the template keeps the rest (``pid``, ``reply``, ``confirm``) as
  text and splices the three in, byte for byte what :func:`ipcd.wire.protocol.encode`
  makes (tests/test_submitting.py checks it over arbitrary payloads).  Any other field
  takes the general encoder.
"""

from __future__ import annotations

import binascii
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

from ipcd.errors import PayloadError

#: Bits of a counter's random start: below 2**63, it stays within 16 hex digits for
#: 2**63 jobs, so it needs no wrapping.
_START_BITS = 63


class JobIds:
    """Fresh job ids for one submitter: call it with the caller's PID (which the caller
    has at hand for the envelope anyway; a change of PID means a forked child, which
    draws a new start so as not to repeat its parent's ids).  Safe to share between
    threads: ``next`` on an ``itertools.count`` is atomic in CPython."""

    __slots__ = ("_ids", "_pid")

    def __init__(self) -> None:
        self._pid = -1
        self._ids: Iterator[int] = itertools.count()

    def __call__(self, pid: int) -> str:
        if pid != self._pid:
            self._ids = itertools.count(int.from_bytes(os.urandom(8), "little") >> 64 - _START_BITS)
            self._pid = pid
        return "%016x" % next(self._ids)  # noqa: UP031 - a third quicker than an f-string


class Template:
    """The envelope of a plain job from process ``pid``, which asks for a reply
    (``reply``) and/or a confirmation (``confirm``) under its PID or neither.

    ``encode_json`` is the payload encoder :func:`ipcd.wire.protocol.encode` uses (its
    JSON options), for payloads other than text and bytes.
    """

    __slots__ = ("_b64", "_json", "_text", "confirm", "pid", "reply")

    def __init__(
        self, pid: int, *, reply: bool, confirm: bool, encode_json: Callable[[Any], str]
    ) -> None:
        self.pid = pid
        self.reply = reply
        self.confirm = confirm
        fields = f',"pid":{pid}'
        if reply:
            fields += f',"reply":{pid}'
        if confirm:
            fields += f',"confirm":{pid}'
        self._text = fields + ',"payload":'
        self._b64 = (fields + ',"payload_b64":"').encode()
        self._json = encode_json

    def encode(self, payload: Any, job_id: str, submitted: float) -> bytes:
        """The envelope; ``job_id`` must be of is_job_id's characters (no JSON escapes:
        a JobIds id is), ``submitted`` the Unix time.  PayloadError as ``encode``."""
        head = f'{{"ipcd":1,"id":"{job_id}","submitted":{round(submitted, 6)!r}'
        if isinstance(payload, bytes | bytearray | memoryview):
            b64 = binascii.b2a_base64(payload, newline=False)
            return b"".join((head.encode(), self._b64, b64, b'"}'))
        try:
            return (head + self._text + self._json(payload) + "}").encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise PayloadError(f"payload cannot be encoded as JSON: {exc}") from None
