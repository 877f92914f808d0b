"""Load test of a running cluster through its gRPC gateway: throughput and latency under concurrency,
plain decoding vs speculative drafters, optionally with ~4k-token prompts.

    prompts = question_prompts(load_questions("dev.jsonl"))        # or long_context_prompts(...)
    results = asyncio.run(run_loadtest("127.0.0.1:50051", prompts, drafters=["none", "ngram"],
                                       concurrency=[1, 4, 16, 32]))
    write_outputs(results, Path("out"))                            # out/loadtest.json, out/loadtest.png

One grpc.aio channel, one asyncio task per request. Per concurrency level and drafter (a series):
- closed loop (default): `concurrency` clients each send their next request as soon as the previous
  one finished;
- open loop (`rate`): requests arrive as a Poisson process of `rate` requests/s whatever the server
  does; at most `concurrency` are in flight and an arrival waits for a slot (the wait counts in its
  TTFT and latency, as a user would see it).
A level ends after `requests` requests or `max_seconds`, whichever comes first; requests still in
flight at `max_seconds` are cancelled and reported as `truncated` (their tokens count in throughput,
not in latencies). Every level of every drafter sends the same prompts in the same order (greedy), so
series differ only in how the tokens were produced; each level has a cache_salt of its own, so no level
starts from prompts an earlier one left in the targets' prefix caches (drafters that never reuse a
cached prefix, as feature heads, would otherwise pay for prefills the others were spared). Levels run
concurrency-major, the drafters alternating, so that machine drift hits every series alike.

A series is a drafter name as requests give it (`none`, `ngram`, ...), sized per step by the server's
adaptive policy, or NAME-fixed (`ngram-fixed`): the same drafter with the full tree budget every step.

Metrics: throughput = output tokens / level wall time (first send .. last token); TTFT = send ->
first streamed token; TPOT = (last token - first token) / (tokens - 1); latency = send -> end;
mean accepted tokens = generated tokens / target forwards over the level's completed requests (from
each stream's final stats); what the adaptive policy chose: draft nodes per step and sequences per
target pass (batch); errors by gRPC status code. Percentiles are nearest-rank."""
from __future__ import annotations

import asyncio
import datetime as _dt
import json
import math
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from transformers import AutoTokenizer

from drafthorse.actors.models.loader import DEFAULT_MODEL, resolve
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.rpc import OPTIONS, is_loopback

LONG_CONTEXT_CATEGORIES = ("rag", "summarization")
DEFAULT_CONTEXT_TOKENS = 3700   # ~4k, leaving room for the reply inside the default max_len of 4096
WARMUP_TOKENS = 8


# ---------------------------------------------------------------- the server address

