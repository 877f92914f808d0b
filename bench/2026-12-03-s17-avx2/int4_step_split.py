import sys, time, statistics, torch, types
from drafthorse.actors.models import loader, llama, exact
from drafthorse.actors.models.llama import BatchItem
torch.set_num_threads(2)
dt = sys.argv[1]; ctx = 300
lm = loader.load("smollm2", dtype=dt, max_len=2048)
m = lm.model
cache = m.new_cache(2048)
m.forward_batch([BatchItem(torch.randint(0, 1000, (ctx,)), torch.arange(ctx), cache, 0, None)], prefill=True)
it = lambda p: BatchItem(torch.tensor([5]), torch.tensor([p]), cache, p, None)
null = types.SimpleNamespace(**{k: getattr(exact, k) for k in dir(exact) if not k.startswith('__')})
null.attend = lambda bks, k, v, q, s: q
res = {"exact": [], "sdpa": [], "null": []}
for rnd in range(4):
    for name in res:
        llama._exact = null if name == "null" else exact
        ex = name != "sdpa"
        for p in range(ctx, ctx + 5):
            m.logits(m.forward_batch([it(p)], exact=ex)[0])
        t = time.perf_counter()
        for p in range(ctx, ctx + 20):
            m.logits(m.forward_batch([it(p)], exact=ex)[0])
        res[name].append((time.perf_counter() - t) / 20 * 1e3)
print(dt, {k: [round(x, 1) for x in v] for k, v in res.items()})
