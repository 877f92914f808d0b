"""Public API keys: only digests are configured, every public RPC and HTTP route refuses a missing or
unknown key (health, reflection and metrics excepted), sessions belong to the key that opened them.
A real gateway on loopback with a real Redis, no workers: a request that passes the key check gets
as far as routing (UNAVAILABLE / 503), one that does not is refused before."""
from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.apikeys import KeyRing, bearer, digest_line, new_key
from drafthorse.cluster.client import key_metadata, request
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.redis_store import free_port
from drafthorse.runtime.settings import Settings

ALICE, BOB = new_key(), new_key()


def test_keyring_stores_digests_and_identifies_keys(tmp_path):
    ring = KeyRing.load([digest_line(ALICE, "alice")])
    assert ring.enabled and ring.identify(ALICE) == "alice"
    assert ring.identify(BOB) is None and ring.identify("") is None and ring.identify(ALICE + "x") is None
    assert ALICE not in repr(ring) and ALICE.encode() not in b"".join(ring.digests)
    f = tmp_path / "keys"
    f.write_text(f"# team keys\n{digest_line(BOB)}\n\n")
    ring = KeyRing.load([digest_line(ALICE, "alice")], str(f))
    assert ring.identify(BOB) == digest_line(BOB)[7:19]      # unnamed: the digest's first 12 hex digits
    assert not KeyRing.load().enabled
    # a malformed entry is refused without echoing it (it may be a key pasted by mistake)
    with pytest.raises(ValueError, match="entry 1: expected sha256") as e:
        KeyRing.load([ALICE])
    assert ALICE not in str(e.value)
    with pytest.raises(ValueError, match="api keys file"):
        KeyRing.load(file=str(tmp_path / "missing"))
    assert bearer([("authorization", f"Bearer {ALICE}")]) == ALICE
    assert bearer([("Authorization", "Basic abc")]) == "" and bearer(None) == ""


def test_api_key_command_prints_a_key_and_its_digest():
    from typer.testing import CliRunner

    from drafthorse.cluster.cli import app
    res = CliRunner().invoke(app, ["api-key", "--name", "ci"])
    assert res.exit_code == 0, res.output
    key = res.output.split("key:")[1].split()[0]
    line = res.output.split("hash:")[1].split()[0]
    assert line == digest_line(key, "ci") and KeyRing.load([line]).identify(key) == "ci"
    assert CliRunner().invoke(app, ["api-key", "--name", "a b"]).exit_code == 2


def test_open_public_apis_beyond_loopback_are_refused_unless_asked_for(monkeypatch):
    """Public APIs on a non-loopback address with no API keys: `drafthorse serve` exits 2 before starting
    anything, saying how to add keys or opt in; the gateway's own start refuses the same settings."""
    from typer.testing import CliRunner

    from drafthorse.cluster.cli import app
    for name in ("DRAFTHORSE_API_KEY_HASHES", "DRAFTHORSE_API_KEYS_FILE", "DRAFTHORSE_ALLOW_ANONYMOUS"):
        monkeypatch.delenv(name, raising=False)
    res = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "no API keys" in res.output and "--allow-anonymous" in res.output
    with pytest.raises(ValueError, match="no API keys"):
        KeyRing.of(Settings(host="10.1.2.3"))
    with pytest.raises(ValueError, match="no API keys"):
        KeyRing.of(Settings(host="gateway.example.com"))
    for ok in (Settings(host="127.0.0.1"), Settings(host="::1"), Settings(host="localhost"),
               Settings(host="0.0.0.0", allow_anonymous=True),
               Settings(host="0.0.0.0", api_key_hashes=[digest_line("k", "ci")])):
        KeyRing.of(ok)


@pytest.fixture(scope="module")
def gateway():
    """A gateway with two keys and no workers; yields (address, settings)."""
    from drafthorse.actors.models import loader
    from tests.conftest import start_gateway
    s = Settings(key_prefix=f"dh-keys-{uuid.uuid4().hex[:8]}:", gateway_port=free_port(), metrics_port=0,
                 redis_url="redis://127.0.0.1:6379/0",
                 api_key_hashes=[digest_line(ALICE, "alice"), digest_line(BOB, "bob")]).with_token()
    start_gateway(s, loader.load("tiny:0").tokenizer)
    yield f"127.0.0.1:{s.gateway_port}", s


