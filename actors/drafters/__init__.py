"""Drafters behind one interface (base.Drafter); `make_drafter` builds one by kind."""
from __future__ import annotations

from typing import Callable

from .base import Budget, Drafter, NoDrafter

KINDS = ("none", "ngram", "draft-model")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown drafter {kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def make_drafter(kind: str, new_draft_runner: Callable | None = None) -> Drafter:
    """A fresh drafter for one sequence. `new_draft_runner()` gives a ModelRunner over the draft model
    (each sequence needs its own KV cache; weights are shared)."""
    check_kind(kind)
    if kind == "none":
        return NoDrafter()
    if kind == "ngram":
        from .ngram import NgramDrafter
        return NgramDrafter()
    if new_draft_runner is None:
        raise ValueError("drafter 'draft-model' needs a draft model: pass --draft-model PATH")
    from .draft_model import DraftModelDrafter
    return DraftModelDrafter(new_draft_runner())


__all__ = ["Budget", "Drafter", "NoDrafter", "KINDS", "check_kind", "make_drafter"]
