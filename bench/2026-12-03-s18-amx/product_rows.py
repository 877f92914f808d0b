"""Row-invariance and call cost of bfloat16 products of SmolLM2's shapes (random weights) at 64, 128 and 256 rows a call
against 1-row calls (what decode rows use); one weight timed in a loop (cache-resident: indicative only)."""
import time, torch
torch.set_num_threads(2)
torch.manual_seed(0)
for name, (k, n) in {"qkv": (576, 960), "gate_up": (576, 3072), "down": (1536, 576)}.items():
    w = (torch.randn(k, n) * 0.02).bfloat16()
    x = torch.randn(256, k).bfloat16()
    one = torch.cat([x[i:i + 1] @ w for i in range(256)])
    same = {r: torch.equal(torch.cat([x[i:i + r] @ w for i in range(0, 256, r)]), one) for r in (64, 128, 256)}
    t = {}
    for r in (64, 256):
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20):
                torch.cat([x[i:i + r] @ w for i in range(0, 256, r)])
            t[r] = (time.perf_counter() - t0) / 20 * 1e3
    print(name, "row-invariant with 1-row calls at", same, f"256 rows as 4x64: {t[64]:.3f} ms, as 1x256: {t[256]:.3f} ms")
