"""Spec-Bench style benchmark: every decoding method on the same prompts, greedy, one process.

    questions = load_questions("dev.jsonl", per_category=5)
    results = run_bench(questions, ["ar", "ngram", "hf"], 128, Path("out"), lm)
    print(format_table(results))

Methods:
    ar           our engine, no drafter (plain autoregressive decoding): the baseline
    ngram        our engine + NgramDrafter (prompt lookup with a token tree), fixed tree budget
    ngram-adaptive  the same drafter, tree size chosen each step by actors/spec/adaptive.py
    draft-model  our engine + DraftModelDrafter over a second, smaller model (needs draft_lm)
    eagle, eagle3, medusa, layerskip  our engine + a trained head (the one shipped for the model, or `heads`)
    eagle+ngram, ...  the same head, n-gram copying where the text repeats (runtime.kinds)
    METHOD/N     an engine method with a tree budget of N nodes (e.g. eagle/8): tree size sweeps
    hf           transformers `generate`, greedy
    hf-pld       transformers `generate` with prompt lookup decoding (prompt_lookup_num_tokens=10)
    llama-cpp    llama.cpp (llama-cpp-python, optional extra) plain greedy decoding of the same GGUF, in
                 its own quantised format: absolute speed side by side (its outputs are its own)

For each question the first turn is rendered with the chat template and every method runs on it
back to back, the order rotated per question so that machine noise hits all methods alike. Each
generation is timed with time.perf_counter around the whole call (prefill included). Token counts
include a final EOS token; hf outputs are cut after the first EOS as our engine cuts them.
Speedups are ratios of tokens/s (sum of tokens / sum of seconds) to `ar` over the same prompts."""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import logging
import os
import platform
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import grpc
import torch
import transformers
from gguf import GGUFReader
from tqdm import tqdm
from transformers import GenerationConfig

from drafthorse.actors.drafters import load_head, make_drafter
from drafthorse.actors.drafters.base import Drafter
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models.loader import LoadedModel, chat_prompt, resolve, simd_flags
from drafthorse.actors.models.products import best_time
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.adaptive import AdaptivePolicy
from drafthorse.actors.spec.grammar import Grammars, compile_spec
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.client import request
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.kinds import KINDS, check_head_kind

log = logging.getLogger(__name__)

CLUSTER_METHODS = ("cluster-ar", "cluster-ngram", "cluster-draft-model", "cluster-eagle")  # through a gateway
HEAD_METHODS = tuple(k.name for k in KINDS.values() if k.head)   # trained heads (trained/ or --head)
METHODS = ("ar", "ngram", "ngram-adaptive", "draft-model") + HEAD_METHODS + ("hf", "hf-pld", "llama-cpp") + \
    CLUSTER_METHODS
ENGINE_METHODS = ("ar", "ngram", "ngram-adaptive", "draft-model") + HEAD_METHODS
HF_METHODS = ("hf", "hf-pld")
BASELINE = "ar"
OVERALL = "overall"
PLD_TOKENS = 10           # prompt_lookup_num_tokens for hf-pld
TREE_SLACK = 64 + 2       # room kept after prompt + max_new_tokens for a draft tree (engine default)
WARMUP_TOKENS = 32


# ---------------------------------------------------------------- questions

