"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions (streaming as server-sent
events, or one JSON body), /v1/models. A thin translation layer: every request becomes one
drafthorse.v1.Generator/Generate call to the gRPC gateway (grpc.aio, loopback), so validation,
routing, sessions and failover are the gateway's, and gRPC status codes map to HTTP ones.

    app = create_app("127.0.0.1:50051", model="smollm2")   # any ASGI server; the cluster serves it
                                                           # through Ray Serve's HTTP ingress

Parameters: model (must be the served model id), prompt (one string) / messages, max_tokens
(max_completion_tokens for chat; default: the server's), temperature (OpenAI's default 1.0),
top_p, stop (string or list), seed, stream, stream_options.include_usage, n (choices: choice i is
sampled with seed + i; up to the server's max_n; x_drafthorse holds choice 0's stats), logprobs and
top_logprobs (chat) / logprobs (completions; the sampled token's is always in top_logprobs): the target
model's own log-probabilities, before temperature, top-k and top-p, equal with speculation on or off;
a token that is part of a character is written with backslash escapes (its `bytes` are exact);
response_format (json_object, json_schema: a structured output); tools / tool_choice / tool messages
(chat; toolcalls.py: a call is a structured output, answered as tool_calls). Extensions:
drafter (none | ngram | draft-model), session_id (continue a session), new_session (open one; its
id comes back in x_drafthorse.session_id), top_k, cache_salt (as vLLM's: cached prompt prefixes are
reused only among requests of one API key and salt). Non-streaming responses (and the last streamed
chunk) carry `x_drafthorse`: the generation's stats (mean_accepted_tokens, tokens_per_s, ...).
Errors come back as {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, Optional, Union

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from drafthorse.actors.spec.logprobs import MAX_TOP
from drafthorse.cluster import toolcalls
from drafthorse.cluster.apikeys import bearer
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.rpc import field_of

log = logging.getLogger(__name__)
REQUEST_TIMEOUT_S = 600.0
OPENAI_DEFAULT_TEMPERATURE = 1.0

# gRPC status -> (HTTP status, OpenAI error type)
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),       # a session's turn while another is in progress
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
# the request field a gateway error names (rpc.field_of) -> its OpenAI parameter; "prompt" and "chat"
# become the request's own input parameter (prompt or messages)
FIELD_PARAMS = {"max_new_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p",
                "sampling.top_k": "top_k", "sampling.seed": "seed", "sampling.logprobs": "logprobs", "stop": "stop",
                "n": "n", "drafter": "drafter", "constraint": "response_format",
                "session_id": "session_id", "cache_salt": "cache_salt"}
# OpenAI parameters this server does not implement: rejected unless absent, null or their no-op value
UNSUPPORTED = {"echo": (None, False),
               "best_of": (None, 1), "suffix": (None, ""), "functions": (None, []),
               "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
               "frequency_penalty": (None, 0, 0.0)}


class APIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """Every error, whatever its status (request validation included: 400, never FastAPI's 422)."""
    error: _ErrorDetail


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


# the statuses a /v1 route answers, as its OpenAPI operation documents them
Responses = dict[int | str, dict[str, Any]]   # FastAPI's `responses=`: status -> OpenAPI response object
RESPONSES: Responses = {
    400: _err("invalid request: not JSON, not an object, a missing or wrong field, an unsupported parameter, a value "
              "out of range (OpenAI's error format)"),
    401: _err("missing or unknown API key (when keys are configured)"),
    403: _err("permission denied"),
    404: _err("unknown model, session or route"),
    413: _err("the request body is too large (DRAFTHORSE_MAX_REQUEST_BYTES)"),
    429: _err("no capacity or a key's limit reached (Retry-After)"),
    500: _err("an unexpected gateway error"),
    503: _err("the gateway or its workers are unavailable"),
    504: _err("the request timed out")}
GENERATE_RESPONSES: Responses = {
    200: {"description": "one JSON body, or with stream: true server-sent events (`data: {chunk}` ... `data: [DONE]`; "
                         "an error after the first event comes as an `error` event)",
          "content": {"text/event-stream": {}}},
    409: _err("the session has a turn in progress: send the next turn once it has finished"),
    **RESPONSES}


def _text(s: str, param: str) -> str:
    """s, if protobuf can carry it (UTF-8): a JSON string may hold a lone surrogate (\\ud800), which
    protobuf refuses with a UnicodeEncodeError; a 400 instead of a 500."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} is not valid Unicode: a lone surrogate at position {e.start}", param=param,
                       code="invalid_value") from None
    return s


def _forwardable(key: str) -> str:
    """The API key to pass on to the gateway as gRPC metadata, or '' where gRPC cannot carry it
    (non-ASCII or control characters: a 500 'Invalid metadata'; over gRPC's metadata limit: a
    RESOURCE_EXHAUSTED, i.e. a misleading 429). No valid key looks like that, so a gateway that
    requires keys answers 401 for it, and an open one serves the request as if no key came."""
    return key if len(key) <= 4096 and key.isascii() and key.isprintable() else ""


def from_grpc(e: grpc.aio.AioRpcError, input_param: str) -> APIError:
    status, type_ = STATUS.get(e.code(), (500, "server_error"))
    details = e.details() or e.code().name
    field = field_of(e)
    param = input_param if field in ("prompt", "chat") else FIELD_PARAMS.get(field or "")
    code = "session_not_found" if e.code() == grpc.StatusCode.NOT_FOUND and param == "session_id" \
        else e.code().name.lower()
    retry = dict(e.trailing_metadata() or ()).get("retry-after")   # the gateway's hint on a 429
    return APIError(status, details, type_, param, code, headers={"Retry-After": str(retry)} if retry else None)


# ---------------------------------------------------------------- request bodies

class _JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[_JsonSchemaFormat] = None


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we ignore (user, metadata, ...)

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = None
    drafter: Optional[str] = None
    session_id: Optional[str] = None
    new_session: Optional[bool] = False
    cache_salt: Optional[str] = None   # requests share cached prompt prefixes only with the same salt
    response_format: Optional[ResponseFormat] = None   # structured outputs: JSON, or JSON of a schema


class CompletionBody(_Body):
    prompt: Union[str, list[Any]]
    logprobs: Optional[int] = None     # the sampled token's log-probability and this many alternatives


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _CalledFunction(BaseModel):
    name: str
    arguments: str


class _ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: _CalledFunction


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[_TextPart], None] = None
    tool_calls: Optional[list[_ToolCallIn]] = None     # an assistant turn that called tools
    tool_call_id: Optional[str] = None                 # a tool's result (role "tool")


class _FunctionIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolIn(BaseModel):
    type: Literal["function"]
    function: _FunctionIn


class _ChosenFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: _ChosenFunction


class ChatBody(_Body):
    messages: list[ChatMessageIn]
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[ToolIn]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None   # accepted; an answer makes at most one call


def _common(body: _Body, r: pb.GenerateRequest) -> None:
    """The parameters both endpoints share, checked where the gateway cannot tell (0 = default in
    the proto) and copied onto the gRPC request."""
    extra = body.model_extra or {}
    for name, noop in UNSUPPORTED.items():
        if name in extra and extra[name] not in noop:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    if body.n is not None:
        if not 1 <= body.n < 2**31:
            raise APIError(400, f"n must be >= 1, got {body.n}", param="n")
        r.n = body.n   # the gateway holds it to its max_n
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    if max_tokens is not None:
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        r.max_new_tokens = min(max_tokens, 2**31 - 1)
    temperature = OPENAI_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    if not math.isfinite(temperature) or temperature < 0:
        raise APIError(400, f"temperature must be a finite number >= 0, got {temperature}", param="temperature")
    r.sampling.temperature = temperature
    if body.top_p is not None:
        if not 0 < body.top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
        r.sampling.top_p = body.top_p
    if body.top_k is not None:
        if not 0 <= body.top_k < 2**31:
            raise APIError(400, f"top_k must be >= 0 (0 disables it), got {body.top_k}", param="top_k")
        r.sampling.top_k = body.top_k
    if body.seed is not None:
        if not 0 <= body.seed < 2**63:
            raise APIError(400, f"seed must be in [0, 2**63), got {body.seed}", param="seed")
        r.sampling.seed = body.seed
    top, param = (body.top_logprobs, "top_logprobs") if isinstance(body, ChatBody) else \
        (getattr(body, "logprobs", None), "logprobs")   # (completions: an int; its own field)
    if isinstance(body, ChatBody) and top is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if top is not None or (isinstance(body, ChatBody) and body.logprobs):
        if not 0 <= (top := top or 0) <= MAX_TOP:
            raise APIError(400, f"{param} must be in [0, {MAX_TOP}], got {top}", param=param)
        r.sampling.logprobs = top
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        r.constraint.json_object = True
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs its json_schema: {name, schema}",
                           param="response_format")
        r.constraint.json_schema = json.dumps(fmt.json_schema.schema_)
    r.stop.extend(_text(s, "stop") for s in ([body.stop] if isinstance(body.stop, str) else (body.stop or [])))
    r.drafter = _text(body.drafter or "", "drafter")
    r.session_id = _text(body.session_id or "", "session_id")
    r.new_session = bool(body.new_session)
    r.cache_salt = _text(body.cache_salt or "", "cache_salt")


def completion_request(body: CompletionBody) -> pb.GenerateRequest:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            kind = "token ids" if prompt and all(isinstance(x, int) or isinstance(x, list) for x in prompt) \
                else f"a list of {len(prompt)} items"
            raise APIError(400, f"prompt must be a single string (or a list holding exactly one string); "
                                f"got {kind}: batched and token-id prompts are not supported", param="prompt")
        prompt = prompt[0]
    r = pb.GenerateRequest(prompt=_text(prompt, "prompt"))
    _common(body, r)
    return r


def tool_choice(body: ChatBody) -> str | None:
    """none | auto | required | a tool's name; None without tools (OpenAI's default: auto with tools)."""
    choice = body.tool_choice
    if choice is not None and not body.tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if not body.tools:
        return None
    return "auto" if choice is None else choice if isinstance(choice, str) else choice.function.name


def chat_request(body: ChatBody) -> pb.GenerateRequest:
    """The gRPC request; tools (toolcalls.py) are written into the system message, earlier calls and their
    results into the turns, and the answer constrained to a call where tool_choice asks for one."""
    r = pb.GenerateRequest()
    r.chat.SetInParent()
    choice = tool_choice(body)
    tools = [{"name": t.function.name, "description": t.function.description, "parameters": t.function.parameters}
             for t in body.tools or []]
    try:
        toolcalls.check(tools, choice)
    except toolcalls.ToolError as e:
        raise APIError(400, str(e), param=e.param) from None
    if choice is not None and body.n not in (None, 1):
        raise APIError(400, "n > 1 with tools is not served: ask for one choice", param="n")
    turns: list[list[str]] = []   # [role, content]
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role must be system, developer, user, assistant or tool, got "
                                f"{m.role!r}", param=f"messages[{i}].role")
        content = m.content if isinstance(m.content, str) or m.content is None \
            else "".join(p.text for p in m.content)
        content = _text(content or "", f"messages[{i}].content")
        if role == "tool":   # a tool's result: a user turn in the generic format
            role, content = "user", toolcalls.response_text(content)
        if role == "assistant" and m.tool_calls:
            content = "\n".join([content] * bool(content) + [toolcalls.call_text(c.function.name, c.function.arguments)
                                                            for c in m.tool_calls])
        turns.append([role, content])
    if tools:
        listed = toolcalls.system_text(tools)
        if turns and turns[0][0] == "system":
            turns[0][1] += "\n\n" + listed
        else:
            turns.insert(0, ["system", listed])
    for role, content in turns:
        r.chat.messages.add(role=role, content=content)
    _common(body, r)
    if choice is not None and (lark := toolcalls.grammar(tools, choice)) is not None:
        if r.HasField("constraint"):
            raise APIError(400, "response_format and tools cannot be combined", param="response_format")
        r.constraint.lark = lark
    return r


# ---------------------------------------------------------------- responses

def _stats(msg: pb.GenerateResponse | None) -> dict:
    if msg is None:
        return {}
    d = MessageToDict(msg.stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {"session_id": msg.session_id or None, **d}


class _Choice:
    """One choice's part of a response as its messages arrive."""

    def __init__(self):
        self.text: list[str] = []
        self.generated = 0
        self.logprobs: list[pb.TokenLogprob] = []
        self.last: pb.GenerateResponse | None = None    # its finishing message, once it came

    def add(self, msg: pb.GenerateResponse) -> None:
        self.text.append(msg.text_delta)
        self.generated += len(msg.token_ids)
        self.logprobs += msg.logprobs
        if msg.finish_reason:
            self.last = msg

    @property
    def reason(self) -> str:
        return _finish(self.last.finish_reason if self.last is not None else "")


