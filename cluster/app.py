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

from actors.draft_worker import DraftWorker
from actors.target_worker import TargetWorker
from cluster.settings import Settings

log = logging.getLogger(__name__)
APP_NAME = "drafthorse"


class GatewayServer:
    """Serve deployment body: runs the asyncio gRPC gateway on a thread of its own."""

    def __init__(self, settings: dict, *workers):
        from transformers import AutoTokenizer

        from actors.models.loader import DEFAULT_MODEL, resolve
        from cluster.gateway import serve_gateway

        s = Settings(**settings)
        directory, gguf = resolve(DEFAULT_MODEL if s.model.startswith("tiny:") else s.model)
        tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
        ready = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                loop_ready = asyncio.Event()
                async def main():
                    task = asyncio.create_task(serve_gateway(s, tok, loop_ready))
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


def _wire_settings(s: Settings) -> dict:
    """Settings for the replicas' constructors (carried by Ray's control plane, not a client socket)."""
    d = s.model_dump(mode="python")
    d["auth_token"] = s.token()
    return d


def build_app(s: Settings):
    cfg = _wire_settings(s)
    target = serve.deployment(TargetWorker, name="TargetWorker", num_replicas=s.num_targets,
                              ray_actor_options={"num_cpus": s.worker_num_cpus, "resources": s.target_resources},
                              health_check_period_s=5, health_check_timeout_s=30).bind(cfg)
    workers = [target]
    if s.num_drafts:
        workers.append(serve.deployment(
            DraftWorker, name="DraftWorker", num_replicas=s.num_drafts,
            ray_actor_options={"num_cpus": s.worker_num_cpus, "resources": s.draft_resources},
            health_check_period_s=5, health_check_timeout_s=30).bind(cfg))
    return serve.deployment(GatewayServer, name="Gateway", num_replicas=1,
                            ray_actor_options={"num_cpus": 0.1}).bind(cfg, *workers)


class Cluster:
    """Starts (and stops) everything `drafthorse serve` runs: Redis if needed, Ray, the Serve app."""

    def __init__(self, s: Settings):
        self.s, self.embedded_redis = s, None

    def start(self, timeout_s: float = 300) -> "Cluster":
        import ray

        from cluster.redis_store import connect, ensure_redis
        from cluster.registry import Registry

        url, self.embedded_redis = ensure_redis(self.s.redis_url)
        self.s = self.s.model_copy(update={"redis_url": url}).with_token()
        if not ray.is_initialized():
            ray.init(address=self.s.ray_address, include_dashboard=False, log_to_driver=False,
                     **({} if self.s.ray_address else {"num_cpus": max(4, _cpus())}))
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()})
        serve.run(build_app(self.s), name=APP_NAME, route_prefix=None, blocking=False)
        registry = Registry(connect(url), self.s.key_prefix, heartbeat_ttl_s=3 * self.s.heartbeat_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING" and \
                    len(registry.alive("target")) >= self.s.num_targets and \
                    len(registry.alive("draft")) >= self.s.num_drafts:
                return self
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"cluster failed to deploy: {status.message}")
            time.sleep(0.5)
        raise TimeoutError(f"cluster not ready after {timeout_s:.0f}s")

    @property
    def gateway(self) -> str:
        return f"{self.s.host}:{self.s.gateway_port}"

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


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
