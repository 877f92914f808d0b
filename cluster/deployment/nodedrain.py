"""Drain the Ray node this process runs on before the node goes away: a Kubernetes preStop hook.

A deleted or evicted pod gets SIGTERM, which kills its raylet and every actor on it at once: the
replicas' graceful drain (actors/workers/worker.py) never runs and their streams fail over mid-flight. Asking
Ray to drain the node first makes Serve migrate its replicas: it starts a replacement elsewhere, then
stops each old replica the graceful way (NOT_SERVING, out of the registry, streams finish within
grace_s or are handed over), or stops them at the drain deadline minus their graceful shutdown time
when no replacement can start. The hook waits until no Serve replica is left on the node, so the pod's
SIGTERM only meets processes that no longer serve anyone."""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import ray
from ray.util.state import list_actors
from ray.util.state.exception import RayStateApiException

REPLICA_CLASS = "ServeReplica:"  # Serve's replica actors' class names: ServeReplica:<app>:<deployment>


def _request_drain(address: str, node_id: str, deadline_s: float) -> None:
    """Ray's own `ray drain-node` (preemption: accepted even while the node is busy)."""
    ray_cli = Path(sys.executable).with_name("ray")
    cmd = [str(ray_cli) if ray_cli.exists() else "ray", "drain-node", "--address", address, "--node-id", node_id,
           "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "drafthorse drain-node: pod stopping",
           "--deadline-remaining-seconds", str(max(int(deadline_s), 0))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"ray drain-node failed: {(done.stderr or done.stdout).strip()[-500:]}")


def _replicas_on(node_id: str) -> list[str]:
    try:
        actors = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], limit=10_000,
                             raise_on_missing_output=False)
    except RayStateApiException as e:
        raise RuntimeError(f"Ray's state API (the head's dashboard) does not answer, so the node's replicas "
                           f"cannot be watched; nothing was drained: {str(e)[:200]}") from None
    return sorted(a.class_name for a in actors if (a.class_name or "").startswith(REPLICA_CLASS))


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init waits minutes for a GCS that is not there: fail fast on an explicit HOST:PORT instead."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"no Ray cluster answers at {address}: {e}") from None


def drain_node(address: str = "auto", node_id: str | None = None, deadline_s: float = 25.0,
               poll_s: float = 0.5) -> dict:
    """Drain `node_id` (default: this process's node) and wait, at most deadline_s, until no Serve
    replica is alive on it. Returns what happened: replicas before, seconds until none, those left."""
    if address != "auto":
        _reachable(address)
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    try:
        node = node_id or ray.get_runtime_context().get_node_id()
        gcs = ray.get_runtime_context().gcs_address
        t0 = time.monotonic()
        before = _replicas_on(node)
        _request_drain(gcs, node, deadline_s)
        left = before
        while left and time.monotonic() - t0 < deadline_s:
            time.sleep(poll_s)
            left = _replicas_on(node)
        return {"node_id": node, "replicas_before": before, "replicas_left": left,
                "seconds": round(time.monotonic() - t0, 2)}
    finally:
        ray.shutdown()
