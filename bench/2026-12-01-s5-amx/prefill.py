import sys, time, torch, cProfile, pstats
from drafthorse.actors.models import loader
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.engine import BatchEngine
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.drafters import make_drafter
torch.set_num_threads(2)
lm = loader.load("smollm2", "bfloat16")
n = int(sys.argv[1])
prompt = [100 + (i * 37) % 20000 for i in range(n)]
engine = BatchEngine(set(), None)
kv = lm.model.new_pool(1, n + 8)
for rep in range(2):
    runner = ModelRunner(lm.model, cache=kv.cache(0))
    t = time.perf_counter()
    if rep == 1 and len(sys.argv) > 2:
        pr = cProfile.Profile(); pr.enable()
    _, step = engine.start(runner, prompt, SamplingParams(max_new_tokens=1), make_drafter("none"))
    print(n, "tokens: first token", step.token_ids, f"{time.perf_counter() - t:.2f} s")
    if rep == 1 and len(sys.argv) > 2:
        pr.disable(); pstats.Stats(pr).sort_stats("tottime").print_stats(15)
