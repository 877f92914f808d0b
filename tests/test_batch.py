"""Batched speculation across requests: every request's output equals its output alone."""
from __future__ import annotations

import pytest
import torch

from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import BatchEngine, Prompt, SpecEngine
from drafthorse.actors.models.loader import tiny_llama
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams


@pytest.fixture(scope="module")
def models():
    return tiny_llama(0), tiny_llama(1)


def drafter(kind, draft):
    return {"none": lambda: None, "ngram": NgramDrafter,
            "chain": lambda: DraftModelDrafter(ModelRunner(draft.model, 256), depth=3),
            "tree": lambda: DraftModelDrafter(ModelRunner(draft.model, 256), depth=3, branches=3)}[kind]()


REQUESTS = [  # (prompt, drafter, params, joins at step)
    ([5, 6, 7, 8, 5, 6, 7, 8, 5], "ngram", SamplingParams(max_new_tokens=30), 0),
    ([1, 2, 3], "none", SamplingParams(max_new_tokens=12), 0),
    (list(range(40, 90)), "chain", SamplingParams(max_new_tokens=25), 2),
    ([9, 9, 9, 9, 9, 9], "tree", SamplingParams(max_new_tokens=20), 5),
    ([3, 1, 4, 1, 5, 9, 2, 6], "ngram", SamplingParams(max_new_tokens=18, temperature=0.9, top_k=20, seed=7), 1),
    ([2, 7, 1, 8, 2, 8], "chain", SamplingParams(max_new_tokens=16, temperature=1.2, top_p=0.9, seed=3), 3),
]


@pytest.mark.parametrize("adaptive", [False, True])
def test_batched_outputs_equal_outputs_alone(models, adaptive):
    """Mixed lengths, drafters and sampling settings, requests joining mid-way; with the adaptive
    policy sizing each tree from acceptance and batch load, outputs still equal outputs alone."""
    from drafthorse.actors.spec.adaptive import AdaptivePolicy
    target, draft = models
    alone = []
    for prompt, kind, params, _ in REQUESTS:
        eng = SpecEngine(ModelRunner(target.model, 256), target.eos_ids)
        alone.append(eng.generate(prompt, params, drafter(kind, draft)).token_ids)

    eng = BatchEngine(target.eos_ids, policy=AdaptivePolicy(16) if adaptive else None)
    kv = target.model.new_pool(len(REQUESTS), 256)   # one K/V tensor: the batch attends in one pass per layer
    outs: dict[int, list[int]] = {}
    active: list[tuple[int, object]] = []
    step_no, waiting = 0, list(enumerate(REQUESTS))
    batch_sizes = []
    while waiting or active:
        for i, (prompt, kind, params, join) in list(waiting):  # requests join between steps
            if join <= step_no:
                seq, first = eng.start(ModelRunner(target.model, cache=kv.cache(i)), prompt, params,
                                       drafter(kind, draft))
                outs[i] = list(first.token_ids)
                active.append((i, seq))
                waiting.remove((i, (prompt, kind, params, join)))
        if active:
            batch_sizes.append(len(active))
            for (i, _), step in zip(active, eng.step([s for _, s in active])):
                outs[i] += step.token_ids
            active = [(i, s) for i, s in active if s.finish_reason is None]  # and leave when done
        step_no += 1
    assert max(batch_sizes) >= 4, "the batch never held several requests at once"
    for i, expected in enumerate(alone):
        if adaptive and not REQUESTS[i][2].greedy:
            # the policy changes tree sizes, hence how the seeded randomness is consumed: a sampled
            # output is then another exact sample (test_verify_sampling), not the same one
            assert len(outs[i]) == len(expected)
            continue
        assert outs[i] == expected, f"request {i} ({REQUESTS[i][1]}) changed when batched"
    if adaptive:
        assert eng.policy.cost.n > 0 and eng.policy.last is not None


@pytest.mark.parametrize("slots", [None, (3, 2, 1, 0), (0, 2, 5, 7), (0, 5, 11, 15)],
                         ids=["own-caches", "reversed", "gaps", "spread"])
