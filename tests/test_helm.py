"""The Helm chart, rendered by real Helm (the Go SDK embedded in helm-python-sdk: no helm binary, no
cluster) and checked object by object: core kinds against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the RayService against KubeRay's CRD, its serveConfigV2 against Ray
Serve's own config schema and drafthorse's Settings, and the wiring between them."""
from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (the test extra) renders the chart")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "drafthorse"
CRD = ROOT.parent / "shared" / "k8s-schemas" / "ray.io_rayservices.yaml"
K8S_VERSION = "1.33.0"
CORE_KINDS = {"Secret", "Service", "StatefulSet", "PodDisruptionBudget", "NetworkPolicy"}


def render(values: dict | None = None, values_file: str | None = None, name: str = "dh") -> list[dict]:
    """The chart rendered with `values_file` and `values` on top; where neither says anything of API keys,
    with apiKeys.allowAnonymous (the chart refuses to render open public APIs by default); where neither
    names the KubeRay operator's namespace (required), kuberay-system."""
    merged = helm.values_from_yaml((CHART / values_file).read_text()) if values_file else {}
    if "apiKeys" not in merged and "apiKeys" not in (values or {}):
        merged["apiKeys"] = {"allowAnonymous": True}
    if "operatorNamespace" not in {**merged.get("networkPolicy", {}), **(values or {}).get("networkPolicy", {})}:
        merged["networkPolicy"] = {**merged.get("networkPolicy", {}), "operatorNamespace": "kuberay-system"}
    for key, value in (values or {}).items():  # one level of overrides on top of the file
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=merged or None, name=name, namespace="serving", is_install=True)
    docs = []
    for path, text in manifests.items():
        if not path.endswith(".txt"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = by_kind(docs, kind)
    return doc


def groups(rs: dict) -> dict[str, dict]:
    """groupName -> worker group spec, plus "head"."""
    spec = rs["spec"]["rayClusterConfig"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def env(group: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(group)["env"]}


def serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.fixture(scope="module")
def default_docs():
    return render()


@pytest.fixture(scope="module")
def gpu_docs():
    return render(values_file="values-gpu.yaml")


@pytest.fixture(scope="module")
def crd_validator():
    import jsonschema
    if not CRD.exists():
        pytest.skip(f"KubeRay CRD not found at {CRD} (the shared/ folder beside the repository is absent)")
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


# ---------------------------------------------------------------- what gets rendered

def test_defaults_render_the_expected_objects(default_docs):
    kinds = Counter(d["kind"] for d in default_docs)
    assert kinds == {"RayService": 1, "Service": 4, "StatefulSet": 1, "Secret": 2, "PodDisruptionBudget": 3,
                     "NetworkPolicy": 3}
    assert set(groups(one(default_docs, "RayService"))) == {"head", "gateway", "draft", "target"}


def test_gpu_values_render_the_expected_objects(gpu_docs):
    kinds = Counter(d["kind"] for d in gpu_docs)
    assert kinds == {"RayService": 1, "Service": 4, "StatefulSet": 1, "Secret": 2, "PodDisruptionBudget": 3,
                     "NetworkPolicy": 3, "ServiceMonitor": 1}
    g = groups(one(gpu_docs, "RayService"))
    for name, product in [("target", "NVIDIA-H100-80GB-HBM3"), ("draft", "NVIDIA-L4")]:
        pod = g[name]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": product}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert container(g[name])["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(g["gateway"]) + json.dumps(g["head"])
    assert container(g["target"])["image"].endswith(":0.1.0-cuda")
    sts = one(gpu_docs, "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"


def test_helm_lint_passes():
    result = helm.lint(str(CHART))
    assert not result["errors"], result
    assert not [m for m in result["messages"] if m["severity"] >= 3], result["messages"]  # 3+ = errors


# ---------------------------------------------------------------- schemas

@pytest.mark.parametrize("values_file", [None, "values-gpu.yaml"])
def test_core_kinds_are_valid_kubernetes(values_file):
    docs = render(values_file=values_file)
    checked = 0
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
    assert checked == sum(d["kind"] in CORE_KINDS for d in docs) >= 9


@pytest.mark.parametrize("values_file", [None, "values-gpu.yaml"])
def test_rayservice_matches_the_kuberay_crd(crd_validator, values_file):
    rs = one(render(values_file=values_file), "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    errors = sorted(crd_validator.iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_the_crd_check_catches_a_broken_rayservice(crd_validator, default_docs):
    rs = json.loads(json.dumps(one(default_docs, "RayService")))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplicas"] = "one"
    del rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]
    assert len(list(crd_validator.iter_errors(rs))) == 2


def test_servicemonitor_shape(gpu_docs):
    sm = one(gpu_docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    metrics_svc = next(s for s in by_kind(gpu_docs, "Service") if s["metadata"]["name"].endswith("-metrics"))
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    port_names = {p["name"] for p in metrics_svc["spec"]["ports"]}
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= port_names


# ---------------------------------------------------------------- the Serve application

@pytest.mark.parametrize("values_file", [None, "values-gpu.yaml"])
def test_serve_config_is_valid_for_ray_serve_and_drafthorse(values_file):
    from ray.serve.schema import ServeDeploySchema

    from drafthorse.cluster.deployment.autoscaling import active_requests_policy
    from drafthorse.runtime.settings import Settings

    rs = one(render(values_file=values_file), "RayService")
    config = ServeDeploySchema.model_validate(serve_config(rs))
    (app,) = config.applications
    assert app.import_path == "drafthorse.cluster.deployment.app:app_builder" and app.route_prefix == "/"  # the OpenAI HTTP API
    unknown = set(app.args) - set(Settings.model_fields)
    assert not unknown, f"args that are not drafthorse settings: {unknown}"
    s = Settings(**app.args)  # every value passes the Settings validators
    assert s.host == "0.0.0.0" and s.auth_token is None and s.redis_url is None
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Gateway", "TargetWorker", "DraftWorker"}
    for name in ("TargetWorker", "DraftWorker"):
        policy = deployments[name].autoscaling_config["policy"]["policy_function"]
        module, func = policy.split(":")
        assert (module, func) == ("drafthorse.cluster.deployment.autoscaling", active_requests_policy.__name__)
    if values_file:
        assert (s.model, s.draft_model, s.drafter, s.dtype, s.device) == ("/models/target", "/models/draft",
                                                                          "draft-model", "bfloat16", "cuda")
        assert deployments["TargetWorker"].ray_actor_options.num_gpus == 1
    else:
        assert s.device == "cpu"


@pytest.mark.parametrize("values_file", [None, "values-gpu.yaml"])
def test_ray_custom_resources_match_what_the_actors_ask_for(values_file):
    docs = render(values_file=values_file)
    rs = one(docs, "RayService")
    g = groups(rs)
    deployments = {d["name"]: d for d in serve_config(rs)["applications"][0]["deployments"]}
    values = helm.values_from_yaml((CHART / (values_file or "values.yaml")).read_text())
    for group, deployment, env_name in [("target", "TargetWorker", "DRAFTHORSE_TARGET_RESOURCES"),
                                        ("draft", "DraftWorker", "DRAFTHORSE_DRAFT_RESOURCES"),
                                        ("gateway", "Gateway", None)]:
        per_replica = deployments[deployment]["ray_actor_options"]["resources"]
        offered = json.loads(json.loads(g[group]["rayStartParams"]["resources"]))  # KubeRay's quoted JSON
        per_pod = values.get(group, {}).get("replicasPerPod", 1)
        assert offered == {k: v * per_pod for k, v in per_replica.items()}, group
        for other in set(g) - {group}:  # no other group offers them: replicas land on their own pods
            assert not set(per_replica) & set(json.loads(json.loads(
                g[other].get("rayStartParams", {}).get("resources", '"{}"')))), (group, other)
        if env_name:
            for grp in g.values():  # the app builder may run on any pod: every pod has the same env
                assert json.loads(env(grp)[env_name]["value"]) == per_replica
    assert g["head"]["rayStartParams"]["num-cpus"] == "0"


# ---------------------------------------------------------------- services, probes, disruption

def test_services_and_probes_reach_the_gateway(default_docs):
    g = groups(one(default_docs, "RayService"))
    gateway = g["gateway"]["template"]
    labels = gateway["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(g["gateway"])["ports"]}
    services = {s["metadata"]["name"]: s for s in by_kind(default_docs, "Service")}
    grpc_svc, http_svc = services["dh-drafthorse-grpc"], services["dh-drafthorse-http"]
    for svc, port_name, port in [(grpc_svc, "grpc", 50051), (http_svc, "http", 8000)]:
        assert svc["spec"]["selector"].items() <= labels.items()
        (p,) = svc["spec"]["ports"]
        assert p["port"] == port and p["targetPort"] == port_name and ports[port_name] == port
    for other in ("head", "draft", "target"):  # only gateway pods are behind them
        assert not grpc_svc["spec"]["selector"].items() <= g[other]["template"]["metadata"]["labels"].items()
    c = container(g["gateway"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051, probe
    # KubeRay submits the Serve config only once the head pod is ready: no probe there may wait for the app
    assert not {"readinessProbe", "livenessProbe", "startupProbe"} & set(container(g["head"]))
    metrics_svc = services["dh-drafthorse-metrics"]
    for grp in ("gateway", "draft", "target", "head"):
        assert metrics_svc["spec"]["selector"].items() <= g[grp]["template"]["metadata"]["labels"].items()


def test_disruption_budgets_select_the_worker_pods(default_docs):
    g = groups(one(default_docs, "RayService"))
    pdbs = {p["metadata"]["name"]: p for p in by_kind(default_docs, "PodDisruptionBudget")}
    assert set(pdbs) == {f"dh-drafthorse-{x}" for x in ("gateway", "draft", "target")}
    for name in ("gateway", "draft", "target"):
        selector = pdbs[f"dh-drafthorse-{name}"]["spec"]["selector"]["matchLabels"]
        for grp, spec in g.items():
            selected = selector.items() <= spec["template"]["metadata"]["labels"].items()
            assert selected == (grp == name), (name, grp)


# ---------------------------------------------------------------- Ray's own ports fenced

ANYONE = "anyone"
OPERATOR = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}}}
PROMETHEUS = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        if labels.get(e["key"]) not in e["values"]:
            return False
    return True


def admitted(docs: list[dict], labels: dict, port: int) -> list | None:
    """The peers the NetworkPolicies admit to `port` of a pod with `labels` (ANYONE for a rule without
    `from`); None when no policy selects the pod, i.e. it is not isolated and admits everyone."""
    policies = [p for p in by_kind(docs, "NetworkPolicy") if _selects(p["spec"]["podSelector"], labels)]
    if not policies:
        return None
    peers = []
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"]
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            assert not any("endPort" in q or isinstance(q["port"], str) for q in ports or [])
            if ports is None or any(q["port"] == port for q in ports):
                peers += rule.get("from") or [ANYONE]  # `from` absent or empty: every source
    return peers


def _ray_pods(docs: list[dict]) -> dict[str, dict]:
    return {name: g["template"]["metadata"]["labels"] for name, g in groups(one(docs, "RayService")).items()}


def _is_own_cluster(peer, docs: list[dict]) -> bool:
    """The peer standing for this release's Ray pods: a podSelector alone (this namespace) that selects
    every Ray pod, and neither Redis nor another release's pods."""
    if peer == ANYONE or set(peer) != {"podSelector"}:
        return False
    sel = peer["podSelector"]
    redis = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    pods = _ray_pods(docs).values()
    other_release = [{**labels, "app.kubernetes.io/instance": "other"} for labels in pods]
    return (all(_selects(sel, labels) for labels in pods) and not _selects(sel, redis)
            and not any(_selects(sel, labels) for labels in other_release))


def _outside_peers(docs: list[dict], labels: dict, port: int) -> list:
    """Who besides this Ray cluster's own pods reaches the port (they run Ray code already: admitting
    them everywhere costs nothing, and Ray picks most of its ports at random)."""
    peers = admitted(docs, labels, port)
    assert peers is not None and any(_is_own_cluster(p, docs) for p in peers), (labels, port)
    return [p for p in peers if not _is_own_cluster(p, docs)]


def test_network_policies_fence_rays_own_ports(default_docs):
    """The dashboard (job submission, Serve deployments: code execution) admits only the KubeRay
    operator; GCS, the Ray client, raylets and the rest only this Ray cluster; the public API of the
    gateway pods everyone; the metrics ports Prometheus."""
    pods = _ray_pods(default_docs)
    assert _outside_peers(default_docs, pods["head"], 8265) == [OPERATOR]
    explicit = [r for p in by_kind(default_docs, "NetworkPolicy") for r in p["spec"]["ingress"]
                if any(q["port"] == 8265 for q in r.get("ports", []))]
    assert [r["from"] for r in explicit] == [[OPERATOR]]
    for name, labels in pods.items():
        for port in (6379, 10001, 52365, 12345):  # GCS, Ray client, dashboard agent, a random Ray port
            assert _outside_peers(default_docs, labels, port) == [], (name, port)
        if name != "head":
            assert _outside_peers(default_docs, labels, 8265) == [], name
        for port in (9100, 8080):
            assert _outside_peers(default_docs, labels, port) == [PROMETHEUS], (name, port)
        for port in (50051, 8000):  # the public API: the gateway pods only
            assert _outside_peers(default_docs, labels, port) == ([ANYONE] if name == "gateway" else []), (name, port)
    redis = one(default_docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert admitted(default_docs, redis, 6379) is None  # Redis is not a Ray pod (it has its password)
    for doc in by_kind(default_docs, "NetworkPolicy"):
        assert doc["apiVersion"] == "networking.k8s.io/v1"
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_dashboard_listens_for_the_operator_and_no_service_publishes_rays_ports(default_docs):
    """The operator reaches the dashboard from its own pod, so it cannot sit on loopback; the chart's
    Services publish none of Ray's ports, and the head declares no Ray client port (KubeRay's head
    Service publishes exactly the declared ones)."""
    head = groups(one(default_docs, "RayService"))["head"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container(head)["ports"]}
    assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379 and 10001 not in ports.values()
    ray_pods = _ray_pods(default_docs).values()
    for svc in by_kind(default_docs, "Service"):
        if any(_selects({"matchLabels": svc["spec"]["selector"]}, labels) for labels in ray_pods):
            assert not {p["port"] for p in svc["spec"]["ports"]} & {8265, 6379, 10001}, svc["metadata"]["name"]


def test_network_policy_values():
    docs = render({"networkPolicy": {"operatorNamespace": "kuberay-system",
                                     "dashboardFrom": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
                                     "apiFrom": [{"namespaceSelector": {"matchLabels": {"team": "web"}}}],
                                     "metricsFrom": []}})
    pods = _ray_pods(docs)
    operator = {**OPERATOR, "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}
    assert _outside_peers(docs, pods["head"], 8265) == [operator, {"ipBlock": {"cidr": "10.0.0.1/32"}}]
    web = {"namespaceSelector": {"matchLabels": {"team": "web"}}}
    assert _outside_peers(docs, pods["gateway"], 50051) == _outside_peers(docs, pods["gateway"], 8000) == [web]
    for labels in pods.values():  # metricsFrom [] means nobody, not everybody
        assert _outside_peers(docs, labels, 9100) == _outside_peers(docs, labels, 8080) == []
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_network_policy_off():
    docs = render({"networkPolicy": {"enabled": False}})
    assert not by_kind(docs, "NetworkPolicy")
    assert admitted(docs, _ray_pods(docs)["head"], 8265) is None


# ---------------------------------------------------------------- secrets

def _secret_values(docs: list[dict]) -> list[str]:
    return [base64.b64decode(v).decode() for s in by_kind(docs, "Secret") for v in s.get("data", {}).values()]


@pytest.mark.parametrize("values_file", [None, "values-gpu.yaml"])
def test_no_secret_value_appears_outside_secrets(values_file):
    docs = render(values_file=values_file)
    secrets = _secret_values(docs)
    assert len(secrets) == 2 and all(len(v) >= 32 for v in secrets)
    others = "\n".join(yaml.safe_dump(d) for d in docs if d["kind"] != "Secret")
    for value in secrets:
        assert value not in others
        assert base64.b64encode(value.encode()).decode() not in others
    g = groups(one(docs, "RayService"))
    for grp in g.values():
        e = env(grp)
        assert e["DRAFTHORSE_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "dh-drafthorse-auth",
                                                                           "key": "auth-token"}
        assert e["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dh-drafthorse-redis"
        assert e["DRAFTHORSE_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@dh-drafthorse-redis:6379/0"
    assert "auth_token" not in one(docs, "RayService")["spec"]["serveConfigV2"]


def test_existing_secrets_and_external_redis():
    docs = render({"auth": {"existingSecret": "my-token"},
                   "redis": {"enabled": False, "external": {"host": "redis.example.internal", "port": 6380,
                                                            "db": 2, "tls": True, "existingSecret": "my-redis"}}})
    kinds = Counter(d["kind"] for d in docs)
    assert "Secret" not in kinds and "StatefulSet" not in kinds
    e = env(groups(one(docs, "RayService"))["target"])
    assert e["DRAFTHORSE_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "my-token"
    assert e["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "redis-password"}
    assert e["DRAFTHORSE_REDIS_URL"]["value"] == "rediss://:$(REDIS_PASSWORD)@redis.example.internal:6380/2"
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_external_redis_without_password_draft_workers_off_and_a_group_image():
    docs = render({"redis": {"enabled": False, "external": {"host": "10.0.0.5"}},
                   "draft": {"enabled": False}, "target": {"image": "registry.example/target:7"}})
    rs = one(docs, "RayService")
    assert set(groups(rs)) == {"head", "gateway", "target"}
    images = {name: container(grp)["image"] for name, grp in groups(rs).items()}
    assert images == {"head": "ghcr.io/drafthorse/drafthorse:0.1.0", "gateway": "ghcr.io/drafthorse/drafthorse:0.1.0",
                      "target": "registry.example/target:7"}
    e = env(groups(rs)["target"])
    assert "REDIS_PASSWORD" not in e and e["DRAFTHORSE_REDIS_URL"]["value"] == "redis://10.0.0.5:6379/0"
    app = serve_config(rs)["applications"][0]
    assert app["args"]["num_drafts"] == 0 and {d["name"] for d in app["deployments"]} == {"Gateway", "TargetWorker"}
    assert {p["metadata"]["name"] for p in by_kind(docs, "PodDisruptionBudget")} == {
        "dh-drafthorse-gateway", "dh-drafthorse-target"}


# ---------------------------------------------------------------- bad values fail rendering

@pytest.mark.parametrize("values,needle", [
    ({"target": {"minReplicas": -1}}, "/target/minReplicas"),
    ({"draft": {"maxReplicas": 0}}, "/draft/maxReplicas"),
    ({"gateway": {"replicas": 0}}, "/gateway/replicas"),
    ({"target": {"autoscaling": {"min_replicas": -2, "max_replicas": 4}}}, "/target/autoscaling/min_replicas"),
    ({"target": {"rayResources": {"drafthorse_target": -1}}}, "/target/rayResources/drafthorse_target"),
    ({"serve": {"gatewayPort": 70000}}, "/serve/gatewayPort"),
    ({"model": {"drafter": "lookahead"}}, "/model/drafter"),
    ({"model": {"device": "gpu"}}, "/model/device"),
    ({"settings": {"Bad-Key": 1}}, "invalid propertyName 'Bad-Key'"),
    ({"target": {"replicas": 3}}, "/target"),  # a typo'd key: groups take minReplicas/maxReplicas
    ({"networkPolicy": {"enabled": "yes"}}, "/networkPolicy/enabled"),
    ({"networkPolicy": {"operatorPodLabels": None}}, "missing property 'operatorPodLabels'"),  # would admit all
    ({"networkPolicy": {"apiFrom": [{}]}}, "/networkPolicy/apiFrom/0"),  # an empty peer: every pod
    ({"networkPolicy": {"metricsFrom": [{"podSelecter": {}}]}}, "/networkPolicy/metricsFrom/0"),
    ({"internalTls": {"enabled": "yes"}}, "/internalTls/enabled"),
    ({"internalTls": {"serverName": "Not a DNS name"}}, "/internalTls/serverName"),
    ({"internalTls": {"secretName": "typo"}}, "/internalTls"),
    ({"gracefulShutdownSeconds": 0}, "/gracefulShutdownSeconds"),
    ({"settings": {"grace_s": -1}}, "/settings/grace_s"),
])
def test_schema_rejects_bad_values(values, needle):
    with pytest.raises(helm.HelmValuesError) as e:
        render(values)
    assert needle in str(e.value)


@pytest.mark.parametrize("values,needle", [
    ({"target": {"minReplicas": 5, "maxReplicas": 2}}, "target.minReplicas (5) must not exceed target.maxReplicas (2)"),
    ({"draft": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "draft.autoscaling.min_replicas (3)"),
    ({"target": {"autoscaling": {"min_replicas": 1, "max_replicas": 9}}}, "target.autoscaling.max_replicas (9)"),
    ({"redis": {"enabled": False}}, "redis.external.host"),
    ({"settings": {"auth_token": "hunter2"}}, "settings.auth_token: secrets do not belong in values"),
    ({"model": {"drafter": "draft-model"}}, "model.draft"),
    ({"internalTls": {"enabled": True}}, "internalTls.enabled is true: set internalTls.existingSecret"),
    ({"settings": {"tls_cert_file": "/x.pem"}}, "settings.tls_cert_file: the internal mTLS is configured with internalTls"),
    ({"gracefulShutdownSeconds": 12}, "gracefulShutdownSeconds (12) must exceed settings.grace_s + 10 (15)"),
    ({"apiKeys": {}}, "apiKeys.existingSecret is empty: the public APIs would be open"),   # the chart's defaults
    ({"networkPolicy": {"operatorNamespace": ""}}, "networkPolicy.operatorNamespace is empty"),
    ({"settings": {"grace_s": 25}}, "gracefulShutdownSeconds (30) must exceed settings.grace_s + 10 (35)"),
])
def test_cross_field_checks_fail_with_a_clear_message(values, needle):
    with pytest.raises(helm.HelmRenderError) as e:
        render(values)
    assert needle in str(e.value)


def test_schema_knows_every_drafter_kind():
    from drafthorse.runtime.kinds import NAMES as KINDS
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["model"]["properties"]["drafter"]["enum"] == list(KINDS)


def test_api_key_digests_come_from_a_secret(default_docs):
    """apiKeys.existingSecret puts the digests into every Ray container from that Secret (never from
    values); by default the public APIs are open and nothing is set."""
    assert all("DRAFTHORSE_API_KEY_HASHES" not in env(g) for g in groups(one(default_docs, "RayService")).values())
    docs = render({"apiKeys": {"existingSecret": "dh-api-keys"}})
    for name, group in groups(one(docs, "RayService")).items():
        ref = env(group)["DRAFTHORSE_API_KEY_HASHES"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "dh-api-keys", "key": "api-key-hashes"}, name
    for doc in docs:
        if doc["kind"] in CORE_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---------------------------------------------------------------- internal mTLS

TLS_ENV = ("DRAFTHORSE_TLS_CERT_FILE", "DRAFTHORSE_TLS_KEY_FILE", "DRAFTHORSE_TLS_CA_FILE", "DRAFTHORSE_TLS_SERVER_NAME")


def _tls_volumes(group: dict) -> list[dict]:
    return [v for v in group["template"]["spec"].get("volumes", []) if "secret" in v]


def test_internal_tls_mounts_the_secret_and_sets_the_env_on_every_pod(crd_validator):
    """internalTls.enabled: the Secret (tls.crt, tls.key, ca.crt, as cert-manager writes it) read-only in
    every Ray container, and the DRAFTHORSE_TLS_* settings pointing at its files: the app builder and
    every replica, whichever pod they land on, dial and serve over mutual TLS."""
    from drafthorse.runtime.settings import Settings

    docs = render({"internalTls": {"enabled": True, "existingSecret": "dh-internal-tls"}})
    g = groups(one(docs, "RayService"))
    assert set(g) == {"head", "gateway", "draft", "target"}
    for name, group in g.items():
        (vol,) = _tls_volumes(group)
        assert vol["secret"]["secretName"] == "dh-internal-tls", name
        assert vol["secret"].get("defaultMode", 0o644) & 0o007 == 0, name  # the key: not world-readable
        (mount,) = [m for m in container(group)["volumeMounts"] if m["name"] == vol["name"]]
        assert mount["readOnly"] is True, name
        e = {k: env(group)[k]["value"] for k in TLS_ENV}
        base = mount["mountPath"]
        assert (e["DRAFTHORSE_TLS_CERT_FILE"], e["DRAFTHORSE_TLS_KEY_FILE"], e["DRAFTHORSE_TLS_CA_FILE"]) == (
            f"{base}/tls.crt", f"{base}/tls.key", f"{base}/ca.crt"), name
        assert e["DRAFTHORSE_TLS_SERVER_NAME"] == "drafthorse-internal", name
        s = Settings(**{k.removeprefix("DRAFTHORSE_").lower(): v for k, v in e.items()})  # all three files or none
        assert s.tls_server_name == "drafthorse-internal"
    errors = list(crd_validator.iter_errors(one(docs, "RayService")))
    assert not errors, errors[:3]
    docs = render({"internalTls": {"enabled": True, "existingSecret": "s", "serverName": "workers.dh.internal"}})
    for group in groups(one(docs, "RayService")).values():
        assert env(group)["DRAFTHORSE_TLS_SERVER_NAME"]["value"] == "workers.dh.internal"


@pytest.mark.parametrize("values_file", [None, "values-gpu.yaml"])
def test_internal_tls_off_by_default_renders_nothing(values_file):
    docs = render(values_file=values_file)
    for name, group in groups(one(docs, "RayService")).items():
        assert not _tls_volumes(group), name
        assert not set(TLS_ENV) & set(env(group)), name
        assert "/etc/drafthorse/tls" not in json.dumps(group), name
    app = serve_config(one(docs, "RayService"))["applications"][0]
    assert not [k for k in app["args"] if k.startswith("tls_")]


# ---------------------------------------------------------------- graceful drain

def _shutdown_timeouts(app) -> dict[str, float]:
    """graceful_shutdown_timeout_s of every deployment of the Serve application the builder makes."""
    from ray.serve.deployment import Application
    d = app._bound_deployment
    out = {d.name: d._deployment_config.graceful_shutdown_timeout_s}
    for arg in [*d.init_args, *d.init_kwargs.values()]:
        if isinstance(arg, Application):
            out.update(_shutdown_timeouts(arg))
    return out


@pytest.mark.parametrize("values,values_file", [
    (None, None), (None, "values-gpu.yaml"),
    ({"settings": {"grace_s": 50}, "gracefulShutdownSeconds": 90}, None),
])
def test_pods_outlive_the_drain_of_their_replicas(values, values_file):
    """A stopping replica drains (NOT_SERVING, deregister, finish its streams within grace_s, hand the
    rest over) while Serve waits graceful_shutdown_timeout_s (grace_s + 5) for it: every Ray pod's
    terminationGracePeriodSeconds must exceed that, or the kubelet SIGKILLs the drain."""
    from drafthorse.cluster.deployment.app import build_app
    from drafthorse.runtime.settings import Settings

    rs = one(render(values, values_file=values_file), "RayService")
    app = serve_config(rs)["applications"][0]
    s = Settings(**app["args"]).with_token()
    if values:
        assert s.grace_s == values["settings"]["grace_s"]
    timeouts = _shutdown_timeouts(build_app(s))
    assert set(timeouts) == {"Gateway", "TargetWorker", "DraftWorker"}
    for d in app["deployments"]:  # an override in the Serve config would win over the builder's
        if "graceful_shutdown_timeout_s" in d:
            timeouts[d["name"]] = d["graceful_shutdown_timeout_s"]
    assert max(timeouts.values()) >= s.grace_s + 5
    for name, group in groups(rs).items():
        spec = group["template"]["spec"]
        period = spec["terminationGracePeriodSeconds"]
        assert period > s.grace_s + 5 and period > max(timeouts.values()) + 5, (name, period, timeouts)
        if name == "head":
            continue
        # worker pods drain their Ray node first (cluster/deployment/nodedrain.py), within the pod's grace period,
        # with time left for Serve's graceful stop of a replica that cannot move before the deadline
        cmd = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert cmd[:2] == ["drafthorse", "drain-node"], (name, cmd)
        deadline = float(cmd[cmd.index("--deadline-s") + 1])
        assert max(timeouts.values()) < deadline < period, (name, deadline, period)


def test_anonymous_public_apis_only_when_asked_for():
    """allowAnonymous reaches the gateway's settings (which refuse open APIs on a non-loopback address
    otherwise); with API keys it is not set."""
    def args(values):
        app = yaml.safe_load(one(render(values), "RayService")["spec"]["serveConfigV2"])["applications"][0]
        return app["args"]
    assert args({"apiKeys": {"allowAnonymous": True}})["allow_anonymous"] is True
    assert "allow_anonymous" not in args({"apiKeys": {"existingSecret": "dh-api-keys"}})


def test_redis_has_a_memory_bound_that_drops_nothing(default_docs):
    """The in-chart Redis stops at maxmemory under its container limit, refusing writes (noeviction) rather
    than evicting sessions or stream leases; both are values, checked by the schema."""
    (c,) = one(default_docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    args = " ".join(c["args"])
    assert "--maxmemory 400mb" in args and "--maxmemory-policy noeviction" in args
    with pytest.raises(helm.HelmValuesError):
        render({"redis": {"maxmemoryPolicy": "drop-everything"}})


def test_rays_own_token_auth_is_on(default_docs, crd_validator):
    """Ray's dashboard runs code and its RPCs trust their callers: the RayService asks KubeRay for Ray's
    token auth (a Secret of its own, or one named), valid against the CRD; it can be turned off."""
    rs = one(default_docs, "RayService")
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    named = one(render({"rayAuth": {"secretName": "ray-token"}}), "RayService")
    assert named["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    assert not list(crd_validator.iter_errors(named))
    off = one(render({"rayAuth": {"mode": "disabled"}}), "RayService")
    assert "authOptions" not in off["spec"]["rayClusterConfig"]
