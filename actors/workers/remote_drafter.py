"""A drafter in another process: the Drafter interface over gRPC (drafthorse.v1.Drafter).

Only the tokens committed since the last call cross the wire, plus the total context length so the
worker can tell when it lost the session; then (FAILED_PRECONDITION) the whole context is resent once
with reset=True. When the worker is unreachable or slow (UNAVAILABLE, DEADLINE_EXCEEDED, ...) the
step gets an empty tree: the target decodes one token alone, which is still exact, and the next call
resets the session. Configuration errors (auth, bad arguments) raise: they would never heal.

Drafters that read the target's features (eagle) get them with the tokens, as raw bytes: this side
keeps the features of the whole context for a reset, and splits a long context into requests of at
most FEATURE_CHUNK_BYTES of features each (all but the last with max_nodes = 0: absorb, no tree)."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import grpc
import torch

from drafthorse.actors.drafters.base import Budget, Drafter
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import DraftTree
from drafthorse.actors.workers.wire import features_to_proto, sampling_to_proto, tree_from_proto
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime import kinds
from drafthorse.runtime.rpc import FEATURE_CHUNK_BYTES, auth_metadata, channel

log = logging.getLogger(__name__)

FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED}


class RemoteDrafter(Drafter):
    checked_trees = True   # by tree_from_proto, against the budget asked for
    waits_on_network = True

    def __init__(self, target: str | grpc.Channel, kind: str, vocab_size: int, session_id: str | None = None,
                 auth_token: str | None = None, timeout_s: float = 5.0, retry_after_s: float = 1.0,
                 chunk_bytes: int = FEATURE_CHUNK_BYTES, on_rpc: Callable[[float], None] | None = None,
                 hidden_size: int | None = None):
        """hidden_size: the features sent are a target row's first hidden_size columns (its final hidden
        state: a target that also returns tapped streams for a local EAGLE-3 head keeps them here)."""
        self.name = f"remote:{kind}"
        self.hidden_size = hidden_size
        self.kind, self.vocab_size, self.timeout_s = kind, vocab_size, timeout_s
        known = kinds.KINDS.get(kind)        # a draft worker may serve kinds of its own (its factory's)
        self.wants_features = known is not None and known.wants_features
        self.on_rpc = on_rpc                # observes each Draft RPC's seconds (the worker's metrics)
        self.chunk_bytes = chunk_bytes
        self.session_id = session_id or uuid.uuid4().hex
        self._own_channel = isinstance(target, str)
        self.channel: grpc.Channel = channel(target) if isinstance(target, str) else target  # given one: its TLS
        self.stub = pb_grpc.DrafterStub(self.channel)
        self.metadata = auth_metadata(auth_token or "")
        self.retry_after_s = retry_after_s  # after a transport failure, draft locally-empty this long
        self.context: list[int] = []        # our copy of everything committed
        self.feats: list[torch.Tensor] = [] # features of context[1:], in pieces (wants_features only)
        self.sent = 0                       # context tokens the worker has (when not resetting)
        self.reset = True
        self._quiet_until = 0.0
        self.rpc_calls = 0
        self.rpc_s = 0.0                    # wall time inside Draft RPCs (network + drafting)
        self.remote_draft_s = 0.0           # drafting time the worker reported
        self.failures = 0                   # steps that fell back to an empty tree
        self.lost_state = 0                 # FAILED_PRECONDITION answers (resent with reset)

    def begin(self, prompt_ids: list[int], features: torch.Tensor | None = None) -> None:
        self.context, self.sent, self.reset = list(prompt_ids), 0, True
        self.feats = []
        if self.wants_features:
            self._add_features(features, len(prompt_ids) - 1)

    def extend(self, token_ids: list[int], features: torch.Tensor | None = None) -> None:
        if self.wants_features:
            self._add_features(features, len(token_ids))
        self.context += token_ids

    def _add_features(self, features: torch.Tensor | None, rows: int) -> None:
        if features is None or len(features) != rows:
            raise ValueError(f"drafter {self.kind!r} needs one target feature per committed token")
        # to the host as they arrive (once a step): the wire takes them from there, and a session's features
        # do not hold device memory
        self.feats.append(features.detach()[:, :self.hidden_size].to("cpu"))

    def _features(self, start: int, end: int) -> pb.Features:
        """The features of context[start:end] (context[0] has none)."""
        lo, hi = max(start, 1) - 1, end - 1                  # rows of context[1:]
        if lo == 0 and len(self.feats) > 1:                  # a reset reads everything: join the pieces once
            self.feats = [torch.cat(self.feats)]
        parts, top = [], len(self.context) - 1
        for piece in reversed(self.feats):                   # a step reads only the last piece or two
            bottom = top - len(piece)
            if bottom < hi and top > lo:
                parts.append(piece[max(lo - bottom, 0):hi - bottom])
            if bottom <= lo:
                break
            top = bottom
        return features_to_proto(torch.cat(parts[::-1]) if parts else self.feats[-1][:0])

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        # `generator` stays here: the worker seeds its own per-session generator the same way
        if not self.context or time.monotonic() < self._quiet_until:
            self.reset = True
            return DraftTree()
        try:
            try:
                resp = self._call(budget, params)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.FAILED_PRECONDITION or self.reset:
                    raise
                self.lost_state += 1
                self.reset = True
                resp = self._call(budget, params)
            tree = tree_from_proto(resp.tree, self.vocab_size, budget.max_nodes, budget.max_depth)
        except grpc.RpcError as e:
            if e.code() in FATAL:
                raise
            return self._fail(f"{e.code().name}: {e.details()}", quiet=True)
        except ValueError as e:  # a malformed tree: a worker bug, but the target must not suffer for it
            return self._fail(f"malformed tree: {e}", quiet=False)
        self.remote_draft_s += resp.draft_s
        self.sent, self.reset = len(self.context), False
        return tree

    def _call(self, budget: Budget, params: SamplingParams) -> pb.DraftResponse:
        start, end = (0 if self.reset else self.sent), len(self.context)
        step = end - start or 1
        if self.wants_features and self.feats:
            row = self.feats[0].shape[1] * self.feats[0].element_size()
            step = max(1, self.chunk_bytes // row)
        for lo in range(start, max(end, start + 1), step):
            hi = min(lo + step, end)
            last = hi == end
            req = pb.DraftRequest(session_id=self.session_id, reset=self.reset and lo == start,
                                  new_token_ids=self.context[lo:hi], context_length=hi,
                                  max_nodes=budget.max_nodes if last else 0, max_depth=budget.max_depth,
                                  sampling=sampling_to_proto(params), drafter=self.kind)
            if self.wants_features:
                req.features.CopyFrom(self._features(lo, hi))
            t0 = time.perf_counter()
            self.rpc_calls += 1
            try:
                resp = self.stub.Draft(req, timeout=self.timeout_s, metadata=self.metadata)
            finally:
                dt = time.perf_counter() - t0
                self.rpc_s += dt
                if self.on_rpc is not None:
                    self.on_rpc(dt)
        return resp

    def _fail(self, why: str, quiet: bool) -> DraftTree:
        # the call may or may not have reached the worker: its state is unknown, so start over
        log.warning("remote drafter %s: %s; this step decodes without a draft", self.session_id, why)
        self.failures += 1
        self.reset = True
        if quiet:
            self._quiet_until = time.monotonic() + self.retry_after_s
        return DraftTree()

    def close(self) -> None:
        """End the worker's session (the engine calls this after every sequence); errors ignored."""
        try:
            self.stub.EndSession(pb.EndSessionRequest(session_id=self.session_id),
                                 timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError:
            pass
        self.reset = True

    def shutdown(self) -> None:
        """close(), and close the channel when this drafter opened it."""
        self.close()
        if self._own_channel:
            self.channel.close()
