"""The EAGLE drafter on a draft worker, over real gRPC on loopback, with a tiny float64 target and a head
trained on it in seconds: the target's features travel with the tokens, the remote drafter proposes the
very trees the in-process one does, survives a lost session, and malformed features are refused."""
from __future__ import annotations

import struct

import grpc
import pytest
import torch

from drafthorse.actors.drafters import load_head, make_drafter
from drafthorse.actors.drafters.eagle import EagleDrafter
from drafthorse.actors.drafters.heads import eagle3_layers
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.training.selfdistill import from_sequences
from drafthorse.actors.training.train import TrainConfig, Trainer
from drafthorse.actors.workers.draft_service import DraftService, serve_drafter
from drafthorse.actors.workers.remote_drafter import RemoteDrafter
from drafthorse.actors.workers.wire import features_from_proto, features_to_proto
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from tests.test_draft_service import Hook, code_of

V, H = 128, 64
PROMPTS = [[5, 17, 33, 2, 9], [1, 2, 3, 1, 2, 3, 1, 2], [7]]
GREEDY = SamplingParams(max_new_tokens=40)
SAMPLED = SamplingParams(temperature=0.75, top_p=0.875, seed=11, max_new_tokens=40)


def train_head(lm, path, prompts: list[list[int]], new_tokens: int = 40, sample: bool = False,
               draft_vocab: int = 96, kind: str = "eagle", epochs: int = 6, lr: float = 3e-3, seed: int = 0) -> None:
    """A small head of `kind` for `lm`, trained on the target's own continuations of `prompts`, saved at
    `path` (seconds on a tiny target)."""
    torch.manual_seed(seed)
    seqs, lens = [], []
    with torch.no_grad():
        for n in sorted({len(p) for p in prompts}):  # one batch per prompt length: no padding
            ids = torch.tensor([p for p in prompts if len(p) == n])
            out = lm.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=sample, max_new_tokens=new_tokens,
                                 pad_token_id=0, top_k=None, top_p=None, temperature=1.0 if sample else None)
            seqs += out.tolist()
            lens += [n] * len(ids)
    corpus = from_sequences(lm, seqs, lens, mid_layer=1, taps=eagle3_layers(lm.model.n_layers))
    t = Trainer(TrainConfig(kind, epochs=epochs, lr=lr, batch_tokens=512, draft_vocab=draft_vocab, medusa_heads=3,
                            val_fraction=0.1), lm.model, lm.name, corpus, lm.eos_ids)
    t.fit(progress=False)
    t.checkpoint(dict(topk=3, depth=4), dict(test=True)).save(path)


@pytest.fixture(scope="module")
def target(tiny):
    return tiny(0)


@pytest.fixture(scope="module")
def head(target, tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("eagle") / "eagle.safetensors"
    train_head(target, path, torch.randint(0, V, (256, 6), generator=g).tolist())
    return load_head("eagle", target, path)


class Recording:
    """Mixin: keeps every proposed tree as (tokens, parents)."""

    def propose(self, budget, params, generator):
        tree = super().propose(budget, params, generator)
        self.trees = getattr(self, "trees", []) + [(tree.tokens, tree.parents)]
        return tree


class LocalEagle(Recording, EagleDrafter):
    pass


class RemoteEagle(Recording, Hook):
    pass


def service(head, **kw) -> DraftService:
    make = lambda kind: NgramDrafter() if kind == "ngram" else make_drafter(kind, head=head)
    return DraftService(make, V, kinds=("ngram", "eagle", "eagle+ngram"), feature_dims={"eagle": H, "eagle+ngram": H},
                        **kw)


@pytest.fixture(scope="module")
def worker(head):
    svc = service(head, max_context=512)
    server, port = serve_drafter(svc, port=0)
    yield svc, port
    server.stop(None)


def engine(target) -> SpecEngine:
    return SpecEngine(ModelRunner(target.model, 512), target.eos_ids)


def remote(port, **kw) -> RemoteEagle:
    return RemoteEagle(f"127.0.0.1:{port}", "eagle", V, at=kw.pop("at", 0), hook=kw.pop("hook", None), **kw)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_remote_eagle_proposes_the_in_process_trees(target, head, worker, params):
    svc, port = worker
    accepted = 0
    for prompt in PROMPTS:
        r = remote(port)
        out = engine(target).generate(prompt, params, r)
        r.shutdown()
        local_drafter = LocalEagle(head, **head.defaults)
        local = engine(target).generate(prompt, params, local_drafter)
        assert r.trees == local_drafter.trees, prompt              # the very same trees, step by step
        assert out.token_ids == local.token_ids, prompt
        if params.greedy:
            assert out.token_ids == engine(target).generate(prompt, params).token_ids, prompt
        assert r.failures == 0 and r.rpc_calls == len(r.trees) > 0
        accepted += out.stats.accepted_tokens
    assert accepted > 0, "the trained head never had a token accepted"
    assert svc.session_count == 0


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(temperature=0.3, seed=11, max_new_tokens=40)],
                         ids=["greedy", "sampled"])