def load_questions(path: str | os.PathLike, per_category: int | None = None) -> list[dict]:
    """Spec-Bench jsonl (one {"question_id", "category", "turns": [str, ...]} per line): the first
    `per_category` questions of each category in file order (all of them when None)."""
    path = Path(path)
    if per_category is not None and per_category < 1:
        raise ValueError(f"per_category must be >= 1 (or None for all), got {per_category}")
    if not path.is_file():
        raise ValueError(f"questions file {path}: no such file")
    questions: list[dict] = []
    taken: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(q, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(q).__name__}")
            for key in ("question_id", "category", "turns"):
                if key not in q:
                    raise ValueError(f"{where}: missing field {key!r}")
            if not isinstance(q["category"], str) or not q["category"]:
                raise ValueError(f"{where}: 'category' must be a non-empty string")
            turns = q["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
            cat = q["category"]
            if per_category is not None and taken.get(cat, 0) >= per_category:
                continue
            taken[cat] = taken.get(cat, 0) + 1
            questions.append(q)
    if not questions:
        raise ValueError(f"questions file {path}: no questions in it")
    return questions


# ---------------------------------------------------------------- methods

def resolve_methods(methods: list[str], draft_lm: LoadedModel | None = None) -> tuple[list[str], list[str]]:
    """Validated, de-duplicated methods with `ar` first, and notes on what was changed."""
    notes: list[str] = []
    unknown = [m for m in methods if _base(m) not in METHODS or (m != _base(m) and (
        _base(m) not in ENGINE_METHODS or not m.partition("/")[2].isdigit() or int(m.partition("/")[2]) < 1))]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}: valid methods are "
                         f"{', '.join(METHODS)}")
    out = list(dict.fromkeys(methods))
    if any(_base(m) == "draft-model" for m in out) and draft_lm is None:
        raise ValueError("method 'draft-model' needs a draft model: give one or drop the method")
    if "hf-pld" in out:
        if not hasattr(GenerationConfig(), "prompt_lookup_num_tokens"):
            raise ValueError("method 'hf-pld': this transformers has no prompt_lookup_num_tokens")
    if "llama-cpp" in out and importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("method 'llama-cpp' needs llama-cpp-python: pip install 'drafthorse[llama-cpp]' "
                         "(compiles llama.cpp, several minutes)")
    if BASELINE not in out:
        notes.append(f"added {BASELINE!r}: speedups are measured against it")
    out = [BASELINE] + [m for m in out if m != BASELINE]
    return out, notes


def _base(method: str) -> str:
    """'eagle/8' -> 'eagle'."""
    return method.partition("/")[0]


