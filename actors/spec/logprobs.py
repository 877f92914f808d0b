"""Log-probabilities of emitted tokens, read off the rows of the pass that chose them: no extra forward.

They are the target model's own, log_softmax of its logits before temperature, top-k and top-p (what
OpenAI's API and vLLM's default report), in float32 (float64 stays float64). A verify row is computed
like the decode row of the same token (models/exact.py), so with speculation on these are the numbers
plain decoding reports."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP = 20   # alternatives per token, OpenAI's bound for top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # the `top` most likely tokens at this row, most likely first


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Row i of logits [n, V] chose tokens[i]."""
    lp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    chosen = lp[torch.arange(len(tokens), device=lp.device), torch.tensor(tokens, device=lp.device)].tolist()
    if not top:
        return [TokenLogprob(t, c) for t, c in zip(tokens, chosen)]
    values, ids = lp.topk(top, dim=-1)
    return [TokenLogprob(t, c, tuple(zip(i, v))) for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist())]
