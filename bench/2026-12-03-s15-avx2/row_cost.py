"""Verify cost by row count after 300 tokens (SmolLM2, auto dtype, 2 threads), with the transposed
layout's cut probed at the default row counts or at those given: `python row_cost.py [2,3,4,16]`."""
import time, statistics, torch, logging, sys
torch.set_num_threads(2)
from drafthorse.actors.models import loader, products
from drafthorse.actors.models.runner import ModelRunner, ROOT
if len(sys.argv) > 1: products.ROWS = tuple(int(x) for x in sys.argv[1].split(","))
logging.basicConfig(level=logging.INFO)
lm = loader.load("smollm2", "auto")
m = lm.model
print("head_cut", m.head_cut, {k: getattr(w, "cut", None) for k, w in m.layers[0].products.items()})
r = ModelRunner(m, 1024)
r.extend([i % 1000 + 5 for i in range(300)])
def t(n, reps=9):
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter(); lg,_=r.score(list(range(5,5+n)), [ROOT]+list(range(n-1))); lg.argmax(-1).tolist(); ts.append(time.perf_counter()-t0); r.discard()
    return statistics.median(ts)*1e3
for rep in range(2):
    print(" ".join(f"{n}:{t(n):.1f}" for n in (1,2,3,4,5,9)))
