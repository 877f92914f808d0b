"""The API issue's goals checked against a running `make serve` (SmolLM2) with the real openai client.

    python api_check.py http://127.0.0.1:8000 api_check.json

1. logprobs / top_logprobs equal with speculation (ngram) and without;
2. n=4 returns 4 choices, each equal to the single-choice answer for its seed (seed + index);
3. a JSON schema answer parses and validates on 20 dev questions, identical with and without speculation;
4. a tool call round trip (required call, its result sent back, a text answer)."""
import json
import os
import sys
import time
from pathlib import Path

import jsonschema
import openai

BASE, OUT = sys.argv[1], Path(sys.argv[2])
MODEL = "smollm2"
DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "spec_bench" / "dev.jsonl"
client = openai.OpenAI(base_url=f"{BASE}/v1", api_key=os.environ.get("DRAFTHORSE_API_KEY", "unused"),
                       max_retries=0, timeout=600)
report: dict = {"model": MODEL, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def chat(content: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# 1. logprobs
q = "Explain why the sky is blue in two sentences."
runs = {d: chat(q, max_tokens=48, temperature=0, logprobs=True, top_logprobs=3, extra_body={"drafter": d})
        for d in ("none", "ngram")}
lps = {d: r.choices[0].logprobs.content for d, r in runs.items()}
report["logprobs"] = {
    "tokens": len(lps["none"]),
    "identical": [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in lps["none"]] ==
                 [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in lps["ngram"]],
    "max_abs_diff": max(abs(a.logprob - b.logprob) for a, b in zip(lps["none"], lps["ngram"])),
    "ngram_mean_accepted_tokens": runs["ngram"].model_extra["x_drafthorse"]["mean_accepted_tokens"],
}

# 2. n = 4
ask = dict(max_tokens=32, temperature=0.8, extra_body={"drafter": "ngram"})
singles = [chat("Write one sentence about horses.", seed=100 + i, **ask).choices[0].message.content for i in range(4)]
t0 = time.perf_counter()
multi = chat("Write one sentence about horses.", seed=100, n=4, **ask)
report["n4"] = {"choices": len(multi.choices),
                "each_equals_its_seed_alone": [c.message.content == singles[c.index] for c in multi.choices],
                "distinct_answers": len({c.message.content for c in multi.choices}),
                "seconds": round(time.perf_counter() - t0, 2),
                "prompt_tokens": multi.usage.prompt_tokens, "completion_tokens": multi.usage.completion_tokens}

# 3. JSON schema on 20 dev questions
schema = {"type": "object", "properties": {"topic": {"type": "string", "maxLength": 60},
                                          "answer": {"type": "string", "maxLength": 240}},
          "required": ["topic", "answer"], "additionalProperties": False}
fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
questions = [json.loads(line)["turns"][0] for line in DEV.read_text().splitlines()[:20]]
rows = []
for question in questions:
    out = {}
    for d in ("none", "ngram"):
        t0 = time.perf_counter()
        r = chat(question, max_tokens=160, temperature=0, response_format=fmt, extra_body={"drafter": d})
        out[d] = (r.choices[0].message.content, r.choices[0].finish_reason, time.perf_counter() - t0,
                  r.usage.completion_tokens)
    try:
        jsonschema.validate(json.loads(out["none"][0]), schema)
        valid = True
    except (ValueError, jsonschema.ValidationError):
        valid = False
    rows.append({"valid": valid, "finish_reason": out["none"][1], "identical": out["none"][0] == out["ngram"][0],
                 "none_s": round(out["none"][2], 3), "ngram_s": round(out["ngram"][2], 3), "tokens": out["none"][3]})
report["json_schema"] = {"questions": len(rows), "valid": sum(r["valid"] for r in rows),
                         "cut_by_max_tokens": sum(r["finish_reason"] == "length" for r in rows),
                         "identical": sum(r["identical"] for r in rows),
                         "none_s": round(sum(r["none_s"] for r in rows), 2),
                         "ngram_s": round(sum(r["ngram_s"] for r in rows), 2), "rows": rows}

# 4. tool call round trip
weather = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
                   "additionalProperties": False}}}
msgs = [{"role": "user", "content": "What is the weather in Paris right now?"}]
r = client.chat.completions.create(model=MODEL, messages=msgs, tools=[weather], tool_choice="required", max_tokens=60,
                                   temperature=0)
call = r.choices[0].message.tool_calls[0]
msgs += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
         {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "clear"})}]
r2 = client.chat.completions.create(model=MODEL, messages=msgs, tools=[weather], tool_choice="none", max_tokens=48,
                                    temperature=0)
auto = client.chat.completions.create(model=MODEL, messages=msgs[:1], tools=[weather], max_tokens=60, temperature=0)
report["tools"] = {"call": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                   "finish_reason": r.choices[0].finish_reason, "answer_after_result": r2.choices[0].message.content,
                   "auto": (auto.choices[0].finish_reason, auto.choices[0].message.content,
                            [c.function.model_dump() for c in auto.choices[0].message.tool_calls or []])}
OUT.write_text(json.dumps(report, indent=1) + "\n")
print(json.dumps({k: v for k, v in report.items() if k != "json_schema"} |
                 {"json_schema": {k: v for k, v in report["json_schema"].items() if k != "rows"}}, indent=1))
