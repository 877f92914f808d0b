"""Trained draft heads (EAGLE, EAGLE-3, Medusa, layer-skip) on a tiny float64 target: training smoke test
(held-out loss goes down, checkpoints round-trip and refuse another target), greedy equality with
plain decoding, and sampling that keeps the target's distribution."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from drafthorse.actors.drafters import load_head, make_drafter
from drafthorse.actors.drafters.base import Budget
from drafthorse.actors.drafters.heads import eagle3_layers, load_checkpoint
from drafthorse.actors.engine import BatchEngine, SpecEngine
from drafthorse.actors.models.loader import LoadedModel, tiny_llama
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.scheduler import Request, Scheduler, SlotPool
from drafthorse.actors.spec.sampling import SamplingParams, make_generator
from drafthorse.actors.spec.stats import GenerationStats
from drafthorse.actors.spec.tree import ROOT
from drafthorse.actors.training import selfdistill
from drafthorse.actors.training.selfdistill import from_sequences
from drafthorse.actors.training.train import TrainConfig, Trainer
from tests.test_scheduler import drain
from tests.test_verify_sampling import E2E_N, E2E_TOKENS, E2E_VOCAB, PASS_P, PROMPT, exact_joint, gof_pvalue

KINDS = ("eagle", "eagle3", "medusa", "layerskip")
V = 64


def _corpus(lm: LoadedModel, n: int, seed: int):
    """Target-written sequences: random 6-token prompts continued by sampling (T=1) for 40 tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, V, (n, 6), generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = lm.hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                             max_new_tokens=40, pad_token_id=0, top_k=None, top_p=None)
    return from_sequences(lm, out.tolist(), [6] * n, mid_layer=1, taps=eagle3_layers(lm.model.n_layers))


@pytest.fixture(scope="module")
def target():
    """A target of this module's own (not the shared cached one): an EAGLE-3 head taps its layers."""
    return tiny_llama(0, vocab_size=V, hidden_size=64, dtype=torch.float64)


@pytest.fixture(scope="module")
def corpus(target):
    return _corpus(target, 96, seed=0)


@pytest.fixture(scope="module")
def trained(target, corpus, tmp_path_factory):
    """kind -> (checkpoint path, validation before training, after)."""
    out = {}
    for kind in KINDS:
        cfg = TrainConfig(kind, epochs=3, lr=3e-3, batch_tokens=512, draft_vocab=48, medusa_heads=3,
                          val_fraction=0.2)
        t = Trainer(cfg, target.model, target.name, corpus, target.eos_ids)
        before = t.validate()
        after = t.fit(progress=False)
        path = tmp_path_factory.mktemp("heads") / f"{kind}.safetensors"
        t.checkpoint(dict(topk=3, depth=3, max_nodes=12), dict(test=True)).save(path)
        out[kind] = (path, before, after)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_training_lowers_the_held_out_loss(trained, kind):
    _, before, after = trained[kind]
    assert after["val_loss"] < 0.95 * before["val_loss"], (before, after)
    # the head agrees with the target more often than an untrained one at depth 1
    assert after["val_top1_per_depth"][0] > before["val_top1_per_depth"][0]


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trips_and_refuses_another_target(trained, target, tiny, kind):
    path = trained[kind][0]
    a = load_checkpoint(path, target.model, target.name)
    b = load_checkpoint(path, target.model, target.name)
    assert a.kind == kind and a.info["defaults"] == dict(topk=3, depth=3, max_nodes=12) and torch.equal(a.d2t, b.d2t)
    for (k, x), (_, y) in zip(a.module.state_dict().items(), b.module.state_dict().items()):
        assert torch.equal(x, y), k
    other = tiny(1, vocab_size=V, hidden_size=64)
    with pytest.raises(ValueError, match="trained for target .* train a head"):
        load_checkpoint(path, other.model, other.name)


