# every layer's product streamed, per row count: x@w, wt@x.T, oneDNN packed (hint sizes)
import sys, time, torch
from drafthorse.actors.models import loader
torch.set_num_threads(2)
lm = loader.load("smollm2", dtype="float32", max_len=2048)
m = lm.model
def best(f, reps=3):
    f(); ts = []
    for _ in range(reps):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    return min(ts) * 1e3
hint = int(sys.argv[1]) if len(sys.argv) > 1 else 1
for key in ("qkv", "gate_up", "down", "o"):
    ws = [l.products[key] for l in m.layers]
    ws = [w.dense() if hasattr(w, "dense") else w for w in ws]
    wts = [w.t().contiguous() for w in ws]
    pk = [torch.ops.mkldnn._reorder_linear_weight(wt, hint) for wt in wts]
    for M in (1, 2, 3, 4, 5, 9, 16, 32, 64, 256):
        x = torch.randn(M, ws[0].shape[0])
        a = best(lambda: [x @ w for w in ws]); b = best(lambda: [wt @ x.t() for wt in wts])
        c = best(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in pk])
        print(key, M, "mm %.2f  t %.2f  onednn %.2f" % (a, b, c), flush=True)
wt = m.lm_head; w = m.lm_head_t if isinstance(m.lm_head_t, torch.Tensor) else m.lm_head_t.dense()
p = torch.ops.mkldnn._reorder_linear_weight(wt, hint)
for M in (1, 2, 4, 9, 16, 64):
    x = torch.randn(M, 576)
    print("head", M, "mm %.2f  t %.2f  onednn %.2f" % (best(lambda: x @ w), best(lambda: wt @ x.t()), best(lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], ""))), flush=True)
