"""The Ray Serve application, composed in one place: a gateway, target workers and draft workers,
each a deployment (so Serve can scale them), each replica serving gRPC on its own port.

    Gateway (gRPC Generator, public port) --TargetRequest--> TargetWorker --TokenTree over gRPC--> DraftWorker
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from ray import serve

from drafthorse.actors.draft_worker import DraftWorker
from drafthorse.actors.target_worker import TargetWorker
from drafthorse.cluster.settings import Settings

log = logging.getLogger(__name__)
APP_NAME = "drafthorse"


class GatewayServer:
    """Serve deployment body: runs the asyncio gRPC gateway on a thread of its own, and is the Serve
    app's HTTP ingress: the OpenAI-compatible API (cluster/openai_api.py), which calls that gateway."""

    def __init__(self, settings: dict, *workers):
        from transformers import AutoTokenizer

        from drafthorse.actors.models.loader import DEFAULT_MODEL, resolve
        from drafthorse.cluster.gateway import serve_gateway

        s = self.s = Settings(**settings)
        directory, gguf = resolve(DEFAULT_MODEL if s.model.startswith("tiny:") else s.model)
        tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
        ready = threading.Event()
        self.error: BaseException | None = None
        self.handles: dict = {}   # the gateway's grpc server and health servicer, for the drain

        def run() -> None:
            try:
                loop_ready = asyncio.Event()
                async def main():
                    self.loop = asyncio.get_running_loop()
                    task = asyncio.create_task(serve_gateway(s, tok, loop_ready, self.handles))
                    await loop_ready.wait()
                    ready.set()
                    await task
                asyncio.run(main())
            except BaseException as e:  # noqa: BLE001 - surfaced through check_health
                self.error = e
                ready.set()

        self.thread = threading.Thread(target=run, name="gateway", daemon=True)
        self.thread.start()
        ready.wait(60)
        if self.error is not None:
            raise RuntimeError(f"gateway failed to start: {self.error}")

    def check_health(self) -> None:
        if self.error is not None or not self.thread.is_alive():
            raise RuntimeError(f"gateway is down: {self.error}")

    def __del__(self):
        """Serve stops the replica: NOT_SERVING, refuse new calls, let streams finish (grace_s)."""
        from drafthorse.cluster.gateway import drain_gateway
        try:
            if self.handles:
                asyncio.run_coroutine_threadsafe(
                    drain_gateway(self.handles["server"], self.handles["health"], self.s.grace_s),
                    self.loop).result(self.s.grace_s + 2)
        except Exception:  # noqa: BLE001 - best effort at teardown
            log.warning("gateway drain failed", exc_info=True)

    def __serve_build_asgi_app__(self):
        """Serve calls this after __init__: the FastAPI app its HTTP proxy routes to."""
        from drafthorse.cluster.openai_api import create_app
        host = "127.0.0.1" if self.s.host in ("", "0.0.0.0", "::") else self.s.host
        return create_app(f"[{host}]:{self.s.gateway_port}" if ":" in host else f"{host}:{self.s.gateway_port}",
                          model=self.s.model, keys=self.s.keyring(), max_body_bytes=self.s.max_request_bytes)


def _wire_settings(s: Settings) -> dict:
    """Settings for the replicas' constructors (carried by Ray's control plane, not a client socket)."""
    d = s.model_dump(mode="python")
    d["auth_token"] = s.token()
    return d


def build_app(s: Settings):
    cfg = _wire_settings(s)
    # health checked every 2 s: Serve replaces a replica after 3 failed checks, so a drained or wedged
    # worker is back within seconds
    target = serve.deployment(TargetWorker, name="TargetWorker", num_replicas=s.num_targets,
                              ray_actor_options={"num_cpus": s.worker_num_cpus, "resources": s.target_resources},
                              health_check_period_s=2, health_check_timeout_s=30,
                              graceful_shutdown_timeout_s=s.grace_s + 5).bind(cfg)
    workers = [target]
    if s.num_drafts:
        workers.append(serve.deployment(
            DraftWorker, name="DraftWorker", num_replicas=s.num_drafts,
            ray_actor_options={"num_cpus": s.worker_num_cpus, "resources": s.draft_resources},
            health_check_period_s=2, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=s.grace_s + 5).bind(cfg))
    return serve.deployment(serve.ingress()(GatewayServer), name="Gateway", num_replicas=1,
                            max_ongoing_requests=1024,  # HTTP requests only wait on the gateway
                            graceful_shutdown_timeout_s=s.grace_s + 5,
                            ray_actor_options={"num_cpus": 0.1}).bind(cfg, *workers)