def test_eagle3_training_unrolls_the_head_as_it_drafts(trained, target, corpus):
    """Training-time test's step s at position i gives the logits the drafter computes for a chain node
    s levels below the committed pairs up to i - s: training sees what drafting at that depth sees."""
    path = trained["eagle3"][0]
    t = Trainer(TrainConfig("eagle3", draft_vocab=48, ttt_steps=3, val_fraction=0.2), target.model, target.name,
                corpus, target.eos_ids)
    t.module = load_checkpoint(path, target.model, target.name).module
    a, b = int(corpus.offsets[5]), int(corpus.offsets[6])
    steps, _, _, _, _ = t.eagle3_steps([(a, b)])
    model = load_head("eagle3", target, path)            # (taps the target: its rows carry the fused layers)
    tokens = corpus.tokens[a:b].tolist()
    for s, i in [(0, 7), (1, 20), (2, 31), (2, 44)]:
        ids = tokens[:i - s + 2]                         # committed: up to the token of window position i - s
        rows = target.model.forward(torch.tensor(ids), torch.arange(len(ids)), target.model.new_cache(), 0, None)
        rows = rows.half().to(rows.dtype)                # as the corpus keeps them (float16)
        d = make_drafter("eagle3", head=model)
        runner = d.runner
        logits, g = runner.extend(ids[1:], embeds=model.inputs(ids[1:], model.feature(rows[:-1])))
        for j in range(s):                               # then the chain's nodes, each on its parent's output
            lg, hid = runner.score([tokens[i - s + 2 + j]], [j - 1 if j else -1],
                                   embeds=model.inputs([tokens[i - s + 2 + j]], g[None]))
            logits, g = lg[0], hid[0]
        assert torch.allclose(logits.float(), steps[s][0, i], atol=1e-4, rtol=1e-4), (s, i)


@pytest.mark.parametrize("kind", KINDS)
def test_a_heads_tree_is_sized_to_the_machine_at_load(trained, target, kind, caplog):
    """load_head turns the head's held-out acceptance per depth and this machine's measured pass, row and
    draft-level costs into its tree (adaptive.chain_depth); the saved tree stays in the checkpoint."""
    with caplog.at_level("INFO", logger="drafthorse.actors.drafters"):
        head = load_head(kind, target, trained[kind][0])
    d = head.defaults
    assert 1 <= d["depth"] <= (3 if kind == "medusa" else 8) and d["max_nodes"] == d["depth"] * d["topk"]
    assert d["topk"] in (1, 3)
    assert f"{kind} head: trees of depth {d['depth']}" in caplog.text and "a pass" in caplog.text
    assert load_checkpoint(trained[kind][0], target.model).info["defaults"] == dict(topk=3, depth=3, max_nodes=12)


def test_bad_checkpoint_files_are_refused(target, tmp_path):
    with pytest.raises(FileNotFoundError, match="train-drafter"):
        load_checkpoint(tmp_path / "missing.safetensors", target.model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_checkpoint(junk, target.model)


PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 7, 7, 7], [5, 17, 33, 2, 9, 40, 41, 42, 43, 1, 2]]


@pytest.fixture(scope="module")
def target_int8():
    """The same tiny target as `target`, loaded at float32 and quantised to int8 weights."""
    lm = tiny_llama(0, vocab_size=V, hidden_size=64, dtype=torch.float32)
    lm.model.quantize_int8()
    return lm


