"""A worker's membership in the cluster: registered in Redis with its address, kind, model and
capacity, kept alive by a heartbeat thread, removed on shutdown. A worker whose heartbeat stops
(crash, partition) drops out of the router's view after the heartbeat TTL."""
from __future__ import annotations

import logging
import threading
from dataclasses import replace

from drafthorse.runtime.redis_store import connect
from drafthorse.runtime.registry import Registration, WorkerInfo
from drafthorse.runtime.settings import Common

log = logging.getLogger(__name__)


class Membership:
    """Built by the deployment layer (which knows the worker's id, Ray node and reachable address) and handed
    to the worker, which starts it once its gRPC server listens."""

    def __init__(self, s: Common, kind: str, worker_id: str, node_id: str = "", advertise_host: str | None = None):
        self.s = s
        self.redis = connect(s.redis_url)
        self.registration = Registration(self.redis, s.key_prefix, heartbeat_ttl_s=3 * s.heartbeat_s)
        self.host = advertise_host or s.host
        self.info = WorkerInfo(worker_id=worker_id, kind=kind, address="", node_id=node_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def address(self) -> str:
        return self.info.address

    def start(self, port: int, model: str = "", capacity: int = 1, drafters: list[str] | None = None) -> None:
        """Register (what the worker serves, at host:port) and keep the registration alive."""
        self.info = replace(self.info, address=f"{self.host}:{port}", model=model, capacity=capacity,
                            drafters=list(drafters or []))
        self.registration.register(self.info)
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.info.worker_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.s.heartbeat_s):
            try:
                if not self.registration.heartbeat(self.info.worker_id):
                    self.registration.register(self.info)  # pruned while we were slow: come back
            except Exception:  # Redis away: keep trying, the router stops routing to us
                log.warning("heartbeat of %s failed", self.info.worker_id, exc_info=True)

    def check(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"{self.info.worker_id}: heartbeat thread is not running")

    def stop(self) -> None:
        self._stop.set()
        try:
            self.registration.deregister(self.info.worker_id)
        except Exception:  # noqa: BLE001 - best effort; the heartbeat TTL removes us anyway
            pass