def test_remote_copying_eagle_equals_the_in_process_one(target, head, worker, params):
    """eagle+ngram on the draft worker: the features keep arriving on the steps it copies, so the head
    drafts the in-process drafter's trees on the others; greedy output is plain decoding's. (A low
    temperature: the tiny target's text then repeats, so both draft.)"""
    _, port = worker
    prompt = PROMPTS[1] * 3
    r = RemoteEagle(f"127.0.0.1:{port}", "eagle+ngram", V, at=0, hook=None)
    out = engine(target).generate(prompt, params, r)
    r.shutdown()
    local = make_drafter("eagle+ngram", head=head)
    assert engine(target).generate(prompt, params, local).token_ids == out.token_ids
    assert local.copied > 0 and local.headed > 0, (local.copied, local.headed)
    if params.greedy:
        assert out.token_ids == engine(target).generate(prompt, params).token_ids
    assert r.failures == 0


def test_long_context_goes_in_pieces(target, head, worker):
    """With a 3-row feature bound per request the prompt's features take several requests (all but the
    last only absorb); the trees stay the in-process ones."""
    svc, port = worker
    prompt = [(7 * i) % V for i in range(20)]
    r = remote(port, chunk_bytes=3 * H * 8)          # float64 rows
    out = engine(target).generate(prompt, GREEDY, r)
    r.shutdown()
    local_drafter = LocalEagle(head, **head.defaults)
    local = engine(target).generate(prompt, GREEDY, local_drafter)
    assert r.trees == local_drafter.trees and out.token_ids == local.token_ids
    assert r.rpc_calls >= len(r.trees) + 20 // 3 and r.failures == 0


def test_lost_session_resends_features(target, head):
    """The worker restarts mid-generation (state lost): the next call is refused, the whole context and its
    features are resent with reset, and the output is still exactly plain decoding's."""
    box = {}
    first = service(head)
    server, port = serve_drafter(first, port=0)

    def restart():
        server.stop(None).wait()
        box["service"] = service(head)
        box["server"], _ = serve_drafter(box["service"], port=port)
        grpc.channel_ready_future(r.channel).result(timeout=10)

    r = remote(port, at=4, hook=restart)
    try:
        out = engine(target).generate(PROMPTS[0], GREEDY, r)
    finally:
        r.shutdown()
        box.get("server", server).stop(None)
    assert out.token_ids == engine(target).generate(PROMPTS[0], GREEDY).token_ids
    assert first.draft_calls == 3 and box["service"].draft_calls > 0 and box["service"].resets == 1
    assert r.lost_state == 1 and r.failures == 0
    # evicted rather than restarted: the same again, on one worker
    svc = service(head, max_sessions=1)
    server, port = serve_drafter(svc, port=0)
    r = remote(port, at=3, hook=lambda: svc.EndSession(pb.EndSessionRequest(session_id=r.session_id), None))
    try:
        out = engine(target).generate(PROMPTS[1], GREEDY, r)
    finally:
        r.shutdown()
        server.stop(None)
    assert out.token_ids == engine(target).generate(PROMPTS[1], GREEDY).token_ids
    assert r.lost_state == 1 and svc.resets == 2 and out.stats.accepted_tokens > 0


def feats(rows: int, dim: int = H, dtype=torch.float64) -> pb.Features:
    return features_to_proto(torch.randn(rows, dim).to(dtype))


def request(**kw) -> pb.DraftRequest:
    args = dict(session_id="f", reset=True, new_token_ids=[1, 2, 3], context_length=3, max_nodes=8,
                max_depth=4, drafter="eagle", features=feats(2))
    args.update(kw)
    return pb.DraftRequest(**args)