def call(addr: str, key: str = "", metadata=None, **req):
    with grpc.insecure_channel(addr) as ch:
        stub = pb_grpc.GeneratorStub(ch)
        r = request("hi", SamplingParams(max_new_tokens=2))
        for k, v in req.items():
            setattr(r, k, v)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(r, timeout=10, metadata=metadata or key_metadata(key)))
    return e.value.code(), e.value.details()


def test_every_public_rpc_needs_a_key(gateway):
    addr, s = gateway
    from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
    public = [m.name for m in pb.DESCRIPTOR.services_by_name["Generator"].methods]
    assert public == ["Generate"]           # the walk below covers every public RPC
    for key in ("", "dh-wrong", ALICE[:-1]):
        code, details = call(addr, key)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in details
    assert call(addr, metadata=[("authorization", ALICE)])[0] == grpc.StatusCode.UNAUTHENTICATED  # no Bearer
    for key in (ALICE, BOB):                # past the check: no worker to route to
        assert call(addr, key)[0] == grpc.StatusCode.UNAVAILABLE
    # the cluster's internal token is accepted too (start-up probe, cluster benchmarks)
    assert call(addr, metadata=[("authorization", f"Bearer {s.token()}")])[0] == grpc.StatusCode.UNAVAILABLE
    # health and reflection stay open: probes carry no key
    with grpc.insecure_channel(addr) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
        out = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {sv.name for r in out for sv in r.list_services_response.service}
        assert "drafthorse.v1.Generator" in names


