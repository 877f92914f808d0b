"""The drafter kinds, in one table: every check (flags, settings, the gateway, both workers, head loading)
reads it, so adding a kind is one line here plus its drafter class."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from drafthorse.runtime.errors import BadField, shown


@dataclass(frozen=True)
class DrafterKind:
    name: str
    runs_on: Literal["target", "draft", "none"]   # the worker that drafts it (none: plain decoding)
    wants_features: bool = False   # reads the target's final hidden states (sent with each Draft RPC)
    head: bool = False             # needs a trained head (`drafthorse train-drafter --kind NAME`)
    needs_draft_model: bool = False


KINDS: dict[str, DrafterKind] = {k.name: k for k in (
    DrafterKind("none", "none"),
    DrafterKind("ngram", "draft"),
    DrafterKind("draft-model", "draft", needs_draft_model=True),
    DrafterKind("eagle", "draft", wants_features=True, head=True),   # a head over the target's features
    DrafterKind("eagle3", "target", wants_features=True, head=True),   # fuses the target's tapped streams
    DrafterKind("medusa", "target", head=True),      # shares the target's weights, features and KV cache
    DrafterKind("layerskip", "target", head=True),
)}
NAMES = tuple(KINDS)
HEAD_KINDS = tuple(k.name for k in KINDS.values() if k.head)
LOCAL_KINDS = tuple(k.name for k in KINDS.values() if k.runs_on == "target")   # drafted in the target worker


def kind(name: str) -> DrafterKind:
    """The kind called `name`; BadField (a ValueError) lists the choices."""
    if name not in KINDS:
        raise BadField("drafter", f"unknown drafter {shown(name)}: choose one of {', '.join(NAMES)}")
    return KINDS[name]


def check_head_kind(name: str) -> str:
    if not kind(name).head:
        raise ValueError(f"{name!r} is not a trained-head drafter ({', '.join(HEAD_KINDS)})")
    return name
