"""Incremental detokenization and stop strings.

Text deltas never split a multi-byte character or drop spaces; the stop-string search looks only at
the newly decoded text (plus the tail a stop string could straddle), so a step costs the same
however long the output already is. ``first_stop`` is the one place that finds where a text is cut.
"""

from __future__ import annotations


def first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text[start:]`` (as an index into ``text``), or None."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text.

    Each new piece is the difference between decoding a short window of recent tokens with and
    without the newest ones; a piece ending in U+FFFD (an unfinished UTF-8 sequence) is held back
    until the next token completes it. ``stop_at`` is where the first stop string starts once one has
    appeared. ``take`` hands out the text that is safe to send: text that could be the start of a
    stop string is held back too, and the final ``flush`` cuts the text at the first stop string.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.token_ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text
        self.text = ""  # all text decoded so far
        self.stop_at: int | None = None  # index in ``text`` of the first stop string
        self._sent = 0  # characters of ``text`` already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> None:
        """Decode new tokens (the text grows unless the newest end inside a character)."""
        self.token_ids.extend(token_ids)
        before = self._decode(self.token_ids[self._prefix : self._read])
        after = self._decode(self.token_ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._extend(after[len(before) :])
            self._prefix, self._read = self._read, len(self.token_ids)

    def _extend(self, piece: str) -> None:
        start = len(self.text)
        self.text += piece
        if self.stop and self.stop_at is None:  # only where a stop string could newly appear
            self.stop_at = first_stop(self.text, self.stop, max(0, start - max(len(s) for s in self.stop) + 1))

    def take(self, final: bool = False) -> str:
        """The text that is safe to send now (possibly empty), and not sent before."""
        end = len(self.text) if self.stop_at is None else self.stop_at
        if self.stop_at is None and not final and self.stop:
            end = max(self._sent, end - (max(len(s) for s in self.stop) - 1))
        piece = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return piece

    def flush(self) -> str:
        """The remaining text at the end of the request, cut at a stop string. Tokens held back
        for an unfinished character are decoded as they are (as a full decode would show them)."""
        if self._read < len(self.token_ids):
            before = self._decode(self.token_ids[self._prefix : self._read])
            self._extend(self._decode(self.token_ids[self._prefix :])[len(before) :])
            self._prefix = self._read = len(self.token_ids)
        return self.take(final=True)

    @property
    def final_text(self) -> str:
        """All text so far, cut at the first stop string."""
        return self.text if self.stop_at is None else self.text[: self.stop_at]
