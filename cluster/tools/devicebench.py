"""The model paths' speed on one device, on random-weight models of real shapes (what
scripts/device_check.sh runs on a GPU machine; on the CPU, the `tiny` shape is its smoke test):

    python -m drafthorse.cluster.tools.devicebench --device cuda --shapes smollm2-135m,llama3-8b --out FILE

Per shape and exactness (exact decode/verify rows on and off):
  - step: the best of a few timed passes after a 256-token prefix at batch 1: a 1-token decode, an 8-token
    verify (a chain of scratch nodes), their ratio, and the weight-read time (the bytes a forward reads over
    the device's measured copy bandwidth) with the decode's multiple of it;
  - methods: plain decoding, n-gram, EAGLE (a random head: its acceptance means nothing, its cost does) and
    the target drafting for itself, at batch 1 on a repetitive prompt, greedy, and EAGLE sampled: tokens/s,
    tokens per target forward;
  - throughput: `drafthorse throughput`'s ar and hf at the batch sizes asked.
Each section is written to the JSON as it ends (a run cut short keeps what it measured); one that fails
records its error and the next runs. Random weights run the same kernels as trained ones: speed only."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from drafthorse.actors.drafters import HEADS
from drafthorse.actors.drafters.base import Drafter
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.heads import Checkpoint, EagleHead, fingerprint, head_config
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models.loader import LoadedModel, resolve_device, wrap
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import ROOT
from drafthorse.cluster.tools import throughput

SHAPES = {   # HF Llama configs of the models named (random weights)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False),
}
PREFIX = 256      # context before the timed passes
VERIFY = 8        # rows of the timed verify
MAX_LEN = 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: str, device: str, dtype: torch.dtype, max_len: int = MAX_LEN) -> LoadedModel:
    """A model of `shape` with random weights, made on the device itself (an 8B model is 16 GB: no host copy)."""
    cfg = AutoConfig.for_model("llama", max_position_embeddings=max_len, bos_token_id=None, pad_token_id=None,
                               eos_token_id=SHAPES[shape]["vocab_size"] - 1, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return wrap(hf, None, name=f"random-{shape}", max_len=max_len)


def copy_gb_per_s(device: torch.device, mib: int = 1024) -> float:
    """The device's memory bandwidth: bytes read and written by a large copy, the best of three."""
    x = torch.empty(mib << 18, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(4):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best / 1e9


def step_times(lm: LoadedModel, reps: int = 10) -> dict:
    """Batch-1 decode and 8-row verify after a PREFIX-token context, the median of `reps` each."""
    dev = lm.model.device
    runner = ModelRunner(lm.model, PREFIX + VERIFY + 1)
    runner.extend([i % lm.vocab_size for i in range(PREFIX)])

    def timed(n: int) -> float:
        times = []
        for _ in range(reps + 2):
            sync(dev)
            t = time.perf_counter()
            logits, _ = runner.score([7] * n, [ROOT] + list(range(n - 1)))
            logits.argmax(-1).tolist()   # a step reads its tokens back: that ends its device work
            times.append(time.perf_counter() - t)
            runner.discard()
        return statistics.median(times[2:])

    one, many = timed(1), timed(VERIFY)
    return {"decode_ms": round(one * 1e3, 3), f"verify{VERIFY}_ms": round(many * 1e3, 3),
            f"verify{VERIFY}_over_decode": round(many / one, 3)}


def random_eagle(lm: LoadedModel):
    """An EAGLE head of the target's shape with random weights, bound to it."""
    with torch.device("cpu"):
        module = EagleHead(head_config("eagle", lm.model)).eval().requires_grad_(False)
    ckpt = Checkpoint("eagle", module, torch.arange(lm.vocab_size),
                      dict(name=lm.name, fingerprint=fingerprint(lm.model)), {})
    return HEADS["eagle"][0](ckpt, lm.model, MAX_LEN)


def methods(lm: LoadedModel, n: int = 64) -> dict:
    """Plain decoding, n-gram, a random EAGLE head and the target as its own draft model at batch 1:
    tokens/s, tokens per target forward, tokens drafted; greedy (identical to plain decoding: checked)
    and sampled with EAGLE (host-side draws from the device's logits). A drafter that drafts nothing
    failed (the engine drops a failing drafter and decodes on): an error here, not a quiet 1.0."""
    prompt = [(i * 7) % 97 + 2 for i in range(48)] * 3   # repeats: n-gram finds matches
    head = random_eagle(lm)
    make: dict[str, Callable[[], Drafter | None]] = {
        "ar": lambda: None, "ngram": NgramDrafter,
        "eagle": lambda: HEADS["eagle"][1](head, topk=4, depth=4, max_nodes=16),
        "self-draft": lambda: DraftModelDrafter(ModelRunner(lm.model, MAX_LEN), depth=4, branches=2)}
    out: dict = {}
    engine = SpecEngine(ModelRunner(lm.model, MAX_LEN), set())
    runs = [(name, SamplingParams(max_new_tokens=n)) for name in make]
    runs.append(("eagle-sampled", SamplingParams(max_new_tokens=n, temperature=1.0, seed=1)))
    tokens = {}
    for name, params in runs:
        drafter = make[name.removesuffix("-sampled")]
        engine.generate(prompt, SamplingParams(max_new_tokens=4), drafter())   # warm-up
        t = time.perf_counter()
        g = engine.generate(prompt, params, drafter())
        dt = time.perf_counter() - t
        if name != "ar" and not g.stats.drafted_tokens:
            raise RuntimeError(f"{name}: nothing drafted (the drafter failed: see the log)")
        out[name] = {"tokens_per_s": round(len(g.token_ids) / dt, 2), "drafted": g.stats.drafted_tokens,
                     "tokens_per_forward": round(g.stats.mean_accepted_tokens, 3)}
        tokens[name] = g.token_ids
    out["identical_to_plain"] = all(tokens[m] == tokens["ar"] for m in make)
    return out


def environment(device: torch.device) -> dict:
    env: dict[str, object] = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "device": str(device),
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "python": platform.python_version(), "cuda_graphs": False}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                   multiprocessors=p.multi_processor_count)
    else:
        env.update(threads=torch.get_num_threads(), platform=platform.platform())
    return env


