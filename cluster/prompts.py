"""Turning a request into prompt token ids: raw text, a first chat turn, or a later turn of a session
(appended to the session's committed tokens with the template's own separators)."""
from __future__ import annotations

from drafthorse.actors.models.loader import chat_prompt, encode_chat, render_chat

_MARK = "\u2063drafthorse-turn\u2063"  # stands in for a previous assistant reply


def turn_ids(tokenizer, history: list[int], messages: list[dict] | None, prompt: str | None) -> list[int]:
    if messages is None:
        return history + tokenizer.encode(prompt, add_special_tokens=False)
    if not history:
        return chat_prompt(tokenizer, messages)
    # Render [user, assistant(_MARK)] + new messages and keep what follows _MARK: the template's
    # end-of-turn separator and the new turn, without a second system preamble.
    prior = [{"role": "user", "content": "-"}, {"role": "assistant", "content": _MARK}]
    eos = tokenizer.eos_token or ""

    def render(ms: list[dict]) -> str:
        full = render_chat(tokenizer, prior + ms)
        suffix = full[full.index(_MARK) + len(_MARK):]
        if eos and history[-1] == tokenizer.eos_token_id and suffix.startswith(eos):
            suffix = suffix[len(eos):]  # the reply already ended with the end-of-turn token
        return suffix
    return history + encode_chat(tokenizer, messages, render)
