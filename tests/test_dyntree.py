"""The dynamic (EAGLE-2) tree builder on hand-made draft distributions."""
from __future__ import annotations

import itertools
import math

import torch

from drafthorse.actors.drafters.base import Budget
from drafthorse.actors.drafters.dyntree import grow
from drafthorse.actors.spec.sampling import SamplingParams, make_generator
from drafthorse.actors.spec.tree import ROOT

# a draft that always says: token 0 with p=.6, 1 with .3, 2 with .1 (vocabulary of 4, token 3 never)
P = torch.tensor([0.6, 0.3, 0.1, 0.0])
LOGITS = torch.log(P.clamp_min(1e-30))


def _expand(calls):
    def expand(nodes, tree):
        calls.append(list(nodes))
        return LOGITS.expand(len(nodes), -1)
    return expand


def _paths(tree):
    out = []
    for i in range(len(tree.tokens)):
        path, n = [], i
        while n != ROOT:
            path.append(tree.tokens[n])
            n = tree.parents[n]
        out.append(tuple(reversed(path)))
    return out


def test_greedy_keeps_the_most_likely_paths():
    calls = []
    tree = grow(LOGITS, _expand(calls), Budget(max_nodes=6, max_depth=8), SamplingParams(),
                make_generator(0), topk=2, depth=3, vocab_size=4)
    # every path of depth <= 3 over {0, 1, 2}, scored by its probability: the 6 best are kept
    scored = {p: math.prod(P[t].item() for t in p) for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)}
    reachable = {p: s for p, s in scored.items() if all(t < 2 for t in p[:-1])}  # only topk=2 nodes expand
    best = sorted(reachable.values(), reverse=True)[:6]
    got = sorted((scored[p] for p in _paths(tree)), reverse=True)
    assert got == best
    assert all(p < i for i, p in enumerate(tree.parents))         # topological order
    assert len(calls) == 2 and all(len(c) == 2 for c in calls)    # depths 2 and 3, topk nodes each


def test_greedy_budget_and_depth_bounds():
    for nodes, depth in ((1, 5), (3, 1), (10, 2)):
        tree = grow(LOGITS, _expand([]), Budget(max_nodes=nodes, max_depth=depth), SamplingParams(),
                    make_generator(0), topk=3, depth=6, vocab_size=4)
        assert len(tree) <= nodes and max(tree.depths()) <= depth
        tree.validate(4, nodes, depth)
    assert grow(LOGITS, _expand([]), Budget(0, 3), SamplingParams(), make_generator(0), 2, 3, 4).tokens == []


def test_draft_vocabulary_maps_to_target_ids():
    d2t = torch.tensor([10, 20, 30, 40])
    tree = grow(LOGITS, _expand([]), Budget(4, 2), SamplingParams(), make_generator(0), 2, 2, 50, d2t)
    assert set(tree.tokens) <= {10, 20, 30}


def test_sampling_never_prunes_and_records_each_draw_distribution():
    params = SamplingParams(temperature=1.0)
    tree = grow(LOGITS, _expand([]), Budget(max_nodes=7, max_depth=4), params, make_generator(3),
                topk=2, depth=4, vocab_size=6, d2t=torch.tensor([0, 1, 2, 5]))
    assert len(tree) == 7 and tree.probs.shape == (7, 6)             # the budget, exactly
    for i, parent in enumerate(tree.parents):
        q = tree.probs[i]
        assert abs(float(q.sum()) - 1) < 1e-6 and q[3] == 0 and q[4] == 0  # outside the draft vocabulary
        assert q[tree.tokens[i]] > 0
        earlier = [j for j in range(i) if tree.parents[j] == parent]
        # without replacement: a sibling drawn before is excluded from this draw's distribution
        assert all(q[tree.tokens[j]] == 0 for j in earlier)
