"""Worker registry: who serves what, who is alive, and how busy each one is.

Keys (under `prefix`):
    worker:<id>       hash    the WorkerInfo fields
    worker:<id>:hb    string  heartbeat, expires after heartbeat_ttl_s: its presence *is* liveness
    worker:<id>:load  int     outstanding requests leased to the worker (router.lease)
    workers:<kind>    set     ids registered per kind, so alive() needs no SCAN

A worker that stops heartbeating disappears from alive() once its TTL lapses; the next alive()
prunes its keys. Heartbeat about every heartbeat_ttl_s / 3 so one late beat does not drop a worker.
Multi-key scripts assume one Redis (or a Sentinel primary), not Redis Cluster."""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import redis

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


class Registry:
    def __init__(self, redis: redis.Redis, prefix: str = "dh:", heartbeat_ttl_s: float = 10):
        self.r, self.prefix, self.heartbeat_ttl_s = redis, prefix, heartbeat_ttl_s
        self._ttl_ms = max(1, int(heartbeat_ttl_s * 1000))  # PX: sub-second TTLs work (tests use them)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._prune = self.r.register_script(_PRUNE)
        self._add_load = self.r.register_script(_ADD_LOAD)

    def _k(self, worker_id: str, suffix: str = "") -> str:
        return f"{self.prefix}worker:{worker_id}{suffix}"

    def register(self, info: WorkerInfo) -> None:
        """Publish (or replace) a worker's info and start its liveness clock. Keeps its load count:
        leases still held by gateways will decrement it, so resetting would undercount."""
        p = self.r.pipeline(transaction=True)
        p.delete(self._k(info.worker_id))  # drop fields of an older registration
        p.hset(self._k(info.worker_id), mapping=info.to_hash())  # type: ignore[arg-type]  # redis' Mapping key is invariant
        for kind in KINDS:  # a re-registration may change kind
            p.srem(f"{self.prefix}workers:{kind}", info.worker_id)
        p.sadd(f"{self.prefix}workers:{info.kind}", info.worker_id)
        p.set(self._k(info.worker_id, ":hb"), "1", px=self._ttl_ms)
        p.execute()

    def heartbeat(self, worker_id: str) -> bool:
        """Extend liveness. False: the registry forgot this worker (pruned); call register() again."""
        return bool(self._heartbeat(keys=[self._k(worker_id), self._k(worker_id, ":hb")], args=[self._ttl_ms]))

    def deregister(self, worker_id: str) -> None:
        p = self.r.pipeline(transaction=True)
        p.delete(self._k(worker_id), self._k(worker_id, ":hb"), self._k(worker_id, ":load"))
        for kind in KINDS:
            p.srem(f"{self.prefix}workers:{kind}", worker_id)
        p.execute()

    def alive(self, kind: str) -> list[WorkerInfo]:
        """Workers of `kind` with a live heartbeat, sorted by worker_id; prunes the dead ones."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        # bytes: the client does not decode responses
        ids = sorted(i.decode() if isinstance(i, bytes) else i for i in self.r.smembers(f"{self.prefix}workers:{kind}"))
        if not ids:
            return []
        p = self.r.pipeline(transaction=False)
        for i in ids:
            p.exists(self._k(i, ":hb"))
            p.hgetall(self._k(i))
        res = p.execute()
        out, dead = [], []
        for i, hb, h in zip(ids, res[0::2], res[1::2]):
            if hb and h:
                out.append(WorkerInfo.from_hash(h))
            else:
                dead.append(i)
        if dead:
            self._prune(keys=[self.prefix], args=dead)
        return out

    def get(self, worker_id: str) -> WorkerInfo | None:
        """The worker's info if it is alive, else None."""
        p = self.r.pipeline(transaction=False)
        p.exists(self._k(worker_id, ":hb"))
        p.hgetall(self._k(worker_id))
        hb, h = p.execute()
        return WorkerInfo.from_hash(h) if hb and h else None

    def add_load(self, worker_id: str, delta: int) -> int:
        """Atomically add `delta` to the worker's outstanding load; never below 0. Returns the new value
        (0 and no change for a worker that is not registered)."""
        return int(self._add_load(keys=[self._k(worker_id), self._k(worker_id, ":load")], args=[int(delta)]))

    def load(self, worker_id: str) -> int:
        return int(self.r.get(self._k(worker_id, ":load")) or 0)

    def loads(self, worker_ids: Iterable[str]) -> dict[str, int]:
        """Loads of many workers in one round trip (the router's hot path)."""
        ids = list(worker_ids)
        if not ids:
            return {}
        vals = self.r.mget([self._k(i, ":load") for i in ids])
        return {i: int(v or 0) for i, v in zip(ids, vals)}
