"""Batched speculation across requests: every request's output equals its output alone."""
from __future__ import annotations

import pytest
import torch

from actors.drafters.draft_model import DraftModelDrafter
from actors.drafters.ngram import NgramDrafter
from actors.engine import SpecEngine
from actors.models.loader import tiny_llama
from actors.models.runner import ModelRunner
from actors.spec.sampling import SamplingParams


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


def test_batched_outputs_equal_outputs_alone(models):
    target, draft = models
    alone = []
    for prompt, kind, params, _ in REQUESTS:
        eng = SpecEngine(ModelRunner(target.model, 256), target.eos_ids)
        alone.append(eng.generate(prompt, params, drafter(kind, draft)).token_ids)

    eng = SpecEngine(None, target.eos_ids)
    outs: dict[int, list[int]] = {}
    active: list[tuple[int, object]] = []
    step_no, waiting = 0, list(enumerate(REQUESTS))
    batch_sizes = []
    while waiting or active:
        for i, (prompt, kind, params, join) in list(waiting):  # requests join between steps
            if join <= step_no:
                seq, first = eng.start(prompt, params, drafter(kind, draft), runner=ModelRunner(target.model, 256))
                outs[i] = list(first.token_ids)
                active.append((i, seq))
                waiting.remove((i, (prompt, kind, params, join)))
        if active:
            batch_sizes.append(len(active))
            for (i, seq), step in zip(active, eng.step([s for _, s in active])):
                outs[i] += step.token_ids
            active = [(i, s) for i, s in active if s.finish_reason is None]  # and leave when done
        step_no += 1
    assert max(batch_sizes) >= 4, "the batch never held several requests at once"
    for i, expected in enumerate(alone):
        assert outs[i] == expected, f"request {i} ({REQUESTS[i][1]}) changed when batched"


def test_forward_batch_rows_equal_single_forward(models):
    """The ragged batched pass gives each sequence exactly its own logits."""
    target, _ = models
    a, b = ModelRunner(target.model, 64), ModelRunner(target.model, 64)
    a.extend([1, 2, 3, 4]), b.extend([7, 8])
    from actors.models.runner import score_batch
    batched = score_batch([a, b], [[5, 6, 7], [9]], [[-1, 0, 0], [-1]])
    a.discard(), b.discard()
    alone_a, _ = a.score([5, 6, 7], [-1, 0, 0])
    alone_b, _ = b.score([9], [-1])
    assert torch.allclose(batched[0][0], alone_a, rtol=0, atol=1e-12)
    assert torch.allclose(batched[1][0], alone_b, rtol=0, atol=1e-12)