def _usage(choices: list[_Choice]) -> dict:
    """The prompt once (its choices share it), every choice's tokens."""
    prompt = next((c.last.stats.prompt_tokens for c in choices if c.last is not None), 0)
    completion = sum(c.last.stats.generated_tokens if c.last is not None and c.last.stats.generated_tokens
                     else c.generated for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token(b: bytes) -> str:
    """A token's text; one that holds part of a character shows its bytes as backslash escapes."""
    return b.decode("utf-8", errors="backslashreplace")


def chat_logprobs(lps) -> dict:
    """OpenAI's chat `logprobs` for these pb.TokenLogprob."""
    def entry(t) -> dict:
        return {"token": _token(t.token), "logprob": t.logprob, "bytes": list(t.token)}
    return {"content": [entry(t) | {"top_logprobs": [entry(a) for a in t.top]} for t in lps], "refusal": None}


def completion_logprobs(lps, offset: int) -> dict:
    """OpenAI's legacy completions `logprobs` for these pb.TokenLogprob, the first at text offset `offset`;
    each position's top_logprobs holds the sampled token too (up to logprobs + 1 entries, as OpenAI's)."""
    tokens = [_token(t.token) for t in lps]
    return {"tokens": tokens, "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [{_token(a.token): a.logprob for a in t.top} | {tok: t.logprob}
                             for tok, t in zip(tokens, lps)],
            "text_offset": list(itertools.accumulate(map(len, tokens), initial=offset))[:-1]}


