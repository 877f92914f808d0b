"""Worker registry: who serves what, who is alive, and how busy each one is.

Keys (under `prefix`):
    worker:<id>       hash    the WorkerInfo fields
    worker:<id>:hb    string  heartbeat, expires after heartbeat_ttl_s: its presence *is* liveness
    worker:<id>:load  int     outstanding requests leased to the worker (router.lease)
    workers:<kind>    set     ids registered per kind, so alive() needs no SCAN

A worker that stops heartbeating disappears from alive() once its TTL lapses; the next alive()
prunes its keys. Heartbeat about every heartbeat_ttl_s / 3 so one late beat does not drop a worker.
Multi-key scripts assume one Redis (or a Sentinel primary), not Redis Cluster.

Two sides, two clients: a worker keeps its own entry from its heartbeat thread (`Registration`, a
blocking client), the gateway reads the registry and counts load on its event loop (`Registry`,
redis.asyncio: a slow Redis delays the requests that wait on it, never the loop). `view` is the
blocking read for tools and tests."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import redis
import redis.asyncio

from drafthorse.runtime.redis_store import connect_async

KINDS = ("target", "draft")


@dataclass
class WorkerInfo:
    worker_id: str
    kind: str                       # "target" | "draft"
    address: str                    # "host:port" of its gRPC server
    model: str = ""
    drafters: list[str] = field(default_factory=list)  # drafter kinds a draft worker serves
    capacity: int = 1               # concurrent requests it is sized for (router's load scale)
    node_id: str = ""               # machine / Ray node: pairs a target with a co-located drafter

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.worker_id:
            raise ValueError("worker_id is empty")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")

    def to_hash(self) -> dict[str, str]:
        d = asdict(self)
        d["drafters"] = json.dumps(self.drafters)
        d["capacity"] = str(self.capacity)
        return d

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> WorkerInfo:
        d = {k.decode(): v.decode() for k, v in h.items()}
        return cls(worker_id=d["worker_id"], kind=d["kind"], address=d["address"], model=d.get("model", ""),
                   drafters=json.loads(d.get("drafters", "[]")), capacity=int(d.get("capacity", "1")),
                   node_id=d.get("node_id", ""))


# Beat only a registered worker: after a prune the worker must re-register (heartbeat returns False).
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 1
"""

# Re-check liveness inside the script: a worker that re-registered since the caller looked survives.
_PRUNE = """
local pruned = 0
for i, id in ipairs(ARGV) do
  local base = KEYS[1] .. 'worker:' .. id
  if redis.call('EXISTS', base .. ':hb') == 0 then
    redis.call('DEL', base, base .. ':load')
    redis.call('SREM', KEYS[1] .. 'workers:target', id)
    redis.call('SREM', KEYS[1] .. 'workers:draft', id)
    pruned = pruned + 1
  end
end
return pruned
"""

# Clamped at 0: a decrement that arrives after a restart or prune must not make a worker look idler
# than idle. Counts only registered workers, so a late lease exit leaves no stray key behind.
_ADD_LOAD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local v = redis.call('INCRBY', KEYS[2], ARGV[1])
if v < 0 then redis.call('SET', KEYS[2], 0); v = 0 end
return v
"""


def _k(prefix: str, worker_id: str, suffix: str = "") -> str:
    return f"{prefix}worker:{worker_id}{suffix}"


def _ttl_ms(heartbeat_ttl_s: float) -> int:
    return max(1, int(heartbeat_ttl_s * 1000))  # PX: sub-second TTLs work (tests use them)


class Registration:
    """A worker's own entry: published, kept alive, removed (runtime/membership.py drives it)."""

    def __init__(self, redis: redis.Redis, prefix: str = "dh:", heartbeat_ttl_s: float = 10):
        self.r, self.prefix, self._ttl_ms = redis, prefix, _ttl_ms(heartbeat_ttl_s)
        self._heartbeat = self.r.register_script(_HEARTBEAT)

    def register(self, info: WorkerInfo) -> None:
        """Publish (or replace) a worker's info and start its liveness clock. Keeps its load count:
        leases still held by gateways will decrement it, so resetting would undercount."""
        base = _k(self.prefix, info.worker_id)
        p = self.r.pipeline(transaction=True)
        p.delete(base)  # drop fields of an older registration
        p.hset(base, mapping=info.to_hash())  # type: ignore[arg-type]  # redis' Mapping key is invariant
        for kind in KINDS:  # a re-registration may change kind
            p.srem(f"{self.prefix}workers:{kind}", info.worker_id)
        p.sadd(f"{self.prefix}workers:{info.kind}", info.worker_id)
        p.set(base + ":hb", "1", px=self._ttl_ms)
        p.execute()

    def heartbeat(self, worker_id: str) -> bool:
        """Extend liveness. False: the registry forgot this worker (pruned); call register() again."""
        base = _k(self.prefix, worker_id)
        return bool(self._heartbeat(keys=[base, base + ":hb"], args=[self._ttl_ms]))

    def deregister(self, worker_id: str) -> None:
        base = _k(self.prefix, worker_id)
        p = self.r.pipeline(transaction=True)
        p.delete(base, base + ":hb", base + ":load")
        for kind in KINDS:
            p.srem(f"{self.prefix}workers:{kind}", worker_id)
        p.execute()


