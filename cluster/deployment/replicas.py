"""The Serve deployment bodies of the workers: each replica builds the infrastructure its worker is handed
(membership in Redis, under the replica's id, at this node's address; the process's metrics). Serve calls
check_health, drain (through __del__), info and record_autoscaling_stats on them."""
from __future__ import annotations

import logging
import socket
import sys
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


def info_logs() -> None:
    """drafthorse's INFO lines (a worker's start-up line: model, dtype, KV pool size, product layouts) on
    the replica's stderr, which Ray keeps in the worker's log and forwards to the driver where it is
    asked to: a Ray worker leaves other loggers than its own at WARNING."""
    ours = logging.getLogger("drafthorse")
    ours.setLevel(logging.INFO)
    if not ours.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        ours.addHandler(handler)
        ours.propagate = False   # once: not again through a root handler Ray may have set


class TargetReplica(TargetWorker):
    """Deployment "TargetWorker"."""

    def __init__(self, s: WorkerSettings):
        info_logs()
        super().__init__(s, membership(s, "target"), Metrics())


class DraftReplica(DraftWorker):
    """Deployment "DraftWorker"."""

    def __init__(self, s: WorkerSettings):
        info_logs()
        super().__init__(s, membership(s, "draft"), Metrics())
