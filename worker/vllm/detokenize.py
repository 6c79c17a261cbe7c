"""Text for a stream of token ids, chunk by chunk, without splitting a character, cut
before the first stop string.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character (an accent, an
emoji), so decoding each chunk of new ids on its own yields U+FFFD halves. `TextStream`
decodes a short window that ends with the new ids and starts a few tokens before them (the
context a tokenizer needs to place spaces), emits only what the window adds beyond its
known part, and holds text back while it ends in an incomplete character. The held text is
released with the next chunk, or at the end of the stream.

`StopText` finds a segment's stop strings in that text. vLLM's engine core leaves stop
strings to its front end's detokenizer, which this worker does not run, so the worker does
the same: text that might be the start of a stop string is held back until the next chunk
tells, and at a match the text ends before it (the stop string itself is not output, as
in vLLM by default).
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


class TextStream:
    """One segment's text. `decode(ids)` is the tokenizer's own decode of a list of ids."""

    def __init__(self, decode) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are in text already emitted
        self._read = 0  # ids up to here have been emitted as text

    def push(self, ids: Sequence[int], final: bool = False) -> str:
        """Text for `ids`, appended to the stream; `final`: the stream ends here, so release
        everything held back (an incomplete last character stays as U+FFFD)."""
        self._ids.extend(ids)
        known = self._decode(self._ids[self._prefix:self._read])
        window = self._decode(self._ids[self._prefix:])
        if not final and (len(window) <= len(known) or window.endswith(REPLACEMENT)):
            return ""  # nothing new yet, or the last character is not complete
        self._prefix, self._read = self._read, len(self._ids)
        return window[len(known):]


class StopText:
    """A segment's text with its stop strings cut out. `push` returns the text that may be
    output now; once a stop string matched, `stopped` is True and nothing more is output."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._pending = ""  # text that may be the start of a stop string
        self.stopped = False

    def push(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        pending = self._pending + text
        hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return pending[:min(hits)]
        keep = 0 if final else self._held_back(pending)
        self._pending = pending[len(pending) - keep:] if keep else ""
        return pending[:len(pending) - keep]

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
