"""The public gRPC gateway: validates a request, renders the prompt, resolves the session, picks a
target worker (least load, session affinity) and a draft worker, and relays the target's stream.

If the target dies mid-stream the request continues on another target from the tokens committed so
far (greedy output is unchanged: the new target re-prefills prompt + committed tokens). Stream
sequence numbers are assigned here, so a client sees one gapless stream either way."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import redis
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from drafthorse.actors.spec.grammar import compile_spec
from drafthorse.actors.workers.wire import constraint_from_proto, sampling_from_proto
from drafthorse.cluster.apikeys import KeyRing, bearer
from drafthorse.cluster.limits import LEASE_MARGIN_S, KeyLimits, LimitExceeded, Limits
from drafthorse.cluster.prompts import turn_ids
from drafthorse.cluster.router import NoWorkers, Router
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime import kinds, metrics
from drafthorse.runtime.errors import BadField, shown
from drafthorse.runtime.redis_store import connect_async
from drafthorse.runtime.registry import Registry
from drafthorse.runtime.rpc import (
    OPEN_PREFIXES,
    OPTIONS,
    abort,
    auth_metadata,
    channel,
    field_of,
    is_loopback,
    token_ok,
)
from drafthorse.runtime.sessions import SessionConflict, SessionNotFound, SessionStore, TooManySessions
from drafthorse.runtime.settings import GatewaySettings

log = logging.getLogger(__name__)
SERVICE = "drafthorse.v1.Generator"
MAX_PROMPT_CHARS = 1_000_000
TURN_LEASE_S = 60.0        # a session's turn lease, renewed while the turn streams (sessions.begin_turn)
TOKENIZE_THREADS = 2
MAX_CHAT_MESSAGES = 1024   # (the template renders each: hundreds of thousands of empty ones cost seconds)
MAX_CACHE_SALT = 256       # characters of a request's cache_salt
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


INTERNAL_OWNER = "_internal"   # the cluster itself (start-up probe, benchmarks), by the internal token


def caller(keys, token: str, metadata) -> str | None:
    """Who is calling: an API key's owner name, INTERNAL_OWNER for the internal token, None if
    neither (both compared in constant time)."""
    owner = keys.identify(bearer(metadata))
    if owner is None and token and token_ok(metadata, token):
        owner = INTERNAL_OWNER
    return owner


class ApiKeyAuth(grpc.aio.ServerInterceptor):
    """Every public RPC but health/reflection needs a configured API key (cluster/apikeys.py) or the
    cluster's internal token."""

    def __init__(self, keys, token: str = ""):
        self.keys, self.token = keys, token

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or unknown API key: send metadata 'authorization: Bearer <key>'")
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

        async def deny_stream(request, context):
            await deny(request, context)
            yield  # pragma: no cover - never reached
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_PREFIXES) or \
                caller(self.keys, self.token, details.invocation_metadata) is not None:
            return await continuation(details)
        handler = await continuation(details)
        return self._deny_stream if handler is not None and handler.response_streaming else self._deny_unary


def prefix_scope(owner: str, salt: str) -> str:
    """The scope within which a request's prompt may reuse K/V cached for another's: its API key's,
    narrowed by its cache_salt (length-prefixed: no owner and salt pair spells another's)."""
    return f"{len(owner)}:{owner}{salt}"


async def _refuse(context, e: LimitExceeded) -> None:
    """RESOURCE_EXHAUSTED with the retry hint as trailing metadata (HTTP: Retry-After)."""
    if e.retry_after_s:
        context.set_trailing_metadata((("retry-after", str(e.retry_after_s)),))
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))