@pytest.mark.parametrize("at", ["target", "target_int8"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_plain_decoding(trained, make_engine, kind, at, request):
    """Speculative output equals plain decoding of the same target; a head trained on the float64
    target also loads on its int8 form (same fingerprint) and is lossless there."""
    lm = request.getfixturevalue(at)
    head = load_head(kind, lm, trained[kind][0])
    engine = make_engine(lm)
    params = SamplingParams(max_new_tokens=48)
    accepted = 0
    for prompt in PROMPTS:
        plain = engine.generate(prompt, params)
        spec = engine.generate(prompt, params, make_drafter(kind, head=head))
        assert spec.token_ids == plain.token_ids, (kind, at, prompt)
        accepted += spec.stats.accepted_tokens
    assert accepted > 0, f"{kind}: the trained head never had a token accepted ({at})"


@pytest.mark.parametrize("kind", KINDS)
def test_copying_twin_equals_plain_decoding(trained, target, make_engine, kind):
    """KIND+ngram copies where the last two tokens recur and drafts with KIND's head elsewhere: both draft
    in these generations (a prompt that repeats itself, and ones that do not), and the output is plain
    decoding's."""
    head = load_head(kind + "+ngram", target, trained[kind][0])
    engine = make_engine(target)
    params = SamplingParams(max_new_tokens=48)
    copied = headed = 0
    for prompt in PROMPTS + [[9, 10, 11, 12, 13] * 4]:
        d = make_drafter(kind + "+ngram", head=head)
        assert d.name == kind + "+ngram"
        spec = engine.generate(prompt, params, d)
        assert spec.token_ids == engine.generate(prompt, params).token_ids, (kind, prompt)
        copied, headed = copied + d.copied, headed + d.headed
    assert copied > 0 and headed > 0, (copied, headed)


@pytest.mark.parametrize("kind", KINDS)
def test_trees_respect_the_budget(trained, target, make_engine, kind):
    """Whatever the head proposes stays within max_nodes / max_depth and in the vocabulary."""
    head = load_head(kind, target, trained[kind][0])
    engine = make_engine(target, max_tree_nodes=5, max_tree_depth=2)
    for prompt in PROMPTS:
        g = engine.generate(prompt, SamplingParams(max_new_tokens=30), make_drafter(kind, head=head, topk=4, depth=6))
        assert g.stats.drafted_tokens <= 5 * (g.stats.target_forwards - 1)
    d = make_drafter(kind, head=head, topk=8, depth=8)
    seq, _ = engine.start(engine.runner, PROMPTS[0], SamplingParams(max_new_tokens=30), d)
    engine.step([seq])
    d.extend(seq.new, seq.new_features)   # what the next step would hand the drafter
    tree = d.propose(Budget(max_nodes=7, max_depth=3), SamplingParams(), make_generator(0))
    assert 0 < len(tree) <= 7 and max(tree.depths()) <= 3
    tree.validate(V, 7, 3)


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_the_cache_keeps_the_state_of_every_position_it_holds(trained, target, make_engine, kind):
    """Once a feature head is bound, a target's caches keep every cached position's output row (the
    features, with EAGLE-3's tapped streams): after speculative steps (rows scored as tree nodes, the
    accepted ones moved into place) and in a slot that copied a prefix, they are the rows of one
    forward over the tokens."""
    head = load_head(kind, target, trained[kind][0])
    engine = make_engine(target)
    assert engine.runner.keeps_features
    g = engine.generate(PROMPTS[2], SamplingParams(max_new_tokens=30), make_drafter(kind, head=head))
    assert g.stats.accepted_tokens > 0
    runner = engine.runner
    runner.score([4, 5, 6, 7], [ROOT, ROOT, 1, 2])   # two branches, 4 and 5 -> 6 -> 7: the second is kept
    runner.commit([1, 2, 3])
    fresh = ModelRunner(target.model, 64)
    _, rows = fresh.extend(runner.tokens, all_hidden=True)
    assert rows.shape[-1] == target.model.config.hidden_size * (1 + len(target.model.taps))
    torch.testing.assert_close(runner.features(runner.length), rows, rtol=0, atol=1e-10)
    pool = target.model.new_pool(2, 64)
    a, b = ModelRunner(target.model, cache=pool.cache(0)), ModelRunner(target.model, cache=pool.cache(1))
    a.extend(runner.tokens)
    b.copy_prefix(a, 20)
    torch.testing.assert_close(b.features(20), rows[:20], rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["eagle3", "eagle+ngram"])
def test_a_feature_head_drafts_a_next_turn_from_its_cached_prefix(trained, target, make_engine, kind):
    """A session's next turn keeps the K/V of the conversation so far (the target scores only the new
    tokens) with a feature head too: the head starts from the states the cache kept, so it drafts as
    after a prefill of the whole prompt, and the answer is plain decoding's."""
    head = load_head(kind, target, trained[kind.removesuffix("+ngram")][0])
    engine = make_engine(target)
    params = SamplingParams(max_new_tokens=24)
    first = engine.generate(PROMPTS[2], params, make_drafter(kind, head=head))
    turn = PROMPTS[2] + first.token_ids + [3, 9, 27, 17]

    def answer(reuse: bool):
        if not reuse:
            engine.runner.reset()
        out = GenerationStats()
        ids = [t for step in engine.stream(turn, params, make_drafter(kind, head=head), out, reuse_prefix=reuse)
               for t in step.token_ids]
        return ids, out

    reused, stats = answer(True)
    assert stats.reused_prefix_tokens == len(PROMPTS[2]) + len(first.token_ids) - 1
    fresh, fresh_stats = answer(False)
    assert fresh_stats.reused_prefix_tokens == 0
    assert reused == fresh == engine.generate(turn, params).token_ids
    assert stats.accepted_tokens > 0
    assert (stats.drafted_tokens, stats.accepted_tokens) == (fresh_stats.drafted_tokens, fresh_stats.accepted_tokens)


def test_a_feature_heads_prompt_enters_in_chunks_and_is_shared(trained, target):
    """In a target worker's scheduler an EAGLE-3 request's long prompt enters the cache in chunks between
    other requests' steps, and a second request of the same scope copies the first's prompt instead of
    prefilling it: both answer as plain decoding alone."""
    head = load_head("eagle3", target, trained["eagle3"][0])
    engine = BatchEngine(target.eos_ids, prefill_chunk=16)
    s = Scheduler(engine, SlotPool(target.model, 2, 256), max_waiting=4)
    try:
        prompt = [(7 * i + 3) % V for i in range(70)]
        params = SamplingParams(max_new_tokens=16)
        plain = SpecEngine(ModelRunner(target.model, 256), target.eos_ids, prefill_chunk=16).generate(
            prompt, params).token_ids
        for expect_copy in (False, True):
            r = Request(list(prompt), params, make_drafter("eagle3", head=head), prefix_scope="k")
            s.submit(r)
            assert drain(r) == plain
            assert r.stats.accepted_tokens > 0
            if expect_copy:
                assert r.stats.reused_prefix_tokens == len(prompt) - 1 and s.shared_tokens == len(prompt) - 1
            else:   # its own earlier chunks count as reused: 4 of 16 before the last piece
                assert r.stats.reused_prefix_tokens == 64 and s.shared_tokens == 0
    finally:
        s.stop()


@pytest.fixture(scope="module")
def small():
    """An 8-token target (the joint of 3 tokens is enumerable) and heads trained on it."""
    lm = tiny_llama(0, vocab_size=E2E_VOCAB, hidden_size=32, dtype=torch.float64)
    corpus = _corpus_small(lm)
    heads = {}
    for kind in KINDS:
        t = Trainer(TrainConfig(kind, epochs=2, lr=3e-3, batch_tokens=512, draft_vocab=6, medusa_heads=3,
                                val_fraction=0.2), lm.model, lm.name, corpus, lm.eos_ids)
        t.fit(progress=False)
        heads[kind] = t.checkpoint(dict(topk=2, depth=3), {})
    return lm, heads


def _corpus_small(lm):
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, E2E_VOCAB, (48, 6), generator=g)
    torch.manual_seed(3)
    with torch.no_grad():
        out = lm.hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0,
                             max_new_tokens=24, pad_token_id=0, top_k=None, top_p=None)
    return from_sequences(lm, out.tolist(), [6] * 48, mid_layer=1, taps=eagle3_layers(lm.model.n_layers))


