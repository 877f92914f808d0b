"""N-gram / prompt-lookup drafting: find earlier places in prompt + generated text where the current
suffix occurred, and propose what followed them. Several matches with different continuations become
branches of one tree. Proposals are deterministic (point masses), so sampling stays lossless."""
from __future__ import annotations

import torch

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import DraftTree, build_trie

from .base import Budget, Drafter


class NgramDrafter(Drafter):
    name = "ngram"

    # Defaults from replaying greedy SmolLM2 outputs on the dev file (2 per category, 128 tokens)
    # against a CPU cost model where each extra verified row costs ~6% of a pass: deeper or wider
    # trees accept a little more but cost more than they gain.
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_branches: int = 2, depth: int = 5,
                 max_matches_per_ngram: int = 8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.max_branches, self.depth = max_branches, depth
        self.max_matches = max_matches_per_ngram
        self.begin([])

    def begin(self, prompt_ids: list[int], features=None) -> None:
        self.tokens: list[int] = []
        # n-gram -> end positions (index of its last token), most recent last; built incrementally
        self.index: dict[tuple[int, ...], list[int]] = {}
        self.extend(prompt_ids)

    def extend(self, token_ids: list[int], features=None) -> None:
        for t in token_ids:
            self.tokens.append(t)
            end = len(self.tokens) - 1
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                self.index.setdefault(tuple(self.tokens[end - n + 1:end + 1]), []).append(end)

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        depth = min(self.depth, budget.max_depth)
        if depth < 1 or budget.max_nodes < 1 or not self.tokens:
            return DraftTree()
        last = len(self.tokens) - 1
        continuations: list[list[int]] = []
        seen_first: set[int] = set()
        for n in range(min(self.max_ngram, last + 1), self.min_ngram - 1, -1):  # longest match first
            ends = self.index.get(tuple(self.tokens[last - n + 1:]), [])
            for end in reversed(ends[-self.max_matches - 1:]):                   # most recent first
                if end == last:
                    continue
                cont = self.tokens[end + 1:end + 1 + depth]
                if cont and cont[0] not in seen_first:  # branch only where continuations differ
                    seen_first.add(cont[0])
                    continuations.append(cont)
                    if len(continuations) >= self.max_branches:
                        break
            if len(continuations) >= self.max_branches:
                break
        return build_trie(continuations, budget.max_nodes)
