"""`drafthorse soak`: steady concurrent load with periodic faults, for a bounded time, against a cluster
it starts itself. Reports the resident memory of every process over time (and its trend), errors by
status code, throughput, and lost tokens.

Lost tokens are checked without a reference model: every request is greedy, so all answers to one
prompt must be identical token for token, each with gapless stream sequence numbers; a stream that
lost, repeated or altered a token across a fault disagrees with the others.

Session clients hold multi-turn sessions and send every turn twice at once: one turn of a session runs
at a time, so the other is refused ABORTED (counted apart, not an error) unless the first had already
ended. After each turn the session's stored conversation must be what it was, then the turn's prompt
(the same tokens for every follow-up), then exactly the tokens the client received: nothing lost, none
twice. At the end every target worker's KV slots must all be free again."""
from __future__ import annotations

import asyncio
import collections
import datetime as _dt
import itertools
import json
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import psutil
import ray
from ray import serve

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.client import request
from drafthorse.cluster.deployment.app import APP_NAME
from drafthorse.cluster.deployment.local import Cluster
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.redis_store import connect_async
from drafthorse.runtime.registry import view
from drafthorse.runtime.rpc import auth_metadata
from drafthorse.runtime.sessions import SessionStore

FAULTS = ("kill-draft", "kill-target", "drain-target")
EXTEND_S = 300.0   # the most a run goes past its minutes for each fault kind to hit once
PROMPTS = ["Tell me about speculative decoding.", "Why is the sky blue?", "one two three one two three one two",
           "Write a haiku about trains.", "the cat sat on the mat, the cat sat on the", "List three prime numbers."]


FOLLOW_UP = "Go on."


class Tally:
    """What the clients saw, shared by their threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.codes: collections.Counter = collections.Counter()
        self.answers: dict[tuple[str, str], list[int]] = {}
        self.mismatches = self.gaps = self.tokens = self.in_flight = 0
        self.done: list[tuple[float, int]] = []   # (time, tokens) of each finished request
        self.turns = self.refused_turns = self.session_mismatches = 0   # session clients (_sessions)
        self.mismatch_examples: list[dict] = []

    def record(self, key: tuple[str, str], msgs: list, t: float) -> None:
        ids = [tok for m in msgs for tok in m.token_ids]
        with self.lock:
            self.codes["OK"] += 1
            self.tokens += len(ids)
            self.done.append((t, len(ids)))
            self.gaps += [m.seq for m in msgs] != list(range(len(msgs)))
            self.mismatches += self.answers.setdefault(key, ids) != ids


def _client(stub, metadata, max_new: int, stop: threading.Event, tally: Tally, rng: random.Random, t0: float) -> None:
    while not stop.is_set():
        prompt, drafter = rng.choice(PROMPTS), rng.choice(("ngram", "draft-model", "none"))
        with tally.lock:
            tally.in_flight += 1
        try:
            msgs = list(stub.Generate(request(prompt, SamplingParams(max_new_tokens=max_new), drafter),
                                      metadata=metadata, timeout=300))
            tally.record((prompt, drafter if drafter == "none" else "spec"), msgs, time.monotonic() - t0)
        except grpc.RpcError as e:
            with tally.lock:
                tally.codes[e.code().name] += 1
        finally:
            with tally.lock:
                tally.in_flight -= 1


def _turn(stub, metadata, max_new: int, sid: str, tally: Tally, t0: float) -> tuple[str, list[int], str]:
    """One follow-up turn of session `sid`: ("ok", tokens received, finish reason), ("refused", [], "") when
    ABORTED (another turn of the session was in progress) or ("failed", [], "") (counted by code)."""
    with tally.lock:
        tally.in_flight += 1
    try:
        msgs = list(stub.Generate(request(FOLLOW_UP, SamplingParams(max_new_tokens=max_new), "ngram", session=sid),
                                  metadata=metadata, timeout=300))
    except grpc.RpcError as e:
        with tally.lock:
            if e.code() == grpc.StatusCode.ABORTED:
                tally.refused_turns += 1
                return "refused", [], ""
            tally.codes[e.code().name] += 1
        return "failed", [], ""
    finally:
        with tally.lock:
            tally.in_flight -= 1
    ids = [tok for m in msgs for tok in m.token_ids]
    with tally.lock:
        tally.codes["OK"] += 1
        tally.turns += 1
        tally.tokens += len(ids)
        tally.done.append((time.monotonic() - t0, len(ids)))
        tally.gaps += [m.seq for m in msgs] != list(range(len(msgs)))
    return "ok", ids, msgs[-1].finish_reason


def conversation(s, sid: str) -> list[int]:
    """The session's stored conversation (blocking: a client of its own on a loop of its own)."""
    async def read() -> list[int]:
        async with connect_async(s.redis_url) as r:
            session = await SessionStore(r, s.key_prefix).get(sid, "")
            return session.token_ids if session else []
    return asyncio.run(read())


