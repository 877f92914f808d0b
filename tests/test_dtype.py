"""Low-precision targets: `auto` dtype selection, exactness at bfloat16, int8 and int4 (a verify row is
computed bit for bit like a one-token decode row, so greedy speculation equals plain decoding at the
same dtype), weight-only int8 and int4 (a GGUF's blocks as stored), and the GGUF converted-weights cache
(hit, corrupted entry)."""
from __future__ import annotations

import dataclasses
import functools
import json
import random

import gguf
import numpy as np
import pytest
import torch

from drafthorse.actors.drafters.base import NoDrafter
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.heads import fingerprint
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models import exact, gguf_blocks, gguf_cache, loader, quant
from drafthorse.actors.models.runner import ModelRunner, score_batch
from drafthorse.actors.spec.sampling import SamplingParams
from tests.conftest import needs_native_bf16

_r = random.Random(7)
PROMPTS = {
    "repetitive": [1, 2, 3, 4] * 3 + [1, 2],
    "repeated_phrase": [7, 90, 33, 12, 5, 7, 90, 33, 12, 5, 7, 90],
    "random": [_r.randrange(128) for _ in range(16)],
    # long enough that decode and verify rows cross the exact-attention split points (exact.py)
    "long": [_r.randrange(128) for _ in range(90)],
}
N_NEW = 40
# (dtype, exact forwards): float32 runs as today (exact off) and with exact forwards forced on
CONFIGS = [("bfloat16", None), ("float16", None), ("float32", None), ("float32", True), ("int8", None),
           ("int4", None)]


@functools.cache
def _tiny(seed: int, dtype: str):
    quantized = dtype in ("int8", "int4")
    lm = loader.tiny_llama(seed, dtype=torch.float32 if quantized else getattr(torch, dtype), max_len=512)
    if dtype == "int8":
        lm.model.quantize_int8()
    elif dtype == "int4":
        lm.model.quantize_int4({})
    return lm


def tiny_at(seed: int, dtype: str, exact_on: bool | None):
    lm = _tiny(seed, dtype)
    lm.model.exact = lm.model.exact_by_default if exact_on is None else exact_on
    return lm


# ---------------------------------------------------------------- auto dtype

def test_auto_dtype_on_this_machine(monkeypatch):
    monkeypatch.delenv(loader.NATIVE_BF16_ENV, raising=False)
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), [])
    native = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))
    assert loader.native_bf16() is native
    assert loader.resolve_dtype("auto") == ("bfloat16" if native else "float32")
    assert loader.resolve_dtype(None) == loader.resolve_dtype("AUTO")


def test_auto_dtype_falls_back_without_native_bf16(monkeypatch):
    assert loader.resolve_dtype("auto", native=False) == "float32"
    assert loader.resolve_dtype("auto", native=True) == "bfloat16"
    monkeypatch.setenv(loader.NATIVE_BF16_ENV, "0")
    assert loader.native_bf16() is False and loader.resolve_dtype("auto") == "float32"
    monkeypatch.setenv(loader.NATIVE_BF16_ENV, "1")
    assert loader.resolve_dtype("auto") == "bfloat16"
    # explicit names are never overridden
    monkeypatch.setenv(loader.NATIVE_BF16_ENV, "0")
    assert loader.resolve_dtype("bfloat16") == "bfloat16" and loader.resolve_dtype("float16") == "float16"


def test_dtype_names_are_checked():
    from pydantic import ValidationError

    from drafthorse.runtime.settings import Settings
    with pytest.raises(ValueError, match="dtype must be"):
        loader.resolve_dtype("int3")
    assert loader.resolve_dtype("int8") == "int8" and loader.dtype_of("int8") == torch.float32
    assert loader.resolve_dtype("int4") == "int4" and loader.dtype_of("int4") == torch.float32
    assert loader.resolve_dtype("auto", native=False) not in ("int8", "int4")   # opt-in only: they change outputs
    assert loader.resolve_dtype("auto", native=True) not in ("int8", "int4")
    assert Settings().dtype == "auto"
    assert Settings(dtype="BFloat16").dtype == "bfloat16" and Settings(dtype="int8").dtype == "int8"
    assert Settings(dtype="int4").dtype == "int4"
    with pytest.raises(ValidationError, match="dtype must be"):
        Settings(dtype="int3")


def test_exact_forwards_default_on_below_float32(monkeypatch):
    monkeypatch.delenv("DRAFTHORSE_EXACT", raising=False)
    assert exact.default_on(torch.bfloat16) and exact.default_on(torch.float16)
    assert not exact.default_on(torch.float32) and not exact.default_on(torch.float64)
    monkeypatch.setenv("DRAFTHORSE_EXACT", "1")
    assert exact.default_on(torch.float32)
    monkeypatch.setenv("DRAFTHORSE_EXACT", "0")
    assert not exact.default_on(torch.bfloat16)


