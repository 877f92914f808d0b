"""The Ray Serve application, composed in one place: a gateway, target workers and draft workers,
each a deployment (so Serve can scale them), each replica serving gRPC on its own port.

    Gateway (gRPC Generator, public port) --TargetRequest--> TargetWorker --TokenTree over gRPC--> DraftWorker

Each deployment gets its own settings group (typed, carried by Ray's control plane)."""
from __future__ import annotations

import logging
from urllib.parse import urlsplit

import ray
from ray import serve

from drafthorse.cluster.deployment.gateway_server import GatewayServer
from drafthorse.cluster.deployment.replicas import DraftReplica, TargetReplica
from drafthorse.runtime.redis_store import ensure_redis
from drafthorse.runtime.settings import Settings

log = logging.getLogger(__name__)
APP_NAME = "drafthorse"
REDIS_KEEPER = "drafthorse-redis"


def gpus(s: Settings) -> tuple[float, float]:
    """GPUs a target and a draft replica ask Ray for: none on the CPU; on CUDA (device cuda, or auto where
    the Ray cluster has GPUs) `target_gpus` and `draft_gpus` (a share: several drafts on one cheap GPU). Ray
    then places each replica on a node with room and shows it only its own GPUs (CUDA_VISIBLE_DEVICES)."""
    if s.device == "cpu" or (s.device == "auto" and not ray.cluster_resources().get("GPU")):
        return 0.0, 0.0
    return s.target_gpus, s.draft_gpus


def build_app(s: Settings):
    worker_settings, gateway_settings = s.worker(), s.gateway()
    target_gpus, draft_gpus = gpus(s)
    # health checked every 2 s: Serve replaces a replica after 3 failed checks, so a drained or wedged
    # worker is back within seconds
    # serve.deployment(**options)(cls): the decorator form, the one Ray's annotations describe
    target = serve.deployment(name="TargetWorker", num_replicas=s.num_targets,
                              ray_actor_options={"num_cpus": s.worker_num_cpus, "num_gpus": target_gpus,
                                                 "resources": s.target_resources},
                              health_check_period_s=2, health_check_timeout_s=30,
                              graceful_shutdown_timeout_s=s.grace_s + 5)(TargetReplica).bind(worker_settings)
    workers = [target]
    if s.num_drafts:
        workers.append(serve.deployment(
            name="DraftWorker", num_replicas=s.num_drafts,
            ray_actor_options={"num_cpus": s.worker_num_cpus, "num_gpus": draft_gpus,
                               "resources": s.draft_resources},
            health_check_period_s=2, health_check_timeout_s=30,
            graceful_shutdown_timeout_s=s.grace_s + 5)(DraftReplica).bind(worker_settings))
    gateway = serve.deployment(name="Gateway", num_replicas=1,
                               max_ongoing_requests=1024,  # HTTP requests only wait on the gateway
                               graceful_shutdown_timeout_s=s.grace_s + 5,
                               ray_actor_options={"num_cpus": 0.1})(serve.ingress()(GatewayServer))
    return gateway.bind(gateway_settings, *workers)


def app_builder(args: dict):
    """Ray Serve application builder: `import_path: drafthorse.cluster.deployment.app:app_builder` in a Serve config
    (deploy/serve_config.yaml, the Helm chart's serveConfigV2). `args` are Settings fields; they
    override the DRAFTHORSE_* environment of the process that builds the application.

    Redis: `redis_url` (or DRAFTHORSE_REDIS_URL), else 127.0.0.1:6379 when it answers, else an
    embedded redis-server kept by a detached Ray actor on this node (one machine only).

    The internal auth token: one build hands the same token to every replica it creates, but a build
    without a configured token generates its own, so replicas of two builds (a config update, or the
    second RayCluster of a KubeRay zero-downtime upgrade, sharing one Redis) would refuse each other.
    Wherever that can happen, i.e. in Kubernetes, set DRAFTHORSE_AUTH_TOKEN from a Secret (the Helm
    chart does). Secrets never go in `args`: a Serve config is stored and shown in plain text."""
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

    @ray.remote(num_cpus=0)
    class RedisKeeper:
        def __init__(self):
            self.url, self.server = ensure_redis(None)

        def get_url(self) -> str:
            return self.url

        def stop(self) -> None:
            if self.server is not None:
                self.server.stop()

    # (ignore: ray types a @ray.remote class as the class itself, not its ActorClass)
    keeper = RedisKeeper.options(name=REDIS_KEEPER, namespace="drafthorse", lifetime="detached",  # type: ignore[attr-defined]
                                 get_if_exists=True).remote()
    return ray.get(keeper.get_url.remote())
