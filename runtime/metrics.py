"""Prometheus metrics of one drafthorse process (gateway, target worker or draft worker).

Every process serves its own registry at http://HOST:PORT/metrics (`serve`); HOST is Settings.host
(loopback unless configured) and PORT is Settings.metrics_port: 0 takes a free port, N takes the
first free port in N .. N+15 (several processes on one machine each get their own). The address is
logged, and workers also report it in `info()`.

Series (all prefixed drafthorse_):
    generated_tokens_total{drafter}            tokens committed by target workers (tokens/s: rate())
    target_forwards_total{drafter}             verify steps (prefill included)
    drafted_tokens_total / accepted_tokens_total{drafter}
    accepted_at_depth_total{drafter,depth}     verify steps that accepted >= depth draft tokens
                                               (acceptance at depth d = this / target_forwards_total)
    mean_accepted_tokens{drafter}              histogram, one observation per generation
    draft_seconds_total / verify_seconds_total{drafter}
                                               per-step latency = rate(these) / rate(target_forwards_total)
    generation_seconds{drafter}                histogram of a generation's time on a target worker
    draft_rpc_seconds                          histogram of internal Draft RPCs (target -> draft worker)
    inflight_requests{component}               requests in flight: gateway / target (running + queued)
    queued_requests{component}                 target: requests waiting for a batch slot (queue depth)
    active_sessions{component}                 target: sessions holding a KV cache; draft: drafter states
    kv_slots{state}                            target: KV slots free / lent to requests (free + lent is
                                               the configured sessions_per_target, else health fails)
    requests_total{code}                       gateway requests finished, by gRPC status code
"""
from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)
PORT_SPAN = 16
REGISTRY = CollectorRegistry(auto_describe=True)

_drafter = ["drafter"]
GENERATED = Counter("drafthorse_generated_tokens", "Tokens committed by target workers", _drafter,
                    registry=REGISTRY)
FORWARDS = Counter("drafthorse_target_forwards", "Target forward passes (verify steps, prefill included)",
                   _drafter, registry=REGISTRY)
DRAFTED = Counter("drafthorse_drafted_tokens", "Draft tokens proposed to the target", _drafter,
                  registry=REGISTRY)
ACCEPTED = Counter("drafthorse_accepted_tokens", "Draft tokens the target accepted", _drafter,
                   registry=REGISTRY)
ACCEPTED_AT_DEPTH = Counter("drafthorse_accepted_at_depth", "Verify steps that accepted at least `depth` "
                            "draft tokens", ["drafter", "depth"], registry=REGISTRY)
MEAN_ACCEPTED = Histogram("drafthorse_mean_accepted_tokens", "Tokens committed per target forward, one "
                          "observation per generation", _drafter, registry=REGISTRY,
                          buckets=(1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8))
DRAFT_SECONDS = Counter("drafthorse_draft_seconds", "Time spent drafting (all steps)", _drafter,
                        registry=REGISTRY)
VERIFY_SECONDS = Counter("drafthorse_verify_seconds", "Time spent verifying (all steps)", _drafter,
                         registry=REGISTRY)
GENERATION_SECONDS = Histogram("drafthorse_generation_seconds", "A generation's time on a target worker",
                               _drafter, registry=REGISTRY,
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
DRAFT_RPC_SECONDS = Histogram("drafthorse_draft_rpc_seconds", "Internal Draft RPC latency (target -> draft "
                              "worker, network + drafting)", registry=REGISTRY,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
INFLIGHT = Gauge("drafthorse_inflight_requests", "Requests in flight", ["component"], registry=REGISTRY)
QUEUED = Gauge("drafthorse_queued_requests", "Requests waiting for a slot in the target's batch", ["component"],
               registry=REGISTRY)
ACTIVE_SESSIONS = Gauge("drafthorse_active_sessions", "Sessions held: target = KV caches holding a session, "
                        "draft = drafter states", ["component"], registry=REGISTRY)
KV_SLOTS = Gauge("drafthorse_kv_slots", "Target KV slots by state: free, lent (to requests)", ["state"],
                 registry=REGISTRY)
REQUESTS = Counter("drafthorse_requests", "Gateway requests finished, by gRPC status code", ["code"],
                   registry=REGISTRY)

_lock = threading.Lock()
_port: int | None = None


def serve(host: str, port: int, who: str) -> int:
    """Start this process's /metrics server once (later calls return its port); 0 when none could bind."""
    global _port
    with _lock:
        if _port is None:
            for p in ([0] if port == 0 else range(port, min(port + PORT_SPAN, 65536))):
                try:
                    server, _ = start_http_server(p, addr=host, registry=REGISTRY)
                except OSError:
                    continue
                _port = server.server_port
                break
            else:
                log.warning("%s: no free metrics port in %d..%d on %s", who, port, port + PORT_SPAN - 1, host)
                return 0
        log.info("%s: metrics at http://%s:%d/metrics", who, host, _port)
        return _port


class Metrics:
    """This process's series, handed to a worker or the gateway by the deployment layer (the data plane
    records through it and never imports Prometheus itself)."""

    def serve(self, host: str, port: int, who: str) -> int:
        return serve(host, port, who)

    def observe_generation(self, drafter: str, stats) -> None:
        """Record one finished (or stopped) generation's GenerationStats."""
        GENERATED.labels(drafter).inc(stats.generated_tokens)
        FORWARDS.labels(drafter).inc(stats.target_forwards)
        DRAFTED.labels(drafter).inc(stats.drafted_tokens)
        ACCEPTED.labels(drafter).inc(stats.accepted_tokens)
        for depth, steps in enumerate(stats.accepted_per_depth, start=1):
            ACCEPTED_AT_DEPTH.labels(drafter, str(depth)).inc(steps)
        DRAFT_SECONDS.labels(drafter).inc(stats.draft_s)
        VERIFY_SECONDS.labels(drafter).inc(stats.verify_s)
        if stats.target_forwards:
            MEAN_ACCEPTED.labels(drafter).observe(stats.mean_accepted_tokens)
            GENERATION_SECONDS.labels(drafter).observe(stats.total_s)

    def observe_draft_rpc(self, seconds: float) -> None:
        DRAFT_RPC_SECONDS.observe(seconds)

    def watch_target(self, service) -> None:
        """Gauges read from a TargetService when scraped."""
        def cached_sessions() -> int:
            with service.pool.lock:
                return sum(not k.startswith("_") for k in service.pool.free)
        INFLIGHT.labels("target").set_function(lambda: service.active)
        QUEUED.labels("target").set_function(lambda: len(service.scheduler.waiting))
        ACTIVE_SESSIONS.labels("target").set_function(lambda: service.active + cached_sessions())
        KV_SLOTS.labels("free").set_function(lambda: service.pool.counts()[0])
        KV_SLOTS.labels("lent").set_function(lambda: service.pool.counts()[1])

    def watch_draft(self, service) -> None:
        """Gauges read from a DraftService when scraped."""
        ACTIVE_SESSIONS.labels("draft").set_function(lambda: service.session_count)
