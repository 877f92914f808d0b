"""When a generation ends: EOS, token budget, stop strings. Tokens are fed one at a time so that a
step committing several tokens at once never lets a token past the stop through."""
from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class StopChecker:
    def __init__(self, max_new_tokens: int, eos_ids: set[int], stop: Sequence[str] = (),
                 decode: Decode | None = None):
        if stop and decode is None:
            raise ValueError("stop strings need a tokenizer")
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.stop = tuple(stop)
        self.decode: Decode = decode or (lambda ids: "")   # never called without stop strings
        # a stop string of b UTF-8 bytes spans at most b tokens (byte-level BPE splits a rare
        # character into up to 4 byte tokens), + slack for a partial character at the window start
        self._window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 4
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def feed(self, token_ids: Sequence[int]) -> list[int]:
        """Accept tokens in order until one ends the generation; return those that were kept."""
        kept: list[int] = []
        for t in token_ids:
            if self.finish_reason is not None:
                break
            self.tokens.append(t)
            kept.append(t)
            if t in self.eos_ids:
                self.finish_reason = "stop"
            elif self.stop and any(s in self.decode(self.tokens[-self._window:]) for s in self.stop):
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.max_new_tokens:
                self.finish_reason = "length"
        return kept

    def text(self) -> str:
        """Generated text, cut before the first stop string (which is not returned)."""
        if self.decode is None:
            return ""
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:cut]