class _Runner:
    """Runs one method on one prompt: returns (token ids, seconds, generated, target forwards)."""

    def __init__(self, lm: LoadedModel, draft_lm: LoadedModel | None, methods: list[str], max_len: int,
                 max_new_tokens: int, draft_depth: int, draft_branches: int, server: str | None = None,
                 heads: dict | None = None, json_schema: str | None = None):
        self.lm = lm
        # a structured output for every engine method: each step masked by the schema's grammar
        self.constraint = ("json_schema", json_schema) if json_schema is not None else None
        grammars = Grammars(lm.tokenizer, lm.vocab_size, lm.eos_ids) if json_schema is not None else None
        self.server = server
        self.max_len = max_len
        self._llama: Any = None   # llama-cpp's model (an optional extra), loaded on first use
        self.timing: dict = {}  # where the last engine generation's time went
        self.max_new_tokens = max_new_tokens
        # no decode: no stop strings, and no detokenising inside the timed call
        self.engine = SpecEngine(ModelRunner(lm.model, max_len), lm.eos_ids, None, grammars=grammars)
        # ngram-adaptive: the same drafter, tree size chosen per step by the adaptive policy
        self.adaptive = SpecEngine(self.engine.runner, lm.eos_ids, None, policy=AdaptivePolicy(16), grammars=grammars)
        self.drafters: dict[str, Drafter | None] = {"ar": None}
        if "ngram" in methods:
            self.drafters["ngram"] = NgramDrafter()
        if "ngram-adaptive" in methods:
            self.drafters["ngram-adaptive"] = NgramDrafter(depth=8)
        loaded = {}
        self.engines = {}
        for m in methods:
            kind = _base(m)
            if kind == "draft-model":
                assert draft_lm is not None   # resolve_methods asks for one
                self.drafters[m] = DraftModelDrafter(ModelRunner(draft_lm.model, max_len), draft_depth, draft_branches)
            elif kind in HEAD_METHODS:
                trained = check_head_kind(kind)   # (eagle+ngram: eagle's head)
                if trained not in loaded:
                    loaded[trained] = load_head(trained, lm, (heads or {}).get(trained), max_len)
                budget = int(m.partition("/")[2]) if m != kind else None   # else the head's default
                self.drafters[m] = make_drafter(kind, head=loaded[trained], max_nodes=budget)
            elif kind in ("ngram", "ar") and m != kind:
                self.drafters[m] = NgramDrafter() if kind == "ngram" else None
            if m != kind:   # a tree budget of its own
                self.engines[m] = SpecEngine(self.engine.runner, lm.eos_ids, None,
                                             max_tree_nodes=int(m.partition("/")[2]), grammars=grammars)

    def __call__(self, method: str, prompt_ids: list[int], max_new_tokens: int | None = None,
                 question: str = ""):
        n = max_new_tokens or self.max_new_tokens
        self.timing = {}
        if _base(method) in ENGINE_METHODS:
            params = SamplingParams(max_new_tokens=n, constraint=self.constraint)
            t0 = time.perf_counter()
            engine = self.adaptive if method == "ngram-adaptive" else self.engines.get(method, self.engine)
            gen = engine.generate(prompt_ids, params, self.drafters[method])
            dt = time.perf_counter() - t0
            st = gen.stats
            self.timing = {"draft_s": st.draft_s, "verify_s": st.verify_s, "prefill_s": st.prefill_s,
                           **({"grammar_s": st.grammar_s} if self.constraint else {})}
            return list(gen.token_ids), dt, st.generated_tokens, st.target_forwards
        if method in CLUSTER_METHODS:
            return self._cluster(method.removeprefix("cluster-"), question, n)
        if method == "llama-cpp":
            return self._llama_cpp(prompt_ids, n)
        kw = {"prompt_lookup_num_tokens": PLD_TOKENS} if method == "hf-pld" else {}
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.lm.hf.device)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        with torch.inference_mode():
            # (ignore: transformers' PreTrainedModel declares no generate; a causal LM mixes it in)
            out = self.lm.hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)  # type: ignore[operator]
            out = out.cpu()   # (a GPU's work is done once its result is on the host)
        dt = time.perf_counter() - t0
        tokens = _cut_after_eos(out[0, len(prompt_ids):].tolist(), self.lm.eos_ids)
        return tokens, dt, len(tokens), None


    def _llama_cpp(self, prompt_ids: list[int], n: int):
        """llama.cpp's greedy decoding of the model's GGUF, fed our prompt token ids (same tokenizer);
        its KV cache is reset first, so the prompt's prefill is timed as ours is."""
        if self._llama is None:
            from llama_cpp import Llama as LlamaCpp  # deferred: an optional extra (drafthorse[llama-cpp])

            directory, gguf = resolve(self.lm.name)
            if gguf is None:
                raise ValueError(f"method 'llama-cpp' needs a GGUF model, {self.lm.name} is not one")
            self._llama = LlamaCpp(model_path=str(Path(directory) / gguf), n_ctx=self.max_len,
                                   n_threads=torch.get_num_threads(), n_batch=512, verbose=False)
        llm = self._llama
        t0 = time.perf_counter()
        llm.reset()
        tokens = []
        for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                reset=True):
            tokens.append(int(tok))
            if tok in self.lm.eos_ids or len(tokens) >= n:
                break
        return tokens, time.perf_counter() - t0, len(tokens), None

    def _cluster(self, drafter: str, question: str, n: int):
        """One generation through the gateway: the same chat prompt, rendered by the cluster."""
        drafter = "none" if drafter == "ar" else drafter
        with grpc.insecure_channel(self.server) as ch:
            t0 = time.perf_counter()
            msgs = list(pb_grpc.GeneratorStub(ch).Generate(
                request(question, SamplingParams(max_new_tokens=n), drafter), timeout=600))
            dt = time.perf_counter() - t0
        st = msgs[-1].stats
        tokens = [t for m in msgs for t in m.token_ids]
        # draft_rpc_s is the whole Draft RPC (network + remote drafting), inside draft_s
        self.timing = {"draft_s": st.draft_s, "verify_s": st.verify_s, "draft_rpc_s": st.draft_rpc_s,
                       "draft_rpcs": st.draft_rpcs, "server_total_s": st.total_s}
        return tokens, dt, len(tokens), st.target_forwards


def _cut_after_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens


