"""Copy where the text repeats, a trained head elsewhere: n-gram lookup wins on answers that quote their
prompt (translation, extraction, retrieval), a head on open-ended ones (writing, coding), so each step
drafts with the n-gram drafter when the last `copy_ngram` tokens occurred before, and with the head
otherwise. One drafter's tree a step, chosen from committed tokens only: every step is verified as that
drafter's would be, so the output is the target's (point masses for the copy, the head's distributions
for its draws). Both follow every committed token, the head its features too, so either can draft next."""
from __future__ import annotations

import torch

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import DraftTree

from .base import Budget, Drafter
from .ngram import NgramDrafter


class CopyOrHeadDrafter(Drafter):
    def __init__(self, head: Drafter, copy_ngram: int = 2):
        if copy_ngram < 1:
            raise ValueError("copy_ngram must be >= 1: the suffix length that has to recur before copying")
        self.head = head
        self.copier = NgramDrafter(min_ngram=copy_ngram, max_ngram=max(3, copy_ngram))
        self.name = f"{head.name}+ngram"
        self.wants_features = head.wants_features
        self.copied = self.headed = 0   # steps each drafted

    def bind(self, runner) -> None:
        self.head.bind(runner)

    def begin(self, prompt_ids: list[int], features: torch.Tensor | None = None) -> None:
        self.copier.begin(prompt_ids)
        self.head.begin(prompt_ids, features)

    def extend(self, token_ids: list[int], features: torch.Tensor | None = None) -> None:
        self.copier.extend(token_ids)
        self.head.extend(token_ids, features)

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        tree = self.copier.propose(budget, params, generator)
        if len(tree.tokens):
            self.copied += 1
            return tree
        self.headed += 1
        return self.head.propose(budget, params, generator)

    def close(self) -> None:
        self.head.close()