def _sessions(stub, metadata, max_new: int, stop: threading.Event, tally: Tally, rng: random.Random, t0: float,
              s) -> None:
    """A session client: opens a session, then sends each follow-up turn twice at once and checks the
    stored conversation after it (see the module doc); a new session once the context is half full.
    A follow-up's prompt tokens depend on how the turn before it ended (a reply that stopped already
    holds the end-of-turn token the template would add): learnt for each finish reason, from the first
    turn that ran alone after one."""
    follow: dict[str, list[int]] = {}
    while not stop.is_set():
        prompt = rng.choice(PROMPTS)
        try:
            msgs = list(stub.Generate(request(prompt, SamplingParams(max_new_tokens=max_new), "ngram",
                                              new_session=True), metadata=metadata, timeout=300))
        except grpc.RpcError as e:
            with tally.lock:
                tally.codes[e.code().name] += 1
            continue
        tally.record((prompt, "spec"), msgs, time.monotonic() - t0)   # a first turn is a plain request
        sid, last = msgs[-1].session_id, msgs[-1].finish_reason
        while not stop.is_set() and len(before := conversation(s, sid)) < s.max_len // 2:
            with ThreadPoolExecutor(2) as twins:
                pair = [f.result() for f in [twins.submit(_turn, stub, metadata, max_new, sid, tally, t0)
                                             for _ in range(2)]]
            if any(status == "failed" for status, _, _ in pair):
                break   # what it relayed before failing is in the conversation, unknown here: a new session
            after, ran = conversation(s, sid), [(ids, end) for status, ids, end in pair if status == "ok"]
            grown = after[len(before):]
            if not ran and not grown:   # both refused (a turn of it was still ending): nothing to check
                continue
            if len(ran) == 1 and last not in follow and grown[len(grown) - len(ran[0][0]):] == ran[0][0]:
                follow[last] = grown[:len(grown) - len(ran[0][0])]
            # both ran when the first ended before the second began: in either order
            orders = [o for o in (ran, ran[::-1]) if all(e in follow for e in [last] + [end for _, end in o[:-1]])]
            matched = [o for o in orders if grown == [t for (ids, _), end in zip(o, [last] + [e for _, e in o])
                                                      for t in follow[end] + ids]]
            if (orders or not ran) and (after[:len(before)] != before or not matched):
                with tally.lock:
                    tally.session_mismatches += 1
                    if len(tally.mismatch_examples) < 3:
                        tally.mismatch_examples.append({"before": len(before), "grown": grown, "answers": ran,
                                                        "follow": follow, "last": last})
                break
            if not orders:   # a finish reason not seen alone yet: unchecked, and the order unknown
                break
            last = matched[0][-1][1]


def _label(p) -> str:
    """A process's role: the Ray actor class it hosts (from its title), else its name."""
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return p.name()
    return actor_role(cmd.split()[0]) if cmd.startswith("ray::") else p.name()


