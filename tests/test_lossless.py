"""Greedy speculation is exactly greedy decoding (token for token, against the engine's own plain
decoding and against transformers' `generate`), whatever the drafter; sampling is reproducible per
seed; the acceptance statistics add up."""
from __future__ import annotations

import random

import pytest

from drafthorse.actors.drafters.base import NoDrafter
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams

SEEDS = [0, 1, 2]
N_NEW = 40
_r = random.Random(5)
PROMPTS = {
    "repetitive": [1, 2, 3, 4] * 3 + [1, 2],
    "repeated_phrase": [7, 90, 33, 12, 5, 7, 90, 33, 12, 5, 7, 90],
    "random": [_r.randrange(128) for _ in range(16)],
    "single_token": [42],
}


def drafters(lm, draft_lm):
    """name -> a fresh drafter for one generation."""
    return {
        "ngram": lambda: NgramDrafter(),
        "ngram_wide": lambda: NgramDrafter(max_ngram=4, max_branches=4, depth=5),
        "draft_chain": lambda: DraftModelDrafter(ModelRunner(draft_lm.model, 256), depth=4, branches=1),
        "draft_tree": lambda: DraftModelDrafter(ModelRunner(draft_lm.model, 256), depth=4, branches=3),
        "self_chain": lambda: DraftModelDrafter(ModelRunner(lm.model, 256), depth=5, branches=1),
        "self_tree": lambda: DraftModelDrafter(ModelRunner(lm.model, 256), depth=4, branches=3),
        "none": lambda: NoDrafter(),
    }


def check_stats(g, n_prompt: int):
    s = g.stats
    assert s.prompt_tokens == n_prompt
    assert s.generated_tokens == len(g.token_ids)
    assert 0 <= s.accepted_tokens <= s.drafted_tokens
    # every target forward commits its accepted draft tokens plus one of its own (nothing was cut)
    assert s.generated_tokens == s.target_forwards + s.accepted_tokens
    assert sum(s.accepted_per_depth) == s.accepted_tokens
    assert all(a >= b for a, b in zip(s.accepted_per_depth, s.accepted_per_depth[1:]))
    assert not s.accepted_per_depth or s.accepted_per_depth[0] <= s.target_forwards - 1


@pytest.mark.parametrize("seed", SEEDS)
def test_greedy_speculation_equals_plain_and_hf(tiny, make_engine, hf_greedy, seed):
    lm, draft_lm = tiny(seed), tiny(seed + 100)
    engine = make_engine(lm, 256)
    params = SamplingParams(max_new_tokens=N_NEW)
    accepted = {name: 0 for name in drafters(lm, draft_lm)}
    for pname, prompt in PROMPTS.items():
        plain = engine.generate(prompt, params)
        assert plain.token_ids == hf_greedy(lm, prompt, N_NEW), f"plain decoding != HF ({pname})"
        assert plain.finish_reason == "length" and len(plain.token_ids) == N_NEW
        assert plain.stats.mean_accepted_tokens == 1.0
        assert plain.stats.target_forwards == N_NEW and plain.stats.drafted_tokens == 0
        check_stats(plain, len(prompt))
        for name, make in drafters(lm, draft_lm).items():
            g = engine.generate(prompt, params, make())
            assert g.token_ids == plain.token_ids, f"{name} changed the greedy output ({pname})"
            assert g.finish_reason == "length"
            check_stats(g, len(prompt))
            accepted[name] += g.stats.accepted_tokens
            if name.startswith("self"):
                # the target drafting for itself is always right: only the token budget stops it
                assert g.stats.mean_accepted_tokens > 2, (name, pname, g.stats.to_dict())
    # the comparison is only meaningful if speculation really committed draft tokens
    for name in ("ngram", "ngram_wide", "self_chain", "self_tree"):
        assert accepted[name] > 0, f"{name} never had a draft token accepted"


def test_self_draft_accepts_everything(tiny, make_engine):
    """With the target as its own draft model (greedy), every drafted chain token is accepted."""
    lm = tiny(0)
    engine = make_engine(lm, 256)
    g = engine.generate(PROMPTS["random"], SamplingParams(max_new_tokens=N_NEW),
                        DraftModelDrafter(ModelRunner(lm.model, 256), depth=4, branches=1))
    assert g.stats.accepted_tokens == g.stats.drafted_tokens > 0