class Cluster:
    """Starts (and stops) everything `drafthorse serve` runs: Redis if needed, Ray, the Serve app."""

    def __init__(self, s: Settings):
        self.s, self.embedded_redis = s, None
        self.startup: dict[str, float] = {}   # seconds per start-up phase (`serve` prints them)

    def start(self, timeout_s: float = 300) -> "Cluster":
        import ray

        from drafthorse.cluster.redis_store import connect, ensure_redis, free_port
        from drafthorse.cluster.registry import Registry

        t0 = last = time.perf_counter()

        def lap(phase: str) -> None:   # seconds since the previous phase ended
            nonlocal last
            now = time.perf_counter()
            self.startup[phase], last = now - last, now

        url, self.embedded_redis = ensure_redis(self.s.redis_url)
        self.s = self.s.model_copy(update={"redis_url": url}).with_token()
        lap("redis_s")
        if not ray.is_initialized():
            # "local": a Ray of our own unless one is named; ray.init() would join any Ray found running
            # on this machine (another `drafthorse serve`, a `ray start`) and deploy into it
            ray.init(address=self.s.ray_address or "local", include_dashboard=False, log_to_driver=False,
                     **({} if self.s.ray_address else {"num_cpus": max(4, _cpus())}))
        lap("ray_s")
        if not self.s.http_port:  # 0: any free port
            self.s = self.s.model_copy(update={"http_port": free_port()})
        try:
            serve.start(http_options={"host": self.s.host, "port": self.s.http_port})
        except Exception as e:  # noqa: BLE001 - most often: the port is taken
            raise RuntimeError(f"Ray Serve's HTTP proxy did not start on {self.s.host}:{self.s.http_port} (port in "
                               f"use? set DRAFTHORSE_HTTP_PORT; 0 = a free port): {e}") from e
        serve.run(build_app(self.s), name=APP_NAME, route_prefix="/", blocking=False)
        registry = Registry(connect(url), self.s.key_prefix, heartbeat_ttl_s=3 * self.s.heartbeat_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING" and \
                    len(registry.alive("target")) >= self.s.num_targets and \
                    len(registry.alive("draft")) >= self.s.num_drafts:
                # Serve's proxy and the workers (model load, weights cache) up to registered
                lap("workers_s")
                self.startup["ready_s"] = last - t0
                return self
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"cluster failed to deploy: {status.message}")
            time.sleep(0.5)
        raise TimeoutError(f"cluster not ready after {timeout_s:.0f}s")

    def first_token(self, timeout_s: float = 120) -> float:
        """Seconds until the gateway streams the first token of a one-token generation (a real request
        through gateway, target and draft workers; it also warms them). Recorded in `startup`."""
        import grpc

        from drafthorse.actors.rpc import auth_metadata
        from drafthorse.actors.spec.sampling import SamplingParams
        from drafthorse.cluster.client import request
        from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc

        t0 = time.perf_counter()
        with grpc.insecure_channel(self.gateway) as channel:
            stream = pb_grpc.GeneratorStub(channel).Generate(   # as the cluster (API keys may be on)
                request("Hi", SamplingParams(max_new_tokens=1)), timeout=timeout_s, metadata=auth_metadata(self.s.token()))
            next(iter(stream))
            stream.cancel()
        self.startup["first_token_s"] = time.perf_counter() - t0
        return self.startup["first_token_s"]

    @property
    def gateway(self) -> str:
        return f"{self.s.host}:{self.s.gateway_port}"

    @property
    def http(self) -> str:
        """Base URL of the OpenAI-compatible API (Ray Serve's HTTP proxy)."""
        return f"http://{self.s.host}:{self.s.http_port}"

    def stop(self) -> None:
        try:
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass
        if self.embedded_redis is not None:
            self.embedded_redis.stop()


def _cpus() -> int:
    import os
    return os.cpu_count() or 2




# ---------------------------------------------------------------- Serve config entry point

REDIS_KEEPER = "drafthorse-redis"


def app_builder(args: dict):
    """Ray Serve application builder: `import_path: cluster.app:app_builder` in a Serve config
    (deploy/serve_config.yaml, the Helm chart's serveConfigV2). `args` are Settings fields; they
    override the DRAFTHORSE_* environment of the process that builds the application.

    Redis: `redis_url` (or DRAFTHORSE_REDIS_URL), else 127.0.0.1:6379 when it answers, else an
    embedded redis-server kept by a detached Ray actor on this node (one machine only).

    The internal auth token: one build hands the same token to every replica it creates, but a build
    without a configured token generates its own, so replicas of two builds (a config update, or the
    second RayCluster of a KubeRay zero-downtime upgrade, sharing one Redis) would refuse each other.
    Wherever that can happen, i.e. in Kubernetes, set DRAFTHORSE_AUTH_TOKEN from a Secret (the Helm
    chart does). Secrets never go in `args`: a Serve config is stored and shown in plain text."""
    from urllib.parse import urlsplit

    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown drafthorse settings in the Serve config args: {', '.join(unknown)}")
    if "auth_token" in args or urlsplit(str(args.get("redis_url") or "")).password:
        raise ValueError("secrets do not belong in Serve config args: set DRAFTHORSE_AUTH_TOKEN and "
                         "DRAFTHORSE_REDIS_URL in the environment (in Kubernetes: from a Secret)")
    s = Settings(**args)
    s.tls()   # unreadable certificates: fail the build, named, not every replica
    s = s.model_copy(update={"redis_url": s.redis_url or _keep_redis()})
    if s.auth_token is None:
        log.warning("DRAFTHORSE_AUTH_TOKEN is unset: this build uses a token of its own; set one (from a "
                    "Secret) when more than one build can be live against the same Redis")
    return build_app(s.with_token())


def _keep_redis() -> str:
    """URL of the Redis `ensure_redis` finds or starts, held by a detached actor: the builder runs in a
    short-lived Ray task, so a redis-server it started itself would die with it."""
    import ray

    @ray.remote(num_cpus=0)
    class RedisKeeper:
        def __init__(self):
            from drafthorse.cluster.redis_store import ensure_redis
            self.url, self.server = ensure_redis(None)

        def get_url(self) -> str:
            return self.url

        def stop(self) -> None:
            if self.server is not None:
                self.server.stop()

    keeper = RedisKeeper.options(name=REDIS_KEEPER, namespace="drafthorse", lifetime="detached",
                                 get_if_exists=True).remote()
    return ray.get(keeper.get_url.remote())
