"""Acceptance statistics, kept per generation and summed over many."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_prefix_tokens: int = 0    # prompt tokens whose K/V a previous turn left in the cache
    generated_tokens: int = 0
    target_forwards: int = 0          # prefill included: plain decoding scores exactly 1.0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)  # [d] = steps that accepted >= d + 1 tokens
    budget_nodes: int = 0             # draft nodes the adaptive policy allowed, summed over steps
    batch_sequences: int = 0          # sequences sharing this request's target passes, summed over steps
    acceptance_estimate: float = 0.0  # the adaptive policy's per-node acceptance estimate (last step)
    row_cost_ratio: float = 0.0       # its fitted cost of one more row in a pass / the pass's base cost
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    grammar_s: float = 0.0            # a structured output's masks, pruning and grammar steps (in the others)
    total_s: float = 0.0

    def record_step(self, drafted: int, accepted: int) -> None:
        self.target_forwards += 1
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        if accepted > len(self.accepted_per_depth):
            self.accepted_per_depth.extend([0] * (accepted - len(self.accepted_per_depth)))
        for d in range(accepted):
            self.accepted_per_depth[d] += 1

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens committed per target forward."""
        return self.generated_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def mean_batch_size(self) -> float:
        """Sequences per target pass over this request's decoding steps (prefill excluded)."""
        steps = self.target_forwards - 1
        return self.batch_sequences / steps if steps > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_accepted_tokens=round(self.mean_accepted_tokens, 4),
                 tokens_per_s=round(self.tokens_per_s, 3), mean_batch_size=round(self.mean_batch_size, 3),
                 acceptance_rate=round(self.acceptance_rate, 4))
        return d
