"""The Serve deployment bodies of the workers: each replica builds the infrastructure its worker is handed
(membership in Redis, under the replica's id, at this node's address; the process's metrics). Serve calls
check_health, drain (through __del__), info and record_autoscaling_stats on them."""
from __future__ import annotations

import socket
import uuid

import ray

from drafthorse.actors.workers.draft_worker import DraftWorker
from drafthorse.actors.workers.target_worker import TargetWorker
from drafthorse.runtime.membership import Membership
from drafthorse.runtime.metrics import Metrics
from drafthorse.runtime.settings import WorkerSettings


def advertise_host(bind_host: str) -> str:
    """The address peers should dial: the bind address, or this node's IP when bound to all."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return socket.gethostbyname(socket.gethostname())


def replica_id(kind: str) -> str:
    """kind-<Serve replica id> inside Serve (operators can map it to the Ray actor), else random."""
    try:
        name = ray.get_runtime_context().get_actor_name() or ""
    except Exception:  # noqa: BLE001 - not in a Ray actor
        name = ""
    return f"{kind}-{name.rsplit('#', 1)[-1] if '#' in name else uuid.uuid4().hex[:8]}"


def membership(s: WorkerSettings, kind: str) -> Membership:
    return Membership(s, kind, replica_id(kind), node_id=ray.get_runtime_context().get_node_id(),
                      advertise_host=advertise_host(s.host))


class TargetReplica(TargetWorker):
    """Deployment "TargetWorker"."""

    def __init__(self, s: WorkerSettings):
        super().__init__(s, membership(s, "target"), Metrics())


class DraftReplica(DraftWorker):
    """Deployment "DraftWorker"."""

    def __init__(self, s: WorkerSettings):
        super().__init__(s, membership(s, "draft"), Metrics())
