"""Drafters behind one interface (base.Drafter); `make_drafter` builds one by kind.

Trained heads (eagle, medusa, layerskip) are loaded once per target with `load_head` and shared by
every sequence's drafter; the heads shipped for the default SmolLM2 live in `trained/`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import Budget, Drafter, NoDrafter

HEAD_KINDS = ("eagle", "medusa", "layerskip")
KINDS = ("none", "ngram", "draft-model") + HEAD_KINDS
TRAINED = Path(__file__).parent / "trained"


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown drafter {kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def shipped_head(kind: str, target_name: str) -> Path | None:
    """The head of `kind` shipped for target `target_name` (e.g. 'smollm2'), if there is one."""
    p = TRAINED / f"{target_name}-{kind}.safetensors"
    return p if p.is_file() else None


def load_head(kind: str, lm, path: str | Path | None = None, max_len: int | None = None):
    """The model object of a trained head for the loaded target `lm` (a LoadedModel): from `path`, or
    the head shipped for it. FileNotFoundError / ValueError say what to do."""
    from .heads import load_checkpoint
    if kind not in HEAD_KINDS:
        raise ValueError(f"{kind!r} is not a trained-head drafter ({', '.join(HEAD_KINDS)})")
    path = path or shipped_head(kind, lm.name)
    if path is None:
        raise FileNotFoundError(f"no {kind} head shipped for target {lm.name!r}: train one with "
                                f"`drafthorse train-drafter --kind {kind}` and pass it with --head")
    ckpt = load_checkpoint(path, lm.model, lm.name)
    if ckpt.kind != kind:
        raise ValueError(f"draft head {path} is a {ckpt.kind} head, not {kind}")
    if kind == "eagle":
        from .eagle import EagleModel
        return EagleModel(ckpt, lm.model, max_len)
    if kind == "medusa":
        from .medusa import MedusaModel
        return MedusaModel(ckpt, lm.model)
    from .layerskip import LayerSkipModel
    return LayerSkipModel(ckpt, lm.model)


def make_drafter(kind: str, new_draft_runner: Callable | None = None, head=None, **options) -> Drafter:
    """A fresh drafter for one sequence. `new_draft_runner()` gives a ModelRunner over the draft model
    (each sequence needs its own KV cache; weights are shared); `head` is a trained head's model
    (load_head) for eagle / medusa / layerskip; options override the head's tree defaults
    (topk, depth)."""
    check_kind(kind)
    if kind == "none":
        return NoDrafter()
    if kind == "ngram":
        from .ngram import NgramDrafter
        return NgramDrafter()
    if kind in HEAD_KINDS:
        if head is None:
            raise ValueError(f"drafter {kind!r} needs a trained head: pass --head PATH")
        opts = {**head.defaults, **{k: v for k, v in options.items() if v is not None}}
        if kind == "eagle":
            from .eagle import EagleDrafter
            return EagleDrafter(head, **opts)
        if kind == "medusa":
            from .medusa import MedusaDrafter
            return MedusaDrafter(head, **opts)
        from .layerskip import LayerSkipDrafter
        return LayerSkipDrafter(head, **opts)
    if new_draft_runner is None:
        raise ValueError("drafter 'draft-model' needs a draft model: pass --draft-model PATH")
    from .draft_model import DraftModelDrafter
    return DraftModelDrafter(new_draft_runner())


__all__ = ["Budget", "Drafter", "NoDrafter", "KINDS", "HEAD_KINDS", "check_kind", "make_drafter", "load_head",
           "shipped_head"]
