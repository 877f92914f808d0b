"""Draft forwards of concurrent sessions share passes (models/combiner.py): same trees as drafting
one session at a time, fewer passes than forwards, a failing forward fails only its own caller."""
from __future__ import annotations

import threading

import pytest
import torch

from drafthorse.actors.drafters.base import Budget
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.models.combiner import Combiner
from drafthorse.actors.models.loader import tiny_llama
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams, make_generator

PROMPTS = [[(s * 7 + i * 3) % 100 for i in range(5 + 3 * s)] for s in range(8)]


def run_sessions(model, combiner: Combiner | None = None, steps: int = 4, concurrent: bool = True) -> list[list]:
    """Each session drafts `steps` trees (greedy top-3 trees, depth 3), committing its first token."""
    results: list[list] = [[] for _ in PROMPTS]
    start = threading.Barrier(len(PROMPTS)) if concurrent else None

    def session(i: int):
        d = DraftModelDrafter(ModelRunner(model, 256, combiner), depth=3, branches=3)
        d.begin(PROMPTS[i])
        if start:
            start.wait()
        for _ in range(steps):
            tree = d.propose(Budget(9, 3), SamplingParams(), make_generator(0))
            results[i].append((tree.tokens, tree.parents))
            d.extend([tree.tokens[0]])
        d.close()
    if concurrent:
        threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    else:
        for i in range(len(PROMPTS)):
            session(i)
    return results


@pytest.fixture
def draft_model():
    return tiny_llama(5, vocab_size=100).model


@pytest.mark.parametrize("slots", [0, 6])
def test_concurrent_sessions_share_passes_and_draft_the_same_trees(draft_model, slots):
    """slots: the sessions' caches are slots of the combiner's pool (6 for 8 sessions: two run on caches of
    their own, in the same passes), given back when their drafters close."""
    alone = run_sessions(draft_model, concurrent=False)
    comb = Combiner(draft_model, draft_model.new_pool(slots, 256) if slots else None)
    shared = run_sessions(draft_model, comb)
    assert shared == alone
    assert comb.kv is None or comb.kv.free == slots
    # 8 sessions x (1 catch-up + 2 tree levels) x 4 steps forwards, in fewer passes
    assert comb.calls == 8 * 3 * 4
    assert comb.passes < comb.calls * 0.75, (comb.passes, comb.calls)


def test_a_failing_forward_fails_only_its_caller(draft_model):
    comb = Combiner(draft_model)
    errors, ok = [], []
    gate = threading.Barrier(6)

    def call(bad: bool):
        r = ModelRunner(draft_model, 64, comb)
        gate.wait()
        try:
            r.extend([1, 2, 10 ** 6] if bad else [1, 2, 3])
            ok.append(True)
        except IndexError as e:
            errors.append(e)
    threads = [threading.Thread(target=call, args=(i == 0,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(errors) == 1 and len(ok) == 5 and not comb._busy and not comb._queue
    logits, _ = ModelRunner(draft_model, 64, comb).extend([1, 2, 3])   # still serving
    assert torch.isfinite(logits).all()
