"""The OpenAI-compatible HTTP API (Ray Serve's HTTP ingress) with the real `openai` client, and the
load test, against one running cluster of tiny models: outputs equal the gRPC path's, errors come
back in OpenAI's format with the right status codes."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid

import grpc
import openai
import pytest

from actors.spec.sampling import SamplingParams
from cluster.redis_store import free_port
from cluster.app import Cluster
from cluster.client import request
from cluster.settings import Settings
from protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc

MODEL = "tiny:0"
N = 16


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    s = Settings(model=MODEL, draft_model="tiny:1", num_targets=1, num_drafts=1, gateway_port=free_port(),
                 http_port=free_port(), worker_num_cpus=0.25, heartbeat_s=0.5, sessions_per_target=8,
                 max_len=512, key_prefix=f"dh-http-{uuid.uuid4().hex[:8]}:")
    c = Cluster(s).start(timeout_s=300)
    yield c
    c.stop()
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(cluster.gateway) as ch:
        yield pb_grpc.GeneratorStub(ch)


def grpc_text(stub, prompt: str, raw: bool, drafter: str = "ngram", n: int = N, stop=()) -> tuple[str, list, object]:
    msgs = list(stub.Generate(request(prompt, SamplingParams(max_new_tokens=n, stop=tuple(stop)), drafter, raw=raw),
                              timeout=120))
    return "".join(m.text_delta for m in msgs), [t for m in msgs for t in m.token_ids], msgs[-1]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"


@pytest.mark.parametrize("drafter", ["ngram", "none"])
def test_chat_equals_grpc(client, stub, drafter):
    text, ids, last = grpc_text(stub, "Tell me about speculative decoding.", raw=False, drafter=drafter)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content":
                                                                "Tell me about speculative decoding."}],
                                       max_tokens=N, temperature=0, extra_body={"drafter": drafter})
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == last.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (last.stats.prompt_tokens, len(ids)) == \
        (last.stats.prompt_tokens, N)
    assert r.usage.total_tokens == r.usage.prompt_tokens + N
    x = r.model_extra["x_drafthorse"]
    assert x["drafter"] == drafter and x["generated_tokens"] == N and x["mean_accepted_tokens"] >= 1.0


def test_completion_equals_grpc(client, stub):
    prompt = "the cat sat on the mat, the cat sat on the"
    text, ids, last = grpc_text(stub, prompt, raw=True)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text
    assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == last.stats.prompt_tokens
    assert r.choices[0].finish_reason == "length"
    # a list holding exactly one string is the same request
    assert client.completions.create(model=MODEL, prompt=[prompt], max_tokens=N, temperature=0).choices[0].text == text


def test_stop_string_finishes_with_stop(client, stub):
    prompt = "one two three one two three one two"
    full, _, _ = grpc_text(stub, prompt, raw=True, n=24)
    assert len(full) > 4
    stop = full[len(full) // 2: len(full) // 2 + 3]
    text, _, last = grpc_text(stub, prompt, raw=True, n=24, stop=[stop])
    assert last.finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "stop" and stop not in text


def test_streaming_chat_gathers_the_same_text(client, stub):
    text, ids, _ = grpc_text(stub, "Why is the sky blue?", raw=False)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Why is the sky blue?"}], max_tokens=N, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["x_drafthorse"]["generated_tokens"] == N
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids) == N
    assert len({c.id for c in chunks}) == 1


def test_streaming_completion(client, stub):
    prompt = "a b c d a b c d a b"
    text, _, _ = grpc_text(stub, prompt, raw=True)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=N, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sessions_through_http(client):
    msgs = [{"role": "user", "content": "hello there, how are you?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0,
                                        extra_body={"new_session": True})
    sid = r1.model_extra["x_drafthorse"]["session_id"]
    assert sid
    r2 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "and then what?"}],
                                        max_tokens=8, temperature=0, extra_body={"session_id": sid})
    assert r2.model_extra["x_drafthorse"]["session_id"] == sid
    assert r2.usage.prompt_tokens > r1.usage.prompt_tokens + r1.usage.completion_tokens  # the history came along
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                       extra_body={"session_id": uuid.uuid4().hex})
    assert e.value.status_code == 404 and e.value.param == "session_id" and e.value.code == "session_not_found"


def _chat(client, **kw):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0) | kw
    return client.chat.completions.create(**args)


@pytest.mark.parametrize("kw,param", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=10**6), "max_tokens"),
    (dict(n=2), "n"),
    (dict(seed=-5), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(extra_body={"drafter": "nope"}), "drafter"),
    (dict(extra_body={"temperature": "hot"}), "temperature"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(logprobs=True), "logprobs"),
])
def test_bad_request_is_400_with_the_param_named(client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, **kw)
    assert e.value.status_code == 400, e.value.body
    assert e.value.param == param, e.value.body
    assert e.value.type == "invalid_request_error" and e.value.message


@pytest.mark.parametrize("prompt,stream", [(["a", "b"], False), ([[1, 2, 3]], False), (["a", "b"], True), ("", False)])
def test_completion_prompt_must_be_one_string(client, prompt, stream):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=stream)
    assert e.value.status_code == 400 and e.value.param == "prompt"


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404(client, stream):
    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, model="gpt-4o", stream=stream)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.param == "model"


def test_malformed_json_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", cast_to=object, content=b'{"model": "tiny:0", "messages": [',
                    options={"headers": {"Content-Type": "application/json"}})
    assert e.value.status_code == 400 and e.value.code == "invalid_json"
    with pytest.raises(openai.BadRequestError) as e:  # valid JSON, missing a required field
        client.post("/completions", cast_to=object, body={"model": MODEL})
    assert e.value.status_code == 400 and e.value.param == "prompt"


def test_unknown_route_is_404_in_openai_format(cluster):
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{cluster.http}/v1/embeddings", data=b"{}", timeout=30)
    assert e.value.code == 404
    assert "message" in json.loads(e.value.read())["error"]


def test_concurrent_http_requests(client):
    import concurrent.futures as cf
    prompts = ["x y z x y z x y", "hello hello hello", "1, 2, 3, 4, 1, 2, 3, 4", "Say hi"]
    one = lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0)  # noqa: E731
    alone = [one(p).choices[0].text for p in prompts]
    with cf.ThreadPoolExecutor(8) as pool:
        together = [r.choices[0].text for r in pool.map(one, prompts * 2)]
    assert together == alone * 2


# ---------------------------------------------------------------- drafthorse loadtest, same cluster

def _loadtest(cluster, tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "cluster.cli", "loadtest", "--server", cluster.gateway,
                           "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=300)


def test_loadtest_closed_loop(cluster, tmp_path):
    out = _loadtest(cluster, tmp_path, "--concurrency", "1,2", "--requests", "4", "--max-new-tokens", "8",
                    "--drafters", "none,ngram")
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "loadtest.json").read_text())
    assert (tmp_path / "loadtest.png").stat().st_size > 1000
    assert [(lv["drafter"], lv["concurrency"]) for lv in res["levels"]] == \
        [("none", 1), ("ngram", 1), ("none", 2), ("ngram", 2)]
    for lv in res["levels"]:
        assert lv["completed"] == lv["requests"] == 4 and lv["errors"] == {}
        assert lv["output_tokens"] == 32 and lv["throughput_tok_s"] > 0
        for key in ("ttft_s", "tpot_s", "latency_s"):
            assert lv[key]["n"] == 4 and 0 < lv[key]["p50"] <= lv[key]["p99"]
        assert lv["mean_accepted_tokens"] >= 1.0
        assert lv["prompt_tokens"]["min"] > 0
    assert set(res["speedup"]) == {"ngram"}
    assert "| ngram | 2 | 4/4 |" in out.stdout


def test_loadtest_open_loop_long_context_and_errors(cluster, tmp_path):
    out = _loadtest(cluster, tmp_path, "--concurrency", "2", "--requests", "3", "--max-new-tokens", "4",
                    "--drafters", "ngram", "--rate", "20", "--long-context", "--context-tokens", "350")
    assert out.returncode == 0, out.stderr
    res = json.loads((tmp_path / "loadtest.json").read_text())
    lv = res["levels"][0]
    assert res["env"]["mode"] == "open-loop" and lv["completed"] == 3
    assert 250 < lv["prompt_tokens"]["mean"] < 420  # <= 350 tokens + the chat template
    assert res["env"]["prompt_tokens_client"]["max"] <= 350
    # an unknown drafter fails the warm-up clearly; a remote server is refused
    bad = _loadtest(cluster, tmp_path, "--drafters", "nope", "--requests", "1")
    assert bad.returncode == 2 and "nope" in bad.stderr
    remote = subprocess.run([sys.executable, "-m", "cluster.cli", "loadtest", "--server", "8.8.8.8:50051"],
                            capture_output=True, text=True, timeout=60)
    assert remote.returncode == 2 and "loopback" in remote.stderr


def test_loadtest_is_bounded_in_time(cluster, tmp_path):
    import time
    t0 = time.monotonic()
    out = _loadtest(cluster, tmp_path, "--concurrency", "2", "--requests", "1000", "--max-new-tokens", "200",
                    "--drafters", "none", "--max-seconds", "2")
    assert out.returncode == 0, out.stderr
    lv = json.loads((tmp_path / "loadtest.json").read_text())["levels"][0]
    assert lv["requests"] < 1000 and lv["truncated"] <= 2 and lv["errors"] == {}
    assert lv["wall_s"] < 4 and time.monotonic() - t0 < 60


def test_raw_sse_format(cluster):
    import urllib.request
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                       "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"{cluster.http}/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    assert "x_drafthorse" in chunks[-1] and all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_client_disconnect_stops_the_generation(cluster, client):
    import time

    from cluster.redis_store import connect
    from cluster.registry import Registry
    reg = Registry(connect(cluster.s.redis_url), cluster.s.key_prefix)
    stream = client.completions.create(model=MODEL, prompt="count slowly", max_tokens=450, temperature=0,
                                       stream=True, extra_body={"drafter": "none"})
    next(iter(stream))
    assert any(reg.load(w.worker_id) for w in reg.alive("target")), "the generation should be running"
    stream.close()
    deadline = time.monotonic() + 1.0  # the whole generation takes ~2 s here
    while any(reg.load(w.worker_id) for w in reg.alive("target")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(reg.load(w.worker_id) for w in reg.alive("target")), "the target kept generating"


# ---------------------------------------------------------------- the mapping alone (a fake gateway, no cluster)

class _Recorder(pb_grpc.GeneratorServicer):
    def __init__(self):
        self.requests = []

    def Generate(self, r, context):
        from protos.drafthorse.v1 import drafthorse_pb2 as pb
        self.requests.append(r)
        if r.session_id == "gone":
            context.abort(grpc.StatusCode.NOT_FOUND, f"session {r.session_id!r} not found (expired?)")
        if r.drafter == "busy":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "all KV caches are in use")
        yield pb.GenerateResponse(seq=0, token_ids=[1, 2], text_delta="ab")
        yield pb.GenerateResponse(seq=1, token_ids=[3], text_delta="c", finish_reason="stop", session_id="s1",
                                  stats=pb.GenerateStats(prompt_tokens=5, generated_tokens=3, target_forwards=2,
                                                         mean_accepted_tokens=1.5, drafter="ngram"))


@pytest.fixture()
def fake():
    from concurrent import futures

    from starlette.testclient import TestClient

    from cluster.openai_api import create_app
    server = grpc.server(futures.ThreadPoolExecutor(4))
    rec = _Recorder()
    pb_grpc.add_GeneratorServicer_to_server(rec, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with TestClient(create_app(f"127.0.0.1:{port}", "m")) as http:
        yield http, rec
    server.stop(None)


def test_parameters_reach_the_gateway(fake):
    http, rec = fake
    r = http.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 7, "top_p": 0.9, "top_k": 3, "seed": 11, "stop": "\n", "drafter": "ngram",
        "new_session": True, "user": "ignored"})
    assert r.status_code == 200, r.json()
    g = rec.requests[-1]
    assert [(m.role, m.content) for m in g.chat.messages] == [("system", "be brief"), ("user", "hi there")]
    assert g.max_new_tokens == 7 and g.sampling.top_k == 3 and g.sampling.seed == 11 and list(g.stop) == ["\n"]
    assert abs(g.sampling.top_p - 0.9) < 1e-6 and g.sampling.temperature == 1.0  # OpenAI's default
    assert g.drafter == "ngram" and g.new_session and not g.session_id
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "abc" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert body["x_drafthorse"]["session_id"] == "s1" and body["x_drafthorse"]["mean_accepted_tokens"] == 1.5
    http.post("/v1/completions", json={"model": "m", "prompt": "p", "temperature": 0, "stop": ["a", "b"]})
    g = rec.requests[-1]
    assert g.prompt == "p" and g.max_new_tokens == 0 and g.sampling.temperature == 0.0 and list(g.stop) == ["a", "b"]
    assert not g.sampling.HasField("seed")


@pytest.mark.parametrize("extra,status,code", [({"session_id": "gone"}, 404, "session_not_found"),
                                                ({"drafter": "busy"}, 429, "resource_exhausted")])
def test_grpc_status_becomes_http_status(fake, extra, status, code):
    http, _ = fake
    for stream in (False, True):
        r = http.post("/v1/completions", json={"model": "m", "prompt": "p", "stream": stream} | extra)
        assert r.status_code == status and r.json()["error"]["code"] == code


def test_gateway_down_is_503():
    from starlette.testclient import TestClient

    from cluster.openai_api import create_app
    with TestClient(create_app(f"127.0.0.1:{free_port()}", "m")) as http:
        r = http.post("/v1/completions", json={"model": "m", "prompt": "p"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
