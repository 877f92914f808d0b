"""Per-token mask cost of three grammar engines on SmolLM2's tokenizer (49,152 tokens), one JSON schema.
Run: pip install llguidance xgrammar outlines-core (xgrammar --no-deps plus apache-tvm-ffi); python THIS out.json"""
import json, time, statistics, sys
import torch
from drafthorse.actors.models.loader import tokenizer_of

tok = tokenizer_of("smollm2")
V = len(tok)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "hobbies": {"type": "array", "items": {"type": "string"}}, "city": {"type": "string"}},
          "required": ["name", "age", "hobbies", "city"], "additionalProperties": False}
TEXT = json.dumps({"name": "Ada Lovelace", "age": 36, "hobbies": ["mathematics", "poetry", "horses"],
                   "city": "London"})
IDS = tok(TEXT, add_special_tokens=False)["input_ids"]
out = {"vocab": V, "tokens": len(IDS), "text": TEXT}

def report(name, compile_s, per):
    out[name] = {"compile_s": round(compile_s, 4), "mask_ms_mean": round(statistics.mean(per) * 1e3, 4),
                 "mask_ms_p50": round(statistics.median(per) * 1e3, 4), "mask_ms_max": round(max(per) * 1e3, 4)}
    print(name, out[name], flush=True)

# llguidance
import llguidance, llguidance.hf, llguidance.torch as lgt
t0 = time.perf_counter()
lltok = llguidance.hf.from_tokenizer(tok)
tok_s = time.perf_counter() - t0
t0 = time.perf_counter()
m = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))
c = time.perf_counter() - t0
bm = lgt.allocate_token_bitmask(1, lltok.vocab_size)
per = []
for t in IDS:
    t1 = time.perf_counter()
    lgt.fill_next_token_bitmask(m, bm, 0)
    per.append(time.perf_counter() - t1)
    assert m.consume_token(t), (t, m.get_error())
report("llguidance", c, per); out["llguidance"]["tokenizer_s"] = round(tok_s, 3)

# xgrammar
try:
    import xgrammar as xgr
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
    comp = xgr.GrammarCompiler(info)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = comp.compile_json_schema(json.dumps(SCHEMA))
    xm = xgr.GrammarMatcher(g)
    c = time.perf_counter() - t0
    xbm = xgr.allocate_token_bitmask(1, info.vocab_size)
    per = []
    for t in IDS:
        t1 = time.perf_counter()
        xm.fill_next_token_bitmask(xbm)
        per.append(time.perf_counter() - t1)
        assert xm.accept_token(t)
    report("xgrammar", c, per); out["xgrammar"]["tokenizer_s"] = round(tok_s, 3)
except Exception as e:
    out["xgrammar"] = {"error": f"{type(e).__name__}: {e}"[:300]}; print(out["xgrammar"])

# outlines-core
try:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    vocab = Vocabulary.from_pretrained if False else None
    from drafthorse.actors.models.tokenbytes import TokenBytes
    tb = TokenBytes(tok)
    eos = tok.eos_token_id
    vmap = {}
    for i in range(V):
        if i != eos:
            vmap.setdefault(tb(i), []).append(i)
    vocab = Vocabulary(eos, vmap)
    regex = build_regex_from_schema(json.dumps(SCHEMA))
    index = Index(regex, vocab)
    c = time.perf_counter() - t0
    guide = Guide(index)
    per = []
    for t in IDS:
        t1 = time.perf_counter()
        allowed = guide.get_tokens()
        mask = torch.zeros(V, dtype=torch.bool); mask[allowed] = True
        per.append(time.perf_counter() - t1)
        guide.advance(t)
    report("outlines_core", c, per)
except Exception as e:
    out["outlines_core"] = {"error": f"{type(e).__name__}: {e}"[:300]}; print(out["outlines_core"])
json.dump(out, open(sys.argv[1], "w"), indent=1)