def _first_diff(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------- the benchmark

def run_bench(questions: list[dict], methods: list[str], max_new_tokens: int, out_dir: str | os.PathLike,
              lm: LoadedModel, draft_lm: LoadedModel | None = None, progress: bool = True,
              draft_depth: int = 4, draft_branches: int = 1, server: str | None = None,
              heads: dict | None = None, json_schema: str | None = None) -> dict:
    """Run every method on every question (greedy), write out_dir/results.json and
    out_dir/speedup.png, and return the results dict (see `summarize` for its "summary" part).
    json_schema: every answer a JSON value of this schema (structured outputs; engine methods only)."""
    methods, notes = resolve_methods(methods, draft_lm)
    if json_schema is not None:
        if others := [m for m in methods if _base(m) not in ENGINE_METHODS]:
            raise ValueError(f"--json-schema runs the engine's methods only, not {', '.join(others)}")
        compile_spec("json_schema", json_schema)   # BadField (a ValueError) naming what is wrong
    if any(m in CLUSTER_METHODS for m in methods) and not server:
        raise ValueError("cluster-* methods need a running cluster: pass --cluster or --server HOST:PORT")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not questions:
        raise ValueError("no questions to run")
    if lm.tokenizer is None:
        raise ValueError(f"model {lm.name} has no tokenizer: the benchmark renders chat prompts")
    for note in notes:
        log.warning(note)
        if progress:
            print(f"bench: {note}", file=sys.stderr)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    prompts = [chat_prompt(lm.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in questions]
    context = lm.model.max_len
    if draft_lm is not None:
        context = min(context, draft_lm.model.max_len)
    runnable, skipped = [], []
    for q, p in zip(questions, prompts):
        if len(p) + max_new_tokens + 1 > context:
            skipped.append(q["question_id"])
            notes.append(f"skipped question {q['question_id']}: {len(p)} prompt tokens + {max_new_tokens} "
                         f"new do not fit the context of {context}")
        else:
            runnable.append((q, p))
    if not runnable:
        raise ValueError("no question fits the model's context with max_new_tokens="
                         f"{max_new_tokens}")
    max_len = min(context, max(len(p) for _, p in runnable) + max_new_tokens + TREE_SLACK)
    run = _Runner(lm, draft_lm, methods, max_len, max_new_tokens, draft_depth, draft_branches, server, heads,
                  json_schema)

    bar = tqdm(total=len(runnable) * len(methods), desc="bench", unit="gen", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    # warm-up: one untimed generation per method (first-call allocations, kernel selection, caches)
    warm_prompt = runnable[0][1]
    for m in methods:
        bar.set_postfix_str(f"warm-up {m}")
        run(m, warm_prompt, min(max_new_tokens, WARMUP_TOKENS), runnable[0][0]["turns"][0])

    records = []
    for i, (q, prompt_ids) in enumerate(runnable):
        k = i % len(methods)
        order = methods[k:] + methods[:k]
        res: dict[str, dict] = {}
        tokens_of: dict[str, list[int]] = {}
        for m in order:
            bar.set_postfix_str(f"q{q['question_id']} {m}")
            tokens, seconds, generated, forwards = run(m, prompt_ids, question=q["turns"][0])
            tokens_of[m] = tokens
            res[m] = {"tokens": len(tokens), "seconds": seconds, "target_forwards": forwards, **run.timing}
            bar.update(1)
        for m in methods:
            diff = _first_diff(tokens_of[m], tokens_of[BASELINE])
            res[m]["equal_to_ar"] = diff is None
            res[m]["first_diff"] = diff
        records.append({"question_id": q["question_id"], "category": q["category"],
                        "prompt_tokens": len(prompt_ids), "order": order,
                        "results": {m: res[m] for m in methods}})
    bar.close()

    categories = list(dict.fromkeys(r["category"] for r in records))
    results = {
        "env": _environment(lm, draft_lm, max_new_tokens, [r["question_id"] for r in records],
                            draft_depth if draft_lm is not None else None,
                            draft_branches if draft_lm is not None else None),
        "methods": methods,
        "categories": categories,
        "summary": summarize(records, methods, categories, weight_bytes(lm, methods)),
        "questions": records,
        "skipped_question_ids": skipped,
        "notes": notes,
        **({"json_schema": json.loads(json_schema)} if json_schema is not None else {}),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot_speedup(results, out_dir / "speedup.png")
    return results


def summarize(records: list[dict], methods: list[str], categories: list[str],
              weights: dict[str, int] | None = None) -> dict:
    """{method: {category | "overall": {prompts, tokens, seconds, tokens_per_s, speedup,
    median_prompt_speedup, mean_accepted, equal_to_ar: {equal, total}, weight_gb_per_s, time_split,
    draft_per_verify}}}

    speedup: tokens/s over the group / ar's tokens/s over the same prompts (ar: 1.0).
    median_prompt_speedup: median over prompts of the per-prompt tokens/s ratio (robust to a few
    generations slowed by machine noise). mean_accepted: tokens per target forward, prefill
    included (engine methods only; None for hf methods). weight_gb_per_s: the target's weights read per
    second of the method's wall time (weights: bytes per target forward, by method, `weight_bytes`;
    a forward per token for hf and llama.cpp), against the machine's `memory_read_gb_per_s`."""
    groups = {c: [r for r in records if r["category"] == c] for c in categories}
    groups[OVERALL] = records
    summary: dict[str, dict] = {m: {} for m in methods}
    for name, recs in groups.items():
        base_tps = None
        for m in [BASELINE] + [x for x in methods if x != BASELINE]:
            rs = [r["results"][m] for r in recs]
            tokens = sum(x["tokens"] for x in rs)
            seconds = sum(x["seconds"] for x in rs)
            tps = tokens / seconds if seconds > 0 else 0.0
            if m == BASELINE:
                base_tps = tps
            if _base(m) in ENGINE_METHODS or m in CLUSTER_METHODS:
                forwards = sum(x["target_forwards"] for x in rs)
                mean_acc = round(tokens / forwards, 4) if forwards else None
            else:
                forwards, mean_acc = tokens, None
            per_forward = (weights or {}).get(m)
            split = {k: round(sum(x.get(k, 0.0) for x in rs), 4) for k in _TIMING if k in rs[0]}
            ratios = [b["seconds"] / x["seconds"] * x["tokens"] / b["tokens"]
                      for b, x in ((r["results"][BASELINE], r["results"][m]) for r in recs)
                      if x["seconds"] > 0 and b["tokens"] > 0]
            median = statistics.median(ratios) if ratios else None
            summary[m][name] = {
                "prompts": len(rs),
                "tokens": tokens,
                "seconds": round(seconds, 4),
                "tokens_per_s": round(tps, 3),
                "speedup": 1.0 if m == BASELINE else (round(tps / base_tps, 4) if base_tps else None),
                "median_prompt_speedup": None if median is None else round(median, 4),
                "mean_accepted": mean_acc,
                "equal_to_ar": {"equal": sum(bool(x["equal_to_ar"]) for x in rs), "total": len(rs)},
                "weight_gb_per_s": round(per_forward * forwards / seconds / 1e9, 2) if per_forward and seconds
                else None,
                # where the time went (engine and cluster methods): summed seconds per part
                "time_split": split,
                # a step's drafting against its target forward (verification): what the drafter costs
                "draft_per_verify": round(split["draft_s"] / split["verify_s"], 4) if split.get("verify_s") else None,
            }
    return summary


_TIMING = ("prefill_s", "draft_s", "verify_s", "draft_rpc_s", "server_total_s")


def weight_bytes(lm: LoadedModel, methods: list[str]) -> dict[str, int]:
    """Bytes of the target's weights one forward reads, per method: ours (Llama.weight_bytes: engine and
    cluster methods), transformers' model (hf), and the GGUF's tensors (llama-cpp; a tied embedding
    counted once, as the LM head it also is)."""
    ours = lm.model.weight_bytes()
    hf = sum(p.numel() * p.element_size() for p in lm.hf.parameters())   # (parameters() lists tied ones once)
    if not getattr(lm.hf.config, "tie_word_embeddings", False):          # an embedding of its own: gathered
        hf -= lm.model.embed.numel() * lm.model.embed.element_size()
    out = {m: ours for m in methods if _base(m) in ENGINE_METHODS or m in CLUSTER_METHODS}
    out.update({m: hf for m in methods if m in HF_METHODS})
    if "llama-cpp" in methods:
        directory, gguf = resolve(lm.name)
        if gguf is not None:
            out["llama-cpp"] = sum(int(t.n_bytes) for t in GGUFReader(Path(directory) / gguf).tensors)
    return out


def memory_read_gb_per_s(mib: int = 512, device: str = "cpu") -> float:
    """The memory read bandwidth of `device` (the CPU's at torch's thread count): the best of three sums of
    a tensor far larger than the caches (what a forward's weight reads could reach at most)."""
    x = torch.ones(mib * 2 ** 18, device=device)          # float32
    return round(x.nbytes / best_time(lambda: float(x.sum()), 3) / 1e9, 2)   # (read back: the device's work done)


def _environment(lm: LoadedModel, draft_lm: LoadedModel | None, max_new_tokens: int,
                 question_ids: list, draft_depth, draft_branches) -> dict:
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": lm.name,
        "draft_model": draft_lm.name if draft_lm is not None else None,
        "draft_depth": draft_depth,
        "draft_branches": draft_branches,
        "dtype": lm.dtype,       # ours (int8: weight-only int8, quant.py)
        "device": lm.device,
        "hf_dtype": str(next(lm.hf.parameters()).dtype).removeprefix("torch."),
        "draft_dtype": draft_lm.dtype if draft_lm is not None else None,
        "exact_rows": bool(lm.model.exact),    # decode and verify rows computed alike (models/exact.py)
        "max_new_tokens": max_new_tokens,
        "greedy": True,
        "hf_pld_prompt_lookup_num_tokens": PLD_TOKENS,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "llama_cpp_python": _version("llama_cpp_python"),
        "memory_read_gb_per_s": memory_read_gb_per_s(device=lm.device),
        "cpu_flags": simd_flags(),
        "question_ids": question_ids,
    }


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- outputs

def plot_speedup(results: dict, path: str | os.PathLike) -> None:
    """Grouped bars: speedup vs ar per category (and overall), one bar per non-ar method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred: plots only
    from matplotlib.figure import Figure  # deferred: plots only

    groups = results["categories"] + [OVERALL]
    others = [m for m in results["methods"] if m != BASELINE]
    fig = Figure(figsize=(min(18.0, max(6.0, 2 + len(groups) * (0.3 + 0.2 * len(others)))), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(others))
    for j, m in enumerate(others):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        ys = [results["summary"][m][g]["speedup"] or 0.0 for g in groups]
        ax.bar(xs, ys, width, label=m)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.axvline(len(groups) - 1.5, color="grey", linewidth=0.8)   # categories | overall
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right")
    ax.set_ylabel(f"speedup vs {BASELINE} (tokens/s ratio)")
    env = results["env"]
    ax.set_title(f"{Path(str(env['model'])).name} · {env['dtype']} · {env['max_new_tokens']} new tokens · "
                 f"{env['threads']} threads · {len(env['question_ids'])} prompts", fontsize=9)
    if others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def format_table(results: dict) -> str:
    """Markdown table: one row per category (and overall); per method tok/s, speedup vs ar,
    mean accepted tokens per target forward, prompts equal to ar's output, and weights read per second."""
    methods, summary = results["methods"], results["summary"]
    groups = results["categories"] + [OVERALL]
    env = results["env"]
    head = ["category", "n"]
    for m in methods:
        head += [f"{m} tok/s", f"{m} ×ar", f"{m} acc", f"{m} =ar", f"{m} GB/s"]
    rows = []
    for g in groups:
        row = [f"**{g}**" if g == OVERALL else g, str(summary[methods[0]][g]["prompts"])]
        for m in methods:
            s = summary[m][g]
            eq = s["equal_to_ar"]
            row += [f"{s['tokens_per_s']:.1f}",
                    "-" if s["speedup"] is None else f"{s['speedup']:.2f}",
                    "-" if s["mean_accepted"] is None else f"{s['mean_accepted']:.2f}",
                    f"{eq['equal']}/{eq['total']}",
                    "-" if s.get("weight_gb_per_s") is None else f"{s['weight_gb_per_s']:.1f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i < 1 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i < 1 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    caption = (f"{env['model']} ({env['dtype']}), greedy, max_new_tokens={env['max_new_tokens']}, "
               f"{env['threads']} threads, {len(env['question_ids'])} prompts, {env['date']}; CPU "
               f"{' '.join(env.get('cpu_flags', []))}, {env.get('device', 'cpu')} memory read "
               f"{env.get('memory_read_gb_per_s')} GB/s "
               "(GB/s: the target's weights read per second)")
    if env.get("draft_model"):
        caption += f"; draft {env['draft_model']} depth={env['draft_depth']} branches={env['draft_branches']}"
    return "\n".join([caption, "", line(head), sep] + [line(r) for r in rows])
