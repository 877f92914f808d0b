import sys, time, threading, json, torch
from collections import defaultdict
from drafthorse.actors.models import loader
from drafthorse.actors.engine import BatchEngine
from drafthorse.actors.scheduler import Scheduler, SlotPool, Request
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.drafters import make_drafter
from drafthorse.cluster.tools.bench import load_questions
torch.set_num_threads(2)
from drafthorse.actors.workers.worker import in_passing_thread
lm = in_passing_thread(lambda: loader.load("smollm2", "auto"))
qs = load_questions("/tmp/interleaved.jsonl")
prompts = [loader.chat_prompt(lm.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in qs]
conc = int(sys.argv[1]); N = int(sys.argv[2])
engine = BatchEngine(lm.eos_ids)
T = defaultdict(float); C = defaultdict(int)
def timed(name, f):
    def g(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T[name] += time.perf_counter() - t; C[name] += 1; return r
    return g
engine.step = timed("step", engine.step)
s = Scheduler(engine, SlotPool(lm.model, conc, 4096), max_waiting=4 * conc)
s._prefill = timed("prefill", s._prefill)
s._extend = timed("extend", s._extend)
s._start = timed("start", s._start)
todo = list(range(N)); lock = threading.Lock(); toks = [0]
def client():
    while True:
        with lock:
            if not todo: return
            i = todo.pop(0)
        r = Request(prompts[i], SamplingParams(max_new_tokens=64), make_drafter("none"))
        s.submit(r)
        while (st := r.out.get()) is not None:
            with lock: toks[0] += len(st.token_ids)
t = time.perf_counter()
th = [threading.Thread(target=client) for _ in range(conc)]
[x.start() for x in th]; [x.join() for x in th]
dt = time.perf_counter() - t
s.stop()
print(json.dumps({"concurrency": conc, "tok_s": round(toks[0] / dt, 2), "tokens": toks[0], "s": round(dt, 1),
                  "T": {k: round(v, 1) for k, v in T.items()}, "C": dict(C)}), flush=True)
