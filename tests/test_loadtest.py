"""`drafthorse loadtest` without a cluster: prompts, percentiles, the loopback rule, and the load
loop itself against a fake Generator (in-process grpc.aio) whose timing is known. The run against
a real cluster is in test_openai_api.py (it shares that module's cluster)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from drafthorse.cluster.tools import loadtest as lt
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc

DEV = Path(__file__).resolve().parents[2] / "shared/data/spec_bench/dev.jsonl"


def _questions():
    qs = []
    for i in range(6):
        qs.append({"question_id": i, "category": "rag",
                   "turns": [f"Doc {i}: " + "alpha beta gamma delta " * (20 + 5 * i) + f"\nWhat is doc {i} about?"]})
        qs.append({"question_id": 100 + i, "category": "summarization",
                   "turns": [f"Summarize: Article {i}. " + "lorem ipsum dolor sit " * 30]})
        qs.append({"question_id": 200 + i, "category": "writing", "turns": [f"Write poem {i}."]})
    return qs


def test_percentile_nearest_rank():
    xs = list(range(1, 101))
    assert lt.percentile(xs, 50) == 50 and lt.percentile(xs, 99) == 99 and lt.percentile(xs, 100) == 100
    assert lt.percentile([3.0], 99) == 3.0 and lt.percentile([], 50) is None
    assert lt.percentile([5, 1, 3], 50) == 3


@pytest.mark.parametrize("server,ok", [("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:50051", True),
                                       ("127.0.0.9:80", True), ("8.8.8.8:50051", False), ("10.0.0.1:1", False)])
def test_loopback_only_unless_allowed(server, ok):
    if ok:
        assert lt.check_server(server) == server
    else:
        with pytest.raises(ValueError, match="loopback"):
            lt.check_server(server)
        assert lt.check_server(server, allow_remote=True) == server


@pytest.mark.parametrize("server", ["127.0.0.1", "host:port", ":50051", "127.0.0.1:70000"])
def test_malformed_server(server):
    with pytest.raises(ValueError, match="HOST:PORT"):
        lt.check_server(server)


def test_question_prompts_interleave_categories():
    ps = lt.question_prompts(_questions())
    assert len(ps) == 18
    assert ps[0].startswith("Doc 0") and ps[1].startswith("Summarize: Article 0") and ps[2] == "Write poem 0."


def test_long_context_prompts_end_with_a_question_and_fit():
    qs = _questions()
    ps = lt.long_context_prompts(qs, context_tokens=400)
    assert len(ps) == 12  # one per rag / summarization question
    for p in ps:
        assert lt.approx_tokens(p) <= 400 + 2
        assert p.rstrip().splitlines()[-1].startswith("Question: ")
        assert p.count("\n\n") >= 2, "several documents"
    assert ps[0].endswith("Question: What is doc 0 about?")
    assert len(set(ps)) == len(ps)
    with pytest.raises(ValueError, match="context-tokens"):
        lt.long_context_prompts(qs, context_tokens=20)
    with pytest.raises(ValueError, match="rag or summarization"):
        lt.long_context_prompts([q for q in qs if q["category"] == "writing"])


@pytest.mark.skipif(not DEV.is_file(), reason="needs the Spec-Bench dev file")
def test_long_context_from_the_dev_file_is_about_4k_tokens():
    from drafthorse.cluster.tools.bench import load_questions
    ps = lt.long_context_prompts(load_questions(DEV), n=10)
    sizes = [lt.approx_tokens(p) for p in ps]
    assert all(3000 <= n <= lt.DEFAULT_CONTEXT_TOKENS for n in sizes), sizes


def test_validate_args():
    good = dict(prompts=["p"], drafters=["none"], concurrency=[1], requests=1, max_seconds=1, max_new_tokens=1,
                rate=None)
    lt.validate_args(**good)
    for bad in (dict(prompts=[]), dict(drafters=[]), dict(concurrency=[0]), dict(requests=0), dict(max_seconds=0),
                dict(max_new_tokens=0), dict(rate=0.0)):
        with pytest.raises(ValueError):
            lt.validate_args(**(good | bad))


# ---------------------------------------------------------------- against a fake gateway

class FakeGenerator(pb_grpc.GeneratorServicer):
    """`max_new_tokens` tokens, 2 per message, `step_s` apart; drafter "bad" -> INVALID_ARGUMENT,
    prompt "boom" -> UNAVAILABLE. Counts requests in flight."""

    def __init__(self, step_s: float = 0.01):
        self.step_s, self.inflight, self.peak, self.prompts = step_s, 0, 0, []
        self.fixed: dict[str, set[bool]] = {}   # drafter -> fixed_tree values seen

    async def Generate(self, r, context):
        if r.drafter == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown drafter 'bad'")
        text = r.chat.messages[0].content
        if text == "boom":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no worker")
        self.prompts.append(text)
        self.fixed.setdefault(r.drafter, set()).add(r.fixed_tree)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            n = r.max_new_tokens
            for i in range(0, n, 2):
                await asyncio.sleep(self.step_s)
                k = min(2, n - i)
                msg = pb.GenerateResponse(token_ids=[7] * k, text_delta="x" * k)
                if i + k >= n:
                    msg.finish_reason = "length"
                    fwd = (n + 1) // 2
                    msg.stats.CopyFrom(pb.GenerateStats(prompt_tokens=len(text), generated_tokens=n,
                                                        target_forwards=fwd, drafter=r.drafter,
                                                        budget_nodes=3 * (fwd - 1), mean_batch_size=1.5))
                yield msg
        finally:
            self.inflight -= 1


def _with_fake(fn, step_s: float = 0.01):
    async def main():
        server = grpc.aio.server()
        fake = FakeGenerator(step_s)
        pb_grpc.add_GeneratorServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await fn(f"127.0.0.1:{port}", fake)
        finally:
            await server.stop(None)
    return asyncio.run(main())


def test_closed_loop_levels_and_metrics():
    async def go(addr, fake):
        res = await lt.run_loadtest(addr, ["a", "bb", "ccc"], ["none", "ngram", "ngram-fixed"], [1, 3], requests=6,
                                    max_seconds=30, max_new_tokens=6)
        return res, fake
    # steps long against a request's own overhead (client and server share this machine's cores), so
    # that 3 clients in parallel are clearly faster than one however busy the machine is
    res, fake = _with_fake(go, step_s=0.05)
    assert [(lv["drafter"], lv["concurrency"]) for lv in res["levels"]] == \
        [("none", 1), ("ngram", 1), ("ngram-fixed", 1), ("none", 3), ("ngram", 3), ("ngram-fixed", 3)]
    assert fake.peak == 3
    # the -fixed series is the same drafter with the adaptive policy off for its requests
    assert fake.fixed == {"none": {False}, "ngram": {False, True}}
    # warm-up (one per drafter) then every level sends the same prompts in the same order
    assert fake.prompts[3:9] == ["a", "bb", "ccc"] * 2
    for lv in res["levels"]:
        assert lv["completed"] == lv["requests"] == 6 and lv["errors"] == {} and lv["truncated"] == 0
        assert lv["output_tokens"] == 36 and lv["throughput_tok_s"] > 0
        assert lv["mean_accepted_tokens"] == 2.0
        assert lv["prompt_tokens"] == {"min": 1, "mean": 2.0, "max": 3}
        assert lv["ttft_s"]["n"] == lv["tpot_s"]["n"] == lv["latency_s"]["n"] == 6
        assert 0.005 < lv["ttft_s"]["p50"] < lv["latency_s"]["p50"]
        assert lv["tpot_s"]["p50"] > 0  # 3 messages 50 ms apart carry 6 tokens: ~20 ms per token
        assert lv["server_stats_mean"]["generated_tokens"] == 6
        assert lv["mean_batch_size"] == 1.5
        assert lv["policy_nodes_per_step"] == (None if lv["drafter"] == "ngram-fixed" else 3.0)
    c1, c3 = res["levels"][0], res["levels"][3]
    assert c3["throughput_tok_s"] > 1.5 * c1["throughput_tok_s"], "3 clients in parallel should be faster"
    assert set(res["speedup"]) == {"ngram", "ngram-fixed"} and set(res["speedup"]["ngram"]) == {"1", "3"}


def test_open_loop_poisson_arrivals_capped_by_concurrency():
    async def go(addr, fake):
        return await lt.run_loadtest(addr, ["a"], ["ngram"], [2], requests=10, max_seconds=30, max_new_tokens=4,
                                     rate=200.0, warmup=False), fake
    res, fake = _with_fake(go, step_s=0.02)
    lv = res["levels"][0]
    assert res["env"]["mode"] == "open-loop" and lv["completed"] == 10
    assert fake.peak == 2
    # arrivals (5 ms apart on average) queue behind 2 slots of ~40 ms each: the wait is in the TTFT
    assert lv["ttft_s"]["p99"] > 0.1


def test_time_bound_truncates_in_flight_requests():
    async def go(addr, fake):
        return await lt.run_loadtest(addr, ["a"], ["none"], [2], requests=1000, max_seconds=0.3,
                                     max_new_tokens=1000, warmup=False), fake
    res, fake = _with_fake(go)
    lv = res["levels"][0]
    assert lv["completed"] == 0 and lv["truncated"] == 2 and lv["errors"] == {}
    assert lv["output_tokens"] > 0 and lv["throughput_tok_s"] > 0 and lv["wall_s"] < 0.6
    assert lv["ttft_s"]["p50"] is None  # latencies of finished requests only
    assert fake.inflight == 0, "the cut requests were cancelled on the server"


def test_errors_are_counted_by_status_and_bad_drafter_fails_the_warmup():
    async def go(addr, fake):
        res = await lt.run_loadtest(addr, ["a", "boom"], ["none"], [1], requests=4, max_seconds=30,
                                    max_new_tokens=2, warmup=False)
        with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
            await lt.run_loadtest(addr, ["a"], ["bad"], [1], requests=1, max_seconds=5, max_new_tokens=2)
        return res
    lv = _with_fake(go)["levels"][0]
    assert lv["completed"] == 2 and lv["errors"] == {"UNAVAILABLE": 2}
    assert lv["error_examples"] == ["no worker"]


def test_outputs_and_table(tmp_path):
    async def go(addr, fake):
        return await lt.run_loadtest(addr, ["a"], ["none", "ngram"], [1, 2], requests=2, max_seconds=30,
                                     max_new_tokens=4)
    res = _with_fake(go)
    js, png = lt.write_outputs(res, tmp_path)
    assert json.loads(js.read_text())["levels"] == res["levels"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = lt.format_table(res)
    assert table.count("\n") == 1 + len(res["levels"]) and "| ngram | 2 | 2/2 |" in table


def test_cli_refuses_a_remote_server_and_bad_arguments(tmp_path):
    from typer.testing import CliRunner

    from drafthorse.cluster.cli import app
    run = lambda *a: CliRunner().invoke(app, ["loadtest", "--out", str(tmp_path), *a])
    out = run("--server", "8.8.8.8:50051")
    assert out.exit_code == 2 and "loopback" in out.stderr
    out = run("--server", "127.0.0.1:1", "--concurrency", "1,x")
    assert out.exit_code == 2 and "--concurrency" in out.stderr
    out = run("--server", "127.0.0.1:1", "--questions", str(tmp_path / "missing.jsonl"))
    assert out.exit_code == 2 and "no such file" in out.stderr
    assert not list(tmp_path.iterdir()), "nothing written on errors"
