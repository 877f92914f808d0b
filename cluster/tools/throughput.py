"""`drafthorse throughput`: batched decoding speed, ours beside HF `generate`, at several batch sizes in one run.

Every method decodes the same B prompts for exactly `max_new_tokens` each (EOS suppressed on both sides);
tokens/s = the tokens generated (counted, = B x max_new_tokens) / the wall time from the first prefill to the
last token:
    ar     drafthorse's engine, plain decoding: one ragged target pass per step for the whole batch
    ngram  the same with prompt-lookup trees sized per step by the adaptive policy (as a target worker runs)
    hf     transformers `generate`, greedy, on a left-padded batch at the same dtype
`step_ms_p50` is the median time of one decoding step (ours: `BatchEngine.step`; HF: one generated position).
Writes DIR/throughput.json and DIR/throughput.png; with a profile batch size, also where a plain decoding
step's time goes at that batch (torch operators vs Python outside them, profiling.py) in "profile"; with
prefill tokens N, the time to first token of one N-token prompt in "prefill": ours in the chunks a target
worker prefills in, HF's one forward over the whole prompt (the best of a few runs each)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

from drafthorse.actors.drafters import make_drafter
from drafthorse.actors.engine import BatchEngine, Prompt
from drafthorse.actors.models.loader import LoadedModel, simd_flags
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.adaptive import AdaptivePolicy
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.tools.profiling import profile

METHODS = ("ar", "ngram", "hf")
MAX_TREE_NODES = 32   # a target worker's default (WorkerSettings.max_tree_nodes)


def run_throughput(lm: LoadedModel, prompts: list[list[int]], batch_sizes: list[int], max_new_tokens: int,
                   methods: list[str], out_dir: str | os.PathLike | None = None, profile_batch: int = 0,
                   prefill_tokens: int = 0) -> dict:
    """{"env": ..., "methods": {method: {str(batch): {"tokens_per_s", "step_ms_p50", "seconds", "tokens"}}}};
    the batch of size B is the first B prompts (repeated when there are fewer). profile_batch > 0 adds
    "profile": the report of plain decoding's steps at that batch size under torch.profiler;
    prefill_tokens > 0 adds "prefill": {"tokens", "ours_s", "hf_s", "ratio", "same_first_token"} (time
    to first token of a prompt that long, the prompts' tokens concatenated)."""
    check(methods, batch_sizes, max_new_tokens)
    if not prompts:
        raise ValueError("no prompts to decode")
    long = long_prompt(prompts, prefill_tokens) if prefill_tokens else []
    if len(long) + 1 > lm.model.max_len:   # said before the batches run, not after
        raise ValueError(f"a {len(long)}-token prompt does not fit the model's context of {lm.model.max_len}")
    result: dict = {"env": environment(lm, max_new_tokens, batch_sizes), "methods": {}}
    for method in methods:
        run = _hf if method == "hf" else _ours
        run(lm, prompts[:1], 4, method)   # warm-up: first calls pay for lazy initialisation, not decoding
        per_batch = result["methods"][method] = {}
        for b in batch_sizes:
            batch = [prompts[i % len(prompts)] for i in range(b)]
            seconds, steps, tokens = run(lm, batch, max_new_tokens, method)
            per_batch[str(b)] = {"tokens_per_s": round(tokens / seconds, 2),
                                 "step_ms_p50": round(1000 * statistics.median(steps), 2),
                                 "seconds": round(seconds, 4), "tokens": tokens}
    if profile_batch:
        batch = [prompts[i % len(prompts)] for i in range(profile_batch)]
        timed: list[float] = []
        _, report = profile(lambda: _ours(lm, batch, max_new_tokens, "ar", timed), lambda _: len(timed))
        result["profile"] = {"batch": profile_batch, "report": report}
    if prefill_tokens:
        result["prefill"] = prefill(lm, long)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "throughput.json").write_text(json.dumps(result, indent=2))
        plot(result, out / "throughput.png")
    return result