def test_forward_batch_rows_equal_single_forward(models, slots):
    """The ragged batched pass gives each sequence its own logits: a tree, a decode row and a prefill
    chunk at contexts from 3 to 150 (several attention buckets), on caches of their own or on slots of
    one pool, consecutive or not."""
    from drafthorse.actors.models.runner import score_batch
    target, _ = models
    kv = target.model.new_pool(16, 256)
    runners = [ModelRunner(target.model, 256) if slots is None else ModelRunner(target.model, cache=kv.cache(s))
               for s in (slots or range(4))]
    for r, n in zip(runners, (4, 2, 140, 9)):
        r.extend([(7 * j + n) % 100 for j in range(n)])
    work = [([5, 6, 7], [-1, 0, 0]), ([9], [-1]), ([3, 4], [-1, 0]), ([11 + j for j in range(40)], list(range(-1, 39)))]
    batched = score_batch(runners, [t for t, _ in work], [p for _, p in work])
    for r, (toks, parents), (logits, _) in zip(runners, work, batched):
        r.discard()
        alone, _ = r.score(toks, parents)
        assert torch.allclose(logits, alone, rtol=0, atol=1e-12)


def test_a_bucket_reads_a_view_of_the_pool_across_idle_slots(models):
    """Decode rows on slots 0, 2 and 5 share a bucket that reads slots 0-5 as one view of the pool
    (slots 1 and 4 idle, slot 3 another bucket's): each still gets its own logits."""
    from drafthorse.actors.models import attention
    from drafthorse.actors.models.runner import score_batch
    target, _ = models
    kv = target.model.new_pool(8, 256)
    slots, lengths = (0, 2, 3, 5), (6, 2, 60, 8)
    runners = [ModelRunner(target.model, cache=kv.cache(s)) for s in slots]
    for r, n in zip(runners, lengths):
        r.extend([(3 * j + n) % 100 for j in range(n)])
    lay = attention.layout(kv, list(slots), list(lengths), [1] * 4, [None] * 4)
    assert any(isinstance(b.slots, slice) and {1, 4} <= set(range(b.slots.start, b.slots.stop)) for b in lay.buckets)
    batched = score_batch(runners, [[9]] * 4, [[-1]] * 4)
    for r, (logits, _) in zip(runners, batched):
        r.discard()
        alone, _ = r.score([9], [-1])
        assert torch.allclose(logits, alone, rtol=0, atol=1e-12)


def test_a_sequences_rows_do_not_depend_on_its_batch(tiny):
    """Exact forwards (bfloat16's default): a sequence's logits are the same bits alone and among any
    companions (other lengths, trees, prefill chunks), so batching can never change a greedy answer."""
    lm = tiny(0, hidden_size=64)
    model = lm.model
    import copy
    model = copy.copy(model)
    model.exact = True
    kv = model.new_pool(5, 256)
    runners = [ModelRunner(model, cache=kv.cache(i)) for i in range(5)]
    for r, n in zip(runners, (30, 5, 90, 12, 64)):
        r.extend([(5 * j + n) % 120 for j in range(n)])
    from drafthorse.actors.models.runner import score_batch
    me = ([8, 9, 10, 11], [-1, 0, 0, 1])
    others = [([1], [-1]), ([2, 3, 4], [-1, 0, 1]), ([6, 7], [-1, -1]), ([50 + j for j in range(20)], list(range(-1, 19)))]
    alone = score_batch(runners[:1], [me[0]], [me[1]])[0][0]
    for k in range(1, 5):
        runners[0].discard()
        for r in runners[1:]:
            r.discard()
        got = score_batch(runners[:k + 1], [me[0]] + [t for t, _ in others[:k]], [me[1]] + [p for _, p in others[:k]])
        assert torch.equal(got[0][0], alone), f"rows changed with {k} companions"


def test_adaptive_policy_shrinks_trees_under_load():
    from drafthorse.actors.spec.adaptive import AdaptivePolicy
    p = AdaptivePolicy(16, per_row_ratio=0.06)
    light, heavy = p.choose([0.7]), p.choose([0.7] * 32)
    assert light[0] >= 4 and max(heavy) <= 1
    assert p.choose([0.05]) == [0]                  # hopeless drafts: plain decoding
    assert p.choose([0.95, 0.3])[0] > p.choose([0.95, 0.3])[1]   # better acceptance, bigger tree


