"""Where a decoding step's time goes (`drafthorse generate --profile`): the generation runs under
torch.profiler, and the report splits its wall time per target forward into torch operators (self time,
the heaviest by name) and what runs outside any operator (Python: engine, drafter, sampling, glue)."""
from __future__ import annotations

import time
from collections import defaultdict

from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile


def profile(fn, forwards_of, top: int = 12):
    """Run fn() under the profiler; returns (fn's result, report text). forwards_of(result) -> the
    number of target forwards it ran (the report's unit)."""
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    self_us: dict[str, float] = defaultdict(float)
    for e in events:
        self_us[e.name] += e.self_cpu_time_total
    # time inside operators = the top-level ones' total (children are inside their parents)
    inside = sum(e.cpu_time_total for e in events if e.cpu_parent is None) / 1e6
    n = max(1, forwards_of(result))
    per = lambda s: 1e3 * s / n   # seconds -> ms per target forward
    lines = [f"profile: {wall:.2f} s wall, {n} target forwards, {per(wall):.1f} ms per forward",
             f"  {'where':<44}{'ms/forward':>11}{'share':>8}"]
    for name, us in sorted(self_us.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {name[:43]:<44}{per(us / 1e6):>11.2f}{us / 1e6 / wall:>8.1%}")
    rest = sum(sorted(self_us.values(), reverse=True)[top:]) / 1e6
    lines.append(f"  {'other torch operators':<44}{per(rest):>11.2f}{rest / wall:>8.1%}")
    outside = max(0.0, wall - inside)
    lines.append(f"  {'outside operators (Python: engine, drafter)':<44}{per(outside):>11.2f}{outside / wall:>8.1%}")
    return result, "\n".join(lines)
