"""An error that names the request field at fault, so a server can tell its client which one (over gRPC:
runtime/rpc.py `abort` / `field_of`; over HTTP: OpenAI's `param`) without anyone parsing its message."""
from __future__ import annotations


class BadField(ValueError):
    """`field` names the field as a GenerateRequest does: "max_new_tokens", "sampling.temperature", "stop",
    "drafter", "session_id", "prompt", "chat"."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def shown(value: str, limit: int = 64) -> str:
    """A client's value as an error message quotes it: at most `limit` characters of it (the rest counted,
    not echoed back)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
