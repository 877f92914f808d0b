"""Graceful drain of a target worker (actors/workers/worker.py) over a real gRPC server and Redis: health turns
NOT_SERVING and the worker leaves the registry while its stream still runs, new streams are refused
with UNAVAILABLE (the gateway retries elsewhere), a stream in flight finishes within the grace, and
past the grace it is handed over: ended with UNAVAILABLE after a prefix of its tokens."""
from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from drafthorse.actors.models import loader
from drafthorse.actors.workers.target_worker import SERVICE, TargetService
from drafthorse.actors.workers.worker import GrpcWorker
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.membership import Membership
from drafthorse.runtime.registry import view
from drafthorse.runtime.rpc import start_server
from drafthorse.runtime.settings import Settings

TOKENS = 200


@pytest.fixture(scope="module")
def lm():
    return loader.load("tiny:0", max_len=512)


@pytest.fixture
def worker(lm):
    s = Settings(key_prefix=f"dh-drain-{uuid.uuid4().hex[:8]}:", heartbeat_s=0.2)
    w = GrpcWorker()
    service = TargetService(lm, "target-drain", 2, 512)
    server, port, health = start_server(lambda srv: pb_grpc.add_TargetServicer_to_server(service, srv), [SERVICE])
    w.serve(service, server, port, health, [SERVICE], Membership(s, "target", "target-drain"), s.grace_s,
            model=lm.name, capacity=2)
    channel = grpc.insecure_channel(w.membership.address)
    yield w, channel
    channel.close()
    w.drain(0)


def generate(channel):
    return pb_grpc.TargetStub(channel).Generate(
        pb.TargetRequest(prompt_ids=[5, 6, 7, 8], max_new_tokens=TOKENS), timeout=60)


def alive(w) -> list:
    """The target workers the gateway would see."""
    return view(w.membership.s.redis_url, w.membership.s.key_prefix, 3 * w.membership.s.heartbeat_s)["target"]


def serving(channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status


def test_drain_order_and_the_stream_in_flight_finishes(worker):
    w, channel = worker
    assert alive(w) and serving(channel) == health_pb2.HealthCheckResponse.SERVING
    stream = generate(channel)
    got = list(next(stream).token_ids)
    result = {}
    drainer = threading.Thread(target=lambda: result.update(w.drain(grace_s=60)))
    drainer.start()
    deadline = time.monotonic() + 10
    while serving(channel) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.01)
    # while the stream still runs: not serving, out of the registry, new streams refused
    assert serving(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert w.service.active == 1 and not alive(w)
    with pytest.raises(grpc.RpcError) as e:
        list(generate(channel))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
    last = None
    for msg in stream:
        got += msg.token_ids
        last = msg
    drainer.join(30)
    assert len(got) == TOKENS and last.finish_reason == "length"
    assert result["in_flight"] == 1 and result["handed_over"] == 0


def test_past_the_grace_streams_are_handed_over(worker, lm):
    w, channel = worker
    reference = [t for m in generate(channel) for t in m.token_ids]
    stream = generate(channel)
    got = list(next(stream).token_ids)
    result = w.drain(grace_s=0)
    with pytest.raises(grpc.RpcError) as e:
        for msg in stream:
            got += msg.token_ids
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "continue on another" in e.value.details()
    assert result["handed_over"] == 1 and got == reference[:len(got)] and len(got) < TOKENS


def test_a_drain_inside_a_drain_does_not_deadlock(worker):
    """The garbage collector may run another worker's __del__ (which drains) on the thread of a drain in
    progress; with a plain lock that hung the suite once."""
    w, _ = worker
    w.drain(0)
    done = threading.Event()

    def nested():
        with GrpcWorker._drain_lock:   # a drain in progress on this thread
            w.__del__()
            assert w.drain()["worker_id"] == "target-drain"
        done.set()
    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(10)
    assert done.is_set(), "drain deadlocked on its own lock"


def test_health_check_fails_once_the_scheduler_thread_is_gone(worker):
    """Every step runs on the target's scheduler thread: a worker without it accepts streams it will never
    serve, so Serve's health check must fail (and replace it)."""
    w, _ = worker
    w.check_health()
    w.service.scheduler.stop()
    w.service.scheduler.thread.join(10)
    with pytest.raises(RuntimeError, match="scheduler thread"):
        w.check_health()
