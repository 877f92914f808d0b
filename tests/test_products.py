"""Weight products in two layouts (products.py): the same values as `x @ w`, lossless speculation on a
model that runs them, and exact forwards back on the product exact.py probes."""
from __future__ import annotations

import pytest
import torch

from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models import products
from drafthorse.actors.models.llama import PRODUCTS
from drafthorse.actors.models.loader import LoadedModel, tiny_llama
from drafthorse.actors.models.products import OutIn
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams


def both_layouts(lm: LoadedModel, cut: int) -> LoadedModel:
    """lm with every product and the LM head in both layouts, the transposed product from `cut` rows
    (what `tune` does where it measures that faster; forced here, whatever this machine measures)."""
    for layer in lm.model.layers:
        for key in PRODUCTS:
            layer.products[key] = OutIn(layer.products[key], cut)
    lm.model.head_cut = cut
    return lm


@pytest.mark.parametrize("cut", [1, 3, 100])
def test_both_layouts_compute_x_at_w(cut):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=gen, dtype=torch.float64)
    p = OutIn(w, cut)
    assert p.shape == (48, 80) and p.dense() is w
    for rows in (1, 2, 3, 4, 9):
        x = torch.randn(rows, 48, generator=gen, dtype=torch.float64)
        assert torch.allclose(p.mm(x), x @ w, rtol=0, atol=1e-12)


def test_a_model_in_both_layouts_scores_as_before():
    plain, both = tiny_llama(0), both_layouts(tiny_llama(0), cut=3)
    outs = []
    for lm in (plain, both):
        r = ModelRunner(lm.model, 256)
        _, hidden = r.extend(list(range(10, 60)), all_hidden=True)   # 50 rows: the transposed products
        outs.append([hidden, lm.model.logits(hidden), *r.extend([7]), *r.extend([8, 9])])   # 1, 2 rows: x @ w
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["ngram", "tree"])
def test_speculation_on_both_layouts_equals_plain_decoding(kind):
    """Decode rows (1) and verify rows (several) now run different products: greedy speculation still
    gives plain decoding's tokens."""
    target, draft = both_layouts(tiny_llama(0), cut=3), tiny_llama(0)   # the draft: the same model, plain
    engine = SpecEngine(ModelRunner(target.model, 256), set(), max_tree_nodes=12)
    params = SamplingParams(max_new_tokens=40)
    for prompt in ([5, 6, 7, 8, 5, 6, 7, 8, 5], list(range(30, 70))):
        plain = engine.generate(prompt, params).token_ids
        drafter = NgramDrafter() if kind == "ngram" else \
            DraftModelDrafter(ModelRunner(draft.model, 256), depth=3, branches=3)
        spec = engine.generate(prompt, params, drafter)
        assert spec.token_ids == plain and spec.stats.target_forwards < len(plain)


def test_exact_forwards_go_back_to_the_probed_product():
    lm = both_layouts(tiny_llama(0), cut=3)
    before, _ = ModelRunner(lm.model, 256).extend(list(range(10, 30)))
    x = torch.randn(5, lm.model.layers[0].products["o"].shape[0], dtype=torch.float64)
    w = lm.model.layers[0].products["o"]
    assert torch.equal(lm.model._linear(x, w, True), lm.model._linear(x, w.dense(), True))   # one exact call
    lm.model.exact = True
    assert all(isinstance(layer.products[key], torch.Tensor) for layer in lm.model.layers for key in PRODUCTS)
    assert lm.model.head_cut is None and lm.model.exact_rows.ok
    after, _ = ModelRunner(lm.model, 256).extend(list(range(10, 30)))
    assert torch.allclose(before, after, rtol=0, atol=1e-9)


def test_small_weights_are_not_tuned():
    lm = tiny_llama(0)
    assert all(isinstance(layer.products[key], torch.Tensor) for layer in lm.model.layers for key in PRODUCTS)
    assert lm.model.head_cut is None
    w = torch.randn(64, 128)
    assert products.cut([w], [w.t().contiguous()]) is None
