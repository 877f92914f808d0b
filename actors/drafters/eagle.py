"""EAGLE-style drafter: autoregression over the target's features with a one-layer head, and a
dynamic (EAGLE-2) draft tree.

The head keeps its own KV cache over the committed sequence, one entry per token t_i fed with the
pair (f_{i-1}, t_i): the target feature that predicted t_i and t_i's embedding. Features arrive with
the committed tokens (the verify pass computes them anyway). To draft, the head first catches up on
the new pairs, which ends at the root and predicts the root's successor feature f̂; a draft token x
under a node with predicted feature g is fed as (g, x), in the head's scratch area with tree
attention, so every depth of the tree is one head forward over the nodes being expanded."""
from __future__ import annotations

import torch

from drafthorse.actors.models.combiner import Combiner
from drafthorse.actors.models.llama import Llama
from drafthorse.actors.models.runner import ContextFull, ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import ROOT, DraftTree

from .base import Budget, Drafter
from .dyntree import grow
from .heads import Checkpoint, EagleHead, RMSNorm


class EagleModel:
    """A trained head bound to its target, shared by every sequence's drafter. An EAGLE-3 head has the
    target return the residual streams it fuses (Llama.tap) from now on, and every head has the target's
    caches made from now on keep them per position (Llama.keep_features)."""

    def __init__(self, ckpt: Checkpoint, target: Llama, max_len: int | None = None):
        head = ckpt.module
        if not isinstance(head, EagleHead):
            raise ValueError(f"a {ckpt.kind} checkpoint is no eagle head")
        self.kind = ckpt.kind
        self.target = target
        self.hidden = target.config.hidden_size
        self.taps: tuple[int, ...] = tuple(head.cfg.get("taps") or ())
        on = (target.device, target.dtype)
        self.fuse_t = None if head.fuse is None else head.fuse.weight.detach().to(*on).t().contiguous()
        self.tap_norms = [norm.weight.detach().to(*on) for norm in head.tap_norms.children()
                          if isinstance(norm, RMSNorm)]
        self.eps = float(head.cfg["rms_norm_eps"])
        if self.taps:
            target.tap(self.taps)
        target.keep_features = True   # its new pools keep the states this head drafts from (KVPool.f)
        self.d2t = ckpt.d2t
        self.head = head.as_llama(target, self.d2t, max_len or target.max_len)
        self.fc_t = head.fc.weight.detach().to(*on).t().contiguous()   # [2H, H]
        self.embed = target.embed
        self.vocab_size = target.vocab_size
        self.defaults = dict(ckpt.info.get("defaults", {}))
        self.combiner: Combiner | None = None   # see share_passes

    def share_passes(self, slots: int = 0) -> Combiner:
        """Run the forwards of every drafter on this head through one Combiner from now on (draft
        workers: concurrent sessions share passes), their caches `slots` slots of one pool; returns it."""
        self.combiner = Combiner(self.head, self.head.new_pool(slots) if slots else None)
        return self.combiner

    def feature(self, rows: torch.Tensor) -> torch.Tensor:
        """Target rows (Llama.forward_batch's) -> the feature the head reads: the final hidden state, or
        (EAGLE-3) its tapped streams fused by the head's projection."""
        if self.fuse_t is None:
            return rows[:, :self.hidden]
        at = [self.hidden * (1 + self.target.taps.index(t)) for t in self.taps]
        return torch.cat([_rms(rows[:, a:a + self.hidden], w, self.eps) for a, w in zip(at, self.tap_norms)],
                         dim=-1) @ self.fuse_t

    def inputs(self, tokens: list[int], feats: torch.Tensor) -> torch.Tensor:
        emb = self.embed[torch.tensor(tokens, dtype=torch.long, device=self.embed.device)]
        return torch.cat([emb, feats.to(emb.dtype)], dim=-1) @ self.fc_t


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """heads.RMSNorm's computation (float32 inside, then the input's dtype, times the weight)."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class EagleDrafter(Drafter):
    wants_features = True

    def __init__(self, model: EagleModel, topk: int = 4, depth: int = 6, max_nodes: int = 16,
                 max_len: int | None = None):
        if topk < 1 or depth < 1 or max_nodes < 1:
            raise ValueError(f"{model.kind} drafter needs topk, depth and max_nodes >= 1")
        self.name = model.kind
        self.m, self.topk, self.depth, self.max_nodes = model, topk, depth, max_nodes
        self.runner = ModelRunner(model.head, max_len, model.combiner)
        self.tokens: list[int] = []                   # committed tokens not yet in the head's cache
        self.feats: list[torch.Tensor] = []           # ... and the features that predicted them

    def begin(self, prompt_ids: list[int], features: torch.Tensor | None = None) -> None:
        self.runner.reset()
        self.tokens, self.feats = list(prompt_ids[1:]), [] if features is None else [features.to(self.m.embed.device)]

    def close(self) -> None:
        self.runner.close()

    def extend(self, token_ids: list[int], features: torch.Tensor | None = None) -> None:
        if features is None or len(features) != len(token_ids):
            raise ValueError(f"{self.name} drafter needs one target feature per committed token")
        self.tokens += token_ids
        self.feats.append(features.to(self.m.embed.device))   # (from a draft worker's wire: on the host)

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        budget = Budget(min(budget.max_nodes, self.max_nodes), budget.max_depth)
        if not self.tokens:
            return DraftTree()
        feats = self.m.feature(torch.cat(self.feats))
        try:
            logits, g_root = self.runner.extend(self.tokens, embeds=self.m.inputs(self.tokens, feats))
        except ContextFull:
            return DraftTree()   # the head's context is full: the target decodes alone from here
        self.tokens, self.feats = [], []
        depth = min(self.depth, budget.max_depth, self.runner.room // max(1, self.topk) - 1)
        if depth < 1:
            return DraftTree()
        slot: dict[int, int] = {}          # tree node -> its scratch index in the head's cache
        out: dict[int, torch.Tensor] = {}  # tree node -> the feature the head predicted after it

        def expand(nodes: list[int], tree: DraftTree) -> torch.Tensor:
            toks = [tree.tokens[n] for n in nodes]
            par = [tree.parents[n] for n in nodes]
            g = torch.stack([g_root if p == ROOT else out[p] for p in par])
            base = self.runner.scratch_size
            lg, hid = self.runner.score(toks, [ROOT if p == ROOT else slot[p] for p in par],
                                        embeds=self.m.inputs(toks, g))
            for j, n in enumerate(nodes):
                slot[n], out[n] = base + j, hid[j]
            return lg

        tree = grow(logits, expand, budget, params, generator, self.topk, depth, self.m.vocab_size, self.m.d2t)
        self.runner.discard()
        return tree
