"""The cluster spread over several Ray nodes (`ray.cluster_utils.Cluster`: one raylet per node, all on this
machine): a head (Serve's controller, the gateway), one "cheap" node and two "large" ones advertising the
accelerator resources the workers ask for. Draft workers must land on the cheap node only, target workers
on the large ones only, so every token tree crosses gRPC between nodes; killing a whole large node (its
raylet and every worker process on it) under 16 streams must cost no stream a token, and draining one
(`drafthorse drain-node`, the chart's preStop hook) must move its replicas off before the node stops.

On one machine the nodes share loopback, so "between nodes" is between processes of different raylets,
not between hosts; placement, the registry's node ids and node death are Ray's real ones."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.client import request
from drafthorse.runtime.redis_store import free_port
from drafthorse.runtime.settings import Settings

# the one-node cluster's models, reference and 16-stream fault harness; `local` and `stub` are its
# fixtures (`stub` over this module's `cluster`); none of them runs unless requested, so no second cluster
from tests.test_cluster import PROMPTS, N, _alive, _storm, chat_ids, local, reference, run, stub  # noqa: F401

pytestmark = pytest.mark.cluster

LARGE = {"num_cpus": 2, "resources": {"large_accel": 1}}
CHEAP = {"num_cpus": 2, "resources": {"cheap_accel": 2}}


@pytest.fixture(scope="module")
def nodes():
    """The Ray cluster: head (no accelerator), 1 cheap node, 2 large ones. Node death is detected in ~1.5 s
    (raylet health check 500 ms x 3) instead of Ray's default ~15 s, to keep the module short."""
    import ray
    from ray.cluster_utils import Cluster as RayCluster
    t0 = time.monotonic()
    rc = RayCluster(initialize_head=True, head_node_args={  # the dashboard answers `drain-node`'s state queries
        "num_cpus": 1, "resources": {}, "include_dashboard": True, "dashboard_port": free_port(),
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    handles = {"cheap": [rc.add_node(**CHEAP)], "large": [rc.add_node(**LARGE), rc.add_node(**LARGE)]}
    rc.wait_for_nodes()
    ray.init(address=rc.address, log_to_driver=False)
    handles["ray_s"] = time.monotonic() - t0
    yield rc, handles
    ray.shutdown()
    rc.shutdown()


@pytest.fixture(scope="module")
def cluster(nodes):
    from drafthorse.cluster.deployment.local import Cluster
    rc, _ = nodes
    s = Settings(model="tiny:0", draft_model="tiny:1", num_targets=2, num_drafts=2, gateway_port=free_port(),
                 http_port=0, ray_address=rc.address, worker_num_cpus=0.25, heartbeat_s=0.5,
                 key_prefix=f"dh-multinode-{uuid.uuid4().hex[:8]}:", sessions_per_target=8, max_len=512,
                 draft_timeout_s=30.0,  # a loaded machine must not turn RPCs into plain-decoding fallbacks
                 adaptive=False,        # fixed trees: every step asks a draft worker
                 target_resources={"large_accel": 1},     # a whole large node per target
                 draft_resources={"cheap_accel": 0.5})    # both drafts fit on the one cheap node
    t0 = time.monotonic()
    c = Cluster(s).start(timeout_s=300)
    c.startup["multinode_start_s"] = time.monotonic() - t0
    print("multi-node start-up:", {k: round(v, 2) for k, v in c.startup.items()}, "ray nodes:",
          round(nodes[1]["ray_s"], 2))
    yield c
    from ray import serve
    c.stop()
    serve.shutdown()


def _ids(handles) -> dict[str, set[str]]:
    return {kind: {n.node_id for n in handles[kind]} for kind in ("cheap", "large")}


def _gateway_node() -> str:
    """Serve SPREADs replicas: the gateway (0.1 CPU, no accelerator) may sit on any node with a free CPU."""
    import ray
    nodes = {a["Address"]["NodeID"] for a in ray._private.state.actors().values()
             if a["State"] == "ALIVE" and "#Gateway#" in (a.get("Name") or "")}
    assert len(nodes) == 1, nodes
    return nodes.pop()


def test_drafts_on_cheap_node_targets_on_large_nodes_trees_cross_grpc(nodes, cluster, stub, local):
    import ray
    _, handles = nodes
    ids = _ids(handles)
    alive, _ = _alive(cluster)
    assert len(alive["draft"]) == 2 and len(alive["target"]) == 2, alive
    assert {w.node_id for w in alive["draft"]} == ids["cheap"], "a draft worker is off the cheap node"
    assert {w.node_id for w in alive["target"]} == ids["large"], "targets must take one large node each"
    # and Ray agrees: the accelerators in use are exactly those the workers asked for
    used = {k: ray.cluster_resources()[k] - ray.available_resources().get(k, 0.0)
            for k in ("large_accel", "cheap_accel")}
    assert used == {"large_accel": 2.0, "cheap_accel": 1.0}

    # stats name the target by worker id and the draft worker by its gRPC address
    node_of = {key: w.node_id for kind in alive for w in alive[kind] for key in (w.worker_id, w.address)}
    prompt = PROMPTS[0]
    ids_out, msgs = run(stub, request(prompt, SamplingParams(max_new_tokens=N), "draft-model"))
    assert ids_out == reference(local, chat_ids(local, prompt), "draft-model") == \
        reference(local, chat_ids(local, prompt), "none")
    assert [m.seq for m in msgs] == list(range(len(msgs)))
    st = msgs[-1].stats
    assert st.draft_worker and st.draft_rpcs > 0 and st.drafted_tokens > 0, st
    # the tree went from a large node's target to the cheap node's drafter over gRPC
    assert node_of[st.target_worker] in ids["large"] and node_of[st.draft_worker] in ids["cheap"]
    from ray import serve
    print("serve proxies:", {n[:8]: str(p) for n, p in serve.status().proxies.items()})


def test_large_node_killed_under_16_streams(nodes, cluster, stub, local):
    """Remove (SIGKILL) the large node of the busiest target that does not share its node with the gateway:
    its streams resume on the other target. A spare large node joins first (as an autoscaler's would; the
    cluster_utils node must be added from the main thread), so the heal measures Ray noticing the dead node
    and Serve starting the replacement there, not node provisioning."""
    rc, handles = nodes
    gateway_node = _gateway_node()
    t = time.monotonic()
    spare = rc.add_node(**LARGE)
    handles["large"].append(spare)
    timings: dict[str, float] = {"add_spare_node_s": time.monotonic() - t}
    killed: dict = {}

    def watch(t_kill: float, dead_id: str) -> None:
        while time.monotonic() < t_kill + 150:
            alive, _ = _alive(cluster)
            targets = [w for w in alive["target"] if w.worker_id != dead_id]
            if len(targets) == 2:
                timings["healed_after_kill_s"] = time.monotonic() - t_kill
                killed["targets_after"] = targets
                return
            time.sleep(0.25)

    def fault():
        alive, loads = _alive(cluster)
        w = max((w for w in alive["target"] if w.node_id != gateway_node), key=lambda w: loads[w.worker_id])
        hit = loads[w.worker_id]
        node = next(n for n in handles["large"] if n.node_id == w.node_id)
        t_kill = time.monotonic()
        rc.remove_node(node, allow_graceful=False)   # SIGKILL: the raylet and every worker on the node
        timings["remove_node_s"] = time.monotonic() - t_kill
        handles["large"].remove(node)
        killed.update(worker=w.worker_id, node=node.node_id)
        killed["watcher"] = threading.Thread(target=watch, args=(t_kill, w.worker_id), daemon=True)
        killed["watcher"].start()
        return hit

    report = _storm(cluster, stub, local, fault)   # every stream == target alone, gapless seq; then _healed
    killed["watcher"].join(150)
    report |= {k: round(v, 2) for k, v in timings.items()}
    where = {rc.head_node.node_id: "head", **{i: kind for kind, ids in _ids(handles).items() for i in ids}}
    print("node-kill report:", report, "gateway on the", where.get(gateway_node, "?"), "node")
    assert report["hit_worker_streams"] > 0
    assert "healed_after_kill_s" in timings, "no replacement target registered"
    # the replacement took the spare large node; nothing runs on the dead one
    assert {w.node_id for w in killed["targets_after"]} == _ids(handles)["large"]
    assert spare.node_id in {w.node_id for w in killed["targets_after"]}
    # the healed cluster drafts across nodes again
    _, msgs = run(stub, request(PROMPTS[1], SamplingParams(max_new_tokens=N), "draft-model"))
    st = msgs[-1].stats
    assert st.draft_rpcs > 0 and st.draft_worker


def test_large_node_drained_under_16_streams(nodes, cluster, stub, local):
    """The Kubernetes preStop path: `drafthorse drain-node` on the busiest target's large node under 16
    streams. Ray marks the node draining, Serve starts a replacement on a spare large node and stops the
    old replica the graceful way; the command returns once no replica is left on the node, which is still
    alive then (the pod's SIGTERM comes after the hook), and only then is the node removed."""
    import json
    import subprocess
    import sys
    rc, handles = nodes
    gateway_node = _gateway_node()
    spare = rc.add_node(**LARGE)
    handles["large"].append(spare)
    drained: dict = {}

    def drain(node_id: str) -> None:
        t = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "drafthorse.cluster.cli", "drain-node", "--address", rc.address,
                               "--node-id", node_id, "--deadline-s", "90"], capture_output=True, text=True,
                              timeout=150)
        drained.update(rc=done.returncode, out=done.stdout, err=done.stderr[-2000:], s=time.monotonic() - t)

    def fault():
        alive, loads = _alive(cluster)
        w = max((w for w in alive["target"] if w.node_id != gateway_node), key=lambda w: loads[w.worker_id])
        drained.update(worker=w.worker_id, node=w.node_id)
        drained["thread"] = threading.Thread(target=drain, args=(w.node_id,), daemon=True)
        drained["thread"].start()
        return loads[w.worker_id]

    report = _storm(cluster, stub, local, fault)   # every stream == target alone, gapless seq
    drained["thread"].join(150)
    assert drained.get("rc") == 0, drained
    result = json.loads(drained["out"].strip().splitlines()[-1])
    print("node-drain report:", report, {k: result[k] for k in ("replicas_before", "seconds")})
    assert report["hit_worker_streams"] > 0
    assert result["node_id"] == drained["node"] and result["replicas_left"] == []
    assert any(r.endswith(":TargetWorker") for r in result["replicas_before"]), result
    # the node was still up when its last replica left: Serve moved them, nothing was killed
    import ray
    assert drained["node"] in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    alive, _ = _alive(cluster)
    assert drained["worker"] not in {w.worker_id for w in alive["target"]}
    assert spare.node_id in {w.node_id for w in alive["target"]}
    node = next(n for n in handles["large"] if n.node_id == drained["node"])
    rc.remove_node(node)   # the pod stops: nothing of the app runs there any more
    handles["large"].remove(node)
    _, msgs = run(stub, request(PROMPTS[2], SamplingParams(max_new_tokens=N), "draft-model"))
    assert [t for m in msgs for t in m.token_ids] == reference(local, chat_ids(local, PROMPTS[2]), "none")


def test_drain_node_names_an_unreachable_cluster():
    """An explicit address with no Ray behind it fails in seconds with a message (ray.init would wait
    minutes for the GCS)."""
    import subprocess
    import sys
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "drafthorse.cluster.cli", "drain-node", "--address", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no Ray cluster answers at 127.0.0.1:" in done.stderr, done.stderr
    assert time.monotonic() - t < 30
