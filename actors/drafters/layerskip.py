"""Layer-skip self-speculation: the target's first L layers plus a trained exit adapter draft for the
full target.

The drafter shares the target's weights and KV cache. The committed prefix's K/V of layers < L are
the ones the target's own passes wrote, so drafting never catches up on anything: it runs the root
and each depth of draft nodes through L layers into the target's scratch slots (which the verify pass
then overwrites with all layers), and turns the residual stream into a distribution with the adapter,
the target's final norm and its LM head restricted to the draft vocabulary."""
from __future__ import annotations

import torch

from drafthorse.actors.models.llama import Llama
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import ROOT, DraftTree

from .base import Budget, Drafter
from .dyntree import grow
from .heads import Checkpoint, ExitAdapter


class LayerSkipModel:
    def __init__(self, ckpt: Checkpoint, target: Llama):
        adapter = ckpt.module
        if not isinstance(adapter, ExitAdapter):
            raise ValueError(f"a {ckpt.kind} checkpoint is no layerskip adapter")
        self.adapter = adapter.to(target.device, target.dtype)
        self.layers = int(adapter.cfg["exit_layer"])
        self.target = target
        self.d2t = ckpt.d2t
        self.lm_head_t = target.lm_head[self.d2t].t().contiguous()   # [H, N]
        self.vocab_size = target.vocab_size
        self.defaults = dict(ckpt.info.get("defaults", {}))

    @torch.inference_mode()
    def logits(self, mid: torch.Tensor) -> torch.Tensor:
        t = self.target
        return (t.rms(self.adapter(mid), t.norm) @ self.lm_head_t).float()


class LayerSkipDrafter(Drafter):
    name = "layerskip"

    def __init__(self, model: LayerSkipModel, topk: int = 2, depth: int = 4, max_nodes: int = 8):
        if topk < 1 or depth < 1 or max_nodes < 1:
            raise ValueError("layerskip drafter needs topk, depth and max_nodes >= 1")
        self.m, self.topk, self.depth, self.max_nodes = model, topk, depth, max_nodes
        self.runner: ModelRunner | None = None
        self.root: int | None = None

    def bind(self, runner: ModelRunner) -> None:
        if runner.model is not self.m.target:
            raise ValueError("layerskip drafter: its adapter was built for another target model")
        self.runner = runner

    def begin(self, prompt_ids: list[int], features: torch.Tensor | None = None) -> None:
        self.root = None

    def extend(self, token_ids: list[int], features: torch.Tensor | None = None) -> None:
        if token_ids:
            self.root = token_ids[-1]

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        budget = Budget(min(budget.max_nodes, self.max_nodes), budget.max_depth)
        r = self.runner
        if r is None or self.root is None:
            return DraftTree()
        depth = min(self.depth, budget.max_depth)
        if r.room < 2 + depth * self.topk or depth < 1:
            return DraftTree()
        slot: dict[int, int] = {}     # tree node -> scratch index (the root is scratch 0)
        first = self.m.logits(r.partial([self.root], [ROOT], self.m.layers))[0]

        def expand(nodes: list[int], tree: DraftTree) -> torch.Tensor:
            par = [0 if tree.parents[n] == ROOT else slot[tree.parents[n]] for n in nodes]
            base = r.scratch_size
            mid = r.partial([tree.tokens[n] for n in nodes], par, self.m.layers)
            for j, n in enumerate(nodes):
                slot[n] = base + j
            return self.m.logits(mid)

        try:
            return grow(first, expand, budget, params, generator, self.topk, depth, self.m.vocab_size, self.m.d2t)
        finally:
            r.discard()   # the verify pass scores the root and the tree afresh, all layers
