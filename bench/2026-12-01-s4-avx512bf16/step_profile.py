import torch, time, sys
from drafthorse.actors.models import loader
from drafthorse.actors.models.runner import ModelRunner, score_batch
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(2)
lm = loader.load("smollm2", "bfloat16")
m = lm.model
B = int(sys.argv[1])
ctxs = [60 + (7 * i) % 40 for i in range(B)]
pool = m.new_pool(B, 512)
rs = [ModelRunner(m, cache=pool.cache(i)) for i in range(B)]
for r, n in zip(rs, ctxs):
    r.extend(list(range(100, 100 + n)))
def step():
    lg = score_batch(rs, [[5]] * B, [[-1]] * B)
    for r in rs: r.commit([0])
for _ in range(3): step()
ts = []
for _ in range(10):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
print(B, "step ms p50", round(sorted(ts)[5] * 1e3, 1))
with profile(activities=[ProfilerActivity.CPU]) as p:
    t = time.perf_counter()
    for _ in range(5): step()
    wall = time.perf_counter() - t
ev = p.key_averages()
print("wall per step", round(wall / 5 * 1e3, 1))
print(ev.table(sort_by="self_cpu_time_total", row_limit=18))