class Gateway(pb_grpc.GeneratorServicer):
    def __init__(self, s: GatewaySettings, tokenizer):
        self.s, self.tok = s, tokenizer
        self.keys = KeyRing.of(s)
        self.redis = connect_async(s.redis_url)   # awaited: a slow Redis holds up only the requests waiting on it
        self.registry = Registry(self.redis, s.key_prefix, heartbeat_ttl_s=3 * s.heartbeat_s)
        self.router = Router(self.registry)
        self.sessions = SessionStore(self.redis, s.key_prefix, ttl_s=s.session_ttl_s)
        # per-key limits apply to callers identified by an API key (not to the cluster itself)
        limits = Limits.of(s)
        self.limits = KeyLimits(self.redis, s.key_prefix, limits, lease_s=s.max_stream_s + LEASE_MARGIN_S) \
            if self.keys.enabled and limits.any else None
        self.metadata = auth_metadata(s.token())
        self.tls = s.tls()   # towards the target workers
        self._channels: dict[str, grpc.aio.Channel] = {}
        # target worker id -> until when (monotonic) this gateway avoids it: it just failed a call with
        # UNAVAILABLE (killed: its registry entry outlives it by up to a heartbeat TTL)
        self._suspects: dict[str, float] = {}
        self._claiming = asyncio.Lock()   # pick-and-count atomic for this gateway (see _claim)
        # chat templating and tokenization (up to MAX_PROMPT_CHARS each) off the event loop, where they
        # stalled every stream and the health probe: a few threads (the tokenizer releases the GIL)
        self._tokenize = ThreadPoolExecutor(max_workers=TOKENIZE_THREADS, thread_name_prefix="tokenize")

    def _stub(self, address: str) -> pb_grpc.TargetStub:
        if address not in self._channels:
            self._channels[address] = channel(address, self.tls, aio=True)
        return pb_grpc.TargetStub(self._channels[address])

    def _validate(self, r: pb.GenerateRequest) -> tuple[list[dict] | None, str | None, int]:
        """Everything checkable before touching a worker; BadField (a ValueError) names the field at fault."""
        which = r.WhichOneof("input")
        if which is None:
            raise BadField("prompt", "give a prompt or chat messages")
        messages = prompt = None
        if which == "prompt":
            if not r.prompt.strip():
                raise BadField("prompt", "prompt is empty")
            if len(r.prompt) > MAX_PROMPT_CHARS:
                raise BadField("prompt", f"prompt is longer than {MAX_PROMPT_CHARS} characters")
            prompt = r.prompt
        else:
            messages = [{"role": m.role, "content": m.content} for m in r.chat.messages]
            if len(messages) > MAX_CHAT_MESSAGES:
                raise BadField("chat", f"chat has {len(messages)} messages, at most {MAX_CHAT_MESSAGES} are served")
            if not messages or not any(m["content"].strip() for m in messages):
                raise BadField("chat", "chat has no message with content")
            if any(m["role"] not in ("system", "user", "assistant") for m in messages):
                raise BadField("chat", "chat message role must be system, user or assistant")
            if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
                raise BadField("chat", f"chat is longer than {MAX_PROMPT_CHARS} characters")
        max_new = r.max_new_tokens or self.s.max_new_tokens_default
        if not 1 <= max_new <= self.s.max_new_tokens_limit:
            raise BadField("max_new_tokens",
                           f"max_new_tokens must be in [1, {self.s.max_new_tokens_limit}], got {r.max_new_tokens}")
        constraint = constraint_from_proto(r.constraint)
        sampling_from_proto(r.sampling, max_new_tokens=max_new, stop=tuple(r.stop), constraint=constraint).validate()
        if constraint is not None:
            compile_spec(*constraint)   # BadField("constraint") for one that does not compile
        if r.drafter:
            kinds.kind(r.drafter)   # BadField("drafter") when unknown
        if len(r.cache_salt) > MAX_CACHE_SALT:
            raise BadField("cache_salt", f"cache_salt is {len(r.cache_salt)} characters, at most {MAX_CACHE_SALT}")
        if r.session_id and r.new_session:
            raise BadField("session_id", "give session_id to continue a session or new_session to open one, not both")
        if r.n > self.s.max_n:
            raise BadField("n", f"n must be in [1, {self.s.max_n}] (choices per request), got {r.n}")
        if r.n > 1 and (r.session_id or r.new_session):
            raise BadField("n", "n > 1 cannot be used with a session (a session continues one conversation): "
                           "ask for one choice")
        return messages, prompt, max_new

    async def _claim(self, session, tried: set[str], kind: str, leases: contextlib.AsyncExitStack,
                     pin: list[str] | None = None):
        """Pick a target (affinity, then least load) and its draft worker, and count the request on
        both. Under one lock: pick-and-count is atomic for this gateway, so a burst of requests
        spreads over the workers instead of all seeing the same loads.
        Workers this request tried are never picked again; recent suspects only when nothing else is alive.
        pin: the choices of one prompt (n > 1) share it; the first claim writes the target it got, the
        others prefer that one (its KV cache holds their shared prompt once the first has prefilled it)."""
        async with self._claiming:
            now = time.monotonic()
            self._suspects = {w: t for w, t in self._suspects.items() if t > now}
            target = await self.router.pick_target(session if not tried else None,   # NoWorkers: none alive
                                                   prefer=pin[0] if pin and not tried else None)
            if target.worker_id in tried or target.worker_id in self._suspects:
                alive = [w for w in await self.registry.alive("target") if w.worker_id not in tried]
                others = [w for w in alive if w.worker_id not in self._suspects] or alive
                if not others:
                    raise NoWorkers("no other target worker is alive")
                target = await self.router.least_loaded(others)
            await leases.enter_async_context(self.router.lease(target))
            if pin is not None and not pin:
                pin.append(target.worker_id)
            draft = await self.router.pick_draft(target, kind) if kind != "none" else None
            await leases.enter_async_context(self.router.lease(draft))
            return target, draft

    async def _claim_or_wait(self, session, tried: set[str], kind: str, leases: contextlib.AsyncExitStack,
                             context, pin: list[str] | None = None):
        """`_claim`; a stream already failed over (tried) waits up to failover_wait_s (and its deadline) for
        a target to come (a replacement starting, a heartbeat late on a loaded host) before UNAVAILABLE."""
        give_up = time.monotonic() + (self.s.failover_wait_s if tried else 0.0)
        while True:
            try:
                return await self._claim(session, tried, kind, leases, pin)
            except NoWorkers as e:
                left = min(give_up - time.monotonic(), context.time_remaining() or float("inf"))
                if left <= 0:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{e}: retry later")
                await asyncio.sleep(min(0.25, left))

    async def Generate(self, r: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """`_generate`, counted: in flight while it runs, then by final status code."""
        code = "UNKNOWN"
        metrics.INFLIGHT.labels("gateway").inc()
        try:
            try:
                async with contextlib.aclosing(self._generate(r, context)) as stream:
                    async for msg in stream:
                        yield msg
            except redis.RedisError as e:   # down or stalled past its socket timeout: retryable, not INTERNAL
                log.warning("redis failed a request: %s", type(e).__name__)
                await abort(context, f"the cluster's Redis did not answer ({type(e).__name__}): retry later",
                            grpc.StatusCode.UNAVAILABLE)
            code = "OK"
        except (asyncio.CancelledError, GeneratorExit):
            code = "DEADLINE_EXCEEDED" if (context.time_remaining() or 1.0) <= 0 else "CANCELLED"
            raise
        except BaseException:
            code = getattr(context.code(), "name", "UNKNOWN")
            raise
        finally:
            metrics.INFLIGHT.labels("gateway").dec()
            metrics.REQUESTS.labels(code).inc()

    async def _generate(self, r: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        if isinstance(r, Unparsable):
            await abort(context, str(r))
        try:
            messages, prompt, max_new = self._validate(r)
        except ValueError as e:
            await abort(context, e)
        session = None
        # a session belongs to the key that opened it: another key's session id is NOT_FOUND
        owner = caller(self.keys, self.s.token(), context.invocation_metadata()) or "" if self.keys.enabled else ""
        if r.session_id:
            session = await self._session(context, r.session_id, owner)
        sid = session.session_id if session else ""
        lease = None
        if session is not None:   # one turn of a session at a time, else two would interleave their tokens
            lease = await self.sessions.begin_turn(sid, TURN_LEASE_S)
            if lease is None:
                await abort(context, f"session {shown(sid)} has a turn in progress: send the next turn once it "
                            "has finished", grpc.StatusCode.ABORTED, "session_id")
        try:
            if r.session_id:   # read again under the lease: a turn that just ended may have added to it
                session = await self._session(context, sid, owner)
            async with contextlib.aclosing(self._turn(r, context, session, sid, owner, messages, prompt, max_new,
                                                      lease, r.new_session)) as turn:
                async for msg in turn:
                    yield msg
        finally:
            if lease is not None:
                await asyncio.shield(self.sessions.end_turn(sid, lease))

    async def _session(self, context, sid: str, owner: str):
        """The session `sid` of `owner`, else NOT_FOUND (another owner's reads as missing)."""
        session = await self.sessions.get(sid, owner)
        if session is None:
            await abort(context, f"session {shown(sid)} not found (expired?)", grpc.StatusCode.NOT_FOUND, "session_id")
        return session

    async def _turn(self, r, context, session, sid: str, owner: str, messages, prompt, max_new: int,
                    lease: str | None, new_session: bool):
        """One request's turn, its session (if any) leased to it: prompt, limits, checkpoint, relay. A new
        session is opened here, once the request is admitted: a refused one leaves no session behind."""
        history = session.token_ids if session else []
        prompt_ids = await asyncio.get_running_loop().run_in_executor(self._tokenize, turn_ids, self.tok, history,
                                                                      messages, prompt)
        if len(prompt_ids) >= self.s.max_len:
            await abort(context, f"prompt is {len(prompt_ids)} tokens; the context is {self.s.max_len}: shorten it",
                        field="chat" if messages is not None else "prompt")
        kind = r.drafter or self.s.drafter
        limits = self.limits if owner not in ("", INTERNAL_OWNER) else None   # None: not limited
        streamed = [0]   # tokens relayed so far: what the key's per-minute budget is charged
        n = max(1, r.n)
        # this request's stream leases, one a choice: released by id, so never twice or leaked
        slots = [f"{uuid.uuid4().hex}.{i}" for i in range(n)]
        opened = None              # the turn lease of a session this request opened
        try:
            if limits is not None:   # before anything is written: a refused turn leaves its session as it was
                try:
                    await limits.check(owner, len(prompt_ids), max_new * n)
                    for slot in slots:
                        await limits.acquire(owner, slot)
                except LimitExceeded as e:
                    await _refuse(context, e)
            if new_session:
                cap = limits.limits.sessions if limits is not None else 0
                try:
                    session = await self.sessions.create(owner, cap)
                except TooManySessions as e:
                    await _refuse(context, LimitExceeded(
                        f"this key has {e.open_now} sessions open, its limit is {cap}: continue one of them, or "
                        f"retry after {e.retry_after_s} s (when the first expires)", e.retry_after_s))
                sid = session.session_id
                lease = opened = await self.sessions.begin_turn(sid, TURN_LEASE_S)
            if session is not None and len(prompt_ids) > len(history):
                # the new turn's prompt is committed conversation: checkpoint it before generating
                await self.sessions.checkpoint(sid, prompt_ids[len(history):])
            # aclosing: a client that goes away closes the relay too (its worker leases, the target call)
            relay_of = self._choices(r, context, prompt_ids, max_new, kind, streamed, n, owner) if n > 1 \
                else self._stream(r, context, session, sid, prompt_ids, max_new, kind, streamed, owner)
            async with contextlib.aclosing(relay_of) as relay:
                renewed = time.monotonic()
                async for msg in relay:
                    if lease is not None and time.monotonic() - renewed > TURN_LEASE_S / 3:
                        renewed = time.monotonic()
                        await self.sessions.renew_turn(sid, lease, TURN_LEASE_S)
                    yield msg
        finally:
            async def settle():
                if opened is not None:
                    await self.sessions.end_turn(sid, opened)
                if limits is not None:
                    for slot in slots:
                        await limits.release(owner, slot)
                    await limits.spent(owner, streamed[0])
            # shielded: a second cancellation while it runs must not leave the lease or the slot taken
            await asyncio.shield(settle())

    async def _choices(self, r, context, prompt_ids: list[int], max_new: int, kind: str, streamed: list[int],
                       n: int, owner: str):
        """n choices of one prompt, each relayed as a request of its own (`_stream`: routed, failed over
        and counted alone) with seed + index, all on the first one's target while it lives (it prefills
        the prompt once for all). Their messages interleave as they come, each with its index, numbered
        in one sequence; a choice that fails ends the request with its status."""
        out: asyncio.Queue = asyncio.Queue(maxsize=2 * n)   # bounded: a slow client holds the relays back
        counts = [[0] for _ in range(n)]
        pin: list[str] = []

        async def relay(i: int) -> None:
            ri = pb.GenerateRequest()
            ri.CopyFrom(r)
            ri.n = 1
            if r.sampling.HasField("seed"):
                ri.sampling.seed = (r.sampling.seed + i) % 2**63   # (seeds are below 2**63)
            try:
                async with contextlib.aclosing(self._stream(ri, context, None, "", prompt_ids, max_new, kind,
                                                            counts[i], owner, pin)) as stream:
                    async for msg in stream:
                        msg.index = i
                        await out.put(msg)
                await out.put(None)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - an abort's status included: the request ends with it
                await out.put(e)

        tasks = [asyncio.create_task(relay(i)) for i in range(n)]
        try:
            seq = ended = 0
            while ended < n:
                item = await out.get()
                if item is None:
                    ended += 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                item.seq, seq = seq, seq + 1
                streamed[0] = sum(c[0] for c in counts)
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, r, context, session, sid: str, prompt_ids: list[int], max_new: int, kind: str,
                      streamed: list[int], owner: str, pin: list[str] | None = None):
        """Route to a target (again, on a retryable failure) and relay its stream; streamed[0] counts
        the tokens relayed. A session's conversation gets exactly the tokens relayed, each message's
        written before it is sent on (this is its only writer: a target that dies after computing tokens
        it never delivered leaves nothing behind for the next one to repeat)."""
        seq = 0
        generated: list[int] = []
        finished = False          # the message with finish_reason was relayed: the answer is whole
        ends = time.monotonic() + self.s.max_stream_s   # with no client deadline too
        tried: set[str] = set()   # target worker ids that failed this request
        while not finished:
            async with contextlib.AsyncExitStack() as leases:
                target, draft = await self._claim_or_wait(session, tried, kind, leases, context, pin)
                treq = pb.TargetRequest(request=r, prompt_ids=prompt_ids + generated, session_id=sid,
                                        draft_address=draft.address if draft else "",
                                        max_new_tokens=max_new - len(generated),
                                        prefix_scope=prefix_scope(owner, r.cache_salt))
                treq.request.drafter = kind
                left = ends - time.monotonic()
                call = self._stub(target.address).Generate(treq, metadata=self.metadata,
                                                           timeout=min(context.time_remaining() or left, left))
                try:
                    async for msg in call:
                        if session is not None and msg.token_ids:
                            await self._checkpoint(context, sid, list(msg.token_ids), target.worker_id,
                                                   len(prompt_ids) + len(generated))
                        generated += list(msg.token_ids)
                        streamed[0] = len(generated)
                        msg.seq, msg.session_id = seq, sid
                        finished = bool(msg.finish_reason)
                        seq += 1
                        yield msg
                    finished = True
                except grpc.aio.AioRpcError as e:
                    if finished:   # died between its last message and its status: nothing is missing
                        log.info("target %s failed (%s) after the last message", target.worker_id, e.code().name)
                        break
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() >= ends:
                        await abort(context, f"the stream ran for max_stream_s ({self.s.max_stream_s:g} s) and was "
                                    "ended: ask for fewer tokens or raise the setting", e.code())
                    if e.code() not in RETRYABLE:
                        # the target's verdict as it gave it, the field at fault included
                        await abort(context, e.details() or e.code().name, e.code(), field_of(e))
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        self._suspects[target.worker_id] = time.monotonic() + self.registry.heartbeat_ttl_s
                    log.warning("target %s failed (%s); continuing on another worker after %d tokens",
                                target.worker_id, e.code().name, len(generated))
                    tried.add(target.worker_id)
                finally:
                    # no-op once the call ended; when the client went away (the relay is being
                    # closed) it stops the target now, not whenever the call object is collected
                    call.cancel()
        if session is not None:
            await self.sessions.finish_turn(sid, {"generated_tokens": len(generated)})

    async def _checkpoint(self, context, sid: str, ids: list[int], worker_id: str, at: int) -> None:
        """Append a relayed message's tokens to the session at offset `at` (setting its affinity)."""
        try:
            await self.sessions.checkpoint(sid, ids, worker_id, at)
        except SessionConflict as e:   # the turn's lease lapsed and another turn wrote: stop this one
            await abort(context, f"{e}: another turn wrote to it; this one stops", grpc.StatusCode.ABORTED,
                        "session_id")
        except SessionNotFound:
            await abort(context, f"session {shown(sid)} expired during the turn", grpc.StatusCode.NOT_FOUND,
                        "session_id")


class Unparsable(ValueError):
    """A request's bytes that are no GenerateRequest."""


def _parse_request(data: bytes) -> pb.GenerateRequest | Unparsable:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as e:
        return Unparsable(f"the request is not a valid GenerateRequest ({e}): string fields must be UTF-8")


async def drain_gateway(server: grpc.aio.Server, hs, grace_s: float) -> None:
    """Health NOT_SERVING first (load balancers stop sending), then refuse new calls and give the streams
    in flight `grace_s` to finish."""
    for name in ("", SERVICE):
        await hs.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace_s)


