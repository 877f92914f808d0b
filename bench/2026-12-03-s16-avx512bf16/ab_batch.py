# needs the previous exact.py beside the new one: git show 317462f:actors/models/exact.py > actors/models/exact_old.py (delete it after)
"""A/B in one process: a batch-B exact decode step (B sequences on one pool, contexts 80..320), old vs new."""
import sys, time, statistics, torch
from drafthorse.actors.models import loader, llama, exact, exact_old
from drafthorse.actors.models.llama import BatchItem
torch.set_num_threads(2)
dt = sys.argv[1]; B = int(sys.argv[2])
lm = loader.load("smollm2", dtype=dt, max_len=1024)
m = lm.model
rows = m.exact_rows
pool = m.new_pool(B, 1024)
ctxs = [80 + (240 * j) // max(B - 1, 1) for j in range(B)]
for j, c in enumerate(ctxs):
    m.forward_batch([BatchItem(torch.randint(0, 1000, (c,)), torch.arange(c), pool.cache(j), 0, None)], prefill=True)
def step(k):
    items = [BatchItem(torch.tensor([5]), torch.tensor([c + k]), pool.cache(j), c + k, None) for j, c in enumerate(ctxs)]
    hs = m.forward_batch(items, exact=True)
    m.logits(torch.cat(hs))
res = {"old": [], "new": []}
for rnd in range(4):
    for name, mod in (("old", exact_old), ("new", exact)):
        llama._exact = mod
        step(0)
        t = time.perf_counter()
        for k in range(1, 9):
            step(k)
        res[name].append((time.perf_counter() - t) / 8 * 1e3)
print(dt, B, {k: [round(x, 1) for x in v] for k, v in res.items()},
      "median old %.1f new %.1f ms a step" % (statistics.median(res["old"]), statistics.median(res["new"])))