def test_adaptive_policy_weighs_what_drafting_itself_costs():
    """Proposing costs a step time no single node pays (a draft worker's round trip): with a=40 ms,
    b=2 ms a row and 4 sequences at alpha 0.5, trees pay while drafting is nearly free and not once it
    adds 30 ms (8 rows, 3 expected tokens: 7 / 94 ms < 4 / 48 ms); a lone sequence's tree still pays."""
    from drafthorse.actors.spec.adaptive import AdaptivePolicy
    p = AdaptivePolicy(16)
    for rows in (4, 6, 8, 10, 12) * 4:
        p.cost.observe(rows, 0.040 + 0.002 * rows)
    assert p.cost.fit is not None and abs(p.cost.fit[1] - 0.002) < 1e-9
    p.observe_draft(0.0005)
    assert sum(p.choose([0.5] * 4)) > 0
    p.draft_s = 0.030
    assert p.choose([0.5] * 4) == [0] * 4
    p.draft_s = 0.004
    assert p.choose([0.9])[0] > 0


def test_a_heads_chain_depth_follows_what_rows_cost_here():
    """A head's tree is sized at load from the machine's pass cost: with acceptance 0.8 at every depth, a
    nearly free row and draft level let the chain grow to the cap; a row and a draft level at a fifth of
    a pass each stop it at three (1 + .8 + .64 + .512 = 2.95 tokens in 2.4 passes beats 2.44 in 2.0 and
    3.36 in 2.8); at 0.8 of a pass each drafting does not pay (1.8 in 3.4 < 1 in 1.8); no acceptance,
    no depth."""
    from drafthorse.actors.spec.adaptive import chain_depth
    assert chain_depth(1.0, 0.001, 0.001, [0.8], max_depth=8) == 8
    assert chain_depth(1.0, 0.2, 0.2, [0.8]) == 3
    assert chain_depth(1.0, 0.8, 0.8, [0.8]) == 0
    assert chain_depth(1.0, 0.0, 0.0, []) == 0
    assert chain_depth(1.0, 0.05, 0.05, [0.9, 0.1]) == 1   # the second depth is rarely right


def test_a_verify_cost_line_ignores_a_slow_round():
    """pass_cost's line through each row count's median: a round the machine was busy for (here 3x slower,
    once per count, or at one count twice) does not bend it, where the fastest or the mean of a few
    passes would; a cost that does not grow with rows gives b = 0, never a negative row."""
    from drafthorse.actors.models.runner import cost_line
    line = {n: [0.060 + 0.005 * n] * 5 for n in (1, 2, 3, 5, 9)}
    line[9][2] *= 3
    line[1][0] *= 3
    line[5][1:3] = [0.5, 0.5]
    a, b = cost_line(line)
    assert abs(a - 0.060) < 1e-9 and abs(b - 0.005) < 1e-9
    assert cost_line({1: [0.08, 0.07, 0.09], 9: [0.07, 0.08, 0.07]}) == pytest.approx((0.075, 0.0))


def test_policy_inputs_in_stats_and_fixed_tree_sequences(models):
    """Each request's stats carry what the policy saw and chose (acceptance estimate, row cost, nodes,
    batch size); a sequence with adaptive off keeps the full tree budget under the same load, and both
    still equal their outputs alone."""
    from drafthorse.actors.spec.adaptive import AdaptivePolicy
    target, _ = models
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5]
    params = SamplingParams(max_new_tokens=24)
    alone = SpecEngine(ModelRunner(target.model, 256), target.eos_ids).generate(prompt, params, NgramDrafter())
    # a heavy row cost: the policy hands out few nodes, the fixed sequence ignores it
    eng = BatchEngine(target.eos_ids, max_tree_nodes=8, policy=AdaptivePolicy(8, per_row_ratio=0.5))
    seqs = []
    for adaptive in (True, False, True, True):
        d = NgramDrafter(max_branches=4, depth=8) if len(seqs) < 3 else None   # the last: plain decoding
        seq, _ = eng.start(ModelRunner(target.model, 256), prompt, params, d)
        seq.adaptive = adaptive
        seqs.append(seq)
    outs = [[s.root] for s in seqs]
    while any(s.finish_reason is None for s in seqs):
        for out, step in zip(outs, eng.step(seqs)):
            out += step.token_ids
    assert all(o == alone.token_ids for o in outs)
    fixed, adaptive = seqs[1].stats, seqs[0].stats
    assert fixed.budget_nodes == 0 and fixed.acceptance_estimate == 0.0
    assert 0 < adaptive.acceptance_estimate < 1 and adaptive.row_cost_ratio > 0
    # the policy's budget bounds what the adaptive sequence drafted; the fixed one drafted more
    assert adaptive.drafted_tokens <= adaptive.budget_nodes and fixed.drafted_tokens > adaptive.drafted_tokens
    assert adaptive.mean_batch_size > 1 and fixed.to_dict()["mean_batch_size"] > 1
    assert seqs[3].stats.budget_nodes == 0       # nothing to hand a sequence that cannot draft


