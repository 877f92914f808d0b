"""The drafter kinds, in one table: every check (flags, settings, the gateway, both workers, head loading)
reads it, so adding a kind is one line here plus its drafter class."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from drafthorse.runtime.errors import BadField, shown


@dataclass(frozen=True)
class DrafterKind:
    name: str
    runs_on: Literal["target", "draft", "none"]   # the worker that drafts it (none: plain decoding)
    wants_features: bool = False   # reads the target's final hidden states (sent with each Draft RPC)
    head: bool = False             # needs a trained head (`drafthorse train-drafter --kind NAME`)
    needs_draft_model: bool = False
    copies: bool = False           # drafts by n-gram lookup where the text repeats, by its head elsewhere

    @property
    def head_kind(self) -> str:
        """The trained head it loads ('eagle' for eagle and eagle+ngram)."""
        return self.name.removesuffix(COPY_SUFFIX)


COPY_SUFFIX = "+ngram"
_KINDS = (
    DrafterKind("none", "none"),
    DrafterKind("ngram", "draft"),
    DrafterKind("draft-model", "draft", needs_draft_model=True),
    DrafterKind("eagle", "draft", wants_features=True, head=True),   # a head over the target's features
    DrafterKind("eagle3", "target", wants_features=True, head=True),   # fuses the target's tapped streams
    DrafterKind("medusa", "target", head=True),      # shares the target's weights, features and KV cache
    DrafterKind("layerskip", "target", head=True),
)
# each head also with copying: `eagle+ngram` drafts where eagle does, with eagle's head
KINDS: dict[str, DrafterKind] = {k.name: k for k in _KINDS + tuple(
    replace(k, name=k.name + COPY_SUFFIX, copies=True) for k in _KINDS if k.head)}
NAMES = tuple(KINDS)
HEAD_KINDS = tuple(k.name for k in _KINDS if k.head)   # the heads themselves (train-drafter --kind)
LOCAL_KINDS = tuple(k for k in HEAD_KINDS if KINDS[k].runs_on == "target")   # heads drafted in the target worker


def kind(name: str) -> DrafterKind:
    """The kind called `name`; BadField (a ValueError) lists the choices."""
    if name not in KINDS:
        raise BadField("drafter", f"unknown drafter {shown(name)}: choose one of {', '.join(NAMES)}")
    return KINDS[name]


def check_head_kind(name: str) -> str:
    """The head a trained-head drafter loads (eagle for eagle and eagle+ngram); ValueError for the others."""
    if name not in KINDS or not KINDS[name].head:
        raise ValueError(f"{name!r} is not a trained-head drafter ({', '.join(HEAD_KINDS)}, or one of them +ngram)")
    return KINDS[name].head_kind
