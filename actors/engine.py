"""The speculative decoding loop for one sequence: draft, verify in one target pass, commit, repeat.

    prefill(prompt) -> first token (the root)
    loop: drafter.extend(new tokens) -> tree = drafter.propose(budget)
          target scores [root] + tree in one pass -> verify -> commit root + accepted path
          emit accepted tokens + the bonus token; the bonus is the next root

Plain autoregressive decoding is the same loop with an empty tree, so every speedup is measured
against the same code. Tokens are emitted as they are committed; stops are checked per token."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from actors.drafters.base import Budget, Drafter, NoDrafter
from actors.models.runner import ModelRunner
from actors.spec.sampling import SamplingParams, make_generator, probs_from_logits
from actors.spec.stats import GenerationStats
from actors.spec.stops import Decode, StopChecker
from actors.spec.tree import ROOT, DraftTree
from actors.spec.verify import verify_greedy, verify_sampling


@dataclass
class Step:
    token_ids: list[int]                 # newly committed tokens (stop-truncated)
    finish_reason: str | None = None     # "stop" | "length" | None
    drafted: int = 0
    accepted: int = 0


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)


class SpecEngine:
    def __init__(self, runner: ModelRunner, eos_ids: set[int], decode: Decode | None = None,
                 max_tree_nodes: int = 64, max_tree_depth: int = 16):
        self.runner = runner
        self.eos_ids = eos_ids
        self.decode = decode
        self.max_tree_nodes = max_tree_nodes
        self.max_tree_depth = max_tree_depth

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the parameter for anything this engine cannot serve."""
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        if any(not 0 <= t < self.runner.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.runner.vocab_size})")
        if len(prompt_ids) >= self.runner.max_len:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens, the model's context is "
                             f"{self.runner.max_len}: shorten the prompt")
        params.validate()
        if params.stop and self.decode is None:
            raise ValueError("stop strings need a tokenizer")

    def stream(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter | None = None,
               stats: GenerationStats | None = None, reuse_prefix: bool = False) -> Iterator[Step]:
        """Yield committed tokens step by step. reuse_prefix keeps the K/V of the longest common
        prefix of the runner's tokens and this prompt (a session's next turn)."""
        self.check_request(prompt_ids, params)
        drafter = drafter or NoDrafter()
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        verify_rng = make_generator(params.seed)
        draft_rng = make_generator(params.seed, salt=1)  # the drafter's randomness is its own
        stopper = StopChecker(params.max_new_tokens, self.eos_ids, params.stop, self.decode)
        runner = self.runner
        keep = 0
        if reuse_prefix:  # at least one prompt token is scored again: its logits start the answer
            limit = min(len(runner.tokens), len(prompt_ids) - 1)
            while keep < limit and runner.tokens[keep] == prompt_ids[keep]:
                keep += 1
        runner.truncate(keep)
        stats.reused_prefix_tokens = keep
        t0 = time.perf_counter()

        logits, _ = runner.extend(prompt_ids[keep:])
        root = self._pick(logits[None], params, verify_rng)
        stats.prefill_s = time.perf_counter() - t0
        stats.record_step(0, 0)
        step = self._emit(stopper, [root], stats, 0, 0, t0)
        yield step
        drafter.begin(prompt_ids)
        new = [root]
        while step.finish_reason is None:
            if runner.room < 2:  # no slot left for the root and a bonus token
                step = Step([], "length")
                yield step
                break
            t1 = time.perf_counter()
            drafter.extend(new)
            left = params.max_new_tokens - len(stopper.tokens)  # the bonus token is free
            budget = Budget(max_nodes=min(self.max_tree_nodes, runner.room - 1),
                            max_depth=min(self.max_tree_depth, left - 1, runner.room - 2))
            tree = drafter.propose(budget, params, draft_rng) if budget.max_depth > 0 else DraftTree()
            tree.validate(runner.vocab_size, budget.max_nodes, budget.max_depth)
            t2 = time.perf_counter()
            stats.draft_s += t2 - t1

            logits, _ = runner.score([root] + tree.tokens, [ROOT] + [p + 1 for p in tree.parents])
            if params.greedy:
                path, bonus = verify_greedy(tree, logits)
            else:
                path, bonus = verify_sampling(tree, probs_from_logits(logits, params), verify_rng)
            runner.commit([0] + [n + 1 for n in path])
            stats.verify_s += time.perf_counter() - t2

            new = [tree.tokens[n] for n in path] + [bonus]
            stats.record_step(len(tree), len(path))
            step = self._emit(stopper, new, stats, len(tree), len(path), t0)
            yield step
            root = bonus
        drafter.close()

    def generate(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter | None = None,
                 ) -> Generation:
        out = Generation()
        for step in self.stream(prompt_ids, params, drafter, out.stats):
            out.token_ids += step.token_ids
            out.finish_reason = step.finish_reason or out.finish_reason
        if self.decode is not None:
            stopper = StopChecker(params.max_new_tokens, self.eos_ids, params.stop, self.decode)
            stopper.tokens = out.token_ids
            out.text = stopper.text()
        return out

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator) -> int:
        if params.greedy:
            return int(logits[0].argmax())
        return int(torch.multinomial(probs_from_logits(logits[0], params), 1, generator=rng))

    @staticmethod
    def _emit(stopper: StopChecker, tokens: list[int], stats: GenerationStats, drafted: int,
              accepted: int, t0: float) -> Step:
        kept = stopper.feed(tokens)
        stats.generated_tokens += len(kept)
        stats.total_s = time.perf_counter() - t0
        return Step(kept, stopper.finish_reason, drafted, accepted)
