"""Sampling parameters and the logits processing shared by target and drafters.

Lossless sampling needs the *same* processing (temperature, top-k, top-p) applied to the target's
and the drafter's logits: the verifier compares the two processed distributions."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from drafthorse.actors.spec.grammar import KINDS, MAX_SPEC_CHARS
from drafthorse.actors.spec.logprobs import MAX_TOP
from drafthorse.runtime.errors import BadField

GREEDY_BELOW = 1e-5   # the common serving convention (vLLM's too)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0 (below GREEDY_BELOW) = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: int | None = None       # None: none; k: each token's log-probability and its k likeliest rivals
    constraint: tuple[str, str] | None = None   # structured output: (kind, spec), grammar.KINDS

    def validate(self, max_new_tokens_limit: int | None = None) -> SamplingParams:
        """Raise BadField (a ValueError) naming the offending parameter."""
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise BadField("sampling.temperature",
                               f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise BadField("sampling.top_k", f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise BadField("sampling.top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise BadField("max_new_tokens", f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if max_new_tokens_limit is not None and self.max_new_tokens > max_new_tokens_limit:
            raise BadField("max_new_tokens",
                               f"max_new_tokens must be <= {max_new_tokens_limit}, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise BadField("stop", "stop strings must be non-empty strings")
        if len(self.stop) > 16 or any(len(s) > 256 for s in self.stop):
            raise BadField("stop", "stop: at most 16 strings of at most 256 characters")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_TOP):
            raise BadField("sampling.logprobs", f"logprobs must be in [0, {MAX_TOP}] (alternatives per token), "
                           f"got {self.logprobs}")
        kind, spec = self.constraint or (KINDS[0], "")
        if kind not in KINDS or len(spec) > MAX_SPEC_CHARS:
            raise BadField("constraint", f"constraint: one of {', '.join(KINDS)}, at most {MAX_SPEC_CHARS} characters")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise BadField("sampling.seed", f"seed must be in [0, 2**63), got {self.seed}")
        return self

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW decode greedily (the limit of sampling as the temperature goes
        to 0): dividing logits by a subnormal one overflows to inf and the softmax to NaN."""
        return self.temperature < GREEDY_BELOW


class Noise:
    """A sequence's sampling randomness, one generator per position of the context: the draw that picks
    the token at position t depends on the seed and t alone. A target token sampled with it is then the
    same whatever the drafts, their tree sizes or the batch (plain decoding's included), and a stream
    resumed elsewhere with its tokens as prompt draws on as before."""

    def __init__(self, seed: int | None):
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1

    def at(self, position: int) -> torch.Generator:
        # hashed, not seed + position: seed s at t + 1 must not be seed s + 1 at t (n choices use s + i)
        mixed = hashlib.blake2b(f"{self.seed}/{position}".encode(), digest_size=8).digest()
        g = torch.Generator()
        g.manual_seed(int.from_bytes(mixed, "little") >> 1)
        return g

    def from_position(self, first: int) -> Callable[[int], torch.Generator]:
        """draw(k): the generator of the k-th token from position `first` on."""
        return lambda k: self.at(first + k)


def make_generator(seed: int | None, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed((seed + salt) % 2**63)
    return g


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Processed next-token distribution(s), rows of `logits` [..., V] -> probabilities [..., V].

    Computed in float32 at least (float64 stays float64) so target and draft use identical math."""
    if params.greedy:
        raise ValueError("probs_from_logits is for sampling (temperature > 0)")
    x = logits.float() if logits.dtype not in (torch.float32, torch.float64) else logits.clone()
    x = x / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        x = x.masked_fill(_top_p_drop(x, params.top_p), float("-inf"))
    return torch.softmax(x, dim=-1)


TOP_P_CANDIDATES = 1024   # top-p looks at the likeliest this many first: a sort of the whole vocabulary
                          # per row costs ~12x a topk of them; rows whose nucleus is wider sort it all


def _top_p_drop(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """[..., V] bool: the tokens top-p drops, those for which the mass strictly before them (in order of
    likelihood) already reaches top_p; the first is always kept. The nucleus is a prefix of that order, so
    where the likeliest TOP_P_CANDIDATES reach top_p the cut lies among them and the rest all go. The
    masses are exp(x - logsumexp(x)) summed in that order either way: the cut does not depend on how many
    candidates were looked at."""
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    k = min(TOP_P_CANDIDATES, x.shape[-1])
    vals, order = torch.topk(x, k, dim=-1)
    p = torch.exp(vals - lse)
    drop = (p.cumsum(-1) - p) >= top_p
    out = torch.ones_like(x, dtype=torch.bool).scatter(-1, order, drop)
    wide = ~drop[..., -1]                     # the cut lies beyond the candidates: the whole order
    if bool(wide.any()):
        vals, order = torch.sort(x[wide], dim=-1, descending=True)
        p = torch.exp(vals - lse[wide])
        drop = (p.cumsum(-1) - p) >= top_p
        out[wide] = drop.scatter(-1, order, drop)
    return out
