"""A separate, smaller causal LM sharing the target's tokenizer, with its own KV cache.

Each step it catches up on the newly committed tokens in one forward pass, then grows the tree level
by level: `branches` children of the root (top-k when greedy, drawn without replacement when
sampling), each continued as a chain to the wanted depth. Every level is one forward pass over the
frontier through the runner's tree attention; the scratch nodes are dropped afterwards."""
from __future__ import annotations

import torch

from drafthorse.actors.models.kvcache import HOST
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams, probs_from_logits
from drafthorse.actors.spec.tree import ROOT, DraftTree

from .base import Budget, Drafter


class DraftModelDrafter(Drafter):
    name = "draft-model"

    def __init__(self, runner: ModelRunner, depth: int = 4, branches: int = 1):
        if depth < 1 or branches < 1:
            raise ValueError("draft model needs depth >= 1 and branches >= 1")
        self.runner, self.depth, self.branches = runner, depth, branches
        self.pending: list[int] = []

    def begin(self, prompt_ids: list[int], features=None) -> None:
        self.runner.reset()
        self.pending = list(prompt_ids)

    def extend(self, token_ids: list[int], features=None) -> None:
        self.pending.extend(token_ids)

    def close(self) -> None:
        self.runner.close()

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        depth = min(self.depth, budget.max_depth)
        branches = min(self.branches, budget.max_nodes)
        if self.pending:
            if self.runner.length + len(self.pending) > self.runner.max_len:
                return DraftTree()  # the draft model's context is full: let the target decode alone
            logits = self.runner.extend(self.pending)[0].to(HOST)   # choices are made on the host
            self.pending = []
        else:
            return DraftTree()
        if depth < 1 or branches < 1:
            return DraftTree()
        depth = min(depth, max(1, budget.max_nodes // branches), self.runner.room // branches)
        if depth < 1:
            return DraftTree()

        tree = DraftTree(probs=None if params.greedy else torch.empty(0, self.runner.vocab_size, device=HOST))
        first, first_q = self._choose(logits, branches, params, generator)
        frontier = self._add(tree, first, [ROOT] * len(first), first_q)
        scratch_of: dict[int, int] = {}  # draft node -> runner scratch node
        for _ in range(depth - 1):
            parents = [scratch_of[tree.parents[n]] if tree.parents[n] != ROOT else ROOT for n in frontier]
            base = self.runner.scratch_size
            logits = self.runner.score([tree.tokens[n] for n in frontier], parents)[0].to(HOST)   # a level at once
            for j, n in enumerate(frontier):
                scratch_of[n] = base + j
            nxt, nxt_q = [], []
            for j in range(len(frontier)):
                tok, q = self._choose(logits[j], 1, params, generator)
                nxt += tok
                nxt_q += q
            frontier = self._add(tree, nxt, frontier, nxt_q)
        self.runner.discard()
        return tree

    @staticmethod
    def _add(tree: DraftTree, tokens: list[int], parents: list[int], qs: list) -> list[int]:
        start = len(tree.tokens)
        tree.tokens += tokens
        tree.parents += parents
        if tree.probs is not None:
            tree.probs = torch.cat([tree.probs, torch.stack(qs)])
        return list(range(start, start + len(tokens)))

    @staticmethod
    def _choose(logits: torch.Tensor, k: int, params: SamplingParams, generator: torch.Generator,
                ) -> tuple[list[int], list]:
        """k distinct children and the distribution each was drawn from."""
        if params.greedy:
            return torch.topk(logits, k).indices.tolist(), [None] * k
        q = probs_from_logits(logits.to(HOST), params).float()   # drawn on the host, by the seeded generator
        tokens, qs = [], []
        for _ in range(k):  # without replacement: each draw from q with earlier picks removed
            if q.sum() <= 0:
                break
            qn = q / q.sum()
            t = int(torch.multinomial(qn, 1, generator=generator))
            tokens.append(t)
            qs.append(qn)
            q = qn.clone()
            q[t] = 0.0
        return tokens, qs
