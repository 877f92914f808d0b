"""The draft worker over real gRPC on loopback, with real (tiny) target and draft models: remote drafting
gives exactly the in-process output, survives a dead or restarted worker, and rejects bad callers."""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from drafthorse.actors.drafters.base import Budget
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models.loader import tiny_llama, wrap
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import DraftTree
from drafthorse.actors.workers.draft_service import DraftService, serve_drafter
from drafthorse.actors.workers.remote_drafter import RemoteDrafter
from drafthorse.actors.workers.wire import sampling_from_proto, sampling_to_proto, tree_from_proto, tree_to_proto
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc

V = 128
KINDS = ("ngram", "draft-model", "draft-model-tree")
PROMPTS = [[5, 17, 33, 2, 9], [1, 2, 3, 1, 2, 3, 1, 2]]
GREEDY = SamplingParams(max_new_tokens=40)
# temperature / top_p exactly representable in float32: the wire carries float32, and the remote draft
# must process logits with the very same numbers as the in-process one for bit-equal trees
SAMPLED = SamplingParams(temperature=0.75, top_p=0.875, seed=11, max_new_tokens=40)


@pytest.fixture(scope="module")
def models(tiny):
    target = tiny(0)
    hf = tiny_llama(0).hf  # a private copy of the target with a noisy head: agrees often, not always
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        w = hf.lm_head.weight
        w.add_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.5 * w.std())
    return target, wrap(hf, name="noisy-tiny-llama-0", max_len=512)


@pytest.fixture(scope="module")
def make_drafter(models):
    draft = models[1]

    def make(kind: str):  # one ModelRunner (KV cache) per session; the weights are shared
        if kind == "ngram":
            return NgramDrafter()
        return DraftModelDrafter(ModelRunner(draft.model, 512), depth=4, branches=3 if kind.endswith("tree") else 1)
    return make


def start(make_drafter, port=0, auth_token="", tls=None, **kw):
    service = DraftService(make_drafter, V, kinds=KINDS, **kw)
    server, port = serve_drafter(service, port=port, token=auth_token, tls=tls)
    return service, server, port


@pytest.fixture(scope="module")
def worker(make_drafter):
    service, server, port = start(make_drafter, max_sessions=16)
    yield service, port
    server.stop(None)


def engine(models) -> SpecEngine:
    return SpecEngine(ModelRunner(models[0].model, 512), models[0].eos_ids)


def plain(models, prompt, params):
    return engine(models).generate(prompt, params).token_ids


# ---------------------------------------------------------------------------- (a), (b) exactness


def test_greedy_remote_equals_plain_and_local_concurrently(models, make_drafter, worker):
    service, port = worker
    calls0 = service.draft_calls
    jobs = [(kind, p) for kind in KINDS for p in PROMPTS]

    def run(job):
        kind, prompt = job
        remote = RemoteDrafter(f"127.0.0.1:{port}", kind, V, session_id=f"{kind}-{len(prompt)}")
        out = engine(models).generate(prompt, GREEDY, remote)
        remote.shutdown()
        return out, remote

    with ThreadPoolExecutor(len(jobs)) as pool:  # all sessions live on the one worker at once
        results = list(pool.map(run, jobs))
    for (kind, prompt), (out, remote) in zip(jobs, results):
        local = engine(models).generate(prompt, GREEDY, make_drafter(kind))
        assert out.token_ids == plain(models, prompt, GREEDY) == local.token_ids, kind
        assert (out.stats.drafted_tokens, out.stats.accepted_tokens) == \
               (local.stats.drafted_tokens, local.stats.accepted_tokens), kind  # the very same trees
        assert remote.failures == 0 and remote.rpc_calls > 0 and out.stats.drafted_tokens > 0
    assert sum(r.rpc_calls for _, r in results) == service.draft_calls - calls0  # every tree came over gRPC
    assert sum(o.stats.accepted_tokens for o, _ in results) > 0
    assert service.session_count == 0  # the engine's close() ended every session


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_sampling_remote_equals_local(models, make_drafter, worker, kind):
    # the worker seeds its session generator as SpecEngine seeds an in-process drafter's (seed, salt=1)
    remote = RemoteDrafter(f"127.0.0.1:{worker[1]}", kind, V)
    out = engine(models).generate(PROMPTS[0], SAMPLED, remote)
    local = engine(models).generate(PROMPTS[0], SAMPLED, make_drafter(kind))
    remote.shutdown()
    assert out.token_ids == local.token_ids
    assert (out.stats.drafted_tokens, out.stats.accepted_tokens) == \
           (local.stats.drafted_tokens, local.stats.accepted_tokens)
    assert remote.rpc_calls > 0 and remote.failures == 0


