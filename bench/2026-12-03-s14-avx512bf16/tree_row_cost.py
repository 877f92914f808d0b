"""Chain rows against tree rows (4 children a node) in a verify pass, after 256 tokens (runner.pass_cost)."""
import json, torch
torch.set_num_threads(2)
from drafthorse.actors.models import loader
from drafthorse.actors.models.runner import pass_cost
lm = loader.load("smollm2", "auto")
out = []
for rep in range(2):
    for br in (1, 2, 4):
        a, b = pass_cost(lm.model, 256, branches=br)
        out.append(dict(branches=br, rep=rep, a_ms=round(1e3 * a, 2), b_ms=round(1e3 * b, 2), b_over_a=round(b / a, 4)))
        print(out[-1], flush=True)
json.dump(dict(dtype=lm.dtype, context=256, points=out), open("bench/2026-12-03-s14-avx512bf16/tree_row_cost.json", "w"), indent=1)
