"""The target worker: owns the large model and drives the speculative loop for its sessions.

Per request: take a KV-cache slot (the session's own if it still holds one: its prefix is reused),
ask the paired draft worker for a tree over gRPC, verify, commit, stream the tokens back and
checkpoint them to Redis as they are committed. Served as a Ray Serve deployment (`TargetWorker`)
whose replica runs the gRPC `Target` service on its own port and registers itself in Redis.

Medusa and layer-skip draft here, in the target worker: they read the target's features and share its
weights and KV cache, which no network hop could carry cheaply. EAGLE drafts on a draft worker, which
gets the features of the committed tokens with each request."""
from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc
import torch

from drafthorse.actors.drafters import KINDS, NoDrafter, make_drafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.spec.stats import GenerationStats
from drafthorse.actors.worker import GrpcWorker
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
LOCAL_KINDS = ("medusa", "layerskip")   # trained heads that run in the target worker itself
HANDOVER = object()   # put on a request's output queue by a drain: end the stream here


def stats_to_proto(s: GenerationStats, **extra) -> pb.GenerateStats:
    return pb.GenerateStats(
        prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens, target_forwards=s.target_forwards,
        drafted_tokens=s.drafted_tokens, accepted_tokens=s.accepted_tokens,
        accepted_per_depth=s.accepted_per_depth, mean_accepted_tokens=s.mean_accepted_tokens,
        tokens_per_s=s.tokens_per_s, draft_s=s.draft_s, verify_s=s.verify_s, total_s=s.total_s,
        budget_nodes=s.budget_nodes, mean_batch_size=s.mean_batch_size, acceptance_estimate=s.acceptance_estimate,
        row_cost_ratio=s.row_cost_ratio, **extra)


class TargetService(pb_grpc.TargetServicer):
    def __init__(self, lm, worker_id: str, capacity: int, max_len: int, token: str = "",
                 checkpoint=None, max_tree_nodes: int = 32, draft_timeout_s: float = 2.0,
                 adaptive: bool = True, max_waiting: int | None = None, heads: dict | None = None,
                 prefill_chunk: int = 256, tls=None):
        from drafthorse.actors.scheduler import Scheduler, SlotPool
        from drafthorse.actors.spec.adaptive import AdaptivePolicy

        self.lm, self.worker_id, self.token, self.tls = lm, worker_id, token, tls
        self.heads = dict(heads or {})        # LOCAL_KINDS kind -> its loaded head (load_head), shared
        self.pool = SlotPool(lm.model, capacity, max_len)
        self.checkpoint = checkpoint          # callable(session_id, token_ids) or None
        self.draft_timeout_s = draft_timeout_s
        self.decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)
        self.policy = AdaptivePolicy(max_tree_nodes) if adaptive else None
        self.engine = SpecEngine(None, lm.eos_ids, self.decode, max_tree_nodes=max_tree_nodes, policy=self.policy,
                                 prefill_chunk=prefill_chunk)
        self.scheduler = Scheduler(self.engine, self.pool, max_waiting or 4 * capacity)
        self.draining = False                 # set by GrpcWorker.drain: refuse new streams
        self._live: dict[int, object] = {}    # id -> request being streamed (handover ends them)
        self._live_lock = threading.Lock()
        self.draft_rpcs = 0
        self._channels: dict[str, grpc.Channel] = {}   # one channel per draft worker, reused
        self._channels_lock = threading.Lock()

    def _channel(self, address: str) -> grpc.Channel:
        from drafthorse.actors.rpc import channel
        with self._channels_lock:
            if address not in self._channels:
                self._channels[address] = channel(address, self.tls)
            return self._channels[address]

    def Generate(self, treq: pb.TargetRequest, context: grpc.ServicerContext):
        from drafthorse.actors.drafters.remote import RemoteDrafter
        from drafthorse.actors.scheduler import QueueFull, Request
        from drafthorse.actors.wire import sampling_from_proto
        from drafthorse.cluster import metrics
        from drafthorse.cluster.textstream import TextStream

        req = treq.request
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"target worker {self.worker_id} is draining: retry on another")
        try:
            params = sampling_from_proto(req.sampling, max_new_tokens=treq.max_new_tokens, stop=tuple(req.stop))
            kind = req.drafter or "none"
            if kind not in KINDS:
                raise ValueError(f"unknown drafter {kind!r}: choose one of {', '.join(KINDS)}")
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        drafter = NoDrafter()
        if kind in LOCAL_KINDS:
            if kind not in self.heads:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                              f"target worker {self.worker_id} has no {kind} head: set DRAFTHORSE_{kind.upper()}_HEAD")
            drafter = make_drafter(kind, head=self.heads[kind])
        elif treq.draft_address and kind != "none":
            drafter = RemoteDrafter(self._channel(treq.draft_address), kind, self.lm.vocab_size,
                                    session_id=treq.session_id or uuid.uuid4().hex, auth_token=self.token,
                                    timeout_s=self.draft_timeout_s)
        r = Request(list(treq.prompt_ids), params, drafter, treq.session_id, adaptive=not req.fixed_tree)
        try:
            self.scheduler.submit(r)
        except QueueFull:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"target worker {self.worker_id} is at capacity")
        context.add_callback(r.cancelled.set)  # client gone or deadline passed: leave the batch
        text = TextStream(self.decode, params.stop)
        with self._live_lock:
            self._live[id(r)] = r
        try:
            while (step := r.out.get()) is not None:
                if step is HANDOVER:   # after its last committed step: the gateway continues it elsewhere
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"target worker {self.worker_id} is draining: "
                                  "continue on another")
                if isinstance(step, ValueError):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(step))
                if isinstance(step, Exception):
                    context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(step).__name__}")
                if self.checkpoint and treq.session_id and step.token_ids:
                    self.checkpoint(treq.session_id, step.token_ids)
                msg = pb.GenerateResponse(token_ids=step.token_ids,
                                          text_delta=text.push(step.token_ids, step.finish_reason is not None))
                if step.finish_reason:
                    msg.finish_reason = step.finish_reason
                    msg.stats.CopyFrom(stats_to_proto(
                        r.stats, drafter=kind, target_worker=self.worker_id, dtype=self.lm.dtype,
                        draft_worker=treq.draft_address if isinstance(drafter, RemoteDrafter) else "",
                        draft_rpc_s=getattr(drafter, "rpc_s", 0.0), draft_rpcs=getattr(drafter, "rpc_calls", 0)))
                yield msg
        finally:
            r.cancelled.set()
            with self._live_lock:
                self._live.pop(id(r), None)
            metrics.observe_generation(kind, r.stats)
            self.draft_rpcs += getattr(drafter, "rpc_calls", 0)

    @property
    def active(self) -> int:
        """Streams in flight."""
        return len(self._live)

    def handover(self) -> int:
        """Ends every stream still running (draining): each stops after the steps already queued for
        it, with UNAVAILABLE. Returns how many."""
        with self._live_lock:
            live = list(self._live.values())
        for r in live:
            r.cancelled.set()
            r.out.put(HANDOVER)
        return len(live)

    def EndSession(self, request: pb.EndSessionRequest, context) -> pb.EndSessionResponse:
        self.pool.forget(request.session_id)
        return pb.EndSessionResponse()