def _tool_call(made: dict) -> dict:
    """OpenAI's tool_calls entry for a parsed call (toolcalls.parse)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": made}


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _loc(error: dict) -> list[str]:
    """A validation error's location without pydantic's union branch tags (`str`, `list[str]`, ...)."""
    return [str(x) for x in error.get("loc", ())
            if not (isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool", "dict", "list")))]


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


class _Generator:
    """One grpc.aio channel to the gateway, made in (and re-made for) the event loop serving requests."""

    def __init__(self, gateway: str, timeout_s: float):
        self.gateway, self.timeout_s = gateway, timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def stub(self) -> pb_grpc.GeneratorStub:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            self._channel, self._loop = grpc.aio.insecure_channel(self.gateway), loop
        return pb_grpc.GeneratorStub(self._channel)

    async def open(self, r: pb.GenerateRequest, input_param: str, key: str = ""):
        """Start the call (with the client's API key, which the gateway checks and owns sessions by)
        and read its first message, so an error becomes the HTTP status."""
        call = self.stub().Generate(r, timeout=self.timeout_s,
                                    metadata=(("authorization", f"Bearer {key}"),) if key else None)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, input_param) from None
        except BaseException:
            call.cancel()
            raise
        return call, first

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class _BodyTooLarge(StarletteHTTPException):
    """Raised while a body is read: an HTTPException, so FastAPI passes it on instead of turning it into
    its generic 400 ("error parsing the body")."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (DRAFTHORSE_MAX_REQUEST_BYTES)")

    def response(self) -> JSONResponse:
        return JSONResponse(APIError(413, self.detail, code="request_too_large").body(), status_code=413,
                            headers={"Connection": "close"})


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, refused by its Content-Length before
    any of it is read, or (chunked) as soon as the bytes received pass the limit, so a client cannot
    make a replica buffer an unbounded body. (Starlette's RequestBodyLimitMiddleware answers in plain
    text, not OpenAI's error format.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            return await _BodyTooLarge(self.limit).response()(scope, receive, send)
        received = 0

        async def bounded():
            nonlocal received
            msg = await receive()
            received += len(msg.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge(self.limit)
            return msg
        await self.app(scope, bounded, send)



def create_app(gateway: str, model: str, timeout_s: float = REQUEST_TIMEOUT_S, keys=None,
               max_body_bytes: int = 4 << 20) -> FastAPI:
    """The FastAPI app serving `model` by calling the gRPC gateway at `gateway` (HOST:PORT). keys: the
    API keys (cluster/apikeys.KeyRing) every /v1 route requires; None or empty = open. A request body
    over max_body_bytes is a 413."""
    gen = _Generator(gateway, timeout_s)

    async def api_key(request: Request) -> str:
        """The request's API key (Authorization: Bearer, as OpenAI clients send it); 401 if keys are
        configured and it is not one of them."""
        key = bearer(request.headers.items())
        if keys is not None and keys.enabled and keys.identify(key) is None:
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")
        return _forwardable(key)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await gen.close()

    app = FastAPI(title="drafthorse OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """The schema (not served: openapi_url=None; tests read it) without FastAPI's automatic 422:
        a validation error is a 400 in OpenAI's format here (_invalid)."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()   # which keeps it as app.openapi_schema
        for item in schema.get("paths", {}).values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema
    app.openapi = openapi   # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    created = int(time.time())
    app.state.generator = gen

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = _loc(first)
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}",
                                         code="invalid_json").body(), status_code=400)
        if loc and loc[0] == "body":
            loc = loc[1:]
        if not loc and first.get("type") == "model_attributes_type":
            err = APIError(400, "the request body must be a JSON object (and sent with Content-Type: "
                                "application/json)", code="invalid_json")
            return JSONResponse(err.body(), status_code=400)
        param = loc[0] + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc[1:]) if loc else None
        msg = "; ".join(f"{'.'.join(_loc(er)[1:]) or 'body'}: {er.get('msg')}" for er in errors[:5])
        return JSONResponse(APIError(400, f"invalid request: {msg}", param=param,
                                     code="invalid_value").body(), status_code=400)

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(_: Request, e: _BodyTooLarge):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type_).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    def model_card() -> dict:
        return {"id": model, "object": "model", "created": created, "owned_by": "drafthorse"}

    def check_model(name: str) -> None:
        if name != model:
            raise APIError(404, f"The model {name!r} does not exist: this server serves {model!r}",
                           param="model", code="model_not_found")

    @app.get("/v1/models", dependencies=[Depends(api_key)], responses=RESPONSES)
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(api_key)], responses=RESPONSES)
    async def get_model(name: str):
        check_model(name)
        return model_card()

    async def run(r: pb.GenerateRequest, body: _Body, chat: bool, key: str):
        input_param = "messages" if chat else "prompt"
        calls = isinstance(body, ChatBody) and tool_choice(body) not in (None, "none")   # answers may be calls
        call, first = await gen.open(r, input_param, key)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        now = int(time.time())
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(call, first, rid, now, chat, include_usage, input_param,
                                             r.sampling.HasField("logprobs"), max(1, r.n), calls),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        got, msg = [_Choice() for _ in range(max(1, r.n))], first
        try:
            while msg is not grpc.aio.EOF:
                got[msg.index].add(msg)
                msg = await call.read()
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, input_param) from None
        finally:
            call.cancel()  # no-op when finished; stops the generation if this handler was cancelled
        choices = []
        for i, c in enumerate(got):
            logprobs = None if not r.sampling.HasField("logprobs") else chat_logprobs(c.logprobs) if chat \
                else completion_logprobs(c.logprobs, 0)
            choice: dict[str, Any] = {"index": i, "logprobs": logprobs, "finish_reason": c.reason}
            if chat and calls and (made := toolcalls.parse("".join(c.text))) is not None:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": [_tool_call(made)]}
                choice["finish_reason"] = "tool_calls"
            elif chat:
                choice["message"] = {"role": "assistant", "content": "".join(c.text)}
            else:
                choice["text"] = "".join(c.text)
            choices.append(choice)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                "model": model, "choices": choices, "usage": _usage(got),
                "system_fingerprint": None, "x_drafthorse": _stats(got[0].last)}

    async def _stream(call, first, rid: str, now: int, chat: bool, include_usage: bool,
                      input_param: str, want_logprobs: bool, n: int, calls: bool = False) -> AsyncIterator[str]:
        """Chunks as messages come: each choice's deltas, then its finish chunk (with its stats) as soon
        as it ends; the usage chunk (all choices) last. With tools (calls), an answer that starts with '<'
        is held and sent at its end as one tool_calls delta (text as content if it is not a call)."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, delta: str | None, finish: str | None = None, role: bool = False, logprobs=None,
                  tool_calls: list | None = None, **extra) -> dict:
            if chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                    ({} if delta is None else {"content": delta})
                if tool_calls is not None:
                    d["tool_calls"] = tool_calls
                c = {"index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish}
            else:
                c = {"index": i, "text": delta or "", "logprobs": logprobs, "finish_reason": finish}
            return {"id": rid, "object": obj, "created": now, "model": model, "choices": [c], **extra}

        got, msg, offsets = [_Choice() for _ in range(n)], first, [0] * n
        held: list[str | None] = [""] * n   # text held while it may be a call; None once it is plain text

        def hold(i: int, delta: str) -> str:
            """What of delta to send now."""
            kept = held[i]
            if not calls or kept is None:
                return delta
            text = kept + delta
            if text and not text.startswith("<"):
                held[i] = None
                return text
            held[i] = text
            return ""

        try:
            if chat:
                for i in range(n):
                    yield _sse(chunk(i, None, role=True))
            while msg is not grpc.aio.EOF:
                i = msg.index
                got[i].add(msg)
                delta = hold(i, msg.text_delta)
                if want_logprobs and msg.logprobs:   # tokens carry their logprobs even while text is held back
                    lp = chat_logprobs(msg.logprobs) if chat else completion_logprobs(msg.logprobs, offsets[i])
                    offsets[i] += sum(len(t) for t in lp.get("tokens", ()))
                    yield _sse(chunk(i, delta, logprobs=lp))
                elif delta:
                    yield _sse(chunk(i, delta))
                if msg.finish_reason:
                    reason = got[i].reason
                    if held[i] and (made := toolcalls.parse(held[i])) is not None:
                        yield _sse(chunk(i, None, tool_calls=[_tool_call(made) | {"index": 0}]))
                        reason = "tool_calls"
                    elif held[i]:   # held, and not a call after all (cut short, say)
                        yield _sse(chunk(i, held[i]))
                    yield _sse(chunk(i, None if chat else "", reason, x_drafthorse=_stats(msg)))
                msg = await call.read()
            for i, c in enumerate(got):   # (the gateway ends every choice with a finish_reason)
                if c.last is None:
                    yield _sse(chunk(i, None if chat else "", c.reason, x_drafthorse={}))
            if include_usage:
                yield _sse({"id": rid, "object": obj, "created": now, "model": model, "choices": [],
                            "usage": _usage(got)})
            yield _sse("[DONE]")
        except grpc.aio.AioRpcError as e:
            err = from_grpc(e, input_param)
            yield _sse(err.body())  # the openai client raises on an `error` event
            yield _sse("[DONE]")
        finally:
            call.cancel()  # the client went away: stop the generation

    @app.post("/v1/completions", responses=GENERATE_RESPONSES)
    async def completions(body: CompletionBody, key: str = Depends(api_key)):
        check_model(body.model)
        return await run(completion_request(body), body, chat=False, key=key)

    @app.post("/v1/chat/completions", responses=GENERATE_RESPONSES)
    async def chat_completions(body: ChatBody, key: str = Depends(api_key)):
        check_model(body.model)
        return await run(chat_request(body), body, chat=True, key=key)

    return app