def split_server(server: str) -> tuple[str, int]:
    """HOST:PORT (or [V6]:PORT) -> (host, port); ValueError if malformed."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server must be HOST:PORT, got {server!r}")
    return host.strip("[]"), int(port)


def check_server(server: str, allow_remote: bool = False) -> str:
    host, _ = split_server(server)
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"{host} is not a loopback address: the load test only targets this machine "
                         f"(pass --allow-remote to load a server elsewhere, one you are allowed to load)")
    return server


# ---------------------------------------------------------------- prompts

def question_prompts(questions: list[dict]) -> list[str]:
    """First turn of each question, categories interleaved (a few requests already cover them all)."""
    by_cat: dict[str, list[str]] = {}
    for q in questions:
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    out: list[str] = []
    i = 0
    while len(out) < len(questions):
        for texts in by_cat.values():
            if i < len(texts):
                out.append(texts[i])
        i += 1
    return out


def approx_tokens(text: str) -> int:
    """~4 characters per token (English BPE): used when no tokenizer is at hand."""
    return max(1, math.ceil(len(text) / 4))


def long_context_prompts(questions: list[dict], context_tokens: int = DEFAULT_CONTEXT_TOKENS,
                         count_tokens: Callable[[str], int] = approx_tokens,
                         n: int | None = None) -> list[str]:
    """Prompts of about `context_tokens` tokens from the rag / summarization questions: several of
    their documents (other questions' texts) concatenated, then one question's own context and its
    question at the end (rag: the question in its last line; summarization: summarize that article).
    One prompt per such question (or `n`), each led by a different mix of documents."""
    anchors: list[tuple[str, str]] = []   # (context, question)
    for q in questions:
        text = q["turns"][0].strip()
        if q["category"] == "rag" and "\n" in text:
            context, question = text.rsplit("\n", 1)
            anchors.append((context.strip(), question.strip()))
        elif q["category"] == "summarization":
            anchors.append((text.removeprefix("Summarize:").strip(),
                            "Summarize the last article above in a few sentences."))
    if not anchors:
        raise ValueError("--long-context needs rag or summarization questions in the questions file")
    if context_tokens < 16:
        raise ValueError(f"context tokens must be >= 16, got {context_tokens}")
    sizes = [count_tokens(c) for c, _ in anchors]
    texts = [f"{c}\n\nAnswer using the documents above.\nQuestion: {q}" for c, q in anchors]
    tails = [(t, j, count_tokens(t)) for j, t in enumerate(texts)]   # (text, its anchor, tokens)
    fitting = [t for t in tails if t[2] <= context_tokens]
    if not fitting:
        raise ValueError(f"--context-tokens {context_tokens} is below every rag/summarization text "
                         f"(the shortest makes a {min(t[2] for t in tails)}-token prompt)")
    prompts = []
    for i in range(n or len(fitting)):
        tail, own, size = fitting[i % len(fitting)]
        budget = context_tokens - size
        docs: list[str] = []
        for k in range(1, len(anchors)):
            j = (own + k) % len(anchors)
            if sizes[j] + 1 > budget:
                continue
            docs.append(anchors[j][0])
            budget -= sizes[j] + 1
        prompts.append("\n\n".join(docs + [tail]))
    return prompts


def tokenizer_counter(model: str = "smollm2") -> Callable[[str], int] | None:
    """Token counter of `model`'s tokenizer (what the gateway renders with), None if unavailable."""
    try:

        directory, gguf = resolve(DEFAULT_MODEL if model.startswith("tiny:") else model)
        tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    except Exception:  # noqa: BLE001 - fall back to the estimate
        return None
    return lambda text: len(tok.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------- measurement

def percentile(xs: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no data."""
    xs = sorted(xs)
    if not xs:
        return None
    return xs[max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))]


def _dist(xs: list[float]) -> dict:
    r = lambda v: None if v is None else round(v, 6)
    return {"p50": r(percentile(xs, 50)), "p99": r(percentile(xs, 99)),
            "mean": r(statistics.fmean(xs)) if xs else None, "n": len(xs)}


FIXED = "-fixed"   # series suffix: no adaptive policy


def _request(prompt: str, drafter: str, max_new_tokens: int, salt: str) -> pb.GenerateRequest:
    fixed = drafter.endswith(FIXED)
    r = pb.GenerateRequest(max_new_tokens=max_new_tokens, drafter=drafter.removesuffix(FIXED), fixed_tree=fixed,
                           cache_salt=salt)
    r.chat.messages.add(role="user", content=prompt)
    return r


async def _one(stub, prompt: str, drafter: str, max_new_tokens: int, sent: float, timeout_s: float,
               salt: str = "") -> dict:
    """One streamed generation; times are perf_counter seconds."""
    rec: dict[str, Any] = {"sent": sent, "first": None, "last": None, "end": None, "tokens": 0, "code": "OK",
                           "stats": None, "finish_reason": None}
    call = stub.Generate(_request(prompt, drafter, max_new_tokens, salt), timeout=timeout_s)
    try:
        async for msg in call:
            now = time.perf_counter()
            if msg.token_ids:
                rec["first"] = rec["first"] or now
                rec["last"] = now
                rec["tokens"] += len(msg.token_ids)
            if msg.finish_reason:
                rec["finish_reason"] = msg.finish_reason
                rec["stats"] = msg.stats
    except grpc.aio.AioRpcError as e:
        rec["code"] = e.code().name
        rec["details"] = e.details()
    except asyncio.CancelledError:
        call.cancel()
        rec["code"] = "TRUNCATED"
    rec["end"] = time.perf_counter()
    return rec


async def run_level(stub, prompts: list[str], drafter: str, concurrency: int, requests: int,
                    max_seconds: float, max_new_tokens: int, rate: float | None = None,
                    rng: random.Random | None = None, timeout_s: float = 600.0, salt: str = "") -> dict:
    """One drafter at one concurrency: `requests` requests (prompts in order) or `max_seconds`; salt: the
    requests' cache_salt."""
    rng = rng or random.Random(0)
    records: list[dict] = []
    t0 = time.perf_counter()
    deadline = t0 + max_seconds
    budget = lambda: max(0.001, min(timeout_s, deadline - time.perf_counter() + 1.0))

    if rate is None:  # closed loop
        counter = iter(range(requests))

        async def client():
            for k in counter:
                if time.perf_counter() >= deadline:
                    return
                records.append(await _one(stub, prompts[k % len(prompts)], drafter, max_new_tokens,
                                          time.perf_counter(), budget(), salt))
        tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    else:  # open loop: Poisson arrivals, at most `concurrency` in flight
        slots = asyncio.Semaphore(concurrency)

        async def arrival(k: int, sent: float):
            async with slots:
                records.append(await _one(stub, prompts[k % len(prompts)], drafter, max_new_tokens,
                                          sent, budget(), salt))
        tasks = []
        at = t0
        for k in range(requests):
            at += rng.expovariate(rate)
            if at >= deadline:
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(arrival(k, at)))
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter())) if tasks \
        else (set(), set())
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return summarize_level(records, drafter, concurrency, rate, t0)


