"""Medusa drafter: K residual heads on the target's last feature, each guessing one token further.

The feature f_{n-1} that predicted the root t_n arrives with the committed tokens; head k turns it
into the distribution of t_{n+k}. The heads do not see each other's guesses, so a path's score is the
sum of independent per-depth log-probabilities; the dynamic tree (dyntree.py) spends the node budget
on the most likely combinations. All K heads run once per step, as one small batched product."""
from __future__ import annotations

import torch

from drafthorse.actors.models.kvcache import HOST
from drafthorse.actors.models.llama import Llama
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import DraftTree

from .base import Budget, Drafter
from .dyntree import grow
from .heads import Checkpoint, MedusaHeads


class MedusaModel:
    def __init__(self, ckpt: Checkpoint, target: Llama):
        heads = ckpt.module
        if not isinstance(heads, MedusaHeads):
            raise ValueError(f"a {ckpt.kind} checkpoint is no medusa head")
        self.heads = heads.to(target.device, target.dtype)
        self.d2t = ckpt.d2t
        self.lm_head_t = target.lm_head[self.d2t].t().contiguous()   # [H, N]
        self.vocab_size = target.vocab_size
        self.n_heads = len(heads.blocks)
        self.defaults = dict(ckpt.info.get("defaults", {}))

    @torch.inference_mode()
    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """[H] -> [K, N]: each head's draft-vocabulary logits (of a target row's first H columns: the
        final hidden state, before any tapped streams)."""
        return (self.heads(feat[None, :self.lm_head_t.shape[0]])[0] @ self.lm_head_t).float()


class MedusaDrafter(Drafter):
    name = "medusa"
    wants_features = True

    def __init__(self, model: MedusaModel, topk: int = 4, depth: int | None = None, max_nodes: int = 16):
        self.m, self.topk, self.max_nodes = model, topk, max_nodes
        self.depth = min(depth or model.n_heads, model.n_heads)
        if topk < 1 or self.depth < 1 or max_nodes < 1:
            raise ValueError("medusa drafter needs topk, depth and max_nodes >= 1")
        self.last: torch.Tensor | None = None

    def begin(self, prompt_ids: list[int], features: torch.Tensor | None = None) -> None:
        self.last = None

    def extend(self, token_ids: list[int], features: torch.Tensor | None = None) -> None:
        if features is None or len(features) != len(token_ids):
            raise ValueError("medusa drafter needs one target feature per committed token")
        self.last = features[-1].to(self.m.lm_head_t.device)   # (from the wire: on the host)

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        budget = Budget(min(budget.max_nodes, self.max_nodes), budget.max_depth)
        if self.last is None:
            return DraftTree()
        per_head = self.m.logits(self.last).to(HOST)   # every level's rows in one read
        depth_of: dict[int, int] = {}

        def expand(nodes: list[int], tree: DraftTree) -> torch.Tensor:
            for n in range(len(tree.tokens)):
                p = tree.parents[n]
                depth_of[n] = 1 if p < 0 else depth_of[p] + 1
            return per_head[[depth_of[n] for n in nodes]]

        self.last = None   # one tree per feature
        return grow(per_head[0], expand, budget, params, generator, self.topk, self.depth,
                    self.m.vocab_size, self.m.d2t)
