"""``wordcount``: lines, words, characters and the most frequent words of a text."""

from __future__ import annotations

import re
from collections import Counter

import structlog

from ipcd.handlers import HandlerError, HandlerResult, Job

log = structlog.get_logger()

#: Words, with inner apostrophes (also U+2019) and hyphens: "don't", "well-known".
_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")
#: At most this many of the most frequent words are returned: results have a size limit.
MAX_TOP = 50


def wordcount(job: Job) -> HandlerResult:
    """Count a text given as the payload, or as ``{"text": ..., "top": N}``.

    ``ipcctl submit wordcount - < file.txt`` sends the file; ``top`` (default 5) asks for
    that many of the most frequent words, case folded.
    """
    text, top = _arguments(job.payload)
    words = [w.casefold() for w in _WORD.findall(text)]
    counts = Counter(words)
    log.info("wordcount.counted", job_id=job.id, words=len(words), distinct=len(counts))
    return {
        "lines": len(text.splitlines()),
        "words": len(words),
        "chars": len(text),
        "top": [[word, n] for word, n in counts.most_common(top)],
    }


def _arguments(payload: object) -> tuple[str, int]:
    top: object = 5
    if isinstance(payload, dict):
        text, top = payload.get("text"), payload.get("top", 5)
    else:
        text = payload
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise HandlerError("wordcount needs UTF-8 text, not binary data") from None
    if not isinstance(text, str):
        raise HandlerError('wordcount needs text, or {"text": "...", "top": N}')
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP:
        raise HandlerError(f"top must be an integer from 0 to {MAX_TOP}")
    return text, top
