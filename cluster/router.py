"""Routing: which target worker serves a request, which draft worker feeds it, and load leases.

Target choice: a session's own worker first (its KV cache already holds the conversation prefix),
then a preferred one (where the first choice of an n > 1 request went), else the least loaded alive
target. "Load" is outstanding leases divided by the worker's capacity, so a worker sized for 8 streams
with 4 leased (0.5) beats one sized for 1 with 1 leased (1.0); with equal capacities it is plain
least-outstanding-requests. Ties go to the smallest worker_id: picks are
deterministic and testable, and spreading still happens because each pick is leased at once.
Full workers are still picked (the least full one): the router balances, it does not admit or shed.

Pick-then-lease is not atomic across gateways: two gateways may pick the same idle worker at once.
That costs a little balance, never correctness. Within a gateway the caller makes it atomic (the
gateway claims under one lock), so a burst of requests spreads instead of all seeing the same loads.
Every read is awaited (redis.asyncio): the gateway's event loop never waits on Redis."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from drafthorse.runtime.registry import Registry, WorkerInfo
from drafthorse.runtime.sessions import Session

log = logging.getLogger("drafthorse.router")


class NoWorkers(RuntimeError):
    """No alive target worker. The gateway maps this to gRPC UNAVAILABLE (retryable)."""


class Router:
    def __init__(self, registry: Registry):
        self.registry = registry

    async def least_loaded(self, workers: list[WorkerInfo], prefer_node: str | None = None) -> WorkerInfo:
        loads = await self.registry.loads(w.worker_id for w in workers)
        return min(workers, key=lambda w: (loads[w.worker_id] / w.capacity,
                                           prefer_node is not None and w.node_id != prefer_node,
                                           w.worker_id))

    async def pick_target(self, session: Session | None = None, prefer: str | None = None) -> WorkerInfo:
        """prefer: a worker id to pick while it is alive (the other choices of one prompt go where the
        first went: they share its prefill there)."""
        if session is not None and session.target_worker:
            w = await self.registry.get(session.target_worker)
            if w is not None and w.kind == "target":
                return w
            log.info("session %s: affinity worker %s is gone, rerouting (the prefix will be re-prefilled)",
                     session.session_id, session.target_worker)
        if prefer and (w := await self.registry.get(prefer)) is not None and w.kind == "target":
            return w
        targets = await self.registry.alive("target")
        if not targets:
            raise NoWorkers("no target worker is alive")
        return await self.least_loaded(targets)

    async def pick_draft(self, target: WorkerInfo, drafter_kind: str) -> WorkerInfo | None:
        """Least-loaded alive draft worker serving `drafter_kind`, same node as `target` on equal load;
        None when there is none (the target then decodes without speculation)."""
        drafts = [w for w in await self.registry.alive("draft") if drafter_kind in w.drafters]
        return await self.least_loaded(drafts, prefer_node=target.node_id) if drafts else None

    @asynccontextmanager
    async def lease(self, worker: WorkerInfo | None) -> AsyncIterator[WorkerInfo | None]:
        """Count one outstanding request on `worker` for the duration of the block (None: no-op, for an
        optional draft worker). The decrement runs on exceptions and cancellation too: shielded, so a
        second cancellation while it is in flight cannot drop it."""
        if worker is None:
            yield None
            return
        await self.registry.add_load(worker.worker_id, 1)
        try:
            yield worker
        finally:
            try:
                await asyncio.shield(self.registry.add_load(worker.worker_id, -1))
            except Exception:  # don't mask the request's outcome; a lost decrement lasts until prune/deregister
                log.warning("could not release load on %s", worker.worker_id, exc_info=True)