@pytest.mark.parametrize("kind", KINDS + ("eagle+ngram",))
def test_sampling_is_lossless(small, make_engine, tmp_path, kind):
    """The joint distribution of the first 3 sampled tokens equals the target's, by a G-test over
    3000 generations; the draft vocabulary (6 of 8 tokens) leaves two tokens undraftable, and top-p
    trims the tail on both sides. eagle+ngram: steps drafted by copying (point masses) and by the head
    (its distributions) in the same generations."""
    lm, heads = small
    path = tmp_path / f"{kind}.safetensors"
    heads[kind.removesuffix("+ngram")].save(path)
    head = load_head(kind, lm, path)
    engine = make_engine(lm, 64)
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=E2E_TOKENS + 1)
    outcomes, drafted, accepted, by = [], 0, 0, set()
    for i in range(E2E_N):
        d = make_drafter(kind, head=head)
        g = engine.generate(PROMPT, SamplingParams(seed=7919 * i + 13, **kw), d)
        outcomes.append(int(np.ravel_multi_index(g.token_ids[:E2E_TOKENS], (E2E_VOCAB,) * E2E_TOKENS)))
        drafted += g.stats.drafted_tokens
        accepted += g.stats.accepted_tokens
        by |= {"copy"} if getattr(d, "copied", 0) else set()
        by |= {"head"} if getattr(d, "headed", 0) else set()
    assert 0 < accepted < drafted, (accepted, drafted)
    assert not kind.endswith("+ngram") or by == {"copy", "head"}, by
    params = SamplingParams(temperature=1.0, top_p=0.95)
    pval = gof_pvalue(outcomes, exact_joint(lm, params))
    assert pval > PASS_P, f"{kind}: output is not distributed as the target (p={pval:.2e})"