def run(device: str, shapes: list[str], batch_sizes: list[int], out: Path, budget_s: float,
        dtype: torch.dtype = torch.bfloat16) -> dict:
    """Every section, in order, while the budget lasts; the JSON rewritten after each."""
    t0 = time.perf_counter()
    dev = torch.device(resolve_device(device))
    result: dict = {"env": environment(dev), "shapes": {}, "skipped": [], "errors": {}}
    result["env"]["copy_gb_per_s"] = round(copy_gb_per_s(dev, 1024 if dev.type == "cuda" else 64), 1)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))

    def section(key: str, where: dict, fn: Callable[[], object]) -> None:
        if time.perf_counter() - t0 > budget_s:
            result["skipped"].append(key)
        else:
            try:
                where[key.rsplit("/", 1)[-1]] = fn()
            except Exception as e:  # noqa: BLE001 - recorded, and the next section runs
                result["errors"][key] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        save()

    for shape in shapes:
        try:
            _shape(shape, dev, dtype, batch_sizes, result, section)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory for its weights: the next shape runs
            result["errors"][shape] = f"{type(e).__name__}: {e}"
            save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    return result


def _shape(shape: str, dev: torch.device, dtype: torch.dtype, batch_sizes: list[int], result: dict,
           section: Callable[[str, dict, Callable[[], object]], None]) -> None:
    """One shape's sections into result["shapes"][shape] (the model freed on return)."""
    per: dict = {}
    result["shapes"][shape] = per
    lm = random_model(shape, str(dev), dtype)
    bytes_read = lm.model.weight_bytes()
    per["weight_gb"] = round(bytes_read / 1e9, 3)
    per["weight_read_ms"] = round(bytes_read / (result["env"]["copy_gb_per_s"] * 1e9) * 1e3, 3)
    for exact in (True, False):
        lm.model.exact = exact
        name = "exact" if exact else "library"
        mode: dict = {}
        per[name] = mode
        if exact:
            rows = lm.model.exact_rows
            mode["probe"] = {"ok": rows.ok, "attention_rows": list(rows.attn), "batched": rows.batched}
        section(f"{shape}/{name}/step", mode, lambda: step_times(lm))
        if "step" in mode:
            mode["step"]["decode_over_weight_read"] = round(mode["step"]["decode_ms"] / per["weight_read_ms"], 2)
        section(f"{shape}/{name}/methods", mode, lambda: methods(lm))
    lm.model.exact = lm.model.exact_by_default
    prompts = [[(i * 13 + j * 7) % (lm.vocab_size - 3) + 2 for j in range(64)] for i in range(16)]
    section(f"{shape}/throughput", per, lambda: throughput.run_throughput(lm, prompts, batch_sizes, 32,
                                                                          ["ar", "hf"])["methods"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--batch-sizes", default="1,8,32,128,256")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    p.add_argument("--out", type=Path, default=Path("device_bench.json"))
    a = p.parse_args()
    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    if unknown := [s for s in shapes if s not in SHAPES]:
        p.error(f"unknown shapes {unknown}: choose from {', '.join(SHAPES)}")
    try:
        result = run(a.device, shapes, [int(b) for b in a.batch_sizes.split(",")], a.out, a.budget_s,
                     getattr(torch, a.dtype))
    except ValueError as e:   # e.g. --device cuda without a GPU
        p.exit(2, f"error: {e}\n")
    print(json.dumps({k: v for k, v in result.items() if k != "shapes"}, indent=1))
    for shape, per in result["shapes"].items():
        for mode in ("exact", "library"):
            if "step" in per.get(mode, {}):
                print(shape, mode, per[mode]["step"])


if __name__ == "__main__":
    main()