def test_a_request_over_max_request_bytes_is_resource_exhausted(gateway):
    """The public gateway reads at most max_request_bytes (4 MiB) of a message, not the 64 MiB the
    internal RPCs allow for target features."""
    addr, s = gateway
    assert s.max_request_bytes == 4 << 20
    code, details = call(addr, ALICE, prompt="x" * (5 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details, details
    code, details = call(addr, ALICE, prompt="x" * (1 << 20))   # read, and refused by the prompt checks
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details, details


def test_sessions_belong_to_their_key(gateway):
    addr, s = gateway
    from drafthorse.runtime.redis_store import connect_async
    from drafthorse.runtime.sessions import SessionStore

    async def opened() -> str:
        async with connect_async(s.redis_url) as r:
            return (await SessionStore(r, s.key_prefix).create("alice")).session_id
    sid = asyncio.run(opened())
    # bob cannot tell alice's session from a missing one; alice gets past the session check
    code, details = call(addr, BOB, session_id=sid)
    assert code == grpc.StatusCode.NOT_FOUND and "not found" in details
    assert call(addr, BOB, session_id="no-such-session") == (code, details.replace(sid, "no-such-session"))
    assert call(addr, ALICE, session_id=sid)[0] == grpc.StatusCode.UNAVAILABLE
    # a session opened by a key is owned by it
    assert call(addr, ALICE, new_session=True)[0] == grpc.StatusCode.UNAVAILABLE


def test_every_http_route_needs_a_key(gateway):
    from starlette.testclient import TestClient

    from drafthorse.cluster.openai_api import create_app
    addr, s = gateway
    app = create_app(addr, "m", keys=KeyRing.of(s))
    routes = sorted(r.path for r in app.routes if r.path.startswith("/v1"))
    assert routes == ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{name:path}"]
    body = {"model": "m", "max_tokens": 2}
    calls = [("get", "/v1/models", None), ("get", "/v1/models/m", None),
             ("post", "/v1/completions", body | {"prompt": "hi"}),
             ("post", "/v1/chat/completions", body | {"messages": [{"role": "user", "content": "hi"}]})]
    with TestClient(app) as http:
        for method, path, js in calls:
            for headers in ({}, {"Authorization": "Bearer dh-wrong"}, {"Authorization": ALICE}):
                r = getattr(http, method)(path, json=js, headers=headers) if js else getattr(http, method)(
                    path, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.json()["error"]["code"] == "invalid_api_key"
            ok = {"Authorization": f"Bearer {ALICE}"}
            r = getattr(http, method)(path, json=js, headers=ok) if js else getattr(http, method)(path, headers=ok)
            # models answer here; generations reach the gateway with the key (503: no worker, not 401)
            assert r.status_code == (200 if method == "get" else 503), (path, r.text)


# ---------------------------------------------------------------- per-key limits

async def test_a_leaked_stream_lease_lapses_however_busy_the_key():
    """A lease whose release never came (a gateway crashed, a request cancelled between taking it and
    guarding it) frees its slot at its expiry, even while the key keeps acquiring: the old counter's TTL
    was pushed back by every acquire, so a busy key locked itself out with 429s for good."""
    from drafthorse.cluster.limits import KeyLimits, LimitExceeded, Limits
    from drafthorse.runtime.redis_store import connect_async
    now = [1000.0]
    async with connect_async("redis://127.0.0.1:6379/0") as r:
        lim = KeyLimits(r, f"dh-lim-{uuid.uuid4().hex[:8]}:", Limits(streams=1), clock=lambda: now[0], lease_s=100)
        await lim.acquire("alice", "leaked")                # never released
        for t in (1010.0, 1050.0, 1099.0):                  # the key keeps trying
            now[0] = t
            with pytest.raises(LimitExceeded):
                await lim.acquire("alice", f"try-{t}")
        now[0] = 1101.0
        await lim.acquire("alice", "fresh")                 # the leaked lease lapsed


async def test_key_limits_unit():
    """Counters in a real Redis under a private prefix; a fake clock moves the minute window."""
    from drafthorse.cluster.limits import KeyLimits, LimitExceeded, Limits
    from drafthorse.runtime.redis_store import connect_async
    now = [600.0]
    async with connect_async("redis://127.0.0.1:6379/0") as r:
        lim = KeyLimits(r, f"dh-lim-{uuid.uuid4().hex[:8]}:",
                        Limits(streams=2, tokens_per_minute=100, prompt_tokens=50, new_tokens=20), clock=lambda: now[0])
        await lim.check("alice", 50, 20)
        with pytest.raises(LimitExceeded, match="prompt is 51 tokens"):
            await lim.check("alice", 51, 1)
        with pytest.raises(LimitExceeded, match="max_new_tokens 21"):
            await lim.check("alice", 1, 21)
        await lim.acquire("alice", "a1")
        await lim.acquire("alice", "a2")
        with pytest.raises(LimitExceeded, match="2 streams open") as e:
            await lim.acquire("alice", "a3")
        assert e.value.retry_after_s == 1
        await lim.acquire("bob", "b1")                      # other keys are not affected
        await lim.release("alice", "a1")
        await lim.release("alice", "a1")                    # twice, or a lease never taken: harmless
        await lim.release("alice", "a3")
        await lim.acquire("alice", "a4")                    # a slot came back, one only
        with pytest.raises(LimitExceeded):
            await lim.acquire("alice", "a5")
        await lim.spent("alice", 60)
        await lim.spent("alice", 45)                        # 105 >= 100 this minute
        now[0] = 615.0
        with pytest.raises(LimitExceeded, match="105 tokens this minute") as e:
            await lim.check("alice", 1, 1)
        assert e.value.retry_after_s == 45                  # until 660 s, the next window
        await lim.check("bob", 1, 1)
        now[0] = 660.0
        await lim.check("alice", 1, 1)                      # a new minute


@pytest.fixture(scope="module")
def limited():
    """A gateway with per-key limits (and no workers)."""
    from drafthorse.actors.models import loader
    from tests.conftest import start_gateway
    s = Settings(key_prefix=f"dh-keylim-{uuid.uuid4().hex[:8]}:", gateway_port=free_port(), metrics_port=0,
                 redis_url="redis://127.0.0.1:6379/0", api_key_hashes=[digest_line(ALICE, "alice"),
                                                                      digest_line(BOB, "bob")],
                 key_max_streams=1, key_tokens_per_minute=1000, key_max_prompt_tokens=200,
                 key_max_new_tokens=64, key_max_sessions=2).with_token()
    start_gateway(s, loader.load("tiny:0").tokenizer)
    yield f"127.0.0.1:{s.gateway_port}", s


def call_meta(addr: str, key: str, **req):
    """(code, details, trailing metadata) of a Generate call expected to fail."""
    with grpc.insecure_channel(addr) as ch:
        r = request(req.pop("prompt", "hi"), SamplingParams(max_new_tokens=req.pop("max_new_tokens", 2)), **req)
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.GeneratorStub(ch).Generate(r, timeout=10, metadata=key_metadata(key)))
    return e.value.code(), e.value.details(), dict(e.value.trailing_metadata() or ())


async def test_per_key_limits_refuse_with_a_retry_hint(limited):
    from drafthorse.cluster.limits import KeyLimits, Limits
    from drafthorse.runtime.redis_store import connect_async
    addr, s = limited
    assert call_meta(addr, ALICE)[0] == grpc.StatusCode.UNAVAILABLE      # within limits: routed
    code, details, _ = call_meta(addr, ALICE, max_new_tokens=65)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_new_tokens 65" in details
    code, details, _ = call_meta(addr, ALICE, prompt="word " * 300)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "this key's limit is 200" in details
    # alice's stream slot is taken (another gateway replica holds it) / her minute is spent: refused
    # with a retry hint; bob is not affected
    lim = KeyLimits(connect_async(s.redis_url), s.key_prefix, Limits.of(s))
    await lim.acquire("alice", "elsewhere")
    code, details, meta = call_meta(addr, ALICE)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "streams open" in details and meta["retry-after"] == "1"
    assert call_meta(addr, BOB)[0] == grpc.StatusCode.UNAVAILABLE
    await lim.release("alice", "elsewhere")
    assert call_meta(addr, ALICE)[0] == grpc.StatusCode.UNAVAILABLE      # failed calls released theirs
    await lim.spent("alice", 1000)
    code, details, meta = call_meta(addr, ALICE)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens this minute" in details
    assert 1 <= int(meta["retry-after"]) <= 60
    # over HTTP: 429 with Retry-After
    from starlette.testclient import TestClient

    from drafthorse.cluster.openai_api import create_app
    with TestClient(create_app(addr, "m", keys=KeyRing.of(s))) as http:
        r = http.post("/v1/chat/completions", json={"model": "m", "max_tokens": 2, "messages": [
            {"role": "user", "content": "hi"}]}, headers={"Authorization": f"Bearer {ALICE}"})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(r.headers["retry-after"]) <= 60


def test_nothing_from_the_network_is_unpickled():
    """Only protobuf crosses our sockets: no module of ours imports a pickle-family decoder or calls
    torch.load (Ray's own pickling stays on its control plane, between its processes)."""
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    banned = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
    found = []
    for path in [p for pkg in ("actors", "cluster", "protos") for p in (root / pkg).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: import {n}" for n in names if n.split(".")[0] in banned]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                found.append(f"{path.name}:{node.lineno}: torch.load")
    assert not found, found


def test_a_refused_request_opens_no_session(limited):
    """A session is opened only once its request is admitted: one refused by a per-key limit leaves
    nothing in Redis (opened first, refused requests piled up empty sessions until their TTL)."""
    from drafthorse.runtime.redis_store import connect
    addr, s = limited
    r = connect(s.redis_url)
    before = set(r.scan_iter(match=s.key_prefix + "session:*", count=1000))
    with grpc.insecure_channel(addr) as ch:
        req = request("hi", SamplingParams(max_new_tokens=65), new_session=True)
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.GeneratorStub(ch).Generate(req, timeout=10, metadata=key_metadata(ALICE)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert set(r.scan_iter(match=s.key_prefix + "session:*", count=1000)) == before


def test_open_sessions_per_key_are_capped(limited):
    """key_max_sessions: a key's next new session past the cap is refused, RESOURCE_EXHAUSTED with the wait
    until its first session lapses; continuing a session is not a new one, and other keys are unaffected.
    (This gateway has no workers: an admitted request opens its session, then finds no target.)"""
    addr, s = limited
    for _ in range(2):
        assert call_meta(addr, BOB, new_session=True)[0] == grpc.StatusCode.UNAVAILABLE
    code, details, meta = call_meta(addr, BOB, new_session=True)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 sessions open, its limit is 2" in details, details
    assert 1 <= int(meta["retry-after"]) <= s.session_ttl_s
    assert call_meta(addr, BOB)[0] == grpc.StatusCode.UNAVAILABLE          # no session: not counted