def test_a_new_pool_reads_zeros_where_nothing_was_written(models):
    """Padded attention rows read past their sequence's context, with weight 0: the pool must hold finite
    values there (0 x NaN is NaN), even where the heap just freed NaN-filled memory of the same size."""
    target, _ = models
    for _ in range(3):
        junk = torch.full((target.model.n_layers, 4, target.model.n_kv, 300, target.model.head_dim), float("nan"),
                          dtype=target.model.dtype)
        del junk
        kv = target.model.new_pool(4, 300)
        assert not kv.k.isnan().any() and not kv.v.isnan().any() and kv.k.abs().sum() == 0


def test_a_committed_pool_holds_its_memory_from_the_start():
    """A target worker's pool is committed at start (its memory budget, a flat footprint after); another
    pool's pages are committed as sequences fill them."""
    import psutil

    from drafthorse.actors.models.kvcache import KVPool
    me = psutil.Process()
    shape = dict(layers=4, slots=8, kv_heads=2, max_len=4096, head_dim=64, dtype=torch.float32)   # 2 x 64 MiB
    rss = me.memory_info().rss
    lazy = KVPool(**shape)
    grew_lazy, rss = me.memory_info().rss - rss, me.memory_info().rss
    committed = KVPool(**shape, commit=True)
    grew_committed = me.memory_info().rss - rss
    assert grew_lazy < 0.1 * lazy.nbytes and grew_committed > 0.9 * committed.nbytes, (grew_lazy, grew_committed)
    assert committed.k.abs().sum() == 0 and committed.v.abs().sum() == 0


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_prompts_started_together_are_started_alone(dtype):
    """`start_many` prefills several prompts (short, several chunks long, one reusing a cached prefix)
    in one pass per round of chunks: each prompt's K/V and first token are the same bits as its start
    alone (at bfloat16 too: exact products, each prompt's attention a call of its own)."""
    lm = tiny_llama(2, dtype=getattr(torch, dtype))
    model = lm.model
    engine = BatchEngine(set(), prefill_chunk=16)
    prompts = [[(5 * j + 1) % 120 for j in range(n)] for n in (3, 40, 17, 70)]
    reuse = prompts[1][:25] + [7, 8, 9]            # a next turn: 25 tokens cached, then new ones
    params = SamplingParams(max_new_tokens=4)

    def run(together: bool):
        pool = model.new_pool(5, 128)
        runners = [ModelRunner(model, cache=pool.cache(i)) for i in range(5)]
        runners[4].extend(prompts[1][:30])
        todo = [Prompt(r, p, params) for r, p in zip(runners, prompts)] + [Prompt(runners[4], reuse, params,
                                                                                   reuse_prefix=True)]
        started = engine.start_many(todo) if together else [engine.start_many([t])[0] for t in todo]
        firsts = [step.token_ids for _, step in started]
        return firsts, [(r.length, pool.k[:, i, :, :r.length].clone(), pool.v[:, i, :, :r.length].clone())
                        for i, r in enumerate(runners)]

    firsts, caches = run(True)
    firsts_alone, caches_alone = run(False)
    assert firsts == firsts_alone
    for (n, k, v), (n2, k2, v2) in zip(caches, caches_alone):
        assert n == n2 and torch.equal(k, k2) and torch.equal(v, v2)
    assert caches[4][0] == len(reuse)
