"""Where models run: `--device` resolution and its errors, and a CPU-side audit that every step keeps its
work on the model's device. Tests marked `gpu` run the lossless checks on CUDA (skipped without one)."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from drafthorse.actors.drafters import HEADS
from drafthorse.actors.drafters.base import NoDrafter
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.eagle import EagleModel
from drafthorse.actors.drafters.heads import eagle3_layers, load_checkpoint
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import BatchEngine, SpecEngine
from drafthorse.actors.models import loader
from drafthorse.actors.models.loader import tiny_llama, wrap
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.training.selfdistill import from_sequences
from drafthorse.actors.training.train import TrainConfig, Trainer
from drafthorse.cluster.tools import devicebench
from tests.test_verify_sampling import E2E_N, E2E_TOKENS, E2E_VOCAB, PASS_P, PROMPT, exact_joint, gof_pvalue

V = 64
KINDS = ("eagle", "eagle3", "medusa", "layerskip")
PROMPTS = [[5, 9, 5, 9, 12, 5, 9, 5, 3], [1, 2, 3, 4, 1, 2, 3], [40]]
CUDA = torch.cuda.is_available()


def test_auto_device_is_cuda_only_where_torch_sees_one(monkeypatch):
    monkeypatch.delenv(loader.DEVICE_ENV, raising=False)
    assert loader.resolve_device(None) == loader.resolve_device("auto") == ("cuda" if CUDA else "cpu")
    assert loader.resolve_device(" CPU ") == "cpu"
    monkeypatch.setenv(loader.DEVICE_ENV, "cpu")
    assert loader.resolve_device(None) == "cpu"
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
            loader.resolve_device(bad)
    with pytest.raises(ValueError, match="CPU kernels only"):
        loader.resolve_dtype("int4", "cuda")


def test_replicas_ask_ray_for_gpus_only_on_cuda():
    # imported here: it imports Ray, which the other tests of this module do not need
    from drafthorse.cluster.deployment.app import gpus
    from drafthorse.runtime.settings import Settings
    assert gpus(Settings(device="cpu")) == (0.0, 0.0)
    assert gpus(Settings(device="cuda")) == (1.0, 0.25)
    assert gpus(Settings(device="cuda:1", target_gpus=2, draft_gpus=0.5)) == (2.0, 0.5)
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        Settings(device="gpu")


@pytest.mark.skipif(CUDA, reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        loader.resolve_device("cuda:0")
    run = subprocess.run([sys.executable, "-m", "drafthorse.cluster.cli", "generate", "hi", "--model", "tiny:0",
                          "--device", "cuda", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "no CUDA device is visible" in run.stderr and "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """(target, draft model, checkpoint of each head kind, corpus): a float64 target with briefly trained heads."""
    target = tiny_llama(0, vocab_size=V, hidden_size=64, dtype=torch.float64)
    draft = tiny_llama(1, vocab_size=V, hidden_size=64, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (16, 6), generator=g)
    torch.manual_seed(0)
    with torch.no_grad():
        out = target.hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 max_new_tokens=20, pad_token_id=0, top_k=None, top_p=None)
    corpus = from_sequences(target, out.tolist(), [6] * 16, mid_layer=1, taps=eagle3_layers(target.model.n_layers))
    ckpts = {}
    for kind in KINDS:
        t = Trainer(TrainConfig(kind, epochs=1, lr=3e-3, batch_tokens=256, draft_vocab=48, medusa_heads=3,
                                val_fraction=0.2), target.model, target.name, corpus, target.eos_ids)
        t.fit(progress=False)
        path = tmp_path_factory.mktemp("heads") / f"{kind}.safetensors"
        t.checkpoint(dict(topk=3, depth=3, max_nodes=12), {}).save(path)
        ckpts[kind] = load_checkpoint(path, target.model, target.name)
    return target, draft, ckpts, corpus


def _everything(target, draft, ckpts, exact: bool, device: str = "cpu") -> dict:
    """Every drafter, greedy and sampled (with logprobs), alone and in one batch, on `device`: what each
    generation emitted, drafted and accepted. Models and drafters are built here (inside whatever
    default-device context the caller set), checkpoints only read."""
    lm = wrap(target.hf.to(device), None, name=target.name, max_len=256)
    lm.model.exact = exact
    dlm = wrap(draft.hf.to(device), None, name=draft.name, max_len=256)
    heads = {k: HEADS[k][0](c, lm.model, 256) if HEADS[k][0] is EagleModel else HEADS[k][0](c, lm.model)
             for k, c in ckpts.items()}
    makers = {"none": NoDrafter, "ngram": NgramDrafter,
              "draft_tree": lambda: DraftModelDrafter(ModelRunner(dlm.model, 256), depth=3, branches=2),
              **{k: (lambda k=k: HEADS[k][1](heads[k], topk=3, depth=3)) for k in heads}}
    engine = SpecEngine(ModelRunner(lm.model, 256), lm.eos_ids)
    out: dict = {}
    for name, make in makers.items():
        for seed in (None, 3):
            params = SamplingParams(max_new_tokens=24) if seed is None else \
                SamplingParams(max_new_tokens=24, temperature=1.0, seed=seed, logprobs=2)
            g = engine.generate(PROMPTS[0], params, make())
            out[name, seed] = (g.token_ids, g.stats.drafted_tokens, g.stats.accepted_tokens,
                               [round(t.logprob, 9) for t in g.logprobs])
    pool = lm.model.new_pool(4, 256)
    batch = BatchEngine(lm.eos_ids)
    names = ["ngram", "eagle3", "medusa", "none"]
    seqs = [batch.start(ModelRunner(lm.model, cache=pool.take()), PROMPTS[i % 3] + [i],
                        SamplingParams(max_new_tokens=16, temperature=float(i % 2), seed=i), makers[n]())[0]
            for i, n in enumerate(names)]
    got: list[list[int]] = [[] for _ in seqs]
    while any(s.finish_reason is None for s in seqs):
        for tokens, step in zip(got, batch.step(seqs)):
            tokens += step.token_ids
    out["batch"] = got
    return out


@pytest.mark.parametrize("exact", [False, True])
def test_every_step_keeps_its_tensors_on_the_models_device(heads, exact, caplog):
    """On a GPU, a tensor made without naming its device lands on the CPU beside the model's and the step
    fails (or, as an index, reads garbage). Here the default device is set to `meta` while the models live
    on the CPU: every tensor a step makes without naming its device (the model's, or the host for
    bookkeeping) is then a meta tensor, and the step fails or changes its output. Each drafter, greedy and
    sampled, alone and batched, exact rows on and off, must emit, draft and accept exactly what it does
    without the meta default, and no drafter may fail (a failed drafter is dropped silently otherwise)."""
    target, draft, ckpts, _ = heads
    ref = _everything(target, draft, ckpts, exact)
    with caplog.at_level(logging.WARNING), torch.device("meta"):
        got = _everything(target, draft, ckpts, exact)
    assert not [r.message for r in caplog.records if "failed" in r.message]
    assert got == ref, [k for k in ref if got[k] != ref[k]]
    assert sum(ref[k, None][2] for k in ("ngram", *KINDS)) > 0, "nothing was accepted: the audit proved little"


def test_training_keeps_its_tensors_on_the_targets_device(heads):
    """The same audit for training each head kind (Trainer: the corpus on the host, batches on the target's
    device): the same losses and agreements with and without the meta default."""
    target, _, _, corpus = heads

    def fit(kind: str) -> dict:
        t = Trainer(TrainConfig(kind, epochs=1, lr=3e-3, batch_tokens=256, draft_vocab=48, medusa_heads=3,
                                val_fraction=0.2), target.model, target.name, corpus, target.eos_ids)
        return t.fit(progress=False)

    for kind in KINDS:
        ref = fit(kind)
        with torch.device("meta"):
            got = fit(kind)
        assert got == ref and ref["val_loss"] > 0, kind


def test_the_device_benchmark_runs_here_and_keeps_what_it_measured(tmp_path):
    """scripts/device_check.sh's benchmark on the CPU (the tiny shape): every section measured, speculative
    output identical to plain decoding at exact rows and with library kernels alike, and a budget that
    runs out skips the sections left but keeps the JSON."""
    out = tmp_path / "bench.json"
    result = devicebench.run("cpu", ["tiny"], [1, 17], out, budget_s=600, dtype=torch.float32)
    assert json.loads(out.read_text()) == result and not result["errors"] and not result["skipped"]
    per = result["shapes"]["tiny"]
    for mode in ("exact", "library"):
        step = per[mode]["step"]
        assert step["decode_ms"] > 0 and step["verify8_over_decode"] > 0, step
        assert per[mode]["methods"]["identical_to_plain"], per[mode]["methods"]
    assert per["exact"]["probe"]["ok"]
    assert set(per["throughput"]) == {"ar", "hf"} and set(per["throughput"]["ar"]) == {"1", "17"}
    cut = devicebench.run("cpu", ["tiny"], [1], tmp_path / "cut.json", budget_s=0, dtype=torch.float32)
    assert "tiny/exact/step" in cut["skipped"] and json.loads((tmp_path / "cut.json").read_text())["skipped"]


# ---------------------------------------------------------------- on a GPU (skipped without one)

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_speculation_equals_plain_decoding_on_cuda(heads, dtype):
    """Every drafter's greedy output on CUDA equals plain decoding on CUDA, alone and in a batch, with
    exact rows (the probe run on the GPU's own kernels) at bfloat16."""
    target, draft, ckpts, _ = heads
    t = tiny_llama(0, vocab_size=V, hidden_size=64, dtype=dtype, device="cuda")
    d = tiny_llama(1, vocab_size=V, hidden_size=64, dtype=dtype, device="cuda")
    exact = dtype == torch.bfloat16
    out = _everything(t, d, ckpts, exact, "cuda")
    assert str(t.model.device).startswith("cuda")
    if exact:
        assert t.model.exact_rows.ok, "the exact probe found no row-invariant kernels on this GPU"
    plain = out["none", None][0]
    for name in ("ngram", "draft_tree", *KINDS):
        assert out[name, None][0] == plain, name
    assert sum(out[k, None][2] for k in ("ngram", *KINDS)) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_sampling_is_lossless_on_cuda(make_engine):
    """The joint of the first 3 sampled tokens with n-gram drafts on CUDA is the target's, by a G-test."""
    lm = tiny_llama(0, vocab_size=E2E_VOCAB, hidden_size=32, dtype=torch.float64, device="cuda")
    engine = make_engine(lm, 64)
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=E2E_TOKENS + 1)
    outcomes = []
    for i in range(E2E_N):
        g = engine.generate(PROMPT, SamplingParams(seed=7919 * i + 13, **kw), NgramDrafter())
        outcomes.append(int(np.ravel_multi_index(g.token_ids[:E2E_TOKENS], (E2E_VOCAB,) * E2E_TOKENS)))
    on_cpu = tiny_llama(0, vocab_size=E2E_VOCAB, hidden_size=32, dtype=torch.float64)   # the same weights
    pval = gof_pvalue(outcomes, exact_joint(on_cpu, SamplingParams(temperature=1.0, top_p=0.95)))
    assert pval > PASS_P, f"not distributed as the target on CUDA (p={pval:.2e})"
