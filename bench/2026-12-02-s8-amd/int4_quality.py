"""int4 against the other dtypes: quality, not speed. Reference answers: SmolLM2 at float32 (the GGUF's
weights dequantised exactly) answering the held-out Spec-Bench questions greedily (the first PER of each
category, the ones `drafthorse bench --per-category N` measures). For each dtype, on those answers:

- perplexity (teacher-forced: each answer token's probability given the prompt and the answer before it);
- top-1 agreement: how often the dtype's most likely next token is float32's answer token;
- greedy agreement: the dtype's own greedy answer, token for token equal to float32's for how long.

Run: python bench/2026-12-02-s8-amd/int4_quality.py OUT.json"""
from __future__ import annotations

import json
import math
import sys
import time

import torch

from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models import loader
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.tools.bench import load_questions

PER, NEW = 2, 64
DTYPES = ("bfloat16", "int8", "int4")


def answers(lm, prompts):
    engine = SpecEngine(ModelRunner(lm.model, 1024), lm.eos_ids)
    return [engine.generate(p, SamplingParams(max_new_tokens=NEW)).token_ids for p in prompts]


def teacher_forced(lm, prompts, refs):
    """(summed NLL, answer tokens, top-1 hits) of `lm` on the reference answers."""
    nll, n, hits = 0.0, 0, 0
    for p, a in zip(prompts, refs):
        runner = ModelRunner(lm.model, 1024)
        _, hidden = runner.extend(p + a, all_hidden=True)
        logits = lm.model.logits(hidden[len(p) - 1:len(p) + len(a) - 1]).double()
        target = torch.tensor(a)
        nll -= float(torch.log_softmax(logits, -1)[torch.arange(len(a)), target].sum())
        hits += int((logits.argmax(-1) == target).sum())
        n += len(a)
    return nll, n, hits


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(out: str) -> None:
    torch.set_num_threads(2)
    held = load_questions("../shared/data/spec_bench/dev.jsonl", PER)   # what bench --per-category PER runs
    ref_lm = loader.load("smollm2", "float32")
    prompts = [loader.chat_prompt(ref_lm.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in held]
    t0 = time.perf_counter()
    refs = answers(ref_lm, prompts)
    rows = {}
    for name in ("float32",) + DTYPES:
        lm = ref_lm if name == "float32" else loader.load("smollm2", name)
        nll, n, hits = teacher_forced(lm, prompts, refs)
        own = refs if name == "float32" else answers(lm, prompts)
        same = [first_diff(o, r) for o, r in zip(own, refs)]
        rows[name] = {"perplexity": round(math.exp(nll / n), 4), "top1_agreement": round(hits / n, 4),
                      "answer_tokens": n, "greedy_identical_answers": sum(o == r for o, r in zip(own, refs)),
                      "greedy_mean_first_diff": round(sum(same) / len(same), 1),
                      "weight_mb_per_forward": round(lm.model.weight_bytes() / 1e6, 1)}
        print(name, rows[name], flush=True)
    result = {"env": {"cpu_flags": loader.simd_flags(), "threads": 2, "torch": torch.__version__,
                      "questions": len(held), "per_category": PER, "max_new_tokens": NEW,
                      "reference": "float32 greedy answers", "seconds": round(time.perf_counter() - t0, 1)},
              "dtypes": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