def test_malformed_features_are_invalid_argument(worker):
    with grpc.insecure_channel(f"127.0.0.1:{worker[1]}") as ch:
        stub = pb_grpc.DrafterStub(ch)
        assert len(stub.Draft(request(session_id="ok")).tree.token_ids) > 0
        stub.Draft(request(session_id="ok", reset=False, new_token_ids=[4, 5], context_length=5, features=feats(2)))
        f = feats(2)
        bad = {"no features": request(features=None),
               "rows: on reset the first token has none": request(features=feats(3)),
               "rows short": request(features=feats(1)),
               "rows after reset": request(session_id="ok", reset=False, new_token_ids=[6], context_length=6,
                                           features=feats(2)),
               "dim": request(features=feats(2, H + 1)),
               "dtype": request(features=pb.Features(data=f.data, dtype="int64", rows=2, dim=H)),
               "pickle is no dtype": request(features=pb.Features(data=f.data, dtype="pickle", rows=2, dim=H)),
               "bytes short": request(features=pb.Features(data=f.data[:-1], dtype="float64", rows=2, dim=H)),
               "bytes vs dtype": request(features=pb.Features(data=f.data, dtype="float32", rows=2, dim=H)),
               "not finite": request(features=features_to_proto(torch.full((2, H), float("nan"), dtype=torch.float64))),
               "ngram takes none": request(drafter="ngram"),
               "context bound": request(reset=False, new_token_ids=[1], context_length=513, features=feats(1))}
        for why, req in bad.items():
            if why == "no features":
                req.ClearField("features")
            with pytest.raises(grpc.RpcError) as e:
                stub.Draft(req)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, why
            assert e.value.details(), why
        # any float dtype of the allow-list is fine: the head casts features to its own
        assert len(stub.Draft(request(session_id="f32", features=feats(2, dtype=torch.float32))).tree.token_ids) > 0
        # a remote drafter refused its features fails loudly rather than drafting nothing
        r = RemoteDrafter(ch, "eagle", V)
        r.begin([1, 2], torch.randn(1, H + 1, dtype=torch.float64))
        r.extend([3], torch.randn(1, H + 1, dtype=torch.float64))
        from drafthorse.actors.drafters.base import Budget
        assert code_of(r.propose, Budget(4, 4), GREEDY, None) == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError, match="one target feature per committed token"):
            r.extend([4, 5], torch.randn(1, H, dtype=torch.float64))
        for sid in ("ok", "f32"):
            stub.EndSession(pb.EndSessionRequest(session_id=sid))


def test_wire_features_round_trip_little_endian():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(5, 7).to(dtype)
        msg = pb.Features.FromString(features_to_proto(x).SerializeToString())
        back = features_from_proto(msg, 5, 7)
        assert back.dtype == dtype and torch.equal(back, x)
        assert len(msg.data) == 5 * 7 * x.element_size()
    assert features_to_proto(torch.tensor([[1.5, -2.0]])).data == struct.pack("<2f", 1.5, -2.0)
    assert features_from_proto(features_to_proto(torch.empty(0, 3)), 0, 3).shape == (0, 3)
    with pytest.raises(ValueError):
        features_to_proto(torch.zeros(2, 3, dtype=torch.int32))


def test_missing_or_wrong_heads_fail_at_start_up(target, tmp_path, monkeypatch):
    from drafthorse.actors.models import loader
    from drafthorse.actors.workers.draft_worker import DraftWorker
    from drafthorse.actors.workers.target_worker import load_local_heads
    from drafthorse.runtime.settings import Settings, WorkerSettings
    monkeypatch.setattr(loader, "load", lambda *a, **kw: target)
    monkeypatch.setattr(loader, "vocab_size_of", lambda spec: V)
    for kw in [dict(drafter="eagle"), dict(eagle_head=str(tmp_path / "missing.safetensors"))]:
        with pytest.raises(RuntimeError, match="cannot serve eagle: .*DRAFTHORSE_EAGLE_HEAD"):
            DraftWorker(WorkerSettings(model="tiny:0", **kw), membership=None)
    assert load_local_heads(Settings(), target) == {}  # nothing asked for, nothing shipped for this target
    with pytest.raises(RuntimeError, match="no medusa head shipped .*DRAFTHORSE_MEDUSA_HEAD"):
        load_local_heads(Settings(drafter="medusa"), target)
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "eagle.safetensors"
    train_head(target, path, torch.randint(0, V, (8, 6), generator=g).tolist(), epochs=1)
    with pytest.raises(RuntimeError, match="is a eagle head, not layerskip"):
        load_local_heads(Settings(layerskip_head=str(path)), target)
