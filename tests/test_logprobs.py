"""Logprobs come off the rows that chose each token: the target's own log_softmax, equal to a plain
forward over the finished sequence (float64, to 1e-9) and to plain decoding's, whatever the drafter, the
sampling settings or the stop that cut a step short."""
from __future__ import annotations

import pytest
import torch

from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models.loader import tiny_llama
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.runtime.errors import BadField

PROMPT = [7, 90, 33, 12, 5, 7, 90, 33, 12, 5, 7, 90]


def reference(lm, prompt: list[int], out: list[int]) -> torch.Tensor:
    """log_softmax of transformers' forward over prompt + out, at the rows that predicted `out`."""
    ids = torch.tensor([prompt + out])
    with torch.no_grad():
        logits = lm.hf(ids).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits, dim=-1)


def drafters(lm, draft_lm):
    return {"none": lambda: None, "ngram": NgramDrafter,
            "draft_tree": lambda: DraftModelDrafter(ModelRunner(draft_lm.model, 256), depth=4, branches=3)}


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.3, 5, 0.9)])
def test_logprobs_are_the_targets_own_whatever_drafts(tiny, make_engine, temperature, top_k, top_p):
    lm, draft_lm = tiny(0), tiny(100)
    engine = make_engine(lm, 256)
    runs = {}
    for name, make in drafters(lm, draft_lm).items():
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=3, max_new_tokens=40,
                                logprobs=5)
        g = engine.generate(PROMPT, params, make())
        assert [t.token_id for t in g.logprobs] == g.token_ids and len(g.token_ids) == 40
        ref = reference(lm, PROMPT, g.token_ids)
        got = torch.tensor([t.logprob for t in g.logprobs], dtype=torch.float64)
        assert torch.allclose(got, ref[torch.arange(40), g.token_ids], rtol=0, atol=1e-9), name
        top = ref.topk(5, dim=-1)
        for t, ids, values in zip(g.logprobs, top.indices.tolist(), top.values.tolist()):
            assert [i for i, _ in t.top] == ids and all(abs(a - b) < 1e-9 for (_, a), b in zip(t.top, values))
        if temperature == 0:   # sampling draws other tokens per drafter (one distribution, not one sequence)
            runs[name] = g
    if runs:
        assert all(g.logprobs == runs["none"].logprobs for g in runs.values())   # bitwise, tops included


def test_logprobs_are_bitwise_plain_decodings_with_exact_rows():
    """bfloat16 (exact rows by default): a verify row is the decode row, so the logprobs are the same bits."""
    lm, draft_lm = tiny_llama(4, dtype=torch.bfloat16), tiny_llama(104, dtype=torch.bfloat16)
    assert lm.model.exact
    engine = SpecEngine(ModelRunner(lm.model, 256), lm.eos_ids)
    runs = {name: engine.generate(PROMPT, SamplingParams(max_new_tokens=40, logprobs=3), make())
            for name, make in drafters(lm, draft_lm).items()}
    assert runs["ngram"].stats.accepted_tokens > 0
    assert all(g.logprobs == runs["none"].logprobs for g in runs.values())


def test_logprobs_stop_where_the_tokens_stop(tiny, make_engine):
    lm = tiny(0)
    engine = make_engine(lm, 256)
    full = engine.generate(PROMPT, SamplingParams(max_new_tokens=30, logprobs=0), NgramDrafter())
    cut = engine.generate(PROMPT, SamplingParams(max_new_tokens=13, logprobs=0), NgramDrafter())
    assert cut.logprobs == full.logprobs[:13] and all(t.top == () for t in cut.logprobs)
    assert engine.generate(PROMPT, SamplingParams(max_new_tokens=5)).logprobs == []   # not asked: none


@pytest.mark.parametrize("k", [-1, 21])
def test_logprobs_out_of_range_is_refused_by_name(k):
    with pytest.raises(BadField, match=r"logprobs must be in \[0, 20\]") as e:
        SamplingParams(logprobs=k).validate()
    assert e.value.field == "sampling.logprobs"