# ---------------------------------------------------------------------------- (c), (d) failures


class Hook(RemoteDrafter):
    """Runs `hook()` once, before the `at`-th propose."""

    def __init__(self, *a, at: int, hook, **kw):
        super().__init__(*a, **kw)
        self.at, self.hook, self.proposes = at, hook, 0

    def propose(self, budget, params, generator):
        self.proposes += 1
        if self.proposes == self.at:
            self.hook()
        return super().propose(budget, params, generator)


def test_worker_killed_mid_generation(models, make_drafter):
    service, server, port = start(make_drafter)
    remote = Hook(f"127.0.0.1:{port}", "draft-model-tree", V, at=4, hook=lambda: server.stop(None).wait())
    out = engine(models).generate(PROMPTS[0], GREEDY, remote)
    remote.shutdown()
    assert out.token_ids == plain(models, PROMPTS[0], GREEDY)
    assert service.draft_calls == 3 and remote.failures >= 1


def generate_against(models, drafter, params, **remote_kw):
    """Plain-decoding-equal output of a generation whose draft worker serves `drafter` for every
    session; returns the RemoteDrafter (its failure counts)."""
    service, server, port = start(lambda kind: drafter)
    remote = RemoteDrafter(f"127.0.0.1:{port}", "ngram", V, retry_after_s=0.0, **remote_kw)
    try:
        out = engine(models).generate(PROMPTS[1], params, remote)
    finally:
        remote.shutdown()
        server.stop(None)
    assert out.token_ids == plain(models, PROMPTS[1], params)
    return remote


def test_worker_too_slow_falls_back(models):
    class Slow(NgramDrafter):
        def propose(self, *a):
            time.sleep(0.3)
            return super().propose(*a)

    remote = generate_against(models, Slow(), SamplingParams(max_new_tokens=6), timeout_s=0.1)
    assert remote.failures == remote.rpc_calls > 0  # every call hit DEADLINE_EXCEEDED


def test_worker_ignoring_the_budget_cannot_hurt_the_target(models):
    """A draft worker that answers with a tree over the asked budget (a bug, or a hostile worker): the
    target drops it and decodes that step alone; the output is still plain decoding's."""
    from drafthorse.actors.spec.tree import DraftTree

    class Greedy(NgramDrafter):
        def propose(self, budget, params, generator):
            return DraftTree([1] * (budget.max_nodes + 3), list(range(-1, budget.max_nodes + 2)))

    remote = generate_against(models, Greedy(), GREEDY)
    assert remote.failures == remote.rpc_calls > 0


def test_worker_restarted_on_same_port_loses_state(models, make_drafter):
    first, server, port = start(make_drafter)
    box = {}

    def restart():
        server.stop(None).wait()
        box["service"], box["server"], _ = start(make_drafter, port=port)
        grpc.channel_ready_future(remote.channel).result(timeout=10)

    remote = Hook(f"127.0.0.1:{port}", "draft-model", V, at=4, hook=restart)
    try:
        out = engine(models).generate(PROMPTS[0], GREEDY, remote)
    finally:
        remote.shutdown()
        box.get("server", server).stop(None)
    second = box["service"]
    assert out.token_ids == plain(models, PROMPTS[0], GREEDY)
    assert first.draft_calls == 3 and second.draft_calls > 0
    assert remote.lost_state == 1 and remote.failures == 0 and second.resets == 1


# ---------------------------------------------------------------------------- service contract


def draft_request(**kw) -> pb.DraftRequest:
    args = dict(session_id="s", reset=True, new_token_ids=[1, 2, 3], context_length=3, max_nodes=8,
                max_depth=4, drafter="ngram")
    args.update(kw)
    return pb.DraftRequest(**args)


