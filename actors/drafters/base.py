"""The drafter interface. A drafter follows one sequence: it is told the prompt, then only the tokens
committed since its last call, and proposes a DraftTree of plain token ids (and, when sampling, the
distribution each node was drawn from). Nothing it returns refers to live state of the target, so
the same calls can cross a process boundary."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import DraftTree


@dataclass(frozen=True)
class Budget:
    max_nodes: int     # tree size bound
    max_depth: int     # no node deeper than this (the tokens still wanted bound it too)


class Drafter(ABC):
    """Features: drafters that set `wants_features` also get the target's final hidden states, one row
    per token given, row i being the state from which the target predicted token i (for the prompt,
    rows for prompt_ids[1:]). They are computed by the verify pass anyway."""
    name: str = "drafter"
    wants_features: bool = False
    # propose() returns trees already validated against the budget (a remote drafter's, where they come off
    # the wire): the engine checks every other drafter's, so each tree is checked once
    checked_trees: bool = False
    # propose() mostly waits on another process: the engine overlaps such calls on threads and runs
    # every other drafter on its own thread
    waits_on_network: bool = False

    def bind(self, runner) -> None:  # noqa: B027 - an optional hook: most drafters need no runner
        """The target's ModelRunner for this sequence (self-speculative drafters share its weights and
        cache); called before `begin`."""

    @abstractmethod
    def begin(self, prompt_ids: list[int], features: torch.Tensor | None = None) -> None:
        """Start a new sequence."""

    @abstractmethod
    def extend(self, token_ids: list[int], features: torch.Tensor | None = None) -> None:
        """Tokens committed since the last call; the last one is the root of the next tree."""

    @abstractmethod
    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        """A tree hanging off the last committed token, within budget."""

    def close(self) -> None:  # noqa: B027 - an optional hook: most drafters hold nothing to free
        """Free per-sequence state."""


class NoDrafter(Drafter):
    """Plain autoregressive decoding: an empty tree every step."""
    name = "none"

    def begin(self, prompt_ids: list[int], features: torch.Tensor | None = None) -> None:
        pass

    def extend(self, token_ids: list[int], features: torch.Tensor | None = None) -> None:
        pass

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        return DraftTree()
