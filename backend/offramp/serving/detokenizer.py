"""Incremental detokenization: text deltas that never split a multi-byte character or drop spaces."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces.

    Each new piece is the difference between decoding a short window of recent tokens with and
    without the newest ones; a piece ending in U+FFFD (an unfinished UTF-8 sequence) is held back
    until the next token completes it. Text that could be the start of a stop string is held back
    too, and the final flush cuts the text at the first stop string.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = stop or []
        self.token_ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text
        self.text = ""  # all text decoded so far
        self._sent = 0  # characters of ``text`` already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """Add new tokens; returns the text that is safe to send now (possibly empty)."""
        self.token_ids.extend(token_ids)
        before = self._decode(self.token_ids[self._prefix : self._read])
        after = self._decode(self.token_ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.token_ids)
        return self._take(final=False)

    def _take(self, final: bool) -> str:
        end = len(self.text)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            end = cut
        elif not final and self.stop:
            end = max(self._sent, end - (max(len(s) for s in self.stop) - 1))
        piece = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return piece

    def flush(self) -> str:
        """The remaining text at the end of the request, cut at a stop string. Tokens held back
        for an unfinished character are decoded as they are (as a full decode would show them)."""
        if self._read < len(self.token_ids):
            before = self._decode(self.token_ids[self._prefix : self._read])
            self.text += self._decode(self.token_ids[self._prefix :])[len(before) :]
            self._prefix = self._read = len(self.token_ids)
        return self._take(final=True)