def code_of(call, *a, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call(*a, **kw)
    return e.value.code()


def test_auth(make_drafter):
    service, server, port = start(make_drafter, auth_token="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.DrafterStub(ch)
            for md in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
                assert code_of(stub.Draft, draft_request(), metadata=md) == grpc.StatusCode.UNAUTHENTICATED
                assert code_of(stub.EndSession, pb.EndSessionRequest(session_id="s"), metadata=md) \
                    == grpc.StatusCode.UNAUTHENTICATED
            assert service.draft_calls == 0
            stub.Draft(draft_request(), metadata=(("authorization", "Bearer s3cret"),))
            assert service.draft_calls == 1
            # a misconfigured client fails loudly instead of silently drafting nothing
            remote = RemoteDrafter(ch, "ngram", V, auth_token="wrong")
            remote.begin([1, 2, 1])
            assert code_of(remote.propose, Budget(4, 4), GREEDY, None) == grpc.StatusCode.UNAUTHENTICATED
            ok = RemoteDrafter(ch, "ngram", V, auth_token="s3cret")
            ok.begin([1, 2, 1])
            assert ok.propose(Budget(4, 4), GREEDY, None).tokens == [2, 1]
            # health stays open for probes
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)


def test_mutual_tls(make_drafter, tmp_path):
    """With certificates configured, only a peer holding a certificate of the same CA connects:
    plaintext, server-only TLS and a certificate of another CA are refused before any RPC runs."""
    from drafthorse.runtime.rpc import MutualTls, channel
    from tests.conftest import make_pki
    ours = make_pki(tmp_path / "ours")
    tls = MutualTls.from_files(ours["tls_cert_file"], ours["tls_key_file"], ours["tls_ca_file"],
                               server_name="drafthorse-internal")
    rogue_files = make_pki(tmp_path / "rogue", ca_name="another CA")
    rogue = MutualTls.from_files(rogue_files["tls_cert_file"], rogue_files["tls_key_file"], ours["tls_ca_file"],
                                 server_name="drafthorse-internal")
    service, server, port = start(make_drafter, auth_token="s3cret", tls=tls)
    address = f"127.0.0.1:{port}"
    try:
        with channel(address, tls) as ch:   # over TLS, the token is still checked
            remote = RemoteDrafter(ch, "ngram", V, auth_token="s3cret")
            remote.begin([1, 2, 1])
            assert remote.propose(Budget(4, 4), GREEDY, None).tokens == [2, 1]
            assert code_of(pb_grpc.DrafterStub(ch).Draft, draft_request(), timeout=5) == grpc.StatusCode.UNAUTHENTICATED
        server_only = grpc.ssl_channel_credentials(root_certificates=tls.ca)
        peers = {"plaintext": grpc.insecure_channel(address),
                 "no client certificate": grpc.secure_channel(address, server_only, options=tls.options()),
                 "certificate of another CA": channel(address, rogue)}
        for what, ch in peers.items():
            with ch:
                assert code_of(pb_grpc.DrafterStub(ch).Draft, draft_request(), timeout=5,
                               metadata=(("authorization", "Bearer s3cret"),)) == grpc.StatusCode.UNAVAILABLE, what
                assert code_of(health_pb2_grpc.HealthStub(ch).Check, health_pb2.HealthCheckRequest(),
                               timeout=5) == grpc.StatusCode.UNAVAILABLE, what
        assert service.draft_calls == 1
    finally:
        server.stop(None)
    with pytest.raises(ValueError, match="cannot read the TLS key"):
        MutualTls.from_files(ours["tls_cert_file"], str(tmp_path / "nope.pem"), ours["tls_ca_file"])


def test_tls_settings_come_as_a_set(tmp_path):
    from drafthorse.runtime.settings import Settings
    with pytest.raises(ValueError, match="DRAFTHORSE_TLS_KEY_FILE, DRAFTHORSE_TLS_CA_FILE"):
        Settings(tls_cert_file="cert.pem")
    assert Settings().tls() is None


def test_malformed_requests_and_lost_sessions(worker):
    with grpc.insecure_channel(f"127.0.0.1:{worker[1]}") as ch:
        stub = pb_grpc.DrafterStub(ch)
        bad = [dict(drafter="nope"), dict(drafter=""), dict(max_nodes=-1), dict(max_depth=-1),
               dict(max_nodes=1 << 30), dict(max_depth=1 << 30), dict(new_token_ids=[1, V], context_length=2),
               dict(new_token_ids=[-1], context_length=1), dict(context_length=7), dict(new_token_ids=[], context_length=0),
               dict(session_id=""), dict(sampling=pb.Sampling(temperature=-1.0)),
               dict(sampling=pb.Sampling(temperature=math.nan)), dict(sampling=pb.Sampling(temperature=1, top_p=2)),
               dict(sampling=pb.Sampling(top_k=-3))]
        for kw in bad:
            assert code_of(stub.Draft, draft_request(**{"session_id": "bad", **kw})) == grpc.StatusCode.INVALID_ARGUMENT, kw
        lost = grpc.StatusCode.FAILED_PRECONDITION
        assert code_of(stub.Draft, draft_request(session_id="never", reset=False)) == lost
        tree = stub.Draft(draft_request(session_id="x", new_token_ids=[1, 2, 3, 1, 2], context_length=5)).tree
        assert list(tree.token_ids) == [3, 1, 2]
        assert list(stub.Draft(draft_request(session_id="x", reset=False, new_token_ids=[3], context_length=6))
                    .tree.token_ids) == [1, 2, 3]
        assert code_of(stub.Draft, draft_request(session_id="x", reset=False, new_token_ids=[1], context_length=9)) == lost
        assert code_of(stub.Draft, draft_request(session_id="x", reset=False, new_token_ids=[1], context_length=7)) == lost
        stub.EndSession(pb.EndSessionRequest(session_id="x"))
        stub.EndSession(pb.EndSessionRequest(session_id="x"))  # idempotent


def test_lru_eviction(make_drafter):
    service, server, port = start(make_drafter, max_sessions=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.DrafterStub(ch)
            for sid in ("a", "b"):
                stub.Draft(draft_request(session_id=sid))
            stub.Draft(draft_request(session_id="a", reset=False, new_token_ids=[4], context_length=4))  # a is recent
            stub.Draft(draft_request(session_id="c"))  # evicts b
            assert service.session_count == 2
            assert code_of(stub.Draft, draft_request(session_id="b", reset=False, new_token_ids=[4], context_length=4)) \
                == grpc.StatusCode.FAILED_PRECONDITION
            stub.Draft(draft_request(session_id="a", reset=False, new_token_ids=[5], context_length=5))
    finally:
        server.stop(None)


def test_health_and_reflection(worker):
    with grpc.insecure_channel(f"127.0.0.1:{worker[1]}") as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "drafthorse.v1.Drafter"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in resp.list_services_response.service}
        assert {"drafthorse.v1.Drafter", "grpc.health.v1.Health"} <= names


# ---------------------------------------------------------------------------- (g) wire


def test_wire_tree_round_trips():
    chain = DraftTree([5, 6, 7], [-1, 0, 1])
    back = tree_from_proto(tree_to_proto(chain), V)
    assert (back.tokens, back.parents, back.probs) == (chain.tokens, chain.parents, None)

    probs = torch.softmax(torch.randn(4, V, dtype=torch.float64), -1).float()
    probs[1, :100] = 0.0  # sparse rows go over the wire as their non-zero entries only
    probs[1] /= probs[1].sum()
    tree = DraftTree([5, 109, 6, 7], [-1, -1, 0, 2], probs)
    msg = tree_to_proto(tree)
    assert len(msg.probs[1].ids) == V - 100 and len(msg.probs[0].ids) == V
    back = tree_from_proto(pb.TokenTree.FromString(msg.SerializeToString()), V)
    assert (back.tokens, back.parents) == (tree.tokens, tree.parents)
    assert back.probs.dtype == torch.float32 and torch.equal(back.probs, probs)  # float32: exact
    assert len(tree_from_proto(tree_to_proto(DraftTree()), V)) == 0


def test_wire_rejects_malformed_trees():
    def dist(ids, ps):
        return pb.SparseDist(ids=ids, probs=ps)

    bad = [pb.TokenTree(token_ids=[1, 2], parents=[-1]),                    # lengths differ
           pb.TokenTree(token_ids=[1, V], parents=[-1, 0]),                 # id out of range
           pb.TokenTree(token_ids=[-2], parents=[-1]),
           pb.TokenTree(token_ids=[1, 2], parents=[-1, 1]),                 # parent not earlier
           pb.TokenTree(token_ids=[1], parents=[-2]),
           pb.TokenTree(token_ids=[1, 2], parents=[-1, 0], probs=[dist([1], [1.0])]),  # one dist short
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([1, 2], [1.0])]),
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([V], [1.0])]),
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([1, 1], [0.5, 0.5])]),
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([1, 2], [1.5, -0.5])]),
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([1], [math.nan])]),
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([1], [math.inf])]),
           # distributions the node could not have been drawn from: q(x) = 0 for its own token x would be
           # accepted whenever p(x) > 0 (the rule divides by q(x)); mass that does not sum to 1
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([2], [1.0])]),
           pb.TokenTree(token_ids=[1, 3], parents=[-1, 0], probs=[dist([1], [1.0]), dist([2, 3], [1.0, 0.0])]),
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([1, 2], [0.5, 0.3])]),
           pb.TokenTree(token_ids=[1], parents=[-1], probs=[dist([1, 2], [0.9, 0.9])])]
    for msg in bad:
        with pytest.raises(ValueError):
            tree_from_proto(msg, V)


def test_wire_sampling_round_trip():
    for p in [SamplingParams(), SamplingParams(temperature=0.5, top_k=7, top_p=0.25, seed=2**62),
              SamplingParams(temperature=1.0, seed=0)]:
        back = sampling_from_proto(pb.Sampling.FromString(sampling_to_proto(p).SerializeToString()),
                                   max_new_tokens=p.max_new_tokens)
        assert back == p
    assert sampling_from_proto(pb.Sampling(temperature=1.0)).top_p == 1.0  # 0 on the wire means off
    assert sampling_from_proto(pb.Sampling(), stop=("x",)).stop == ("x",)
