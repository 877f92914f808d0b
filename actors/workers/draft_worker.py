"""The draft worker: hosts drafters for many sessions behind the gRPC `Drafter` service. It keeps each
session's drafter state (a draft model's own KV cache, an n-gram index, an EAGLE head's cache over
the target's features) and receives only the tokens committed since the last call (and, for EAGLE,
their features). Served as a Ray Serve deployment (`DraftWorker`); asks Ray for the cheap-accelerator
resources configured for draft workers.

EAGLE drafts with the target's own embeddings and LM head, so a worker serving it loads the target
model as well (same spec and dtype as the target workers, or the head's fingerprint check fails)."""
from __future__ import annotations

import logging
import time

import torch

from drafthorse.actors.drafters import load_head, make_drafter
from drafthorse.actors.models import loader
from drafthorse.actors.models.combiner import Combiner
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.workers.draft_service import SERVICE_NAME, DraftService
from drafthorse.actors.workers.worker import GrpcWorker
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.kinds import KINDS
from drafthorse.runtime.membership import Membership
from drafthorse.runtime.metrics import Metrics
from drafthorse.runtime.rpc import start_server
from drafthorse.runtime.settings import WorkerSettings

log = logging.getLogger(__name__)
DRAFT_THREADS = 32   # Draft RPCs served at once: as many sessions' forwards can share one pass


class DraftWorker(GrpcWorker[DraftService]):
    """Drafters for many sessions behind a gRPC server. The deployment layer hands it its settings, its
    membership in the cluster and the process's metrics (gauges read its service)."""

    def __init__(self, s: WorkerSettings, membership: Membership, metrics: Metrics | None = None):
        torch.set_num_threads(s.torch_threads)
        t0 = time.perf_counter()
        dlm = loader.load(s.draft_model, s.dtype, s.max_len, s.device) if s.draft_model else None
        vocab = dlm.vocab_size if dlm else loader.vocab_size_of(s.model)
        heads, hidden = {}, 0
        if s.head_asked("eagle"):
            tlm = loader.load(s.model, s.dtype, s.max_len, s.device)
            try:
                heads["eagle"] = load_head("eagle", tlm, s.eagle_head, s.max_len)
            except (FileNotFoundError, ValueError) as e:
                raise RuntimeError(f"draft worker cannot serve eagle: {e} (set DRAFTHORSE_EAGLE_HEAD)") from None
            vocab, hidden = tlm.vocab_size, tlm.model.embed.shape[1]
        # what this worker can draft: the draft-side kinds whose draft model / head it has loaded
        kinds = [k.name for k in KINDS.values() if k.runs_on == "draft"
                 and (dlm is not None or not k.needs_draft_model) and (k.head_kind in heads or not k.head)]
        dims = {name: hidden for name in kinds if KINDS[name].wants_features}   # they get the target's features
        # concurrent sessions' draft forwards share passes (one combiner per model), their K/V one pool
        # of draft_sessions slots (a session's drafter gives its slot back when it is closed)
        self.combiners: list[Combiner] = []
        new_runner = None
        if dlm:
            draft_passes = Combiner(dlm.model, dlm.model.new_pool(s.draft_sessions, s.max_len))
            self.combiners.append(draft_passes)
            new_runner = lambda: ModelRunner(draft_passes.model, s.max_len, draft_passes)
        if heads:
            self.combiners.append(heads["eagle"].share_passes(s.draft_sessions))
        make = lambda kind: make_drafter(kind, new_runner, head=heads.get(KINDS[kind].head_kind))
        service = DraftService(make, vocab, max_sessions=s.draft_sessions, max_nodes=s.max_tree_nodes, kinds=kinds,
                               feature_dims=dims, max_context=s.max_len)
        server, port, health = start_server(
            lambda srv: pb_grpc.add_DrafterServicer_to_server(service, srv), [SERVICE_NAME],
            host=s.host, token=s.token(), max_workers=DRAFT_THREADS, tls=s.tls())
        self.serve(service, server, port, health, [SERVICE_NAME], membership, s.grace_s,
                   model=dlm.name if dlm else "", capacity=s.draft_sessions, drafters=kinds)
        self.metrics_port = 0
        if metrics is not None:
            metrics.watch_draft(service)
            self.metrics_port = metrics.serve(s.host, s.metrics_port, self.worker_id)
        log.info("%s serving %s on port %d (ready in %.1fs)", self.worker_id, kinds, port,
                 time.perf_counter() - t0)

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "address": self.membership.address,
                "draft_calls": self.service.draft_calls, "metrics_port": self.metrics_port,
                "draft_passes": sum(c.passes for c in self.combiners),
                "draft_forwards": sum(c.calls for c in self.combiners)}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metric: the sessions being drafted for right now."""
        return {"active_requests": self.service.session_count}
