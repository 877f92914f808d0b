# non-attention part of a layer, eager vs torch.compile, at n rows
import sys, time, torch, statistics
import torch.nn.functional as F
from drafthorse.actors.models import loader, llama
from drafthorse.actors.models.quant import Int4Weight
torch.set_num_threads(2)
dt = sys.argv[1]
lm = loader.load("smollm2", dtype=dt, max_len=2048)
m = lm.model
H = m.config.hidden_size; nh, nkv, d = m.n_heads, m.n_kv, m.head_dim
eps = m.eps
cos_t, sin_t = m.rope["full_attention"] if "full_attention" in m.rope else next(iter(m.rope.values()))
def mm(x, w):
    return w.mm(x) if isinstance(w, Int4Weight) else x @ (w if isinstance(w, torch.Tensor) else w.dense())
def rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
def rot(x):
    a, b = x.chunk(2, -1); return torch.cat((-b, a), -1)
def pre(x, ln1, wqkv, cos, sin):
    h = rms(x, ln1)
    qk, v = mm(h, wqkv).split([(nh + nkv) * d, nkv * d], -1)
    qk = qk.view(-1, nh + nkv, d)
    q, k = (qk * cos + rot(qk) * sin).split([nh, nkv], 1)
    return q, k, v.view(-1, nkv, d)
def post(x, a, wo, ln2, wgu, wd):
    x = x + mm(a.reshape(x.shape[0], -1), wo)
    h = rms(x, ln2)
    g, u = mm(h, wgu).chunk(2, -1)
    return x + mm(F.silu(g) * u, wd)
def layer_all(x, pos, f_pre, f_post):
    cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]
    for w in m.layers:
        P = w.products
        q, k, v = f_pre(x, w.ln1, P["qkv"], cos, sin)
        x = f_post(x, q, P["o"], w.ln2, P["gate_up"], P["down"])   # q stands in for attention's output
    return x
cpre = torch.compile(pre, dynamic=True)
cpost = torch.compile(post, dynamic=True)
def t(f, n=20):
    for _ in range(3): f()
    s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e3
with torch.inference_mode():
    for rows in (1, 4):
        x = torch.randn(rows, H); pos = torch.arange(300, 300 + rows)
        t0 = time.perf_counter(); layer_all(x, pos, cpre, cpost); print("compile s", time.perf_counter() - t0)
        e = layer_all(x, pos, pre, post); c = layer_all(x, pos, cpre, cpost)
        print(dt, rows, "maxdiff", (e - c).abs().max().item())
        for r in range(2):
            print(dt, rows, "eager ms %.2f  compiled ms %.2f" % (t(lambda: layer_all(x, pos, pre, post)), t(lambda: layer_all(x, pos, cpre, cpost))))
print("--- whole stack, static")
whole = torch.compile(lambda x, pos: layer_all(x, pos, pre, post), dynamic=False)
with torch.inference_mode():
    x = torch.randn(1, H); pos = torch.arange(300, 301)
    t0 = time.perf_counter(); whole(x, pos); print("compile s", time.perf_counter() - t0)
    print("maxdiff", (whole(x, pos) - layer_all(x, pos, pre, post)).abs().max().item())
    for r in range(3):
        print("eager ms %.2f  whole ms %.2f" % (t(lambda: layer_all(x, pos, pre, post)), t(lambda: whole(x, pos))))