def check(methods: list[str], batch_sizes: list[int], max_new_tokens: int) -> None:
    """ValueError naming what is wrong with a run's arguments (before any model is loaded)."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {', '.join(unknown) or 'none'}")
    if not batch_sizes or any(b < 1 for b in batch_sizes) or max_new_tokens < 1:
        raise ValueError("need batch sizes >= 1 and max_new_tokens >= 1")


def _ours(lm: LoadedModel, batch: list[list[int]], n: int, method: str, steps: list[float] | None = None,
          ) -> tuple[float, list[float], int]:
    """(seconds, each step's seconds (also appended to `steps`), tokens generated)"""
    policy = AdaptivePolicy(MAX_TREE_NODES) if method == "ngram" else None
    engine = BatchEngine(set(), None, max_tree_nodes=MAX_TREE_NODES, policy=policy)   # no EOS: exactly n tokens
    max_len = max(map(len, batch)) + n + MAX_TREE_NODES + 1
    params = SamplingParams(max_new_tokens=n)
    steps = [] if steps is None else steps
    t0 = time.perf_counter()
    drafter = "none" if method == "ar" else method
    kv = lm.model.new_pool(len(batch), max_len)   # one K/V tensor for the batch, as a target worker's
    started = engine.start_many([Prompt(ModelRunner(lm.model, cache=kv.cache(i)), p, params, make_drafter(drafter))
                                 for i, p in enumerate(batch)])   # the prompts prefilled together, as HF's
    tokens = sum(len(first.token_ids) for _, first in started)
    seqs = [seq for seq, _ in started]
    while seqs:
        t = time.perf_counter()
        tokens += sum(len(s.token_ids) for s in engine.step(seqs))
        steps.append(time.perf_counter() - t)
        seqs = [s for s in seqs if s.finish_reason is None]
    return time.perf_counter() - t0, steps, tokens


def long_prompt(prompts: list[list[int]], n: int) -> list[int]:
    """The first n tokens of the prompts one after another (repeated while they are too few)."""
    ids = [t for p in prompts for t in p]
    if not ids:
        raise ValueError("no prompt tokens to build a long prompt from")
    return (ids * -(-n // len(ids)))[:n]


def prefill(lm: LoadedModel, prompt: list[int], runs: int = 3) -> dict:
    """Time to first token of `prompt`: ours through `BatchEngine.start` (prefill in the engine's chunks,
    as a target worker), HF as one forward over the whole prompt; the best of `runs` each."""
    engine = BatchEngine(set(), None)
    params = SamplingParams(max_new_tokens=1)
    kv = lm.model.new_pool(1, len(prompt) + 1)
    ids = torch.tensor([prompt], device=lm.hf.device)
    ours, hf, firsts = [], [], set()
    for _ in range(runs):
        runner = ModelRunner(lm.model, cache=kv.cache(0))
        t = time.perf_counter()
        _, step = engine.start(runner, prompt, params, make_drafter("none"))
        ours.append(time.perf_counter() - t)
        runner.reset()
        t = time.perf_counter()
        with torch.inference_mode():
            first = int(lm.hf(ids, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())
        hf.append(time.perf_counter() - t)
        firsts |= {(step.token_ids[0], first)}
    return {"tokens": len(prompt), "ours_s": round(min(ours), 3), "hf_s": round(min(hf), 3),
            "ratio": round(min(ours) / min(hf), 3), "same_first_token": all(a == b for a, b in firsts)}


class _StepClock(LogitsProcessor):
    """Times HF's decoding steps: called once per generated position, after that position's forward."""

    def __init__(self):
        self.marks: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.marks.append(time.perf_counter())
        return scores


def _hf(lm: LoadedModel, batch: list[list[int]], n: int, method: str) -> tuple[float, list[float], int]:
    width = max(map(len, batch))
    pad = lm.hf.generation_config.pad_token_id
    pad = next(iter(lm.eos_ids)) if pad is None else pad
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], dtype=torch.long, device=lm.hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], dtype=torch.long, device=lm.hf.device)
    clock = _StepClock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        # (ignore: transformers' PreTrainedModel declares no generate; a causal LM mixes it in)
        out = lm.hf.generate(  # type: ignore[operator]
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
            logits_processor=LogitsProcessorList([clock])).cpu()   # (a GPU's work is done once it is read)
    seconds = time.perf_counter() - t0
    steps = [b - a for a, b in zip(clock.marks, clock.marks[1:])] or [seconds]   # the first mark ends the prefill
    return seconds, steps, (out.shape[1] - width) * len(batch)


def environment(lm: LoadedModel, max_new_tokens: int, batch_sizes: list[int]) -> dict:
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": lm.name,
        "dtype": lm.dtype,
        "hf_dtype": str(next(lm.hf.parameters()).dtype).removeprefix("torch."),
        "device": lm.device,
        "exact_rows": bool(lm.model.exact),   # decode and verify rows computed alike (models/exact.py)
        "max_new_tokens": max_new_tokens,
        "batch_sizes": batch_sizes,
        "cpu_flags": simd_flags(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def plot(result: dict, path: str | os.PathLike) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred: plots only
    from matplotlib.figure import Figure  # deferred: plots only

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method, per_batch in result["methods"].items():
        sizes = sorted(per_batch, key=int)
        ax.plot([int(b) for b in sizes], [per_batch[b]["tokens_per_s"] for b in sizes], marker="o", label=method)
    env = result["env"]
    ax.set(xscale="log", xlabel="batch size", ylabel="tokens/s",
           title=f"{env['model']} {env['dtype']}, {env['max_new_tokens']} new tokens, {env['threads']} threads")
    ax.set_xticks([int(b) for b in env["batch_sizes"]], [str(b) for b in env["batch_sizes"]])
    ax.grid(alpha=0.3)
    ax.legend()
    FigureCanvasAgg(fig).print_png(str(path))


def format_table(result: dict) -> str:
    methods = list(result["methods"])
    lines = ["| batch | " + " | ".join(f"{m} tok/s" for m in methods) +
             (" | ar / hf |" if {"ar", "hf"} <= set(methods) else " |"),
             "|---" * (len(methods) + 1 + ({"ar", "hf"} <= set(methods))) + "|"]
    for b in result["env"]["batch_sizes"]:
        cells = [str(result["methods"][m][str(b)]["tokens_per_s"]) for m in methods]
        if {"ar", "hf"} <= set(methods):
            ar, hf = (result["methods"][m][str(b)]["tokens_per_s"] for m in ("ar", "hf"))
            cells.append(f"{ar / hf:.2f}x")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
