"""The target worker: owns the large model and drives the speculative loop for its sessions.

Per request: take a KV-cache slot (the session's own if it still holds one: its prefix is reused),
ask the paired draft worker for a tree over gRPC, verify, commit and stream the tokens back (the
gateway, which knows what reached the client, is the only writer of a session's conversation).
Served as a Ray Serve deployment (`TargetWorker`) whose replica runs the gRPC `Target` service on its
own port and registers itself in Redis.

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

from drafthorse.actors.drafters import Drafter, NoDrafter, load_head, make_drafter, shipped_head
from drafthorse.actors.engine import BatchEngine
from drafthorse.actors.models import loader
from drafthorse.actors.models.loader import LoadedModel
from drafthorse.actors.models.tokenbytes import TokenBytes
from drafthorse.actors.scheduler import QueueFull, Request, Scheduler, SlotPool
from drafthorse.actors.spec.adaptive import AdaptivePolicy
from drafthorse.actors.spec.grammar import Grammars
from drafthorse.actors.spec.stats import GenerationStats
from drafthorse.actors.spec.textstream import TextStream
from drafthorse.actors.workers.remote_drafter import RemoteDrafter
from drafthorse.actors.workers.wire import constraint_from_proto, logprobs_to_proto, sampling_from_proto
from drafthorse.actors.workers.worker import GrpcWorker, in_passing_thread
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime import kinds
from drafthorse.runtime.membership import Membership
from drafthorse.runtime.metrics import Metrics
from drafthorse.runtime.rpc import MutualTls, abort, channel, start_server
from drafthorse.runtime.settings import WorkerSettings

log = logging.getLogger(__name__)
HANDOVER = object()   # put on a request's output queue by a drain: end the stream here
SERVICE = "drafthorse.v1.Target"


def stats_to_proto(s: GenerationStats, **extra) -> pb.GenerateStats:
    return pb.GenerateStats(
        prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens, target_forwards=s.target_forwards,
        drafted_tokens=s.drafted_tokens, accepted_tokens=s.accepted_tokens,
        accepted_per_depth=s.accepted_per_depth, mean_accepted_tokens=s.mean_accepted_tokens,
        tokens_per_s=s.tokens_per_s, draft_s=s.draft_s, verify_s=s.verify_s, total_s=s.total_s,
        budget_nodes=s.budget_nodes, mean_batch_size=s.mean_batch_size, acceptance_estimate=s.acceptance_estimate,
        row_cost_ratio=s.row_cost_ratio, reused_prefix_tokens=s.reused_prefix_tokens, **extra)


class TargetService(pb_grpc.TargetServicer):
    def __init__(self, lm, worker_id: str, capacity: int, max_len: int, token: str = "",
                 max_tree_nodes: int = 32, draft_timeout_s: float = 2.0,
                 adaptive: bool = True, max_waiting: int | None = None, heads: dict | None = None,
                 prefill_chunk: int = 256, prefill_tokens: int = 1024, tls: MutualTls | None = None,
                 metrics: Metrics | None = None):
        self.lm, self.worker_id, self.token, self.tls, self.metrics = lm, worker_id, token, tls, metrics
        self.heads = dict(heads or {})        # kinds.LOCAL_KINDS kind -> its loaded head (load_head), shared
        self.pool = SlotPool(lm.model, capacity, max_len)
        self.draft_timeout_s = draft_timeout_s
        self.decode = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)
        self.token_bytes = TokenBytes(lm.tokenizer)
        self.policy = AdaptivePolicy(max_tree_nodes) if adaptive else None
        self.engine = BatchEngine(lm.eos_ids, self.decode, max_tree_nodes=max_tree_nodes, policy=self.policy,
                                  prefill_chunk=prefill_chunk,
                                  grammars=Grammars(lm.tokenizer, lm.vocab_size, lm.eos_ids))
        self.scheduler = Scheduler(self.engine, self.pool, max_waiting or 4 * capacity, prefill_tokens)
        self.draining = False                 # set by GrpcWorker.drain: refuse new streams
        self._live: dict[int, Request] = {}    # id -> request being streamed (handover ends them)
        self._live_lock = threading.Lock()
        self.draft_rpcs = 0
        self._channels: dict[str, grpc.Channel] = {}   # one channel per draft worker, reused
        self._channels_lock = threading.Lock()

    def check(self) -> None:
        """Raises when this worker can no longer serve: its scheduler thread (every step runs there) died
        or its KV slots do not add up (Scheduler.audit)."""
        try:
            self.scheduler.check()
        except RuntimeError as e:
            raise RuntimeError(f"target worker {self.worker_id}: {e}") from None

    def _channel(self, address: str) -> grpc.Channel:
        with self._channels_lock:
            if address not in self._channels:
                self._channels[address] = channel(address, self.tls)
            return self._channels[address]

    def Generate(self, treq: pb.TargetRequest, context: grpc.ServicerContext):
        req = treq.request
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"target worker {self.worker_id} is draining: retry on another")
        try:
            params = sampling_from_proto(req.sampling, max_new_tokens=treq.max_new_tokens, stop=tuple(req.stop),
                                         constraint=constraint_from_proto(req.constraint))
            kind = kinds.kind(req.drafter or "none")
        except ValueError as e:
            abort(context, e)
        drafter: Drafter = NoDrafter()
        if kind.runs_on == "target":
            if kind.head_kind not in self.heads:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"target worker {self.worker_id} has no "
                              f"{kind.head_kind} head: set DRAFTHORSE_{kind.head_kind.upper()}_HEAD")
            drafter = make_drafter(kind.name, head=self.heads[kind.head_kind])
        elif kind.runs_on == "draft" and treq.draft_address:
            drafter = RemoteDrafter(self._channel(treq.draft_address), kind.name, self.lm.vocab_size,
                                    session_id=treq.session_id or uuid.uuid4().hex, auth_token=self.token,
                                    timeout_s=self.draft_timeout_s,
                                    on_rpc=self.metrics.observe_draft_rpc if self.metrics else None,
                                    hidden_size=self.lm.model.config.hidden_size)
        r = Request(list(treq.prompt_ids), params, drafter, treq.session_id, adaptive=not req.fixed_tree,
                    prefix_scope=treq.prefix_scope)
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
                    abort(context, step)
                if isinstance(step, Exception):
                    context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {type(step).__name__}")
                msg = pb.GenerateResponse(token_ids=step.token_ids,
                                          text_delta=text.push(step.token_ids, step.finish_reason is not None),
                                          logprobs=logprobs_to_proto(step.logprobs or [], self.token_bytes))
                if step.finish_reason:
                    msg.finish_reason = step.finish_reason
                    msg.stats.CopyFrom(stats_to_proto(
                        r.stats, drafter=kind.name, target_worker=self.worker_id, dtype=self.lm.dtype,
                        draft_worker=treq.draft_address if isinstance(drafter, RemoteDrafter) else "",
                        draft_rpc_s=getattr(drafter, "rpc_s", 0.0), draft_rpcs=getattr(drafter, "rpc_calls", 0)))
                yield msg
        finally:
            r.cancelled.set()
            with self._live_lock:
                self._live.pop(id(r), None)
            if self.metrics is not None:
                self.metrics.observe_generation(kind.name, r.stats)
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


def load_local_heads(s: WorkerSettings, lm: LoadedModel) -> dict:
    """The heads drafted in this worker (kinds.LOCAL_KINDS: medusa, layer-skip, eagle3). A head asked for (its path
    set, or its kind the default drafter) must load, else start-up fails; otherwise the shipped one is served
    if it loads."""
    heads = {}
    for kind in kinds.LOCAL_KINDS:
        path = getattr(s, f"{kind}_head")
        wanted = s.head_asked(kind)
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


class TargetWorker(GrpcWorker[TargetService]):
    """One target model behind a gRPC server. The deployment layer hands it its settings, its membership in
    the cluster and the process's metrics."""

    def __init__(self, s: WorkerSettings, membership: Membership, metrics: Metrics | None = None):
        tls = s.tls()   # read once: the server and the channels to draft workers share it
        torch.set_num_threads(s.torch_threads)
        t0 = time.perf_counter()
        # loaded (and probed, at the thread count it serves with) on a thread that then ends: the
        # scheduler's thread is the only one left running torch work (in_passing_thread)
        def load() -> tuple[LoadedModel, dict]:
            lm = loader.load(s.model, s.dtype, s.max_len, s.device)
            # an EAGLE head on the draft workers drafts from this target's states: its slots keep them
            lm.model.keep_features = s.head_asked("eagle")
            return lm, load_local_heads(s, lm)
        lm, heads = in_passing_thread(load)
        service = TargetService(lm, membership.worker_id, s.sessions_per_target, s.max_len, s.token(),
                                max_tree_nodes=s.max_tree_nodes, draft_timeout_s=s.draft_timeout_s,
                                adaptive=s.adaptive, heads=heads, prefill_chunk=s.prefill_chunk,
                                prefill_tokens=s.prefill_tokens, tls=tls,
                                metrics=metrics)
        server, port, health = start_server(
            lambda srv: pb_grpc.add_TargetServicer_to_server(service, srv), [SERVICE],
            host=s.host, token=s.token(), max_workers=s.sessions_per_target + 4, tls=tls)
        self.serve(service, server, port, health, [SERVICE], membership, s.grace_s,
                   model=lm.name, capacity=s.sessions_per_target)
        self.metrics_port = 0
        if metrics is not None:
            metrics.watch_target(service)
            self.metrics_port = metrics.serve(s.host, s.metrics_port, self.worker_id)
        kv = service.pool.kv
        log.info("%s serving %s (%s on %s) on port %d with local heads %s; KV pool %d slots x %d tokens%s "
                 "(%.2f GiB, committed); loaded in %.1fs", self.worker_id, lm.name, lm.dtype, lm.device, port,
                 sorted(heads), kv.slots, kv.max_len, "" if kv.f is None else f" and their {kv.f.shape[-1]}-wide "
                 "output rows (feature heads)", kv.nbytes / 2 ** 30, time.perf_counter() - t0)

    def info(self) -> dict:
        sched = self.service.scheduler
        return {"worker_id": self.worker_id, "address": self.membership.address,
                "draft_rpcs": self.service.draft_rpcs, "active": self.service.active,
                "steps": sched.steps, "last_batch": sched.last_batch,
                "policy_nodes": self.service.policy.last if self.service.policy else None,
                "slots": dict(zip(("free", "lent"), self.service.pool.counts()), configured=self.service.pool.capacity),
                "metrics_port": self.metrics_port}

    def record_autoscaling_stats(self) -> dict:
        """Serve's custom autoscaling metric (requests reach us over gRPC, not through Serve handles)."""
        return {"active_requests": self.service.active}
