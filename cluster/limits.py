"""Per-key limits on the public API: concurrent streams, generated tokens per minute, prompt size and
max new tokens per request, open sessions (those counted by the session store, runtime/sessions.py).
Counters live in Redis, so every gateway replica enforces the same budget. Over a limit a request is
refused before it reaches a worker: RESOURCE_EXHAUSTED (HTTP 429) with a retry hint in seconds (gRPC
trailing metadata `retry-after`, HTTP `Retry-After`).

Tokens per minute are counted in fixed one-minute windows when a generation ends (its generated
tokens), so one request can overshoot the budget it started within; the next is refused until the
window turns. Each open stream holds a lease of its own (a member of the key's sorted set, scored by
its expiry: the longest a stream may run, plus a minute), so a gateway that crashed, or a request
cancelled at the wrong moment, frees its slot by then however busy the key is. Awaited on the
gateway's event loop (redis.asyncio)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio

from drafthorse.runtime.settings import GatewaySettings

LEASE_MARGIN_S = 60   # a stream lease outlives the longest stream (max_stream_s) by this much

# KEYS[1]: the key's leases; ARGV: now, expiry, limit, lease id, lease seconds. Expired leases go first;
# the set itself lapses a lease after its last acquire.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[3]) then return -n end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return n + 1
"""


@dataclass(frozen=True)
class Limits:
    streams: int = 0              # concurrent streams per key (0 = unlimited)
    tokens_per_minute: int = 0    # generated tokens per key per minute
    prompt_tokens: int = 0        # prompt tokens per request
    new_tokens: int = 0           # max new tokens per request
    sessions: int = 0             # open sessions

    @classmethod
    def of(cls, s: GatewaySettings) -> Limits:
        return cls(s.key_max_streams, s.key_tokens_per_minute, s.key_max_prompt_tokens, s.key_max_new_tokens,
                   s.key_max_sessions)

    @property
    def any(self) -> bool:
        return any((self.streams, self.tokens_per_minute, self.prompt_tokens, self.new_tokens, self.sessions))


class LimitExceeded(Exception):
    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def now() -> float:
    """The clock minute windows are cut from (Unix seconds)."""
    return time.time()


class KeyLimits:
    def __init__(self, r: redis.asyncio.Redis, prefix: str, limits: Limits, clock=None,
                 lease_s: float = 1800 + LEASE_MARGIN_S):
        self.r, self.prefix, self.limits, self.lease_s = r, prefix, limits, lease_s
        self.clock = clock or (lambda: now())
        self._acquire = r.register_script(_ACQUIRE)

    def _key(self, owner: str, what: str) -> str:
        return f"{self.prefix}limit:{owner}:{what}"

    def _window(self) -> tuple[int, int]:
        """(this minute's number, seconds until the next one)."""
        now = self.clock()
        return int(now // 60), max(1, math.ceil(60 - now % 60))

    async def check(self, owner: str, prompt_tokens: int, max_new: int) -> None:
        """Refuse a request over a per-request limit or in a minute whose token budget is spent."""
        lim = self.limits
        if lim.prompt_tokens and prompt_tokens > lim.prompt_tokens:
            raise LimitExceeded(f"prompt is {prompt_tokens} tokens, this key's limit is {lim.prompt_tokens} per "
                                "request: shorten it")
        if lim.new_tokens and max_new > lim.new_tokens:
            raise LimitExceeded(f"max_new_tokens {max_new} is over this key's limit of {lim.new_tokens} per request")
        if lim.tokens_per_minute:
            minute, left = self._window()
            used = int(await self.r.get(self._key(owner, f"tpm:{minute}")) or 0)
            if used >= lim.tokens_per_minute:
                raise LimitExceeded(f"this key generated {used} tokens this minute, its limit is "
                                    f"{lim.tokens_per_minute}: retry after {left} s", left)

    async def spent(self, owner: str, tokens: int) -> None:
        """Count a finished generation's tokens in this minute's window."""
        if self.limits.tokens_per_minute and tokens > 0:
            minute, _ = self._window()
            key = self._key(owner, f"tpm:{minute}")
            p = self.r.pipeline()
            p.incrby(key, tokens)
            p.expire(key, 120)
            await p.execute()

    async def acquire(self, owner: str, lease: str) -> None:
        """Take one of the key's concurrent-stream slots as `lease` (an id unique to the request; release
        it with `release`, which is harmless for a lease never taken)."""
        if not self.limits.streams:
            return
        t = self.clock()
        n = int(await self._acquire(keys=[self._key(owner, "streams")],
                              args=[t, t + self.lease_s, self.limits.streams, lease, math.ceil(self.lease_s)]))
        if n < 0:
            raise LimitExceeded(f"this key has {-n} streams open, its limit is {self.limits.streams}: "
                                "retry when one ends", 1)

    async def release(self, owner: str, lease: str) -> None:
        if self.limits.streams:
            await self.r.zrem(self._key(owner, "streams"), lease)
