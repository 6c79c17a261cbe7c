"""Text for a stream of token ids, chunk by chunk, without splitting a character.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character (an accent, an
emoji), so decoding each chunk of new ids on its own yields U+FFFD halves. `TextStream`
decodes a short window that ends with the new ids and starts a few tokens before them (the
context a tokenizer needs to place spaces), emits only what the window adds beyond its
known part, and holds text back while it ends in an incomplete character. The held text is
released with the next chunk, or at the end of the stream.
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
