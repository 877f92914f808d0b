"""Where an exact 3,600-token prefill goes: torch profiler over BatchEngine.start (second run), operators by self time."""
import sys, time, torch
from torch.profiler import profile, ProfilerActivity
from drafthorse.actors.models import loader
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.engine import BatchEngine
from drafthorse.actors.spec.sampling import SamplingParams
torch.set_num_threads(2)
lm = loader.load("smollm2", "bfloat16")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 3600
prompt = [100 + (i * 37) % 20000 for i in range(n)]
engine = BatchEngine(set(), None)
kv = lm.model.new_pool(1, n + 8)
for rep in range(2):
    runner = ModelRunner(lm.model, cache=kv.cache(0))
    if rep == 1:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.start(runner, prompt, SamplingParams(max_new_tokens=1))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
    else:
        t = time.perf_counter()
        engine.start(runner, prompt, SamplingParams(max_new_tokens=1))
        print(n, f"tokens: first token in {time.perf_counter() - t:.2f} s (first run)")