def test_a_sequence_inside_another_takes_its_rows_from_that_ones_pass(target):
    """teacher_pass runs the target once over a sequence that others begin (a first turn inside its second
    turn's prompt): their rows equal their own pass's."""
    g = torch.Generator().manual_seed(5)
    long = torch.randint(0, V, (30,), generator=g).tolist()
    other = torch.randint(0, V, (12,), generator=g).tolist()
    seqs = [long[:10], long, other, long[:20], long[:10]]
    assert selfdistill.carriers(seqs) == [1, 1, 2, 1, 1]
    folded = selfdistill.teacher_pass(target, seqs, 1, eagle3_layers(target.model.n_layers))
    starts = np.cumsum([0] + [len(s) for s in seqs]).tolist()
    for i, s in enumerate(seqs):
        alone = selfdistill.teacher_pass(target, [s], 1, eagle3_layers(target.model.n_layers))
        for got, want in zip(folded, alone):
            assert got is not None and want is not None
            torch.testing.assert_close(got[starts[i]:starts[i + 1]], want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_positions_are_learnt_from_only_when_asked(target, corpus, kind):
    """prompt_loss=False: the loss reads what the target did at answer positions alone (what a head drafts
    when serving), so other targets at prompt positions leave it as it was; with prompt_loss they count.
    (eagle3 learns the target's distribution, from its final features; the others its greedy labels.)"""
    prompt = ~corpus.answers()
    if kind == "eagle3":
        other = dataclasses.replace(corpus, feat=torch.where(prompt[:, None], corpus.feat.flip(-1), corpus.feat))
    else:
        other = dataclasses.replace(corpus, label=torch.where(prompt, (corpus.label + 1) % V, corpus.label))
    for prompt_loss in (False, True):
        losses, first = [], None
        for c in (corpus, other):
            torch.manual_seed(0)   # the same initial head for both corpora
            t = Trainer(TrainConfig(kind, draft_vocab=V, medusa_heads=3, ttt_steps=2, prompt_loss=prompt_loss),
                        target.model, target.name, c, target.eos_ids)
            first = first or t
            t.d2t, t.t2d, t.lm_d = first.d2t, first.t2d, first.lm_d   # (the vocabulary counts every label)
            losses.append(float(t.loss(list(t._batches(t.train_seqs, False))[0], train=False)[0]))
        assert (losses[0] == losses[1]) != prompt_loss, (kind, prompt_loss, losses)
    assert Trainer(TrainConfig(kind), target.model, target.name, corpus, target.eos_ids).prompt_loss == \
        (kind != "eagle3")   # the defaults (train.PROMPT_LOSS)


def test_amp_computes_products_in_bfloat16_and_keeps_float32_weights(target):
    """amp: a float32 target's training products run in bfloat16 under autocast (the loss differs from
    float32's a little, not much), the head's weights stay float32 and still learn."""
    t32 = tiny_llama(0, vocab_size=V, hidden_size=64, dtype=torch.float32)
    corpus = _corpus(t32, 48, seed=3)
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        t = Trainer(TrainConfig("eagle3", epochs=2, lr=3e-3, batch_tokens=512, draft_vocab=48, ttt_steps=2,
                                val_fraction=0.2, amp=amp), t32.model, t32.name, corpus, t32.eos_ids)
        before = t.validate()
        batch = list(t._batches(t.train_seqs, False))[0]
        losses[amp] = float(t.loss(batch, train=False)[0])
        after = t.fit(progress=False)
        assert after["val_loss"] < before["val_loss"] and t.info["amp"] is amp
        assert {p.dtype for p in t.module.parameters()} == {torch.float32}
    assert losses[False] != losses[True] and losses[True] == pytest.approx(losses[False], rel=0.05)
    # unasked, a float64 target (the tests' tiny ones, exactly reproducible) trains without autocast
    assert Trainer(TrainConfig("eagle3"), target.model, target.name, corpus, target.eos_ids).amp is False


def test_features_of_another_teacher_dtype_are_refused(target, tmp_path):
    """The feature cache is keyed by the teacher's dtype: features a float32 pass wrote are not read as a
    bfloat16 teacher's (they would differ from what that target serves)."""
    seqs = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(2)).tolist()
    feats = from_sequences(target, seqs, [4] * 4, 1, taps=eagle3_layers(target.model.n_layers))
    assert feats.meta["teacher_dtype"] == "float64"
    feats.meta["teacher_dtype"] = "float32"
    feats.save(tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="at float32 .* not for .* at float64"):
        selfdistill.cached(target, tmp_path / "f.safetensors", 1, lambda: feats)


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_a_head_trains_on_from_its_checkpoint(trained, target, corpus, kind):
    """init: more epochs on a saved head start from its weights (the held-out figures it was saved with,
    up to float16 storage), not from a fresh head; the checkpoint remembers the epochs before. A head of
    another kind or another draft vocabulary is refused with what to change."""
    path, before, after = trained[kind]
    cfg = TrainConfig(kind, epochs=1, lr=3e-3, batch_tokens=512, draft_vocab=48, medusa_heads=3, val_fraction=0.2)
    warm = Trainer(dataclasses.replace(cfg, init=str(path)), target.model, target.name, corpus, target.eos_ids)
    start = warm.validate()
    assert start["val_loss"] == pytest.approx(after["val_loss"], rel=1e-3)
    assert abs(start["val_loss"] - before["val_loss"]) > 0.05 * before["val_loss"]
    warm.fit(progress=False)
    assert warm.info["init"] == str(path) and warm.info["init_epochs"] == 3
    other = "eagle3" if kind == "eagle" else "eagle"
    with pytest.raises(ValueError, match=f"is a {kind} head, not {other}"):
        Trainer(dataclasses.replace(cfg, kind=other, init=str(path)), target.model, target.name, corpus,
                target.eos_ids)
    with pytest.raises(ValueError, match="another vocabulary .* same corpus"):
        Trainer(dataclasses.replace(cfg, draft_vocab=40, init=str(path)), target.model, target.name, corpus,
                target.eos_ids)
