"""The verify-cost line at contexts 64, 256 and 1024 (runner.pass_cost), twice each: how context and
repetition move a and b."""
import json, torch
torch.set_num_threads(2)
from drafthorse.actors.models import loader
from drafthorse.actors.models.runner import pass_cost
lm = loader.load("smollm2", "auto")
out = []
for ctx in (64, 256, 1024):
    for rep in range(2):
        a, b = pass_cost(lm.model, ctx)
        out.append(dict(context=ctx, rep=rep, a_ms=round(1e3 * a, 2), b_ms=round(1e3 * b, 2), b_over_a=round(b / a, 4)))
        print(out[-1], flush=True)
json.dump(dict(dtype=lm.dtype, points=out), open("bench/2026-12-03-s14-avx512bf16/verify_cost.json", "w"), indent=1)
