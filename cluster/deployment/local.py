"""A whole cluster on this machine or a Ray cluster it joins: what `drafthorse serve`, the tools and the
tests start (Redis if needed, Ray, the Serve app) and stop."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import grpc
import ray
from ray import serve
from ray._common.utils import get_default_ray_temp_dir  # where ray.init puts a local Ray's logs

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.client import request
from drafthorse.cluster.deployment.app import APP_NAME, build_app
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.redis_store import EmbeddedRedis, ensure_redis, free_port
from drafthorse.runtime.registry import view
from drafthorse.runtime.rpc import auth_metadata
from drafthorse.runtime.settings import Settings

log = logging.getLogger(__name__)


class Cluster:
    """Starts (and stops) everything `drafthorse serve` runs: Redis if needed, Ray, the Serve app."""

    def __init__(self, s: Settings):
        self.s = s
        self.embedded_redis: EmbeddedRedis | None = None
        self.startup: dict[str, float] = {}   # seconds per start-up phase (`serve` prints them)

    def start(self, timeout_s: float = 300) -> Cluster:
        t0 = last = time.perf_counter()

        def lap(phase: str) -> None:   # seconds since the previous phase ended
            nonlocal last
            now = time.perf_counter()
            self.startup[phase], last = now - last, now

        url, self.embedded_redis = ensure_redis(self.s.redis_url)
        self.s = self.s.model_copy(update={"redis_url": url}).with_token()
        lap("redis_s")
        if not ray.is_initialized():
            if not self.s.ray_address:
                # Ray starts its workers at nice 15 (so they never starve its own daemons); our workers
                # are the point of the cluster, and niced below the gateway and the clients on a small
                # host their torch threads lose the CPU: 2 cores, 32 streams, 96 -> 123 tok/s at nice 0
                os.environ.setdefault("RAY_worker_niceness", "0")
            # "local": a Ray of our own unless one is named; ray.init() would join any Ray found running
            # on this machine (another `drafthorse serve`, a `ray start`) and deploy into it
            if self.s.ray_address:
                ray.init(address=self.s.ray_address, include_dashboard=False, log_to_driver=False)
            else:
                start_local_ray(num_cpus=max(4, _cpus()))
        lap("ray_s")
        if not self.s.http_port:  # 0: any free port
            self.s = self.s.model_copy(update={"http_port": free_port()})
        try:
            serve.start(http_options={"host": self.s.host, "port": self.s.http_port})
        except Exception as e:  # most often: the port is taken
            raise RuntimeError(f"Ray Serve's HTTP proxy did not start on {self.s.host}:{self.s.http_port} (port in "
                               f"use? set DRAFTHORSE_HTTP_PORT; 0 = a free port): {e}") from e
        serve.run(build_app(self.s), name=APP_NAME, route_prefix="/", blocking=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            alive = view(url, self.s.key_prefix, 3 * self.s.heartbeat_s) \
                if status is not None and status.status == "RUNNING" else {}
            if alive and len(alive["target"]) >= self.s.num_targets and len(alive["draft"]) >= self.s.num_drafts:
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
        t0 = time.perf_counter()
        with grpc.insecure_channel(self.gateway) as channel:
            stream = pb_grpc.GeneratorStub(channel).Generate(   # as the cluster (API keys may be on)
                request("Hi", SamplingParams(max_new_tokens=1)), timeout=timeout_s,
                metadata=auth_metadata(self.s.token()))
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


def start_local_ray(attempts: int = 2, **init) -> None:
    """A Ray of our own on this machine (`ray.init(address="local", ...)`), tried again once if its raylet
    misses Ray's fixed 30 s start-up wait (seen on a loaded 2-core host). The error names the Ray logs to
    read and quotes their last lines, which is where the raylet says why."""
    init = {"include_dashboard": False, "log_to_driver": False} | init
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", **init)
            return
        except Exception as e:
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            tails = _ray_log_tails(init.get("_temp_dir") or get_default_ray_temp_dir())
            if attempt == attempts:
                raise RuntimeError(f"Ray did not start on this machine after {attempts} tries: {e}\n{tails}") from e
            log.warning("Ray's node did not start in time (try %d of %d); trying again. %s", attempt, attempts, tails)


def _ray_log_tails(temp_dir: str, lines: int = 15) -> str:
    logs = Path(temp_dir) / "session_latest" / "logs"
    parts = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
        try:
            text = (logs / name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        parts.append(f"--- {logs / name} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(parts) or f"(no Ray logs under {logs})"


def _cpus() -> int:
    return os.cpu_count() or 2
