"""The bytes a token id stands for: what a client needs to rebuild text from logprobs when a character
spans tokens (OpenAI's `bytes`). Byte-level BPE vocabularies (SmolLM2, Llama 3, Qwen) spell each byte
as a printable character; SentencePiece ones (Gemma, Mistral) write a space as '▁' and a byte they
have no piece for as '<0xNN>'."""
from __future__ import annotations

import re

from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self.special = set(tokenizer.all_special_ids)
        self._unbyte = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if (b := self._cache.get(token_id)) is None:
            b = self._cache[token_id] = self._bytes(token_id)
        return b

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self.special:   # <|im_end|>, <eos>: spelt as they are written
            return piece.encode()
        if self.byte_level:
            return bytes(self._unbyte[c] for c in piece) if all(c in self._unbyte for c in piece) else piece.encode()
        if m := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(m.group(1), 16)])
        return piece.replace("\u2581", " ").encode()
