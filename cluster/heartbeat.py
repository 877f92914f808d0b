"""A worker's membership in the cluster: registered in Redis with its address, kind, model and
capacity, kept alive by a heartbeat thread, removed on shutdown. A worker whose heartbeat stops
(crash, partition) drops out of the router's view after the heartbeat TTL."""
from __future__ import annotations

import logging
import socket
import threading
import uuid

from drafthorse.cluster.redis_store import connect
from drafthorse.cluster.registry import Registry, WorkerInfo
from drafthorse.cluster.sessions import SessionStore
from drafthorse.cluster.settings import Settings

log = logging.getLogger(__name__)


def advertise_host(bind_host: str) -> str:
    """The address peers should dial: the bind address, or this node's IP when bound to all."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    try:
        import ray
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return socket.gethostbyname(socket.gethostname())


def worker_id(kind: str) -> str:
    """kind-<Serve replica id> inside Serve (operators can map it to the Ray actor), else random."""
    import ray
    try:
        name = ray.get_runtime_context().get_actor_name() or ""
    except Exception:  # noqa: BLE001 - not in a Ray actor
        name = ""
    return f"{kind}-{name.rsplit('#', 1)[-1] if '#' in name else uuid.uuid4().hex[:8]}"


class Membership:
    def __init__(self, s: Settings, kind: str, worker_id: str, model: str, capacity: int, node_id: str = "",
                 drafters: list[str] | None = None):
        self.s = s
        self.redis = connect(s.redis_url)
        self.registry = Registry(self.redis, s.key_prefix, heartbeat_ttl_s=3 * s.heartbeat_s)
        self.sessions = SessionStore(self.redis, s.key_prefix, ttl_s=s.session_ttl_s)
        self.info = WorkerInfo(worker_id=worker_id, kind=kind, address="", model=model,
                               drafters=drafters or [], capacity=capacity, node_id=node_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return self.info.address

    def checkpoint_tokens(self, session_id: str, token_ids: list[int]) -> None:
        self.sessions.checkpoint(session_id, token_ids, self.info.worker_id)

    def start(self, port: int) -> None:
        self.info.address = f"{advertise_host(self.s.host)}:{port}"
        self.registry.register(self.info)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.info.worker_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.s.heartbeat_s):
            try:
                if not self.registry.heartbeat(self.info.worker_id):
                    self.registry.register(self.info)  # pruned while we were slow: come back
            except Exception:  # noqa: BLE001 - Redis away: keep trying, the router stops routing to us
                log.warning("heartbeat of %s failed", self.info.worker_id, exc_info=True)

    def check(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"{self.info.worker_id}: heartbeat thread is not running")

    def stop(self) -> None:
        self._stop.set()
        try:
            self.registry.deregister(self.info.worker_id)
        except Exception:  # noqa: BLE001 - best effort; the heartbeat TTL removes us anyway
            pass
