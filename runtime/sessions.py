"""Multi-turn sessions: the committed conversation, its owner, and which target worker holds its KV cache.

Keys (under `prefix`), both expiring `ttl_s` after the last write:
    session:<id>          hash    owner, target_worker, turns, created_at, updated_at, last_op, stat:<name>
    session:<id>:tokens   string  token ids packed as little-endian uint32: a turn's checkpoint is one
                                  APPEND (O(new tokens)), a read is one GET and one unpack
    session:<id>:turn     string  the lease of the turn in progress (one at a time), expiring unless renewed
    owner:<name>:sessions set     ids an owner opened, kept only under a cap on open sessions (create's
                                  max_open); an id whose session is gone is dropped when the cap is reached,
                                  so it holds at most max_open ids and needs no expiry

Writes are Lua scripts, so each is atomic and checks that the session still exists (a write to an
expired session must not resurrect half of it). Each write carries a fresh nonce stored in `last_op`:
when redis-py resends a script after a timeout that actually ran, the resend is a no-op instead of
appending the same tokens twice.

Ownership: get() returns None for a session of another owner, exactly as for a missing one, so a
caller cannot probe other owners' ids. Writes take no owner; the gateway authorizes with get() first.

The gateway is its only user, on its event loop: every method is awaited (redis.asyncio)."""
from __future__ import annotations

import math
import re
import struct
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio

_ID = re.compile(r"[0-9a-f]{32}")


class SessionNotFound(KeyError):
    """No such session (never created, expired, deleted, or malformed id). Gateway: NOT_FOUND."""


class TooManySessions(RuntimeError):
    """The owner has max_open sessions open. Gateway: RESOURCE_EXHAUSTED, retry when one expires."""

    def __init__(self, open_now: int, retry_after_s: int):
        super().__init__(f"{open_now} sessions are open")
        self.open_now, self.retry_after_s = open_now, retry_after_s


class SessionConflict(RuntimeError):
    """The conversation is not as long as its writer expected: another turn wrote to it (its lease lapsed)."""


@dataclass
class Session:
    session_id: str
    owner: str                                  # api-key id, "" when auth is off
    token_ids: list[int] = field(default_factory=list)  # whole committed conversation, prompts + outputs
    target_worker: str = ""                     # affinity: the worker whose KV cache holds this prefix
    turns: int = 0
    stats: dict[str, int | float] = field(default_factory=dict)  # cumulative over finished turns
    created_at: float = 0.0                     # unix seconds
    updated_at: float = 0.0


# KEYS: the new session's hash, the owner's set; ARGV: owner, now, ttl_ms, max open (0: no cap), id,
# session key prefix. At the cap, ids whose session expired or was deleted leave the set first; still at
# the cap: {-open, ms until the first of them expires}.
_CREATE = """
local cap = tonumber(ARGV[4])
if cap > 0 and redis.call('SCARD', KEYS[2]) >= cap then
  local soonest = -1
  for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    local ttl = redis.call('PTTL', ARGV[6] .. id)
    if ttl == -2 then redis.call('SREM', KEYS[2], id)
    elseif soonest < 0 or ttl < soonest then soonest = ttl end
  end
  local n = redis.call('SCARD', KEYS[2])
  if n >= cap then return {-n, soonest} end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'target_worker', '', 'turns', 0, 'created_at', ARGV[2],
           'updated_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if cap > 0 then redis.call('SADD', KEYS[2], ARGV[5]) end
return {1, 0}
"""