class Registry:
    """The gateway's view: alive workers, their loads, load leases (cluster/router.py)."""

    def __init__(self, redis: redis.asyncio.Redis, prefix: str = "dh:", heartbeat_ttl_s: float = 10):
        self.r, self.prefix, self.heartbeat_ttl_s = redis, prefix, heartbeat_ttl_s
        self._prune = self.r.register_script(_PRUNE)
        self._add_load = self.r.register_script(_ADD_LOAD)

    async def alive(self, kind: str) -> list[WorkerInfo]:
        """Workers of `kind` with a live heartbeat, sorted by worker_id; prunes the dead ones."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        members = await self.r.smembers(f"{self.prefix}workers:{kind}")
        ids = sorted(i.decode() if isinstance(i, bytes) else i for i in members)   # bytes: responses not decoded
        if not ids:
            return []
        p = self.r.pipeline(transaction=False)
        for i in ids:
            p.exists(_k(self.prefix, i, ":hb"))
            p.hgetall(_k(self.prefix, i))
        res = await p.execute()
        out, dead = [], []
        for i, hb, h in zip(ids, res[0::2], res[1::2]):
            if hb and h:
                out.append(WorkerInfo.from_hash(h))
            else:
                dead.append(i)
        if dead:
            await self._prune(keys=[self.prefix], args=dead)
        return out

    async def get(self, worker_id: str) -> WorkerInfo | None:
        """The worker's info if it is alive, else None."""
        p = self.r.pipeline(transaction=False)
        p.exists(_k(self.prefix, worker_id, ":hb"))
        p.hgetall(_k(self.prefix, worker_id))
        hb, h = await p.execute()
        return WorkerInfo.from_hash(h) if hb and h else None

    async def add_load(self, worker_id: str, delta: int) -> int:
        """Atomically add `delta` to the worker's outstanding load; never below 0. Returns the new value
        (0 and no change for a worker that is not registered)."""
        base = _k(self.prefix, worker_id)
        return int(await self._add_load(keys=[base, base + ":load"], args=[int(delta)]))

    async def loads(self, worker_ids: Iterable[str]) -> dict[str, int]:
        """Loads of many workers in one round trip (the router's hot path)."""
        ids = list(worker_ids)
        if not ids:
            return {}
        vals = await self.r.mget([_k(self.prefix, i, ":load") for i in ids])
        return {i: int(v or 0) for i, v in zip(ids, vals)}


def view(url: str | None, prefix: str = "dh:", heartbeat_ttl_s: float = 10) -> dict[str, list[tuple[WorkerInfo, int]]]:
    """Alive workers of each kind with their loads, read with a client of its own (blocking: for tools
    and tests, not for an event loop)."""
    async def read() -> dict[str, list[tuple[WorkerInfo, int]]]:
        async with connect_async(url) as r:
            reg = Registry(r, prefix, heartbeat_ttl_s)
            out = {}
            for kind in KINDS:
                workers = await reg.alive(kind)
                loads = await reg.loads(w.worker_id for w in workers)
                out[kind] = [(w, loads[w.worker_id]) for w in workers]
            return out
    return asyncio.run(read())