def summarize_level(records: list[dict], drafter: str, concurrency: int, rate: float | None, t0: float) -> dict:
    ok = [r for r in records if r["code"] == "OK"]
    truncated = [r for r in records if r["code"] == "TRUNCATED"]
    errors: dict[str, int] = {}
    for r in records:
        if r["code"] not in ("OK", "TRUNCATED"):
            errors[r["code"]] = errors.get(r["code"], 0) + 1
    ends = [r["last"] or r["end"] for r in ok + truncated if r["tokens"]]
    wall = (max(ends) - t0) if ends else 0.0
    tokens = sum(r["tokens"] for r in ok + truncated)
    gen = sum(r["stats"].generated_tokens for r in ok if r["stats"] is not None)
    fwd = sum(r["stats"].target_forwards for r in ok if r["stats"] is not None)
    # decoding steps (prefill excluded): what the policy allowed per step, how many shared a pass
    steps = sum(r["stats"].target_forwards - 1 for r in ok if r["stats"] is not None)
    nodes = sum(r["stats"].budget_nodes for r in ok if r["stats"] is not None)
    batch = sum(r["stats"].mean_batch_size * (r["stats"].target_forwards - 1) for r in ok if r["stats"] is not None)
    prompt_tokens = [r["stats"].prompt_tokens for r in ok if r["stats"] is not None]
    server: dict[str, float] = {}  # mean of every numeric final-stats field (whatever the server reports)
    stats = [r["stats"] for r in ok if r["stats"] is not None]
    if stats:
        dicts = [MessageToDict(s, preserving_proto_field_name=True) for s in stats]
        for key in sorted({k for d in dicts for k in d}):
            vals = [d[key] for d in dicts if isinstance(d.get(key), (int, float)) and not isinstance(d[key], bool)]
            if vals:
                server[key] = round(statistics.fmean(vals), 6)
    return {
        "drafter": drafter, "concurrency": concurrency, "rate": rate,
        "requests": len(records), "completed": len(ok), "truncated": len(truncated),
        "errors": errors, "error_examples": sorted({r.get("details", "") for r in records
                                                    if r["code"] not in ("OK", "TRUNCATED")})[:3],
        "wall_s": round(wall, 4), "output_tokens": tokens,
        "throughput_tok_s": round(tokens / wall, 3) if wall > 0 else 0.0,
        "requests_per_s": round(len(ok) / wall, 4) if wall > 0 else 0.0,
        "ttft_s": _dist([r["first"] - r["sent"] for r in ok if r["first"] is not None]),
        "tpot_s": _dist([(r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]),
        "latency_s": _dist([r["end"] - r["sent"] for r in ok]),
        "mean_accepted_tokens": round(gen / fwd, 4) if fwd else None,
        "policy_nodes_per_step": round(nodes / steps, 3) if steps and not drafter.endswith(FIXED) else None,
        "mean_batch_size": round(batch / steps, 3) if steps else None,
        "prompt_tokens": {"min": min(prompt_tokens), "mean": round(statistics.fmean(prompt_tokens), 1),
                          "max": max(prompt_tokens)} if prompt_tokens else None,
        "server_stats_mean": server,
    }


class _Keyed:
    """The Generator stub, sending the API key (if any) with every call."""

    def __init__(self, stub, api_key: str):
        self.stub, self.metadata = stub, (("authorization", f"Bearer {api_key}"),) if api_key else None

    def Generate(self, request, **kw):
        return self.stub.Generate(request, metadata=self.metadata, **kw)


async def run_loadtest(server: str, prompts: list[str], drafters: list[str], concurrency: list[int],
                       requests: int = 32, max_seconds: float = 120.0, max_new_tokens: int = 128,
                       rate: float | None = None, seed: int = 0, warmup: bool = True,
                       progress: Callable[[str], None] | None = None, api_key: str = "") -> dict:
    """Every drafter at every concurrency level against the gateway at `server`; returns the results
    dict that write_outputs saves (validation of its arguments is the caller's: see validate_args)."""
    validate_args(prompts, drafters, concurrency, requests, max_seconds, max_new_tokens, rate)
    say = progress or (lambda _msg: None)
    levels: list[dict] = []
    run = uuid.uuid4().hex[:12]   # salts of this run's levels: nothing cached by an earlier run is reused
    async with grpc.aio.insecure_channel(server, options=OPTIONS) as channel:
        stub = _Keyed(pb_grpc.GeneratorStub(channel), api_key)
        if warmup:  # first-call costs out of the numbers; a bad drafter fails here, once, clearly
            for d in drafters:
                rec = await _one(stub, prompts[0], d, min(max_new_tokens, WARMUP_TOKENS), time.perf_counter(), 300,
                                 f"{run}:warm-up")
                if rec["code"] != "OK":
                    raise ValueError(f"warm-up request with drafter {d!r} failed: {rec['code']}: "
                                     f"{rec.get('details', '')}")
        for c in concurrency:
            for d in drafters:
                say(f"drafter {d}, concurrency {c}" + (f", {rate} req/s" if rate else "") + " ...")
                level = await run_level(stub, prompts, d, c, requests, max_seconds, max_new_tokens, rate,
                                        random.Random(seed), salt=f"{run}:{d}:{c}")
                levels.append(level)
                say(_line(level))
    return {"env": {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                    "server": server, "drafters": drafters, "concurrency": concurrency,
                    "mode": "open-loop" if rate else "closed-loop", "rate": rate,
                    "requests_per_level": requests, "max_seconds_per_level": max_seconds,
                    "max_new_tokens": max_new_tokens, "prompts": len(prompts), "seed": seed,
                    "cpu_count": os.cpu_count()},
            "levels": levels, "speedup": speedups(levels)}


def validate_args(prompts, drafters, concurrency, requests, max_seconds, max_new_tokens, rate) -> None:
    if not prompts:
        raise ValueError("no prompts")
    if not drafters or any(not d for d in drafters):
        raise ValueError("give at least one drafter (none, ngram, draft-model)")
    if not concurrency or any(c < 1 for c in concurrency):
        raise ValueError(f"concurrency levels must be >= 1, got {concurrency}")
    if requests < 1:
        raise ValueError(f"requests per level must be >= 1, got {requests}")
    if not max_seconds > 0:
        raise ValueError(f"max seconds per level must be > 0, got {max_seconds}")
    if max_new_tokens < 1:
        raise ValueError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")


def speedups(levels: list[dict]) -> dict:
    """{drafter: {concurrency: throughput / throughput of `none` at that concurrency}}."""
    base = {lv["concurrency"]: lv["throughput_tok_s"] for lv in levels if lv["drafter"] == "none"}
    out: dict[str, dict] = {}
    for lv in levels:
        b = base.get(lv["concurrency"])
        if lv["drafter"] != "none" and b:
            out.setdefault(lv["drafter"], {})[str(lv["concurrency"])] = round(lv["throughput_tok_s"] / b, 4)
    return out


# ---------------------------------------------------------------- outputs

def _ms(d: dict, key: str = "p50") -> str:
    return "-" if d.get(key) is None else f"{d[key] * 1000:.0f}"


def _line(lv: dict) -> str:
    errs = ", ".join(f"{k} {v}" for k, v in lv["errors"].items()) or "none"
    return (f"  {lv['drafter']} c={lv['concurrency']}: {lv['throughput_tok_s']:.1f} tok/s, "
            f"TTFT p50 {_ms(lv['ttft_s'])} ms, TPOT p50 {_ms(lv['tpot_s'])} ms, "
            f"acc {lv['mean_accepted_tokens']}, {lv['completed']}/{lv['requests']} ok, errors: {errs}")


def format_table(results: dict) -> str:
    head = ["drafter", "conc", "ok/req", "tok/s", "×none", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
            "latency p50/p99 ms", "acc", "nodes/step", "batch", "prompt tok", "errors"]
    rows = []
    sp = results.get("speedup", {})
    for lv in results["levels"]:
        x = sp.get(lv["drafter"], {}).get(str(lv["concurrency"]))
        pt = lv["prompt_tokens"]
        rows.append([lv["drafter"], str(lv["concurrency"]), f"{lv['completed']}/{lv['requests']}",
                     f"{lv['throughput_tok_s']:.1f}", "-" if x is None else f"{x:.2f}",
                     f"{_ms(lv['ttft_s'])}/{_ms(lv['ttft_s'], 'p99')}",
                     f"{_ms(lv['tpot_s'])}/{_ms(lv['tpot_s'], 'p99')}",
                     f"{_ms(lv['latency_s'])}/{_ms(lv['latency_s'], 'p99')}",
                     "-" if lv["mean_accepted_tokens"] is None else f"{lv['mean_accepted_tokens']:.2f}",
                     "-" if lv.get("policy_nodes_per_step") is None else f"{lv['policy_nodes_per_step']:.2f}",
                     "-" if lv.get("mean_batch_size") is None else f"{lv['mean_batch_size']:.1f}",
                     "-" if pt is None else f"{pt['mean']:.0f}",
                     ", ".join(f"{k}:{v}" for k, v in lv["errors"].items()) or "-"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(results: dict, path: str | os.PathLike) -> None:
    """Two panels against concurrency, one line per drafter: throughput, and TTFT p50."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred: plots only
    from matplotlib.figure import Figure  # deferred: plots only

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for d in results["env"]["drafters"]:
        lv = sorted((x for x in results["levels"] if x["drafter"] == d), key=lambda x: x["concurrency"])
        cs = [x["concurrency"] for x in lv]
        ax1.plot(cs, [x["throughput_tok_s"] for x in lv], marker="o", label=d)
        ax2.plot(cs, [(x["ttft_s"]["p50"] or float("nan")) * 1000 for x in lv], marker="o", label=d)
    for ax, label in ((ax1, "throughput (output tokens/s)"), (ax2, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(results["env"]["concurrency"])
        ax.set_xticklabels([str(c) for c in results["env"]["concurrency"]])
        ax.set_xlabel("concurrency" + (" (max in flight)" if results["env"]["rate"] else ""))
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    env = results["env"]
    pt = [x["prompt_tokens"]["mean"] for x in results["levels"] if x["prompt_tokens"]]
    title = env["mode"] + (f" at {env['rate']} req/s" if env["rate"] else "") + f" · {env['max_new_tokens']} new tokens"
    if pt:
        title += f" · prompts ~{statistics.fmean(pt):.0f} tokens"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(results: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, png = out_dir / "loadtest.json", out_dir / "loadtest.png"
    js.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plot(results, png)
    return js, png
