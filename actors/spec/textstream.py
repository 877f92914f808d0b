"""Turning committed token ids into text deltas for streaming: decode the whole generation, emit
what is new, and hold back text that could still become a stop string (or an incomplete UTF-8
character), so a client never sees text that is later taken back."""
from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.sent = 0  # characters already emitted

    def push(self, token_ids: Sequence[int], final: bool = False) -> str:
        self.tokens.extend(token_ids)
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final = text[:cut], True
        if not final:
            if text.endswith("\ufffd"):  # a multi-byte character not complete yet
                text = text[:-1]
            # hold back a tail that is a prefix of some stop string
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta
