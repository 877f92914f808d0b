"""`drafthorse soak`, short: the real command against a cluster it starts (tiny float64 models), with a
fault every 15 s; then the memory-trend and verdict rules on their own, so the check can fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from drafthorse.cluster.tools.soak import FAULTS, trends, verdict

pytestmark = pytest.mark.cluster


def test_short_soak_loses_nothing_and_does_not_grow(tmp_path):
    # a key prefix of its own: workers another test's cluster left registered on the shared Redis (until
    # their heartbeats expire) are not this cluster's, and faults must hit this one's
    env = {**os.environ, "DRAFTHORSE_KEY_PREFIX": f"dh-soak-{uuid.uuid4().hex[:8]}:"}
    out = subprocess.run([sys.executable, "-m", "drafthorse.cluster.cli", "soak", "--minutes", "1.5", "--model", "tiny:0",
                          "--draft-model", "tiny:1", "--dtype", "float64", "--concurrency", "8",
                          "--fault-every", "15", "--max-new-tokens", "32", "--max-growth", "30",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak_memory.png").stat().st_size > 0
    assert r["errors"] == {} and r["lost"] == {"mismatched_answers": 0, "sequence_gaps": 0, "session_mismatches": 0}
    assert r["requests_ok"] > 50 and r["tokens_per_s"] > 0
    # two session clients, each turn sent twice at once: turns ran and were checked, twins were refused
    assert r["env"]["session_clients"] == 2 and r["session_turns"]["ok"] > 5
    assert r["session_turns"]["refused_turn_in_progress"] > 0
    assert len(r["slots"]) == 2 and all(v == {"free": v["configured"], "lent": 0, "configured": v["configured"]}
                                        for v in r["slots"].values())
    assert [f["fault"] for f in r["faults"]][:3] == list(FAULTS)
    assert all(f["streams_in_flight"] > 0 for f in r["faults"])
    assert r["faults"][0]["recovered_s"] is not None and r["faults"][1]["recovered_s"] is not None
    # the trend covers the processes that lived through the second half (faults replace workers: both
    # targets, here); the curve covers every one
    roles = " ".join(r["memory_trend"])
    assert "Gateway" in roles and "driver" in roles and "raylet" in roles
    sampled = " ".join(n for sample in r["memory"] for n in sample["rss_mb"])
    assert "TargetWorker" in sampled and "DraftWorker" in sampled
    assert len(r["memory"]) >= 30


def test_trend_and_verdict_catch_growth_and_loss():
    flat = [{"t": t, "rss_mb": {"w:1": 500.0 + (t % 3), "leak:2": 300.0 + t}} for t in range(0, 120, 2)]
    tr = trends(flat)
    assert abs(tr["leak:2"]["slope_mb_per_min"] - 60) < 1 and abs(tr["w:1"]["slope_mb_per_min"]) < 3
    ok = {"errors": {}, "lost": {"mismatched_answers": 0, "sequence_gaps": 0}, "requests_ok": 5,
          "memory_trend": {"w:1": tr["w:1"]}, "slots": {"t1": {"free": 4, "lent": 0, "configured": 4}}}
    assert verdict(ok, 20) == []
    bad = {**ok, "memory_trend": tr, "errors": {"UNAVAILABLE": 1}, "lost": {"mismatched_answers": 0, "sequence_gaps": 2},
           "slots": {"t1": {"free": 3, "lent": 0, "configured": 4}}}
    problems = verdict(bad, 20)
    assert len(problems) == 4 and "KV slots" in problems[2] and "leak:2 grows" in problems[3]
    unfaulted = verdict({**ok, "faults": [{"fault": "drain-target", "error": "RayActorError: gone"}]}, 20)
    assert unfaulted == ["faults not injected: drain-target (RayActorError: gone)"]
    # a process keeps its name while Ray retitles it with the method it runs
    from drafthorse.cluster.tools.soak import actor_role
    assert {actor_role(t) for t in ("ray::drafthorse:DraftWorker", "ray::drafthorse:DraftWorker.check_health",
                                    "ray::SERVE_REPLICA::drafthorse#DraftWorker#q1:drafthorse:DraftWorker.__init__",
                                    "ray::ServeReplica:drafthorse:DraftWorker")} == {"DraftWorker"}
    assert actor_role("ray::ProxyActor") == "ProxyActor" and actor_role("ray::IDLE") == "IDLE"
    # a process replaced half-way is judged by neither its old nor its new pid
    moved = [{"t": t, "rss_mb": {"w:1" if t < 80 else "w:3": 100.0 + 5 * t}} for t in range(0, 120, 2)]
    assert trends(moved) == {}
    # a replacement started during the run may still be loading its model in the steady part: not judged
    # (CI: a draft worker killed at 15 s, whose replacement loaded until after the half, "grew" 250 MiB/min)
    late = [{"t": t, "rss_mb": {"w:1": 100.0, **({"w:4": 100.0 + 20 * t} if t >= 16 else {})}} for t in range(0, 120, 2)]
    assert set(trends(late)) == {"w:1"}


def test_bad_arguments_are_named_before_anything_starts(tmp_path):
    for args, needle in [(["--model", str(tmp_path / "missing.gguf")], "missing.gguf"),
                         (["--targets", "1"], "--targets"), (["--minutes", "0"], "--minutes")]:
        out = subprocess.run([sys.executable, "-m", "drafthorse.cluster.cli", "soak", "--minutes", "0.5", *args],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
