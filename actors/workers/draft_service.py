"""The draft worker's gRPC service: hosts one drafter per session and answers Draft calls.

A session mirrors one sequence on a target worker. The target sends only the tokens committed since
its last call plus the total context length; if this process lost the session (restart, eviction) or
the lengths disagree, the call fails with FAILED_PRECONDITION and the target resends the whole
context with reset=True. Sessions are independent (one lock each); one session's calls are serial.

Drafters that read the target's features (eagle) get them with the tokens and keep their own feature
cache per session (the head's KV cache); a request with max_nodes = 0 only absorbs its tokens, which
is how a long context arrives in pieces."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
import torch

from drafthorse.actors.drafters.base import Budget, Drafter
from drafthorse.actors.spec.sampling import SamplingParams, make_generator
from drafthorse.actors.spec.tree import DraftTree
from drafthorse.actors.workers.wire import features_from_proto, sampling_from_proto, tree_to_proto
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.errors import shown
from drafthorse.runtime.rpc import start_server

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Drafter"].full_name  # "drafthorse.v1.Drafter"
LIMIT = 1 << 16               # max_nodes / max_depth beyond this are nonsense, not a request
LOST = "session state lost, resend with reset"


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


@dataclass
class _Session:
    lock: threading.Lock = field(default_factory=threading.Lock)
    kind: str = ""
    drafter: Drafter | None = None
    length: int = 0                 # committed tokens the drafter has seen
    generator: torch.Generator | None = None
    dead: bool = False              # evicted or ended: a request still holding it must not use it

    def retire(self) -> None:
        with self.lock:             # waits for an in-flight call of this session to finish
            self.dead = True
            if self.drafter is not None:
                self.drafter.close()
            self.drafter = None


class DraftService(pb_grpc.DrafterServicer):
    def __init__(self, make_drafter: Callable[[str], Drafter], vocab_size: int, max_sessions: int = 64,
                 max_nodes: int = 64,
                 kinds: Iterable[str] = ("ngram", "draft-model"), feature_dims: dict[str, int] | None = None,
                 max_context: int = 1 << 20):
        """feature_dims: the kinds that read the target's features, with its hidden size (eagle: H);
        max_context bounds a session's committed tokens (what a drafter may be made to hold)."""
        if max_sessions < 1 or max_nodes < 0:
            raise ValueError("need max_sessions >= 1 and max_nodes >= 0")
        self.make_drafter, self.vocab_size = make_drafter, vocab_size
        self.max_sessions, self.max_nodes, self.max_context = max_sessions, max_nodes, max_context
        self.kinds = frozenset(kinds)
        self.feature_dims = dict(feature_dims or {})
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.draft_calls = 0        # Draft RPCs answered with a tree
        self.resets = 0             # of which (re)started a session
        self.end_calls = 0
        # drain (actors/workers/worker.py): new Draft calls are refused (UNAVAILABLE: the target decodes that
        # step plainly, lossless, until paired elsewhere); calls in flight are short and finish within grace
        self.draining = False
        self._in_flight = 0

    # ------------------------------------------------------------------ RPCs

    def Draft(self, request: pb.DraftRequest, context: grpc.ServicerContext) -> pb.DraftResponse:
        if self.draining:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draft worker is draining")
        with self._lock:
            self._in_flight += 1
        try:
            return self._draft(request)
        except _Abort as e:
            context.abort(e.code, e.details)
            raise  # not reached: abort raises
        finally:
            with self._lock:
                self._in_flight -= 1

    @property
    def active(self) -> int:
        """Draft calls in flight (what a drain waits for)."""
        return self._in_flight

    def handover(self) -> int:
        """Nothing to hand over: a Draft call is one step, and a session's state is rebuilt by the next
        worker from the context the target resends (reset)."""
        return 0

    def EndSession(self, request: pb.EndSessionRequest, context: grpc.ServicerContext) -> pb.EndSessionResponse:
        with self._lock:
            sess = self._sessions.pop(request.session_id, None)
            self.end_calls += 1
        if sess is not None:
            sess.retire()
        return pb.EndSessionResponse()

    # ------------------------------------------------------------------ internals

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _check(self, r: pb.DraftRequest) -> tuple[SamplingParams, torch.Tensor | None]:
        bad = lambda msg: _Abort(grpc.StatusCode.INVALID_ARGUMENT, msg)
        if not r.session_id or len(r.session_id) > 256:
            raise bad("session_id must be 1..256 characters")
        if r.drafter not in self.kinds:
            raise bad(f"unknown drafter {shown(r.drafter)}; this worker serves {sorted(self.kinds)}")
        if not 0 <= r.max_nodes <= LIMIT or not 0 <= r.max_depth <= LIMIT:
            raise bad(f"max_nodes and max_depth must be in [0, {LIMIT}]")
        if any(not 0 <= t < self.vocab_size for t in r.new_token_ids):
            raise bad(f"new_token_ids outside the vocabulary [0, {self.vocab_size})")
        if r.reset and (not r.new_token_ids or r.context_length != len(r.new_token_ids)):
            raise bad("reset needs the whole context: context_length == len(new_token_ids) > 0")
        if r.context_length > self.max_context:
            raise bad(f"context_length {r.context_length} is over this worker's bound {self.max_context}")
        feats = None
        dim = self.feature_dims.get(r.drafter)
        if dim is None and r.HasField("features"):
            raise bad(f"drafter {r.drafter!r} takes no features")
        try:
            if dim is not None:
                if not r.HasField("features"):
                    raise ValueError(f"drafter {r.drafter!r} needs the target's features of new_token_ids")
                # on reset the first token has no feature: nothing predicted it
                feats = features_from_proto(r.features, len(r.new_token_ids) - r.reset, dim)
            return sampling_from_proto(r.sampling).validate(), feats
        except ValueError as e:
            raise bad(str(e)) from None

    def _session(self, sid: str, create: bool) -> _Session | None:
        evicted = []
        with self._lock:
            sess = self._sessions.get(sid)
            if sess is not None:
                self._sessions.move_to_end(sid)
            elif create:
                sess = self._sessions[sid] = _Session()
                while len(self._sessions) > self.max_sessions:
                    evicted.append(self._sessions.popitem(last=False)[1])
        for old in evicted:  # outside the global lock: retiring waits for the old session's call
            old.retire()
        return sess

    def _drop(self, sid: str, sess: _Session) -> None:
        with self._lock:
            if self._sessions.get(sid) is sess:
                del self._sessions[sid]
        sess.dead = True  # the caller holds sess.lock
        drafter, sess.drafter = sess.drafter, None
        try:
            if drafter is not None:
                drafter.close()
        except Exception:  # noqa: BLE001 - already failing: freeing is best effort
            pass

    def _draft(self, r: pb.DraftRequest) -> pb.DraftResponse:
        params, feats = self._check(r)
        ids = list(r.new_token_ids)
        for _ in range(3):  # a reset may race with an eviction of the same id: take the fresh session
            sess = self._session(r.session_id, create=r.reset)
            if sess is None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, LOST)
            with sess.lock:
                if sess.dead:
                    if r.reset:
                        continue
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, LOST)
                return self._draft_locked(r, sess, ids, feats, params)
        raise _Abort(grpc.StatusCode.UNAVAILABLE, "session churn, retry")

    def _draft_locked(self, r: pb.DraftRequest, sess: _Session, ids: list[int], feats: torch.Tensor | None,
                      params: SamplingParams) -> pb.DraftResponse:
        t0 = time.perf_counter()
        try:
            if r.reset:
                if sess.drafter is None or sess.kind != r.drafter:
                    if sess.drafter is not None:
                        sess.drafter.close()
                    sess.drafter, sess.kind = self.make_drafter(r.drafter), r.drafter
                drafter = sess.drafter
                if feats is not None:   # begin as the engine does: ids[0] has no feature
                    drafter.begin(ids, feats)
                else:
                    drafter.begin([])
                    drafter.extend(ids)
                sess.length = len(ids)
                # seeded exactly as SpecEngine seeds an in-process drafter's generator, so a seeded
                # sampling run drafts the same trees whether the drafter is local or remote
                sess.generator = make_generator(params.seed, salt=1)
            else:
                if sess.drafter is None or sess.kind != r.drafter or sess.length + len(ids) != r.context_length:
                    self._drop(r.session_id, sess)
                    raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, LOST)
                drafter = sess.drafter
                drafter.extend(ids, feats)
                sess.length += len(ids)
            budget = Budget(min(r.max_nodes, self.max_nodes), r.max_depth)
            tree = DraftTree()  # an empty budget: absorb the tokens only (a piece of a long context)
            if budget.max_nodes > 0 and budget.max_depth > 0:
                assert sess.generator is not None   # set when the session (re)started
                tree = drafter.propose(budget, params, sess.generator)
        except _Abort:
            raise
        except (ValueError, KeyError) as e:  # the factory refused the kind, or the drafter the input
            self._drop(r.session_id, sess)
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except Exception as e:  # noqa: BLE001 - the drafter's state is now unknown: forget it, the client resets
            self._drop(r.session_id, sess)
            raise _Abort(grpc.StatusCode.INTERNAL, f"drafter failed: {type(e).__name__}: {e}") from None
        resp = pb.DraftResponse(tree=tree_to_proto(tree), draft_s=time.perf_counter() - t0)
        with self._lock:
            self.draft_calls += 1
            self.resets += r.reset
        return resp


def serve_drafter(service: DraftService, host: str = "127.0.0.1", port: int = 0,
                  max_workers: int = 4, token: str = "", tls=None) -> tuple[grpc.Server, int]:
    """Start a sync gRPC server with the Drafter, health and reflection services; returns (server, port).
    Loopback by default: bind a routable address only with an auth token."""
    server, bound, _ = start_server(lambda srv: pb_grpc.add_DrafterServicer_to_server(service, srv),
                                    [SERVICE_NAME], host=host, port=port, token=token,
                                    max_workers=max_workers, tls=tls)
    return server, bound
