# needs the previous exact.py beside the new one: git show 317462f:actors/models/exact.py > actors/models/exact_old.py (delete it after)
import sys, time, statistics, torch, types
from drafthorse.actors.models import loader, llama, exact, exact_old
from drafthorse.actors.models.llama import BatchItem
torch.set_num_threads(2)
dt = sys.argv[1]; ctx = int(sys.argv[2]) if len(sys.argv) > 2 else 300
lm = loader.load("smollm2", dtype=dt, max_len=2048)
m = lm.model
rows = m.exact_rows
cache = m.new_cache(2048)
m.forward_batch([BatchItem(torch.randint(0, 1000, (ctx,)), torch.arange(ctx), cache, 0, None)], prefill=True)
it = lambda p: BatchItem(torch.tensor([5]), torch.tensor([p]), cache, p, None)
null = types.SimpleNamespace(**{k: getattr(exact, k) for k in dir(exact) if not k.startswith('__')})
null.attend = lambda bks, k, v, q, s: q
one = types.SimpleNamespace(**{k: getattr(exact, k) for k in dir(exact) if not k.startswith('__')})
def att1(*a):
    torch.set_num_threads(1)
    try:
        return exact.attend(*a)
    finally:
        torch.set_num_threads(2)
one.attend = att1
res = {"old": [], "new": [], "null": [], "one": []}
for rnd in range(5):
    for name, mod in (("old", exact_old), ("new", exact), ("null", null), ("one", one)):
        llama._exact = mod
        for p in range(ctx, ctx + 5):
            m.logits(m.forward_batch([it(p)], exact=True)[0])
        t = time.perf_counter()
        for p in range(ctx, ctx + 30):
            m.logits(m.forward_batch([it(p)], exact=True)[0])
        res[name].append((time.perf_counter() - t) / 30 * 1e3)
print(dt, ctx, {k: [round(x, 2) for x in v] for k, v in res.items()},
      "median " + " ".join("%s %.2f" % (k, statistics.median(v)) for k, v in res.items()))