def test_cli_generate_reports_the_chosen_dtype(tmp_path, monkeypatch):
    """`generate --dtype auto` on an HF directory: the weights are cast once at load, and the dtype
    actually used is in the --json stats (bfloat16 here, float32 when native bf16 is forced off)."""
    from typer.testing import CliRunner

    from drafthorse.cluster.cli import app
    tiny = loader.load("tiny:3")             # SmolLM2's tokenizer over a tiny float64 Llama
    tiny.hf.to(torch.float32).save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    outs = {}
    for native in ("1", "0"):
        monkeypatch.setenv(loader.NATIVE_BF16_ENV, native)
        res = CliRunner().invoke(app, ["generate", "Hi", "--model", str(tmp_path), "--max-new-tokens", "8",
                                       "--json", "--drafter", "ngram", "--no-adaptive"])
        assert res.exit_code == 0, res.output
        outs[native] = json.loads(res.stdout.strip().splitlines()[-1])
    assert outs["1"]["stats"]["dtype"] == "bfloat16" and outs["1"]["stats"]["exact_rows"] is True
    assert outs["0"]["stats"]["dtype"] == "float32" and outs["0"]["stats"]["exact_rows"] is False
    res = CliRunner().invoke(app, ["generate", "Hi", "--model", str(tmp_path), "--max-new-tokens", "8",
                                   "--json", "--dtype", "int8"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout.strip().splitlines()[-1])["stats"]
    assert stats["dtype"] == "int8" and stats["exact_rows"] is True
    res = CliRunner().invoke(app, ["generate", "Hi", "--model", str(tmp_path), "--max-new-tokens", "8",
                                   "--json", "--dtype", "int4"])     # (a directory: quantised here)
    assert res.exit_code == 0, res.output
    stats = json.loads(res.stdout.strip().splitlines()[-1])["stats"]
    assert stats["dtype"] == "int4" and stats["exact_rows"] is True
    res = CliRunner().invoke(app, ["generate", "Hi", "--model", str(tmp_path), "--dtype", "int3"])
    assert res.exit_code == 2 and "dtype must be" in res.output


# ---------------------------------------------------------------- exactness

def _decode_rows(lm, prompt: list[int], n: int):
    """Plain greedy decoding through the runner's one-token forward: (runner, tokens, hidden rows,
    logits rows, cache snapshot, prefix length). Its cache is slot 0 of a pool of four."""
    r = ModelRunner(lm.model, cache=lm.model.new_pool(4, 512).cache(0))
    logits, _ = r.extend(prompt)
    toks, hid, log = [int(logits.argmax())], [], []
    for _ in range(n):
        lg, h = r.score([toks[-1]], [-1])
        r.commit([0])
        hid.append(h[0].clone())
        log.append(lg[0].clone())
        toks.append(int(lg[0].argmax()))
    return r, toks, hid, log, (r.cache.k.clone(), r.cache.v.clone()), len(prompt)


def _rewind(r, snap, length):
    r.cache.k.copy_(snap[0])
    r.cache.v.copy_(snap[1])
    r.discard()
    r.length = length


def check_rows_bitwise(lm, prompt, offsets, sizes, decode_n):
    """Chains and trees (a decoy branch first, so the true branch sits at scattered cache slots)
    scored in one forward give exactly the rows of one-token decoding; so does a batch of two (the other
    with a cache of its own), and a batch with companions on the same pool (a decode row, a tree, a
    prefill chunk, at other context lengths): a sequence's rows never depend on what shares its pass."""
    r, toks, hid, log, snap, plen = _decode_rows(lm, prompt, decode_n)
    other = ModelRunner(lm.model, 512)
    other.extend(prompt[: len(prompt) // 2])
    mates = [ModelRunner(lm.model, cache=r.cache.pool.cache(i)) for i in (1, 2, 3)]
    for m, n in zip(mates, (3, len(prompt) + 40, 50)):
        m.extend([(11 * j + n) % lm.vocab_size for j in range(n)])
    mate_work = ([5], [-1]), ([6, 7, 8, 9], [-1, 0, 0, 2]), ([(3 * j) % lm.vocab_size for j in range(24)],
                                                              list(range(-1, 23)))
    bad = []
    for off in offsets:
        for k in sizes:
            seq = toks[off:off + k]
            _rewind(r, snap, plen + off)
            lg, h = r.score(seq, [-1] + list(range(k - 1)))
            rows = list(range(k))
            decoy = [(t + 1) % lm.vocab_size for t in seq[1:4]]
            _rewind(r, snap, plen + off)
            lg2, h2 = r.score([seq[0]] + decoy + seq[1:],
                              [-1] + list(range(len(decoy))) + [0] + list(range(len(decoy) + 1, len(decoy) + k - 1)))
            rows2 = [0] + list(range(len(decoy) + 1, len(decoy) + k))
            _rewind(r, snap, plen + off)
            other.discard()
            (lg3, h3), _ = score_batch([r, other], [seq, [5, 6, 7]], [[-1] + list(range(k - 1)), [-1, 0, 1]])
            _rewind(r, snap, plen + off)
            for m in mates:
                m.discard()
            (lg4, h4), *_ = score_batch([r, *mates], [seq] + [t for t, _ in mate_work],
                                        [[-1] + list(range(k - 1))] + [p for _, p in mate_work])
            for name, L, H, rs in (("chain", lg, h, rows), ("tree", lg2, h2, rows2), ("batch", lg3, h3, rows),
                                   ("pool", lg4, h4, rows)):
                for i, row in enumerate(rs):
                    if not (torch.equal(H[row], hid[off + i]) and torch.equal(L[row], log[off + i])):
                        bad.append((name, off, k, i))
    r.discard()
    for m in mates:
        m.discard()
    return bad


@pytest.mark.parametrize("dtype,exact_on", [("bfloat16", None), ("float16", None), ("float32", True),
                                            ("int8", None), ("int4", None)])
def test_verify_rows_are_bitwise_decode_rows(dtype, exact_on):
    lm = tiny_at(0, dtype, exact_on)
    assert lm.model.exact and lm.model.exact_rows.ok
    bad = check_rows_bitwise(lm, PROMPTS["long"], offsets=range(0, 60, 7), sizes=(2, 5, 9), decode_n=70)
    assert not bad, f"{len(bad)} rows differ, first {bad[:5]}"


def test_exact_row_counts_keep_to_one_class():
    """The probe groups the row counts by the bits they give and keeps each product's calls to one group.
    AMX bf16 kernels (SmolLM2's MLP up projection, 2 threads) round one way at M = 1-27, 29, 31, 33-39,
    49-52 and another at 28, 30, 32, 40-48, 53-64: a probe that sampled 1-24, 28, 32, 40, 48 took every
    count from 28 on as one class, and a 38-row call rounded unlike a 28-row one."""
    a = {*range(1, 28), 29, 31, *range(33, 40), *range(49, 53)}
    b = set(range(1, exact.PROBE_ROWS + 1)) - a
    up = [a, b]
    # on the classes: calls as they come up to 27 rows (no padding) beat padding every call to 28
    assert exact._pick([up]) == tuple(sorted(a))
    assert [exact.rows(n, tuple(sorted(a))) for n in (1, 27, 28, 30, 32, 40, 52)] == [1, 27, 29, 31, 33, 49, 52]
    # several ops (attention's products): one class of each, the counts they share, fewest calls too
    assert exact._pick([up, [{1, 2, 3, 4}, set(range(5, 65))]]) == tuple(sorted(a - {1, 2, 3, 4}))
    assert exact._pick([up, [{1, 2, 3, 4, 64}, set(range(5, 64))]]) == tuple(sorted(a - {1, 2, 3, 4}))
    assert exact._pick([[{1, 2}], [{3, 4}]]) is None                  # nothing in common: not exact
    # the grouping, on an op whose rounding depends on the row count: rows of calls of one or two rows
    # alike, of longer calls alike (another order of summation)
    gen = torch.Generator().manual_seed(0)
    x = exact._cancelling(3 * 8, 64, exact._hot(64), torch.float32, gen)
    op = lambda rows: rows.sum(-1) if len(rows) <= 2 else rows.flip(-1).cumsum(-1)[:, -1]
    assert exact._classes(op, x, list(range(1, 9))) == [{1, 2}, set(range(3, 9))]


def test_exact_products_past_their_window_run_in_chunks():
    """More rows than a product's largest probed count: calls of that many rows, the last padded like any
    short call to the next count of its class, so every row is computed by a call the probe saw."""
    m = loader.tiny_llama(0, dtype=torch.float32, max_len=64).model   # its own: the probe result is set here
    w = m.layers[0].products["o"]
    m.exact_rows = exact.ExactRows(True, {tuple(w.shape): (2, 4)}, (1,))
    x = torch.randn(11, w.shape[0], dtype=w.dtype)
    pad = lambda rows, n: torch.cat([rows, rows.new_zeros(n - len(rows), rows.shape[1])])
    want = torch.cat([x[0:4] @ w, x[4:8] @ w, (pad(x[8:11], 4) @ w)[:3]])
    assert torch.equal(m._linear(x, w, True), want)
    assert torch.equal(m._linear(x[:1], w, True), (pad(x[:1], 2) @ w)[:1])
    assert torch.equal(m._linear(x, w, False), x @ w)


def test_exact_probe_data_shows_any_change_of_summation_order():
    """The probe's rows cancel two huge terms, so summing in another order changes nearly every row
    (plain random data changes a few percent): a float32 sum in reverse order against the forward one."""
    gen = torch.Generator().manual_seed(0)
    hot = exact._hot(64)
    x = exact._cancelling(32, 64, hot, torch.float32, gen)
    fwd, rev = torch.zeros(32), torch.zeros(32)
    for j in range(64):
        fwd += x[:, j]
        rev += x[:, 63 - j]
    assert (fwd != rev).sum() >= 30


@pytest.mark.parametrize("batched", [True, False])
def test_exact_attention_scores_like_plain_attention(batched):
    """The exact path's split, window and blocked sums are a reordering of plain attention: at float64
    a batch of decode rows, a tree and a prefill chunk on one pool (several buckets, padded groups, or
    one group a call) scores as the plain forward does."""
    lm = loader.tiny_llama(3, hidden_size=64, heads=4, kv_heads=2)
    model = lm.model
    every = tuple(range(1, exact.PROBE_ROWS + 1))
    weights = [*model.layers[0].products.values(), model.lm_head_t]
    model.exact_rows = exact.ExactRows(True, {tuple(getattr(w, "dense", lambda w=w: w)().shape): every for w in weights},
                                       tuple(range(2, exact.PROBE_ROWS + 1, 2)), batched)
    pool = model.new_pool(4, 400)
    runners = [ModelRunner(model, cache=pool.cache(i)) for i in range(4)]
    for r, n in zip(runners, (10, 150, 70, 300)):
        r.extend([(7 * j + n) % 120 for j in range(n)])
    work = [([5], [-1]), ([6, 7, 8, 9, 10], [-1, 0, 0, 2, 1]), ([(3 * j) % 120 for j in range(70)], list(range(-1, 69))),
            ([4], [-1])]
    got = {}
    for on in (True, False):
        model.exact = on
        got[on] = score_batch(runners, [t for t, _ in work], [p for _, p in work])
        for r in runners:
            r.discard()
    for (a, _), (b, _) in zip(got[True], got[False]):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_attention_reads_committed_keys_in_place_or_gathered_alike(dtype):
    """A bucket of groups at consecutive slots reads their committed keys and values as a view of the
    pool; the same bucket gathered (as one with slots out of order would be) gives every row the same
    bits, and so does each group in a bucket of its own."""
    gen = torch.Generator().manual_seed(0)
    kv, heads, d, n_pos = 2, 4, 16, 512
    k_pool = torch.randn(6, kv, n_pos, d, generator=gen).to(dtype)
    v_pool = torch.randn(6, kv, n_pos, d, generator=gen).to(dtype)
    ctxs = [300, 140, 41, 260]   # decode rows at slots 2..5, splits 256, 96, 0, 224: two value blocks
    plans = [exact.plan(torch.tensor([c]), c, None) for c in ctxs]
    slots, offsets, sizes = [2, 3, 4, 5], [0, 1, 2, 3], [1, 1, 1, 1]
    q = torch.randn(4, heads, d, generator=gen).to(dtype)
    counts = tuple(range(1, 9))
    in_place = exact._bucket(exact._units(slots, offsets, plans, sizes, max(counts)), (kv, n_pos), dtype, counts, 4)
    assert in_place.first == 2
    gathered = dataclasses.replace(in_place, first=None)
    alone = exact.buckets(slots, offsets, plans, sizes, (kv, n_pos), dtype, counts, batched=False)
    a = exact.attend([in_place], k_pool, v_pool, q, d ** -0.5)
    assert torch.equal(a, exact.attend([gathered], k_pool, v_pool, q, d ** -0.5))
    assert torch.equal(a, exact.attend(alone, k_pool, v_pool, q, d ** -0.5))


def test_the_batch_probe_notices_rows_that_change_with_padding(monkeypatch):
    """`probe` batches groups only where a bucket gives each row the bits of its group alone: a bucket
    whose rows depended on its padding (here, on its longest split) is caught."""
    real = exact.attend

    def padded(bks, k, v, q, scale):
        out = real(bks, k, v, q, scale)
        for b in bks:
            out[b.rows] *= 1 + 1e-2 * b.heads
        return out
    monkeypatch.setattr(exact, "attend", padded)
    assert not exact._batches_alike(torch.bfloat16, 4, 2, 16, (1, 2, 3, 4), torch.Generator().manual_seed(0))


def test_exact_forward_refuses_a_too_deep_tree():
    lm = tiny_at(0, "bfloat16", None)
    r = ModelRunner(lm.model, 512)
    r.extend(PROMPTS["random"])
    depth = exact.DEPTH + exact.CHUNK + 2
    tokens = [1, 2] + [3] * depth          # root, a one-node branch, then a deep second branch
    parents = [-1, 0, 0] + list(range(2, depth + 1))
    with pytest.raises(ValueError, match="deeper than"):
        r.score(tokens, parents)


def drafters(lm, draft_lm):
    return {
        "ngram": lambda: NgramDrafter(),
        "ngram_wide": lambda: NgramDrafter(max_ngram=4, max_branches=4, depth=5),
        "draft_chain": lambda: DraftModelDrafter(ModelRunner(draft_lm.model, 512), depth=4, branches=1),
        "draft_tree": lambda: DraftModelDrafter(ModelRunner(draft_lm.model, 512), depth=4, branches=3),
        "self_tree": lambda: DraftModelDrafter(ModelRunner(lm.model, 512), depth=4, branches=3),
    }


@pytest.mark.parametrize("dtype,exact_on", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_speculation_equals_plain_at_each_dtype(dtype, exact_on, seed):
    lm, draft_lm = tiny_at(seed, dtype, exact_on), tiny_at(seed + 100, dtype, exact_on)
    engine = SpecEngine(ModelRunner(lm.model, 512), lm.eos_ids)
    params = SamplingParams(max_new_tokens=N_NEW)
    accepted = dict.fromkeys(drafters(lm, draft_lm), 0)
    for pname, prompt in PROMPTS.items():
        plain = engine.generate(prompt, params, NoDrafter())
        assert len(plain.token_ids) == N_NEW
        for name, make in drafters(lm, draft_lm).items():
            g = engine.generate(prompt, params, make())
            assert g.token_ids == plain.token_ids, f"{name} changed the greedy output ({dtype}, {pname})"
            accepted[name] += g.stats.accepted_tokens
    for name in ("ngram", "self_tree"):
        assert accepted[name] > 0, f"{name} never had a draft token accepted: the comparison proves nothing"


# ---------------------------------------------------------------- weight-only int8

@pytest.mark.parametrize("threads", [1, 2])
def test_int8_products_are_row_invariant_at_every_row_count(threads):
    """Why int8 needs no row padding (quant.py): on SmolLM2's product shapes, every row of the int8
    kernel comes out bit for bit the same at every row count 1-32, with data on which any change of
    summation order shows (exact._cancelling)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        for k, n in [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 4096)]:
            w = quant.Int8Weight(torch.randn(k, n, generator=gen))
            hot = exact._hot(k)
            w.q[:, hot] = 1
            x = exact._cancelling(96, k, hot, torch.float32, gen)   # 3 x 32 rows
            assert len(exact._classes(w.mm, x, list(range(1, 33)))) == 1, (k, n)
    finally:
        torch.set_num_threads(before)


def test_int8_weights():
    """Per-channel symmetric quantisation: within half a step of the dense weight, products as with the
    dequantised weight (inputs rounded to bfloat16), the dense weights still reachable for fingerprints,
    and `load(..., "int8")` of a tiny model quantises a float32 copy."""
    gen = torch.Generator().manual_seed(1)
    w_t = torch.randn(64, 48, generator=gen)
    w = quant.Int8Weight(w_t)
    assert w.q.dtype == torch.int8 and w.q.shape == (48, 64) and w.shape == (64, 48)
    step = w.scale.float()[None, :]
    assert ((w.dequantize() - w_t).abs() <= 0.5 * step * 1.01 + 1e-6).all()
    x = torch.randn(5, 64, generator=gen)
    ref = x.bfloat16().float() @ w.dequantize()
    assert torch.allclose(w.mm(x), ref, rtol=1e-2, atol=1e-2) and w.mm(x).dtype == torch.float32
    lm = loader.load("tiny:0", "int8")
    f64 = loader.load("tiny:0", "float32")
    assert lm.dtype == "int8" and lm.model.dtype == torch.float32 and lm.model.quantized and lm.model.exact
    assert isinstance(lm.model.lm_head_t, quant.Int8Weight) and f64.dtype == "float64"
    assert fingerprint(lm.model) == fingerprint(f64.model)     # a head trained on one loads on the other
    assert torch.equal(lm.model.dense(0, "qkv"), f64.model.layers[0].products["qkv"].float())
    with pytest.raises(ValueError, match="float32"):
        f64.model.quantize_int8()


# ---------------------------------------------------------------- weight-only int4

def _int4_hot(k: int, n: int, gen: torch.Generator) -> tuple[quant.Int4Weight, list[int]]:
    """Random int4 codes [n, k] whose weights at exact._hot(k)'s inputs are exactly 1 (code 9 with scale
    1/16 and zero 15/16 in their groups), for exact._cancelling's data."""
    q = torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.full((n, k // quant.GROUP), 2.0 ** -4)
    zero = torch.zeros(n, k // quant.GROUP)
    hot = exact._hot(k)
    q[:, hot] = 9
    zero[:, [h // quant.GROUP for h in hot]] = 1 - 2.0 ** -4
    return quant.Int4Weight(q, scale, zero), hot


@pytest.mark.parametrize("threads", [1, 2])
def test_int4_products_are_row_invariant_at_every_row_count(threads):
    """Why int4 needs no row padding either: on SmolLM2's product shapes (the LM head as two halves),
    every row of the int4 kernel comes out bit for bit the same at every row count 1-32."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        for k, n in [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 8192)]:
            w, hot = _int4_hot(k, n, gen)
            assert torch.equal(w.dequantize()[hot], torch.ones(len(hot), n))
            x = exact._cancelling(96, k, hot, torch.bfloat16, gen)
            assert len(exact._classes(w.mm, x, list(range(1, 33)))) == 1, (k, n)
    finally:
        torch.set_num_threads(before)


def test_int4_weights():
    """Groups of 32 from their minimum to their maximum in 16 levels: within half a step of the dense
    weight; the kernel multiplies by what int4_values says (its float32 path, dequantize) and its
    bfloat16 products match; `load(..., "int4")` of a tiny model quantises a float32 copy, exact rows
    on, the dense weights still reachable for fingerprints."""
    gen = torch.Generator().manual_seed(1)
    w_t = torch.randn(64, 48, generator=gen)
    w = quant.Int4Weight.quantize(w_t)
    assert w.shape == (64, 48) and not w.halves
    step = (w_t.reshape(2, 32, 48).amax(1) - w_t.reshape(2, 32, 48).amin(1)) / 15
    assert ((w.dequantize() - w_t).abs() <= 0.5 * step.repeat_interleave(32, 0) * 1.02 + 1e-6).all()
    x = torch.randn(5, 64, generator=gen)
    ref = x.bfloat16().float() @ w.dequantize()
    assert torch.allclose(w.mm(x), ref, rtol=1e-2, atol=2e-2) and w.mm(x).dtype == torch.float32
    with pytest.raises(ValueError, match="groups"):
        quant.Int4Weight(torch.zeros(8, 40, dtype=torch.uint8), torch.ones(8, 1), torch.zeros(8, 1))
    with pytest.raises(ValueError, match="groups of 32 inputs.*has 40: load it at another dtype"):
        quant.Int4Weight.quantize(torch.randn(40, 8))
    odd = quant.Int4Weight.quantize(w_t[:, :40])    # outputs the kernel does not pack (16s): padded, cut off
    assert odd.shape == (64, 40) and odd.mm(x).shape == (5, 40)
    assert torch.equal(odd.mm(x), w.mm(x)[:, :40]) and torch.equal(odd.dequantize(), w.dequantize()[:, :40])
    lm = loader.load("tiny:0", "int4")
    f64 = loader.load("tiny:0", "float32")
    assert lm.dtype == "int4" and lm.model.dtype == torch.float32 and lm.model.quantized == "int4"
    assert lm.model.exact and isinstance(lm.model.lm_head_t, quant.Int4Weight)
    assert fingerprint(lm.model) == fingerprint(f64.model)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_as_the_int4_kernel_reads_them(kind):
    """A GGUF block type in the kernel's terms gives gguf's own dequantisation (up to the scales' rounding
    to bfloat16); llama.cpp's q/k row order is undone; fused parts (4-bit beside 8-bit) multiply as the
    concatenated dense weights do."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(48, 128, generator=gen).numpy()
    t = gguf.GGMLQuantizationType[kind]
    blocks = gguf.quants.quantize(w, t)
    ref = torch.from_numpy(gguf.quants.dequantize(blocks, t))
    codes = gguf_blocks._codes(kind, blocks.reshape(48, -1, gguf_blocks._BLOCK_BYTES[kind]))
    got = quant.int4_values(*codes)
    assert codes[3] == (kind == "Q8_0") and got.shape == ref.shape
    assert ((got - ref).abs() <= 2 ** -8 * ref.abs().amax(1, keepdim=True)).all()
    order = gguf_blocks._orders(48, (6, 2))[1]
    assert torch.equal(quant.int4_values(*gguf_blocks._reordered(codes, order)), got[torch.from_numpy(order)])
    four = gguf_blocks._codes("Q4_1", gguf.quants.quantize(w[:16], gguf.GGMLQuantizationType.Q4_1).reshape(16, 4, 20))
    fused = gguf_blocks._fuse([codes, four])
    dense = torch.cat([got, quant.int4_values(*four)])
    assert torch.equal(quant.int4_values(*fused), dense)
    x = torch.randn(3, 128, generator=gen)
    assert torch.allclose(quant.Int4Weight(*fused).mm(x), x.bfloat16().float() @ dense.t(), rtol=2e-2, atol=5e-2)


def test_gguf_q4_k_blocks_as_the_int4_kernel_reads_them():
    """Q4_K (gguf-py cannot write it: random blocks with sane float16 d and dmin) read in the kernel's
    terms give gguf's own dequantisation, up to the scales' rounding to bfloat16."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(24, 2, 144), dtype=np.uint8)
    blocks[..., :4] = rng.uniform(0.001, 0.02, size=(24, 2, 2)).astype(np.float16).view(np.uint8).reshape(24, 2, 4)
    ref = torch.from_numpy(gguf.quants.dequantize(blocks.reshape(24, -1), gguf.GGMLQuantizationType.Q4_K))
    codes = gguf_blocks._codes("Q4_K", blocks)
    got = quant.int4_values(*codes)
    assert got.shape == ref.shape == (24, 512)
    assert ((got - ref).abs() <= 2 ** -8 * ref.abs().amax(1, keepdim=True)).all()
    assert not torch.equal(got, ref)    # (the scales did round: the check above is not vacuous)


# ---------------------------------------------------------------- GGUF weights cache

def test_cache_entry_round_trip_and_corruption(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    lm = _tiny(5, "bfloat16")
    sha = "ab" * 32
    assert gguf_cache.load(sha, "bfloat16") is None                 # miss
    d = gguf_cache.store(sha, "bfloat16", lm.hf, None)
    assert d == tmp_path / "models" / f"{sha[:24]}-bfloat16" and (d / gguf_cache.MANIFEST).is_file()
    hf, tok = gguf_cache.load(sha, "bfloat16")                      # hit: the same weights
    assert tok is None
    want = lm.hf.state_dict()
    got = hf.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert gguf_cache.load(sha, "float32") is None                  # keyed by dtype too
    # flip one byte in the middle of the weights: never loaded, the entry is dropped
    p = d / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    p.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        assert gguf_cache.load(sha, "bfloat16") is None
    assert "checksum mismatch in model.safetensors" in caplog.text and not d.exists()
    # a truncated manifest, and an entry from another format version, are rebuilt as well
    d = gguf_cache.store(sha, "bfloat16", lm.hf, None)
    (d / gguf_cache.MANIFEST).write_text("{")
    assert gguf_cache.load(sha, "bfloat16") is None and not d.exists()
    d = gguf_cache.store(sha, "bfloat16", lm.hf, None)
    m = json.loads((d / gguf_cache.MANIFEST).read_text())
    m["versions"]["format"] = -1
    (d / gguf_cache.MANIFEST).write_text(json.dumps(m))
    assert gguf_cache.load(sha, "bfloat16") is None
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cache_root() is None and gguf_cache.store(sha, "bfloat16", lm.hf, None) is None


# ---------------------------------------------------------------- SmolLM2 at bfloat16

SMOL_QUESTIONS = [
    "Edit the following paragraph to correct any grammatical errors:\nShe didn't remembre where is her purse, "
    "so I thinks its in the car but he's say it's on kitchen table but he are not sure.",
    "Write a C++ program to find the nth Fibonacci number using recursion.",
    "Given these records, extract the highest closing price for each month as CSV:\nDate,Close\n"
    "2022-01-01,153.80\n2022-01-02,156.25\n2022-02-01,161.80\n2022-02-02,163.90\n2022-03-01,166.80",
]


def test_int4_codes_cache_round_trip_and_corruption(tmp_path, monkeypatch, caplog):
    """int4 products packed from a GGUF are kept under the GGUF's sha256: read back they multiply bit for
    bit as the originals; a corrupted file is caught by its checksum, the entry removed, nothing loaded."""
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    gen = torch.Generator().manual_seed(4)
    codes = {"0.qkv": quant.Int4Weight.quantize(torch.randn(64, 40, generator=gen)),
             "lm_head": quant.Int4Weight(torch.randint(0, 16, (96, 64), generator=gen), torch.rand(96, 2) / 8,
                                         torch.randn(96, 2), halves=True)}
    sha = "ab" * 32
    entry = gguf_cache.store_codes(sha, codes)
    assert entry is not None and entry.name.endswith("-int4-codes")
    back = gguf_cache.load_codes(sha)
    assert back is not None and set(back) == set(codes)
    x = torch.randn(3, 64, generator=gen)
    for name, w in codes.items():
        assert back[name].shape == w.shape and back[name].halves == w.halves
        assert torch.equal(back[name].mm(x), w.mm(x))
    p = entry / gguf_cache.CODES_FILE
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    p.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        assert gguf_cache.load_codes(sha) is None
    assert "checksum mismatch" in caplog.text and not entry.exists()


@pytest.fixture(scope="module", params=[pytest.param("bfloat16", marks=needs_native_bf16), "int8", "int4"])
def smollm2_at(request):
    """SmolLM2 at each exact dtype, loaded with 2 threads (what the exact probe measures)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lm = loader.load("smollm2", request.param)
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    yield lm
    torch.set_num_threads(before)


@pytest.mark.smollm2
def test_smollm2_ngram_equals_plain(smollm2_at):
    lm = smollm2_at
    assert lm.dtype in ("bfloat16", "int8", "int4") and lm.model.exact and lm.model.exact_rows.ok
    engine = SpecEngine(ModelRunner(lm.model, 1024), lm.eos_ids)
    params = SamplingParams(max_new_tokens=64)
    accepted = 0
    for q in SMOL_QUESTIONS:
        prompt = loader.chat_prompt(lm.tokenizer, [{"role": "user", "content": q}])
        plain = engine.generate(prompt, params)
        g = engine.generate(prompt, params, NgramDrafter())
        assert g.token_ids == plain.token_ids, lm.tokenizer.decode(plain.token_ids)
        accepted += g.stats.accepted_tokens
    assert accepted > 0


@pytest.mark.smollm2
def test_smollm2_verify_rows_are_bitwise_decode_rows(smollm2_at):
    lm = smollm2_at
    prompt = loader.chat_prompt(lm.tokenizer, [{"role": "user", "content": SMOL_QUESTIONS[1]}])
    bad = check_rows_bitwise(lm, prompt, offsets=(0, 9, 20, 33), sizes=(2, 9), decode_n=44)
    assert not bad, f"{len(bad)} rows differ, first {bad[:5]}"


@pytest.mark.smollm2
@pytest.mark.parametrize("exact_prefill", [True, False])
def test_smollm2_a_tokens_kv_do_not_depend_on_how_it_entered_the_cache(smollm2_at, exact_prefill):
    """A request resumed after a failover (or a session turn moved to another worker) enters the tokens
    already generated as a prompt; at bfloat16 a library prefill row rounds unlike the decode and verify
    rows that first computed them, and a near tie later flipped (2 of 8 streams differed after a target
    kill). With exact prompt rows (the default) the resumed cache holds bit for bit the undisturbed K/V
    and the continuation is the same; with them off the K/V differ: the check can tell."""
    lm = smollm2_at
    prompt = loader.chat_prompt(lm.tokenizer, [{"role": "user", "content": SMOL_QUESTIONS[2]}])
    pool = lm.model.new_pool(2, 512)
    before = lm.model.exact_prefill
    lm.model.exact_prefill = exact_prefill
    try:
        engine = SpecEngine(ModelRunner(lm.model, cache=pool.cache(0)), lm.eos_ids)
        first = engine.generate(prompt, SamplingParams(max_new_tokens=48), NgramDrafter())   # decode + verify rows
        out = first.token_ids
        assert len(out) == 48 and first.stats.accepted_tokens > 0
        for k in (1, 9, 30):   # resumed after k tokens, on another slot: prompt + those k as its prompt
            resumed = SpecEngine(ModelRunner(lm.model, cache=pool.cache(1)), lm.eos_ids)
            rest = resumed.generate(prompt + out[:k], SamplingParams(max_new_tokens=48 - k)).token_ids
            n = len(prompt) + 47                 # positions both caches hold (the last token never entered)
            same = torch.equal(pool.k[:, 0, :, :n], pool.k[:, 1, :, :n]) and \
                torch.equal(pool.v[:, 0, :, :n], pool.v[:, 1, :, :n])
            if exact_prefill:
                assert same and rest == out[k:], k
            elif lm.dtype == "bfloat16":   # (int8/int4 activations are float32: library rows may agree there)
                assert not same, k
    finally:
        lm.model.exact_prefill = before


@pytest.mark.smollm2
def test_smollm2_gguf_cache_hit_and_corrupted_entry(tmp_path, monkeypatch, caplog):
    """Cold load converts the GGUF and writes the cache; a warm load reads the same weights back; a
    corrupted entry is detected by its checksum and rebuilt, never loaded."""
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    dtype = loader.resolve_dtype("auto")   # (bfloat16 without native instructions: minutes a load)
    try:
        cold = loader.load("smollm2", dtype)
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    (entry,) = (tmp_path / "models").iterdir()
    want = {k: v.clone() for k, v in cold.hf.state_dict().items()}
    del cold
    warm = loader.load("smollm2", dtype)
    got = warm.hf.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    prompt = loader.chat_prompt(warm.tokenizer, [{"role": "user", "content": "Hi!"}])
    assert warm.tokenizer.decode(prompt).rstrip().endswith("assistant") and warm.eos_ids
    del warm, got
    p = entry / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    p.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        again = loader.load("smollm2", dtype)
    assert "checksum mismatch" in caplog.text
    got = again.hf.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert gguf_cache.load(gguf_cache.file_sha256(loader.smollm2_path()), dtype) is not None  # rebuilt


@pytest.mark.smollm2
@needs_native_bf16   # (two bfloat16 loads of SmolLM2, each probing its kernels: 570 s on AVX2 alone)
def test_auto_never_picks_a_dtype_the_exact_probe_rejects(monkeypatch):
    """Where the probe finds no row counts that round alike (ExactRows.ok False), dtype auto falls back to
    float32 rather than serve bfloat16 whose speculative output could drift from plain decoding."""
    from drafthorse.actors.models import exact
    monkeypatch.setenv(loader.NATIVE_BF16_ENV, "1")
    monkeypatch.setattr(exact, "_pick", lambda *a, **k: None)        # a machine that defeats the probe
    try:
        lm = loader.load("smollm2", "auto")
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 is not installed: {e}")
    assert lm.dtype == "float32" and lm.model.dtype == torch.float32
    explicit = loader.load("smollm2", "bfloat16")                   # asked for by name: served, with a warning
    assert explicit.dtype == "bfloat16" and not explicit.model.exact_rows.ok