def actor_role(title: str) -> str:
    """Ray retitles an actor's process with the method running ("ray::drafthorse:DraftWorker.check_health",
    "ray::SERVE_REPLICA::drafthorse#DraftWorker#id:drafthorse:DraftWorker.__init__"): keep the class, so
    one process keeps one name (and one memory series) for its whole life."""
    return title.removeprefix("ray::").rsplit(":", 1)[-1].split(".", 1)[0]


def memory_sample() -> dict[str, float]:
    """RSS (MiB) of this process and every process below it (Ray's GCS, raylet, workers, Redis)."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            out[f"{'driver' if p.pid == me.pid else _label(p)}:{p.pid}"] = p.memory_info().rss / 2 ** 20
        except Exception:  # noqa: BLE001 - a process that just exited
            pass
    return out


def trends(samples: list[dict], skip_frac: float = 0.5) -> dict[str, dict]:
    """Per process alive through the steady part (the first `skip_frac` of the run is warm-up: caches,
    allocator pools and Ray's own buffers fill there) and running since the first sample, i.e. started
    with the cluster (a replacement a fault started may still be loading its model well into the steady
    part, on a loaded machine): its least-squares RSS slope (MiB/min) and growth (MiB, last minus first)."""
    steady = samples[int(len(samples) * skip_frac):]
    if len(steady) < 3:
        return {}
    common = set(samples[0]["rss_mb"]).intersection(*(s["rss_mb"] for s in steady))
    out = {}
    for name in sorted(common):
        ts = [s["t"] / 60 for s in steady]
        ys = [s["rss_mb"][name] for s in steady]
        mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
        var = sum((t - mt) ** 2 for t in ts) or 1e-9
        slope = sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var
        out[name] = {"slope_mb_per_min": round(slope, 2), "growth_mb": round(ys[-1] - ys[0], 1),
                     "rss_mb": round(ys[-1], 1)}
    return out


def kill_replica(worker_id: str) -> None:
    """Kill the Ray actor of a Serve replica (Serve starts a new one)."""
    suffix = "#" + worker_id.split("-", 1)[1]
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].endswith(suffix):
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
            return
    raise RuntimeError(f"no Ray actor for {worker_id}")


def inject(kind: str, s) -> dict:
    """One fault on the busiest worker of its kind; returns what was hit and its load then."""
    if kind == "drain-target":
        drained = serve.get_deployment_handle("TargetWorker", APP_NAME).drain.remote(0.0).result()
        return {"worker": drained["worker_id"], "streams_on_it": drained["in_flight"]}
    w, load = max(view(s.redis_url, s.key_prefix, 3 * s.heartbeat_s)[kind.split("-")[1]], key=lambda wl: wl[1])
    kill_replica(w.worker_id)
    return {"worker": w.worker_id, "streams_on_it": load}


def run_soak(s, minutes: float, concurrency: int, fault_every_s: float, max_new_tokens: int,
             sample_s: float = 2.0, say: Callable[[str], None] = lambda _m: None, session_clients: int = 0) -> dict:
    """Start a cluster from settings `s`, load it for `minutes` with `concurrency` plain streams and
    `session_clients` session clients (two streams each at times) and a fault every `fault_every_s`
    (0: none), then stop it; returns the results dict. With faults, the load lasts until each fault kind
    has hit once and the cluster is whole again, if that takes longer than `minutes` (a slow machine
    restarts a worker in tens of seconds), at most EXTEND_S more."""
    say("starting the cluster ...")
    cluster = Cluster(s).start()
    s = cluster.s
    tally, samples = Tally(), []
    faults: list[dict] = []   # filled by the fault thread (_faults)
    stop, covered = threading.Event(), threading.Event()   # load ends; each fault kind has hit once
    metadata = auth_metadata(s.token())   # as the cluster: API keys and per-key limits do not apply
    try:
        channel = grpc.insecure_channel(cluster.gateway)
        stub = pb_grpc.GeneratorStub(channel)
        t0 = time.monotonic()
        stop_at = t0 + minutes * 60
        clients = [threading.Thread(target=_client, args=(stub, metadata, max_new_tokens, stop, tally,
                                                          random.Random(i), t0), daemon=True)
                   for i in range(concurrency)]
        clients += [threading.Thread(target=_sessions, args=(stub, metadata, max_new_tokens, stop, tally,
                                                             random.Random(-1 - i), t0, s), daemon=True)
                    for i in range(session_clients)]
        for c in clients:
            c.start()
        if fault_every_s:
            threading.Thread(target=_faults, args=(s, tally, faults, t0, stop_at, stop, covered, fault_every_s, say),
                             daemon=True).start()
        else:
            covered.set()
        while (now := time.monotonic()) < stop_at or (not covered.is_set() and now < stop_at + EXTEND_S):
            samples.append({"t": round(now - t0, 2), "rss_mb": memory_sample()})   # memory, every sample_s
            time.sleep(max(0.0, sample_s - (time.monotonic() - now)))
        stop.set()
        wall = time.monotonic() - t0
        for c in clients:
            c.join(330)
        channel.close()
        slots = free_slots(s)
    finally:
        stop.set()
        cluster.stop()
    per_10s = collections.Counter(int(t // 10) for t, _ in tally.done)
    return {"env": {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "model": s.model,
                    "draft_model": s.draft_model, "minutes": minutes, "concurrency": concurrency,
                    "fault_every_s": fault_every_s, "max_new_tokens": max_new_tokens,
                    "loaded_s": round(wall, 1),
                    "targets": s.num_targets, "drafts": s.num_drafts, "session_clients": session_clients,
                    "sessions_per_target": s.sessions_per_target},
            "requests_ok": tally.codes["OK"], "errors": {k: v for k, v in tally.codes.items() if k != "OK"},
            "lost": {"mismatched_answers": tally.mismatches, "sequence_gaps": tally.gaps,
                     "session_mismatches": tally.session_mismatches},
            "session_turns": {"ok": tally.turns, "refused_turn_in_progress": tally.refused_turns},
            "session_mismatch_examples": tally.mismatch_examples,
            "slots": slots,
            "tokens": tally.tokens, "tokens_per_s": round(tally.tokens / wall, 2),
            "requests_per_10s": [per_10s.get(i, 0) for i in range(int(wall // 10) + 1)],
            "faults": faults, "memory": samples, "memory_trend": trends(samples)}


def free_slots(s, settle_s: float = 120.0) -> dict[str, dict]:
    """Every alive target worker's KV slots ({free, lent, configured}) once no stream runs: waits up to
    settle_s for a replacement a late fault started and for streams cancelled at the end to leave. Serve
    routes each `info` call to some replica, so it asks until it has heard from each."""
    handle = serve.get_deployment_handle("TargetWorker", APP_NAME)
    deadline = time.monotonic() + settle_s
    while True:
        # a killed worker's entry outlives it by up to its TTL, and its replacement registers late: only
        # num_targets entries that all answer make the set whole
        ids = {w.worker_id for w, _ in view(s.redis_url, s.key_prefix, 3 * s.heartbeat_s)["target"]}
        seen: dict[str, dict] = {}
        for _ in range(20 * len(ids) if len(ids) >= s.num_targets else 0):
            info = handle.info.remote().result(timeout_s=30)
            seen[info["worker_id"]] = info["slots"]
            if set(seen) >= ids:
                break
        whole = len(seen) >= s.num_targets and set(seen) >= ids
        if (whole and all(v["lent"] == 0 for v in seen.values())) or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def _faults(s, tally: Tally, faults: list, t0: float, stop_at: float, stop: threading.Event,
            covered: threading.Event, every_s: float, say) -> None:
    """The fault kinds in turn, one every `every_s` (later if the cluster has not recovered from the last);
    the first round runs whole even past `stop_at` (run_soak waits for `covered`), later ones stop there."""
    next_fault = t0 + every_s
    try:
        for i, kind in enumerate(itertools.cycle(FAULTS)):
            time.sleep(max(0.0, next_fault - time.monotonic()))
            if stop.is_set() or (i >= len(FAULTS) and time.monotonic() >= stop_at - 5):   # a fault needs streams
                return
            with tally.lock:
                in_flight = tally.in_flight
            f: dict[str, Any] = {"t": round(time.monotonic() - t0, 2), "fault": kind, "streams_in_flight": in_flight}
            try:
                f.update(inject(kind, s))
            except Exception as e:   # noqa: BLE001 (reported: the verdict fails a soak whose fault did not happen)
                faults.append({**f, "error": f"{type(e).__name__}: {e}"})
                say(f"fault {faults[-1]}")
                return
            f["recovered_s"] = _wait_whole(s, f["worker"], stop)
            faults.append(f)
            say(f"fault {f}")
            if i == len(FAULTS) - 1:
                covered.set()
            next_fault = max(next_fault + every_s, time.monotonic())
    finally:   # (the load need not wait for faults that will not come)
        covered.set()


def _wait_whole(s, gone: str, stop: threading.Event) -> float | None:
    """Seconds until the worker hit is out of the registry and as many workers as configured are in it
    again (None: not before the run ends)."""
    t0 = time.monotonic()
    while not stop.is_set():
        alive = {kind: [w.worker_id for w, _ in workers]
                 for kind, workers in view(s.redis_url, s.key_prefix, 3 * s.heartbeat_s).items()}
        if gone not in alive["target"] + alive["draft"] and len(alive["target"]) >= s.num_targets \
                and len(alive["draft"]) >= s.num_drafts:
            return round(time.monotonic() - t0, 2)
        time.sleep(0.2)
    return None


def verdict(result: dict, max_slope_mb_per_min: float) -> list[str]:
    """What fails the soak: any error, any lost token, a process whose memory keeps growing, a fault
    that could not be injected."""
    problems = []
    if failed := [f"{f['fault']} ({f['error']})" for f in result.get("faults", []) if "error" in f]:
        problems.append(f"faults not injected: {', '.join(failed)}")
    if result["errors"]:
        problems.append(f"client errors: {result['errors']}")
    if any(result["lost"].values()):
        problems.append(f"lost tokens: {result['lost']}")
    if not result["requests_ok"]:
        problems.append("no request completed")
    leaked = {w: v for w, v in result["slots"].items() if v["free"] != v["configured"]}
    if leaked or not result["slots"]:
        problems.append(f"KV slots not all free at the end: {leaked or 'no target answered'}")
    for name, t in result["memory_trend"].items():
        if t["slope_mb_per_min"] > max_slope_mb_per_min:
            problems.append(f"{name} grows {t['slope_mb_per_min']} MiB/min (bound {max_slope_mb_per_min})")
    return problems


def write(result: dict, out: Path) -> None:
    import matplotlib  # deferred: plots only
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plots only

    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = sorted({n for s in result["memory"] for n in s["rss_mb"]})
    for name in names:
        pts = [(s["t"], s["rss_mb"][name]) for s in result["memory"] if name in s["rss_mb"]]
        if max(y for _, y in pts) >= 100:   # the small helpers would only clutter the plot
            ax.plot(*zip(*pts), label=name, lw=1)
    for f in result["faults"]:
        ax.axvline(f["t"], color="grey", ls=":", lw=0.8)
    ax.set_xlabel("seconds (dotted: faults)")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"drafthorse soak: {result['env']['minutes']} min, concurrency {result['env']['concurrency']}")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(out / "soak_memory.png", dpi=110)
    plt.close(fig)