SERVICE = "drafthorse.v1.Target"


def load_local_heads(s, lm) -> dict:
    """The medusa / layer-skip heads this worker serves. A head asked for (its path set, or its kind the
    default drafter) must load, else start-up fails; otherwise the shipped one is served if it loads."""
    from drafthorse.actors.drafters import load_head, shipped_head
    heads = {}
    for kind in LOCAL_KINDS:
        path = getattr(s, f"{kind}_head")
        wanted = bool(path) or s.drafter == kind
        if not wanted and shipped_head(kind, lm.name) is None:
            continue
        try:
            heads[kind] = load_head(kind, lm, path, s.max_len)
        except (FileNotFoundError, ValueError) as e:
            if wanted:
                raise RuntimeError(f"target worker cannot serve {kind}: {e} (set DRAFTHORSE_{kind.upper()}_HEAD)") \
                    from None
            log.warning("not serving %s: %s", kind, e)
    return heads



class TargetWorker(GrpcWorker):
    """Ray Serve deployment body (see cluster/app.py): one target model behind a gRPC server."""

    def __init__(self, settings: dict):
        import ray

        from drafthorse.actors.models import loader
        from drafthorse.actors.rpc import start_server
        from drafthorse.cluster import metrics
        from drafthorse.cluster.heartbeat import Membership, worker_id
        from drafthorse.cluster.settings import Settings

        s = Settings(**settings)
        tls = s.tls()   # read once: the server and the channels to draft workers share it
        torch.set_num_threads(s.torch_threads)
        t0 = time.perf_counter()
        lm = loader.load(s.model, s.dtype, s.max_len)
        heads = load_local_heads(s, lm)
        self.worker_id = worker_id("target")
        self.membership = Membership(s, "target", self.worker_id, lm.name, s.sessions_per_target,
                                     node_id=ray.get_runtime_context().get_node_id())
        self.service = TargetService(lm, self.worker_id, s.sessions_per_target, s.max_len, s.token(),
                                     checkpoint=self.membership.checkpoint_tokens,
                                     max_tree_nodes=s.max_tree_nodes, draft_timeout_s=s.draft_timeout_s,
                                     adaptive=s.adaptive, heads=heads, prefill_chunk=s.prefill_chunk, tls=tls)
        self.server, port, self.health = start_server(
            lambda srv: pb_grpc.add_TargetServicer_to_server(self.service, srv), [SERVICE],
            host=s.host, token=s.token(), max_workers=s.sessions_per_target + 4, tls=tls)
        self.service_names, self.grace_s = [SERVICE], s.grace_s
        self.membership.start(port)
        metrics.watch_target(self.service)
        self.metrics_port = metrics.serve(s.host, s.metrics_port, self.worker_id)
        log.info("%s serving %s on port %d with local heads %s (loaded in %.1fs)", self.worker_id, lm.name, port,
                 sorted(heads), time.perf_counter() - t0)

    def info(self) -> dict:
        sched = self.service.scheduler
        return {"worker_id": self.worker_id, "address": self.membership.address,
                "draft_rpcs": self.service.draft_rpcs, "active": self.service.active,
                "steps": sched.steps, "last_batch": sched.last_batch,
                "policy_nodes": self.service.policy.last if self.service.policy else None,
                "metrics_port": self.metrics_port}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metric (requests reach us over gRPC, not through Serve handles)."""
        return {"active_requests": self.service.active}
