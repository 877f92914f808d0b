"""Adaptive speculation: how many draft nodes each sequence gets this step.

A target pass over R rows costs about a + b*R (a: reading the weights once; b: per row). A sequence
whose drafts are accepted node by node with probability alpha gains alpha^d expected tokens from its
d-th node. Nodes are handed out best first while they raise the batch's expected tokens per unit of
target time: node gain g is worth adding iff (N + g) / (a + b(R + 1)) > N / (a + bR), i.e.
g > b*N / (a + b*R). Light load -> large trees; heavy load (large N, R) -> small trees or none.
Drafting at all costs a step time d too (proposing: a draft worker's round trip, a head's pass), which
no single node pays: the nodes chosen are kept only if (N + G) / (a + b(R + K) + d) beats N / (a + bR),
K nodes of expected gain G; else the step decodes plainly. alpha per sequence, a, b and d are measured
online (a and b over whole steps: a step's verification and bookkeeping cost time per row too); the
choice never changes *what* is generated, only how many tokens are guessed, so losslessness does not
depend on it."""
from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass
class Acceptance:
    """Per-sequence estimate of the per-node acceptance probability (decayed counts, Laplace prior)."""
    accepted: float = 1.0
    rejected: float = 1.0
    decay: float = 0.9

    def update(self, drafted_depth: int, accepted: int) -> None:
        if drafted_depth <= 0:
            return
        self.accepted = self.decay * self.accepted + accepted
        self.rejected = self.decay * self.rejected + (1 if accepted < drafted_depth else 0)

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)


class StepCost:
    """Online least squares fit of a target pass's time = a + b*rows (decayed)."""

    def __init__(self, per_row_ratio: float = 0.06, decay: float = 0.98):
        self.default, self.decay = per_row_ratio, decay
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.n, self.sx, self.sy = d * self.n + 1, d * self.sx + rows, d * self.sy + seconds
        self.sxx, self.sxy = d * self.sxx + rows * rows, d * self.sxy + rows * seconds

    @property
    def fit(self) -> tuple[float, float] | None:
        """(a, b) in seconds, or None until the observed row counts vary enough to fit."""
        var = self.sxx * self.n - self.sx ** 2
        if self.n < 8 or var < 1e-6 * max(self.n, 1) ** 2:
            return None
        b = (self.sxy * self.n - self.sx * self.sy) / var
        a = (self.sy - b * self.sx) / self.n
        return (a, b) if a > 0 and b > 0 else None

    @property
    def ratio(self) -> float:
        """b / a; the configured default until the observed row counts vary enough to fit."""
        fit = self.fit
        return self.default if fit is None else fit[1] / fit[0]


def chain_depth(a: float, b: float, draft_s: float, accept: list[float], max_depth: int = 16) -> int:
    """The chain depth at which one sequence's expected tokens per second peak: a target pass over 1 + D
    rows costs a + b(1 + D), drafting D levels D * draft_s, and depth d is accepted with probability
    accept[d - 1] once its parent was (the last entry repeats). 0: drafting does not pay here."""
    best, best_rate = 0, 1.0 / (a + b)
    tokens = p = 1.0
    for d in range(1, max_depth + 1):
        p *= accept[min(d, len(accept)) - 1] if accept else 0.0
        tokens += p
        rate = tokens / (a + b * (1 + d) + draft_s * d)
        if rate > best_rate:
            best, best_rate = d, rate
    return best


class AdaptivePolicy:
    def __init__(self, max_nodes: int, per_row_ratio: float = 0.06, decay: float = 0.9):
        self.max_nodes = max_nodes
        self.cost = StepCost(per_row_ratio)
        self.draft_s = 0.0          # the time drafting adds to a step (decayed mean over steps that drafted)
        self.decay = decay
        self.last: list[int] = []   # the last choice, for stats

    def observe_draft(self, seconds: float) -> None:
        """The drafting phase of a step in which some sequence drafted."""
        self.draft_s = seconds if not self.draft_s else self.decay * self.draft_s + (1 - self.decay) * seconds

    def choose(self, alphas: list[float]) -> list[int]:
        """Draft nodes per sequence for one step."""
        r = self.cost.ratio
        n_seq = len(alphas)
        tokens, rows = float(n_seq), float(n_seq)   # each sequence's root row yields one token
        nodes = [0] * n_seq
        heap = [(-a, i) for i, a in enumerate(alphas) if a > 0]   # next node's gain per sequence
        heapq.heapify(heap)
        while heap:
            neg_gain, i = heapq.heappop(heap)
            gain = -neg_gain
            if gain <= r * tokens / (1 + r * rows):
                break
            nodes[i] += 1
            tokens += gain
            rows += 1
            if nodes[i] < self.max_nodes:
                heapq.heappush(heap, (-(gain * alphas[i]), i))
        fit = self.cost.fit
        if fit is not None and rows > n_seq and self.draft_s:   # drafting's own cost: worth it at all?
            a, b = fit
            if tokens / (a + b * rows + self.draft_s) <= n_seq / (a + b * n_seq):
                nodes = [0] * n_seq
        self.last = nodes
        return nodes