@pytest.mark.parametrize("name", ["ngram", "draft_tree", "self_chain"])
def test_stream_steps_add_up_to_generate(tiny, make_engine, name):
    lm, draft_lm = tiny(1), tiny(101)
    engine = make_engine(lm, 256)
    params = SamplingParams(max_new_tokens=N_NEW)
    make = drafters(lm, draft_lm)[name]
    full = engine.generate(PROMPTS["repetitive"], params, make())
    steps = list(engine.stream(PROMPTS["repetitive"], params, make()))
    assert [t for s in steps for t in s.token_ids] == full.token_ids
    assert all(s.finish_reason is None for s in steps[:-1]) and steps[-1].finish_reason == "length"
    assert all(len(s.token_ids) == s.accepted + 1 for s in steps)
    assert all(s.accepted <= s.drafted for s in steps)


@pytest.mark.parametrize("max_len", [20, 23])
def test_greedy_up_to_the_context_end(tiny, make_engine, hf_greedy, max_len):
    """A target context that ends before max_new_tokens: speculation stops where plain decoding stops,
    with the same tokens (drafts are cut to the room left)."""
    lm = tiny(2)
    prompt = PROMPTS["repetitive"]
    engine = make_engine(lm, max_len)
    params = SamplingParams(max_new_tokens=N_NEW)
    plain = engine.generate(prompt, params)
    assert plain.finish_reason == "length" and 0 < len(plain.token_ids) < N_NEW
    assert plain.token_ids == hf_greedy(lm, prompt, len(plain.token_ids))
    for name, make in drafters(lm, tiny(102)).items():
        g = engine.generate(prompt, params, make())
        assert g.token_ids == plain.token_ids, name
        assert g.finish_reason == "length"


@pytest.mark.parametrize("name", ["none", "ngram", "draft_chain", "draft_tree", "self_tree"])
def test_sampling_is_deterministic_per_seed(tiny, make_engine, name):
    lm, draft_lm = tiny(0), tiny(100)
    engine = make_engine(lm, 256)
    make = drafters(lm, draft_lm)[name]
    outs = []
    for seed in (1, 2, 3):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=30)
        a = engine.generate(PROMPTS["repetitive"], params, make())
        b = engine.generate(PROMPTS["repetitive"], params, make())
        assert a.token_ids == b.token_ids, f"seed {seed}: two runs differ"
        assert len(a.token_ids) == 30
        check_stats(a, len(PROMPTS["repetitive"]))
        outs.append(tuple(a.token_ids))
    assert len(set(outs)) > 1, "different seeds all gave the same sample"


def test_draft_model_with_a_short_context_still_lossless(tiny, make_engine):
    """A draft model whose own context fills up mid-generation stops drafting; output is unchanged."""
    lm = tiny(1)
    engine = make_engine(lm, 256)
    params = SamplingParams(max_new_tokens=N_NEW)
    plain = engine.generate(PROMPTS["repetitive"], params)
    steps = list(engine.stream(PROMPTS["repetitive"], params,
                               DraftModelDrafter(ModelRunner(lm.model, 30), depth=4, branches=2)))
    assert [t for s in steps for t in s.token_ids] == plain.token_ids
    drafted = [s.drafted for s in steps[1:]]
    assert drafted[0] > 0 and drafted[-1] == 0   # it drafted, then its context was full


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_sampling_with_point_mass_drafts_draws_plain_decodings_tokens(tiny, make_engine, seed):
    """The target's token at each position is drawn with that position's randomness (sampling.Noise): with
    n-gram drafts (point masses) a seeded answer is plain decoding's, token for token, however the trees
    come out; and a stream resumed with its tokens as prompt (a failover) draws on as the first one would."""
    lm = tiny(seed)
    engine = make_engine(lm, 256)
    prompt = PROMPTS["repeated_phrase"]
    params = SamplingParams(temperature=0.7, top_k=20, seed=seed, max_new_tokens=N_NEW)
    plain = engine.generate(prompt, params)
    accepted = 0
    for drafter in (NgramDrafter(), NgramDrafter(max_ngram=4, max_branches=4, depth=5)):
        g = engine.generate(prompt, params, drafter)
        assert g.token_ids == plain.token_ids
        accepted += g.stats.accepted_tokens
    assert accepted > 0
    k = N_NEW // 2
    resumed = engine.generate(prompt + plain.token_ids[:k], SamplingParams(
        temperature=0.7, top_k=20, seed=seed, max_new_tokens=N_NEW - k), NgramDrafter())
    assert resumed.token_ids == plain.token_ids[k:]
