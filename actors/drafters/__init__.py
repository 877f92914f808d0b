"""Drafters behind one interface (base.Drafter); `make_drafter` builds one by kind.

Trained heads (eagle, eagle3, medusa, layerskip) are loaded once per target with `load_head` and shared by
every sequence's drafter; the heads shipped for the default SmolLM2 live in `trained/`."""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from pathlib import Path

from drafthorse.actors.drafters.base import Budget, Drafter, NoDrafter
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.eagle import EagleDrafter, EagleModel
from drafthorse.actors.drafters.heads import load_checkpoint
from drafthorse.actors.drafters.hybrid import CopyOrHeadDrafter
from drafthorse.actors.drafters.layerskip import LayerSkipDrafter, LayerSkipModel
from drafthorse.actors.drafters.medusa import MedusaDrafter, MedusaModel
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.models.runner import pass_cost
from drafthorse.actors.spec.adaptive import chain_depth
from drafthorse.runtime.kinds import check_head_kind, kind

log = logging.getLogger(__name__)

TRAINED = Path(__file__).parent / "trained"
# per head kind (runtime.kinds): the model a checkpoint loads into, and the drafter that proposes with it
CHEAP_ROW = 0.02   # a verify row below this fraction of a pass's fixed cost: trees keep their branches
MAX_DEPTH = 8
COST_CONTEXT = 256   # tokens before the rows of the verify whose cost sizes a tree: a chat turn's context
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # target -> {branches: (a, b)}

HEADS = {"eagle": (EagleModel, EagleDrafter), "eagle3": (EagleModel, EagleDrafter),
         "medusa": (MedusaModel, MedusaDrafter), "layerskip": (LayerSkipModel, LayerSkipDrafter)}


def shipped_head(kind: str, target_name: str) -> Path | None:
    """The head of `kind` shipped for target `target_name` (e.g. 'smollm2'), if there is one."""
    p = TRAINED / f"{target_name}-{kind}.safetensors"
    return p if p.is_file() else None


def load_head(kind: str, lm, path: str | Path | None = None, max_len: int | None = None):
    """The model object of a trained head for the loaded target `lm` (a LoadedModel): from `path`, or
    the head shipped for it. FileNotFoundError / ValueError say what to do."""
    kind = check_head_kind(kind)
    path = path or shipped_head(kind, lm.name)
    if path is None:
        raise FileNotFoundError(f"no {kind} head shipped for target {lm.name!r}: train one with "
                                f"`drafthorse train-drafter --kind {kind}` and pass it with --head")
    ckpt = load_checkpoint(path, lm.model, lm.name)
    if ckpt.kind != kind:
        raise ValueError(f"draft head {path} is a {ckpt.kind} head, not {kind}")
    model = HEADS[kind][0]
    head = model(ckpt, lm.model, max_len) if model is EagleModel else model(ckpt, lm.model)
    head.defaults = sized_tree(kind, head, lm.model, ckpt.info)
    return head


def sized_tree(kind: str, head, target, info: dict) -> dict:
    """A head's tree for this machine: the chain depth that peaks in expected tokens per second, from the
    head's held-out acceptance per depth (its checkpoint's validation) and what a target pass, a verify
    row and a draft level cost here (measured now by runner.pass_cost: several row counts, medians, after
    a chat turn's context); the branches of its saved tree only where a row of such a tree is cheap
    (CHEAP_ROW), else a chain. Without validation figures, the saved tree as it is."""
    saved = dict(info.get("defaults", {}))
    accept = ((info.get("history") or [{}])[-1]).get("val_top1_per_depth") or []
    if not accept:
        return saved
    a, b = _verify_cost(target, 1)
    if isinstance(head, EagleModel):
        draft_s = pass_cost(head.head, COST_CONTEXT)[0]
    elif isinstance(head, LayerSkipModel):
        draft_s = a * head.layers / target.n_layers
    else:   # medusa: its blocks on one feature, a small fraction of a pass
        draft_s = 0.0
    top = MAX_DEPTH if not isinstance(head, MedusaModel) else head.n_heads
    depth = max(1, chain_depth(a, b, draft_s, accept, top))
    topk = saved.get("topk", 1) if b < CHEAP_ROW * a else 1   # (a tree's row costs more than a chain's)
    tree_b = _verify_cost(target, topk)[1] if topk > 1 else b   # a tree's rows, as drafted: probed only then
    if tree_b >= CHEAP_ROW * a:
        topk = 1
    sized = dict(saved, depth=depth, topk=topk, max_nodes=depth * topk)
    log.info("%s head: trees of depth %d, %d children a node, %d nodes on this machine (a pass %.1f ms + %.2f "
             "ms a chain row, %.2f ms a tree row after %d tokens, a draft level %.1f ms; held-out acceptance per "
             "depth %s)", kind, depth, topk, depth * topk, 1e3 * a, 1e3 * b, 1e3 * tree_b, COST_CONTEXT,
             1e3 * draft_s, accept)
    return sized


def _verify_cost(target, branches: int) -> tuple[float, float]:
    """pass_cost of `target`'s verify rows (chains: branches 1), measured once per target and process: a
    worker loading several heads probes its target once."""
    per = _COSTS.setdefault(target, {})
    if branches not in per:
        per[branches] = pass_cost(target, COST_CONTEXT, branches=branches)
    return per[branches]


def make_drafter(name: str, new_draft_runner: Callable | None = None, head=None, **options) -> Drafter:
    """A fresh drafter for one sequence. `new_draft_runner()` gives a ModelRunner over the draft model
    (each sequence needs its own KV cache; weights are shared); `head` is a trained head's model
    (load_head) for eagle / eagle3 / medusa / layerskip and their +ngram twins; options override the
    head's tree defaults (topk, depth)."""
    k = kind(name)
    if k.name == "none":
        return NoDrafter()
    if k.name == "ngram":
        return NgramDrafter()
    if k.head:
        if head is None:
            raise ValueError(f"drafter {k.name!r} needs a trained head: pass --head PATH")
        opts = {**head.defaults, **{o: v for o, v in options.items() if v is not None}}
        drafter = HEADS[k.head_kind][1](head, **opts)
        return CopyOrHeadDrafter(drafter) if k.copies else drafter
    if new_draft_runner is None:
        raise ValueError("drafter 'draft-model' needs a draft model: pass --draft-model PATH")
    return DraftModelDrafter(new_draft_runner())


__all__ = ["Budget", "Drafter", "NoDrafter", "make_drafter", "load_head", "shipped_head"]