async def serve_gateway(s: GatewaySettings, tokenizer, ready: asyncio.Event | None = None,
                        handles: dict | None = None) -> None:
    """Serve until the server stops; `handles` (if given) receives the server and its health servicer."""
    gateway = Gateway(s, tokenizer)
    # clients' messages are bounded by max_request_bytes (gRPC answers RESOURCE_EXHAUSTED past it); the
    # 64 MiB of OPTIONS is for the internal messages that carry target features
    public = [o for o in OPTIONS if o[0] != "grpc.max_receive_message_length"] + \
        [("grpc.max_receive_message_length", s.max_request_bytes)]
    server = grpc.aio.server(options=public, interceptors=[ApiKeyAuth(gateway.keys, s.token())]
                             if gateway.keys.enabled else [], maximum_concurrent_rpcs=s.max_concurrent_rpcs)
    if not gateway.keys.enabled and not is_loopback(s.host):
        log.warning("the public API on %s has no API keys, as asked (allow_anonymous): anyone who reaches "
                    "it can generate", s.host)
    # Generate as pb_grpc registers it, but a request that does not parse (invalid UTF-8 in a string field)
    # reaches the handler as Unparsable, for INVALID_ARGUMENT (gRPC's own answer would be INTERNAL)
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        gateway.Generate, request_deserializer=_parse_request,
        response_serializer=pb.GenerateResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if s.reflection:
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if server.add_insecure_port(f"{s.host}:{s.gateway_port}") == 0:
        raise OSError(f"cannot bind the gateway to {s.host}:{s.gateway_port}")
    await server.start()
    for name in ("", SERVICE):
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    if handles is not None:
        handles.update(server=server, health=hs)
    log.info("gateway listening on %s:%d", s.host, s.gateway_port)
    metrics.serve(s.host, s.metrics_port, "gateway")
    if ready is not None:
        ready.set()
    await server.wait_for_termination()
