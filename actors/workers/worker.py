"""What the target and draft worker deployments share: a gRPC server and a membership in Redis,
checked by Serve's health probe, and a graceful drain that takes them down together.

Drain order (Serve calls it when it stops a replica: scale-down, upgrade, `serve shutdown`, and so on
SIGTERM to `drafthorse serve`): health turns NOT_SERVING, the worker leaves the registry (no router
picks it any more), new streams are refused with UNAVAILABLE (the gateway retries elsewhere), streams
in flight get `grace_s` to finish, and what is left is handed over: ended with UNAVAILABLE after their
last committed token, so the gateway continues each on another worker, gaplessly."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import grpc
from grpc_health.v1 import health

from drafthorse.runtime.membership import Membership
from drafthorse.runtime.rpc import set_not_serving

log = logging.getLogger(__name__)


class Streams(Protocol):
    """What a drain needs of a worker's gRPC servicer."""
    draining: bool                  # set by the drain: refuse new calls with UNAVAILABLE

    @property
    def active(self) -> int:        # calls in flight
        ...

    def handover(self) -> int:      # end what still runs, each after its last committed step; how many
        ...


S = TypeVar("S", bound=Streams)
T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread of its own that ends before this returns, so that torch's OpenMP team for it
    (libgomp keeps one per thread that ran parallel work) ends with it. A worker's torch work must run
    on one thread only (its scheduler's): libgomp's idle threads spin for the next parallel region only
    while it manages no more threads than the machine has CPUs, and a team left on the loading thread
    (Ray's) beside the scheduler's turned every one of the scheduler's waits into a sleep and wake-up.
    Measured on 2 cores, SmolLM2 bfloat16, a batch-4 decoding step: 150 ms on a second thread, 70 ms
    with the first thread's team gone."""
    out: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - raised again on the calling thread
            errors.append(e)
    t = threading.Thread(target=run, name="load")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out[0]


class GrpcWorker(Generic[S]):
    """A servicer behind a gRPC server, registered in the cluster through `membership` (built by the
    deployment layer). Subclasses build the servicer and call `serve`."""
    service: S
    membership: Membership
    server: grpc.Server | None = None
    health: health.HealthServicer
    service_names: list[str]
    grace_s: float = 5.0
    _drained: dict | None = None
    # class-wide (one worker per process, and a drain is rare) and reentrant: the garbage collector may run
    # another instance's __del__ -> drain() on this thread while a drain holds the lock
    _drain_lock = threading.RLock()

    def serve(self, service: S, server: grpc.Server, port: int, health_servicer: health.HealthServicer,
              service_names: list[str], membership: Membership, grace_s: float, **info) -> None:
        """Take the running server and join the cluster (`info`: what Membership.start registers)."""
        self.service, self.server, self.health = service, server, health_servicer
        self.service_names, self.membership, self.grace_s = service_names, membership, grace_s
        membership.start(port, **info)

    @property
    def worker_id(self) -> str:
        return self.membership.worker_id

    def check_health(self) -> None:
        """Serve calls this periodically: a worker whose heartbeat stopped, or whose service says it is
        broken (a target's scheduler thread died), is replaced."""
        self.membership.check()
        check = getattr(self.service, "check", None)
        if check is not None:
            check()

    def drain(self, grace_s: float | None = None) -> dict:
        """Leave the cluster without failing a client (see the module doc); idempotent. Returns what
        happened: streams that finished here and streams handed over."""
        with self._drain_lock:
            if self._drained is not None:
                return self._drained
            grace_s = self.grace_s if grace_s is None else grace_s
            t0 = time.monotonic()
            set_not_serving(self.health, self.service_names)
            self.membership.stop()
            in_flight = self.service.active
            self.service.draining = True
            while self.service.active and time.monotonic() - t0 < grace_s:
                time.sleep(0.02)
            handed = self.service.handover()
            if self.server is not None:
                self.server.stop(grace=1.0).wait()
            self._drained = {"worker_id": self.membership.info.worker_id, "in_flight": in_flight,
                             "handed_over": handed, "drain_s": round(time.monotonic() - t0, 3)}
            log.info("drained: %s", self._drained)
            return self._drained

    def __del__(self):
        try:
            if self.server is not None and self._drained is None:
                self.drain()
        except Exception:  # best effort at teardown
            log.warning("drain failed", exc_info=True)
