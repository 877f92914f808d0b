import time, torch
from drafthorse.actors.models import loader
torch.set_num_threads(2)
lm = loader.load("smollm2", dtype="int4", max_len=2048)
m = lm.model
h = torch.randn(1, 576)
def t(f, n=30):
    for _ in range(3): f()
    s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e3
w = m.lm_head_t
print(type(w).__name__, getattr(w, "halves", None), w.shape, w.nbytes / 1e6, "MB")
print("lm_head ms", t(lambda: m.logits(h)))
for key, p in m.layers[0].products.items():
    x = torch.randn(1, p.shape[0]); print(key, p.shape, "%.3f ms" % t(lambda: p.mm(x), 100))