# ARGV: packed tokens, max bytes, target worker, now, ttl_ms, nonce, expected length in bytes (-1: any)
_CHECKPOINT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'last_op') == ARGV[6] then return redis.call('STRLEN', KEYS[2]) end
if tonumber(ARGV[7]) >= 0 and redis.call('STRLEN', KEYS[2]) ~= tonumber(ARGV[7]) then return -3 end
local n = redis.call('STRLEN', KEYS[2]) + string.len(ARGV[1])
if n > tonumber(ARGV[2]) then return -2 end
if string.len(ARGV[1]) > 0 then redis.call('APPEND', KEYS[2], ARGV[1]) end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'target_worker', ARGV[3]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[4], 'last_op', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return n
"""

# ARGV: now, ttl_ms, nonce, then (name, value) pairs added to stat:<name>. HINCRBYFLOAT for all
# values: it keeps integers integral ("10", not "10.0") and never fails on a int/float mix.
_FINISH_TURN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'last_op') == ARGV[3] then return 1 end
redis.call('HINCRBY', KEYS[1], 'turns', 1)
for i = 4, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], 'stat:' .. ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1], 'last_op', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

_SET_AFFINITY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'target_worker', ARGV[1], 'updated_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# the turn lease: renewed or released only by its holder (ARGV[1], its token)
_RENEW_TURN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_END_TURN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# ARGV[1] == '1': delete only if the owner is ARGV[2].
_DELETE = """
if ARGV[1] == '1' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
return redis.call('DEL', KEYS[1], KEYS[2])
"""


def _num(b: bytes) -> int | float:
    s = b.decode()
    try:
        return int(s)
    except ValueError:
        return float(s)


class SessionStore:
    def __init__(self, redis: redis.asyncio.Redis, prefix: str = "dh:", ttl_s: float = 3600,
                 max_tokens: int = 131_072):
        if redis.get_connection_kwargs().get("decode_responses"):
            raise ValueError("SessionStore needs a bytes client (decode_responses=False): tokens are packed")
        self.r, self.prefix, self.ttl_s, self.max_tokens = redis, prefix, ttl_s, max_tokens
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._create = self.r.register_script(_CREATE)
        self._checkpoint = self.r.register_script(_CHECKPOINT)
        self._finish_turn = self.r.register_script(_FINISH_TURN)
        self._set_affinity = self.r.register_script(_SET_AFFINITY)
        self._delete = self.r.register_script(_DELETE)
        self._renew_turn = self.r.register_script(_RENEW_TURN)
        self._end_turn = self.r.register_script(_END_TURN)

    def _keys(self, session_id: str) -> list[str]:
        if not isinstance(session_id, str) or not _ID.fullmatch(session_id):
            raise SessionNotFound(session_id)  # also keeps arbitrary text out of key names
        k = f"{self.prefix}session:{session_id}"
        return [k, k + ":tokens"]

    async def create(self, owner: str, max_open: int = 0) -> Session:
        """A new session of `owner`; TooManySessions when `owner` already has `max_open` open (0: no cap)."""
        now = time.time()
        s = Session(session_id=uuid.uuid4().hex, owner=owner, created_at=now, updated_at=now)
        n, wait_ms = await self._create(keys=[self._keys(s.session_id)[0], f"{self.prefix}owner:{owner}:sessions"],
                                        args=[owner, repr(now), self._ttl_ms, max_open, s.session_id,
                                              f"{self.prefix}session:"])
        if n < 0:
            raise TooManySessions(-n, max(1, math.ceil(wait_ms / 1000)))
        return s

    async def get(self, session_id: str, owner: str) -> Session | None:
        """The session, or None if it does not exist or belongs to another owner."""
        try:
            meta, tokens = self._keys(session_id)
        except SessionNotFound:
            return None
        p = self.r.pipeline(transaction=True)  # MULTI: metadata and tokens from the same instant
        p.hgetall(meta)
        p.get(tokens)
        h, packed = await p.execute()
        if not h or h.get(b"owner", b"").decode() != owner:
            return None
        packed = packed or b""
        return Session(
            session_id=session_id, owner=owner,
            token_ids=list(struct.unpack(f"<{len(packed) // 4}I", packed)),
            target_worker=h.get(b"target_worker", b"").decode(), turns=int(h.get(b"turns", 0)),
            stats={k[5:].decode(): _num(v) for k, v in h.items() if k.startswith(b"stat:")},
            created_at=float(h.get(b"created_at", 0)), updated_at=float(h.get(b"updated_at", 0)))

    async def checkpoint(self, session_id: str, token_ids_appended: list[int], target_worker: str = "",
                   at: int | None = None) -> int:
        """Append committed tokens (and set affinity unless target_worker is ""); refresh the TTL.
        Returns the conversation length. ValueError, with nothing appended, past max_tokens; with `at`,
        SessionConflict, with nothing appended, unless the conversation is `at` tokens long."""
        keys = self._keys(session_id)
        try:
            packed = struct.pack(f"<{len(token_ids_appended)}I", *token_ids_appended)
        except struct.error as e:
            raise ValueError(f"token ids must be integers in [0, 2**32): {e}") from None
        n = int(await self._checkpoint(keys=keys, args=[packed, self.max_tokens * 4, target_worker, repr(time.time()),
                                                  self._ttl_ms, uuid.uuid4().hex, -1 if at is None else 4 * at]))
        if n == -1:
            raise SessionNotFound(session_id)
        if n == -3:
            raise SessionConflict(f"session {session_id}: the conversation is not {at} tokens long")
        if n == -2:
            raise ValueError(f"conversation would exceed {self.max_tokens} tokens: start a new session")
        return n // 4

    async def set_affinity(self, session_id: str, target_worker: str) -> None:
        if not await self._set_affinity(keys=self._keys(session_id),
                                        args=[target_worker, repr(time.time()), self._ttl_ms]):
            raise SessionNotFound(session_id)

    async def begin_turn(self, session_id: str, lease_s: float) -> str | None:
        """The lease on the session's turn (a token for renew_turn / end_turn), or None while another turn
        holds it: one turn at a time, so two turns never interleave their tokens in the conversation. It
        lapses lease_s after its last renewal: a gateway that died mid-turn frees the session by then."""
        token = uuid.uuid4().hex
        ok = await self.r.set(self._keys(session_id)[0] + ":turn", token, nx=True, px=max(1, int(lease_s * 1000)))
        return token if ok else None

    async def renew_turn(self, session_id: str, token: str, lease_s: float) -> bool:
        """Extend the lease `token` holds; False when it lapsed (another turn may have begun)."""
        return bool(await self._renew_turn(keys=[self._keys(session_id)[0] + ":turn"],
                                     args=[token, max(1, int(lease_s * 1000))]))

    async def end_turn(self, session_id: str, token: str) -> None:
        """Release the lease `token` holds (no-op once it lapsed or was taken over)."""
        await self._end_turn(keys=[self._keys(session_id)[0] + ":turn"], args=[token])

    async def finish_turn(self, session_id: str, stats: dict[str, int | float] | None = None) -> None:
        """Count a turn and add its numeric stats (tokens drafted/accepted, seconds, ...) to the totals."""
        args: list = [repr(time.time()), self._ttl_ms, uuid.uuid4().hex]
        for name, value in (stats or {}).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"stat {name!r} must be a number, got {type(value).__name__}")
            args += [name, repr(value)]
        if not await self._finish_turn(keys=self._keys(session_id), args=args):
            raise SessionNotFound(session_id)

    async def delete(self, session_id: str, owner: str | None = None) -> bool:
        """Delete; with `owner`, only that owner's session. True if something was deleted."""
        try:
            keys = self._keys(session_id)
        except SessionNotFound:
            return False
        return bool(await self._delete(keys=keys, args=["0" if owner is None else "1", owner or ""]))
