"""The `drafthorse` command: generate (in-process or through a cluster), bench, serve, loadtest, soak,
distill, train-drafter, api-key, drain-node.

Each command imports what it runs where it starts (`# deferred`): torch, transformers and Ray take seconds to
import, and `drafthorse --help`, `api-key` or a mistyped flag should answer at once."""
from __future__ import annotations

import asyncio
import json
import logging
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn, Optional, cast

import psutil
import typer
from pydantic import ValidationError

from drafthorse.cluster.apikeys import KeyRing, digest_line, new_key
from drafthorse.runtime import kinds
from drafthorse.runtime.redis_store import free_port
from drafthorse.runtime.settings import Settings

# the Spec-Bench dev questions shipped beside the repository (../shared); any file of that format works
DEV_QUESTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spec_bench" / "dev.jsonl"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="drafthorse: lossless speculative decoding, in-process or as a cluster.")


TEACHER_DTYPE_HELP = ("the target's dtype in the teacher-forced pass that computes the training features: auto = "
                      "what serving picks here (bfloat16 where native, about twice float32's speed; else float32), "
                      "float32 or bfloat16")
AMP_HELP = ("training products in bfloat16 under autocast, weights and losses in float32 (default: where the device "
            "has native bfloat16)")
DEVICE_HELP = ("auto | cpu | cuda | cuda:N (default: DRAFTHORSE_DEVICE, else auto: CUDA where torch sees a GPU, "
               "else the CPU)")


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _check_models(target: str, draft: str | None = None) -> None:
    """A model that cannot be found, or a draft model whose tokenizer is not the target's, stops a cluster
    command here, named, not as a failed deployment."""
    from drafthorse.actors.models.loader import check_pair, resolve  # deferred: heavy (see the module doc)
    for spec in (target, draft):
        if spec and not spec.startswith("tiny:"):
            try:
                resolve(spec)
            except FileNotFoundError as e:
                _fail(str(e))
    if draft:
        try:
            check_pair(target, draft)
        except ValueError as e:
            _fail(str(e))


def _check_device(device: str | None) -> None:
    from drafthorse.actors.models.loader import resolve_device  # deferred: heavy (see the module doc)
    try:
        resolve_device(device)
    except ValueError as e:
        _fail(str(e))


def _teacher_dtype(name: str) -> str:
    """A teacher pass runs the dense target (features of a quantised one would train a head for it alone)."""
    if name.strip().lower() not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"--teacher-dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return name


def _threads(n: int | None) -> None:
    import torch  # deferred: heavy (see the module doc)
    if n:
        torch.set_num_threads(n)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="user message (the chat template is applied unless --raw)"),
    drafter: Optional[str] = typer.Option(None, help="none | ngram | draft-model | eagle | eagle3 | medusa | "
                                          "layerskip | HEAD+ngram (n-gram copying where the text repeats, the head "
                                          "elsewhere); default: ngram, or with --server the server's default"),
    head: Optional[Path] = typer.Option(None, help="trained head for eagle / eagle3 / medusa / layerskip (default: the "
                                                    "one shipped for the model)"),
    model: str = typer.Option("smollm2", help="target: 'smollm2' (default), a .gguf file or an HF dir"),
    draft_model: Optional[str] = typer.Option(None, help="draft LM for --drafter draft-model"),
    max_new_tokens: int = typer.Option(128, min=1, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass in (0, 1]"),
    top_k: int = typer.Option(0, min=0, help="0 = off"),
    seed: Optional[int] = typer.Option(None, help="sampling seed"),
    stop: list[str] = typer.Option([], help="stop string (repeatable)"),
    raw: bool = typer.Option(False, help="send the prompt as is, without the chat template"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 | int8 | int4 (auto: "
                                           "bfloat16 where the CPU has it natively, else float32; int8 / int4: "
                                           "weight-only codes over float32, opt-in; int4 runs a GGUF's 4-bit "
                                           "blocks as stored)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)"),
    server: Optional[str] = typer.Option(None, help="HOST:PORT of a drafthorse gateway; in-process if unset"),
    session: Optional[str] = typer.Option(None, help="session id to continue (with --server)"),
    api_key: str = typer.Option("", envvar="DRAFTHORSE_API_KEY", help="API key for --server (when it has keys)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object: text, token_ids, stats"),
    adaptive: bool = typer.Option(True, help="size each step's tree from measured acceptance"),
    profile: bool = typer.Option(False, help="run under torch.profiler and print where a step's time goes "
                                             "(stderr)"),
):
    """Generate a reply to PROMPT, streaming it to stdout (or one JSON object with --json)."""
    from drafthorse.actors.drafters import load_head, make_drafter  # deferred: heavy (see the module doc)
    from drafthorse.actors.engine import SpecEngine  # deferred: heavy (see the module doc)
    from drafthorse.actors.models import loader  # deferred: heavy (see the module doc)
    from drafthorse.actors.models.runner import ModelRunner  # deferred: heavy (see the module doc)
    from drafthorse.actors.spec.adaptive import AdaptivePolicy  # deferred: heavy (see the module doc)
    from drafthorse.actors.spec.sampling import SamplingParams  # deferred: heavy (see the module doc)
    from drafthorse.actors.spec.textstream import TextStream  # deferred: heavy (see the module doc)
    from drafthorse.cluster.client import generate_remote  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools.profiling import profile as run_profiled  # deferred: heavy (see the module doc)

    try:
        if drafter is not None:
            kinds.kind(drafter)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_new_tokens=max_new_tokens, stop=tuple(stop)).validate()
        if not prompt.strip():
            raise ValueError("prompt is empty")
    except ValueError as e:
        _fail(str(e))
    if server:
        generate_remote(server, prompt, params, drafter or "", raw, session, json_out, api_key=api_key)
        return
    drafter = drafter or "ngram"

    _threads(threads)

    if drafter == "draft-model" and not draft_model:
        _fail("--drafter draft-model needs --draft-model PATH")
    try:
        lm = loader.load(model, dtype, device=device)
        dlm = loader.load(draft_model, dtype, device=device) if drafter == "draft-model" and draft_model else None
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    tok = lm.tokenizer
    assert tok is not None   # loader.load attaches one
    ids = tok.encode(prompt, add_special_tokens=False) if raw else loader.chat_prompt(
        tok, [{"role": "user", "content": prompt}])
    decode = lambda t: cast(str, tok.decode(t, skip_special_tokens=True))   # one sequence: a string, not a list
    engine = SpecEngine(ModelRunner(lm.model), lm.eos_ids, decode, policy=AdaptivePolicy(16) if adaptive else None)
    try:
        trained = load_head(drafter, lm, head) if kinds.kind(drafter).head else None
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    d = make_drafter(drafter, (lambda: ModelRunner(dlm.model)) if dlm else None, head=trained)
    try:
        if json_out or profile:
            if profile:
                out, report = run_profiled(lambda: engine.generate(ids, params, d),
                                           lambda g: g.stats.target_forwards)
                typer.echo(report, err=True)
            else:
                out = engine.generate(ids, params, d)
            if not json_out:
                typer.echo(out.text)
                return
            stats = out.stats.to_dict() | {"drafter": drafter, "dtype": lm.dtype, "device": lm.device, "model": lm.name,
                                           "exact_rows": lm.model.exact}
            typer.echo(json.dumps({"text": out.text, "token_ids": out.token_ids,
                                   "finish_reason": out.finish_reason, "stats": stats}))
            return
        ts = TextStream(decode, params.stop)
        for step in engine.stream(ids, params, d):
            sys.stdout.write(ts.push(step.token_ids, step.finish_reason is not None))
            sys.stdout.flush()
        sys.stdout.write("\n")
    except ValueError as e:
        _fail(str(e))


@app.command()
def bench(
    questions: Path = typer.Option(DEV_QUESTIONS, help="Spec-Bench jsonl"),
    per_category: Optional[int] = typer.Option(2, min=1, help="questions per category"),
    max_new_tokens: int = typer.Option(128, min=1),
    methods: str = typer.Option("ar,ngram,ngram-adaptive,hf,hf-pld",
                                help="comma list: ar,ngram,ngram-adaptive,draft-model,eagle,eagle3,medusa,layerskip,"
                                     "eagle+ngram,hf,hf-pld,cluster-ar,cluster-ngram,cluster-draft-model,"
                                     "cluster-eagle; an engine method with /N (eagle/8) uses a tree budget of N nodes"),
    model: str = typer.Option("smollm2"),
    draft_model: Optional[str] = typer.Option(None, help="draft LM for the draft-model method"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 | int8 | int4, for drafthorse "
                                           "and the hf baselines alike (int8 / int4: hf runs the float32 "
                                           "weights)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None),
    out: Path = typer.Option(Path("bench_out"), help="writes OUT/results.json and OUT/speedup.png"),
    head: list[str] = typer.Option([], help="KIND=PATH: a trained head for method KIND (eagle, eagle3, "
                                             "medusa, layerskip) instead of the shipped one (repeatable)"),
    server: Optional[str] = typer.Option(None, help="gateway HOST:PORT for the cluster-* methods"),
    cluster: bool = typer.Option(False, help="start a local cluster (1 target, 1 draft worker on other "
                                             "Ray actors) for the cluster-* methods"),
    json_schema: Optional[Path] = typer.Option(None, help="a JSON Schema file: every answer is JSON of it "
                                                            "(structured outputs; engine methods only)"),
):
    """Speculative methods vs plain decoding vs HF generate, side by side on the same prompts.
    cluster-ar / cluster-ngram / cluster-draft-model run the same drafter through the distributed
    path (gateway -> target actor -> draft actor, trees over gRPC)."""
    import torch  # deferred: heavy (see the module doc)

    from drafthorse.actors.models import loader  # deferred: heavy (see the module doc)
    from drafthorse.cluster.deployment.local import Cluster  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools import bench as b  # deferred: heavy (see the module doc)

    _threads(threads)
    running = None
    try:
        qs = b.load_questions(questions, per_category)
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        if cluster and not server:
            _check_device(device)   # (its workers load on this machine)
            running = Cluster(Settings(model=model, draft_model=draft_model, dtype=dtype, num_targets=1,
                                       **cast(dict[str, Any], {"device": device} if device else {}),
                                       num_drafts=1, gateway_port=free_port(), http_port=0,
                                       torch_threads=threads or torch.get_num_threads(),
                                       key_prefix=f"drafthorse-bench-{uuid.uuid4().hex[:8]}:")).start()
            server = running.gateway
        lm = loader.load(model, dtype, device=device)
        dlm = loader.load(draft_model, dtype, device=device) if draft_model else None
        heads = {}
        for h in head:
            kind, sep, path = h.partition("=")
            if not sep or kind not in kinds.HEAD_KINDS:
                raise ValueError(f"--head {h!r}: expected KIND=PATH with KIND one of {', '.join(kinds.HEAD_KINDS)}")
            heads[kind] = path
        schema = json_schema.read_text(encoding="utf-8") if json_schema is not None else None
        results = b.run_bench(qs, wanted, max_new_tokens, out, lm, dlm, server=server, heads=heads,
                              json_schema=schema)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    finally:
        if running is not None:
            running.stop()
    typer.echo(b.format_table(results))
    typer.echo(f"wrote {out / 'results.json'} and {out / 'speedup.png'}")


@app.command()
def throughput(
    questions: Path = typer.Option(DEV_QUESTIONS, help="Spec-Bench jsonl (first turns are the prompts)"),
    batch_sizes: str = typer.Option("1,4,16,32,64", help="comma list of batch sizes"),
    max_new_tokens: int = typer.Option(64, min=1, help="tokens every sequence generates (EOS suppressed)"),
    methods: str = typer.Option("ar,ngram,hf", help="comma list: ar, ngram, hf"),
    model: str = typer.Option("smollm2"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 | int8 | int4, ours and hf "
                                           "alike (int8 / int4: hf runs the float32 weights)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    threads: Optional[int] = typer.Option(None),
    out: Path = typer.Option(Path("throughput_out"), help="writes OUT/throughput.json and OUT/throughput.png"),
    profile_batch: int = typer.Option(0, min=0, help="also profile plain decoding's steps at this batch size "
                                      "(torch operators vs Python outside them; printed and in the JSON)"),
    prefill_tokens: int = typer.Option(0, min=0, help="also time the first token of one prompt this long, "
                                       "ours beside HF's prefill (printed and in the JSON)"),
):
    """Batched decoding throughput at each batch size: drafthorse's engine beside HF generate (a benchmark)."""
    from drafthorse.actors.models import loader  # deferred: heavy (see the module doc)
    from drafthorse.actors.models.loader import chat_prompt  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools import throughput as tp  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools.bench import load_questions  # deferred: heavy (see the module doc)

    _threads(threads)
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
        wanted = [m.strip() for m in methods.split(",") if m.strip()]
        tp.check(wanted, sizes, max_new_tokens)
        qs = load_questions(questions)
        lm = loader.load(model, dtype, device=device)
        prompts = [chat_prompt(lm.tokenizer, [{"role": "user", "content": q["turns"][0]}]) for q in qs]
        result = tp.run_throughput(lm, prompts, sizes, max_new_tokens, wanted, out, profile_batch, prefill_tokens)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(tp.format_table(result))
    if "prefill" in result:
        p = result["prefill"]
        typer.echo(f"time to first token of a {p['tokens']}-token prompt: ours {p['ours_s']} s, "
                   f"HF prefill {p['hf_s']} s ({p['ratio']}x)")
    if "profile" in result:
        typer.echo(f"plain decoding at batch {profile_batch}, per step:\n{result['profile']['report']}")
    typer.echo(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'}")


def default_drafter(model: str, dtype: str, device: str) -> str:
    """`serve`'s drafter where none is set, for workers on this machine: EAGLE-3 beside n-gram copying
    where the model ships an EAGLE-3 head and runs at bfloat16 on a CPU that computes it natively (there
    it led n-gram copying alone at one stream and stayed within a few percent of it under load:
    bench/2026-12-03-s18-amx), else n-gram copying (on float32 CPUs the two tie; GPUs: not measured)."""
    from drafthorse.actors.drafters import shipped_head  # deferred: heavy (see the module doc)
    from drafthorse.actors.models import loader  # deferred: heavy (see the module doc)
    on = loader.resolve_device(device)
    native = on == "cpu" and loader.native_bf16(on)
    if shipped_head("eagle3", model) is not None and native and loader.resolve_dtype(dtype, on, native) == "bfloat16":
        return "eagle3+ngram"
    return "ngram"


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, help="target model (default smollm2)"),
    draft_model: Optional[str] = typer.Option(None, help="draft LM served by the draft workers"),
    drafter: Optional[str] = typer.Option(None, help="default drafter: none | ngram | draft-model | eagle | "
                                                     "eagle3 | medusa | layerskip | HEAD+ngram (unset: "
                                                     "eagle3+ngram where the model ships an EAGLE-3 head and "
                                                     "the CPU has native bfloat16, else ngram)"),
    eagle_head: Optional[str] = typer.Option(None, help="EAGLE head for the draft workers (default: shipped)"),
    medusa_head: Optional[str] = typer.Option(None, help="Medusa head for the target workers (default: shipped)"),
    layerskip_head: Optional[str] = typer.Option(None, help="layer-skip adapter (default: shipped)"),
    eagle3_head: Optional[str] = typer.Option(None, help="EAGLE-3 head for the target workers (default: shipped)"),
    num_targets: Optional[int] = typer.Option(None, min=1),
    num_drafts: Optional[int] = typer.Option(None, min=0),
    port: Optional[int] = typer.Option(None, help="gateway gRPC port (default 50051)"),
    http_port: Optional[int] = typer.Option(None, help="OpenAI-compatible HTTP port (default 8000)"),
    host: Optional[str] = typer.Option(None, help="bind address (default 127.0.0.1)"),
    allow_anonymous: bool = typer.Option(False, "--allow-anonymous",
                                         help="serve the public APIs with no API keys on a non-loopback --host"),
    redis_url: Optional[str] = typer.Option(None, help="default: 127.0.0.1:6379 if up, else an embedded redis"),
    ray_address: Optional[str] = typer.Option(None, help="join this Ray cluster instead of starting one"),
    dtype: Optional[str] = typer.Option(None, help="auto (default) | float32 | bfloat16 | float16 | int8 | int4"),
    device: Optional[str] = typer.Option(None, help="auto (default: CUDA where torch sees a GPU) | cpu | cuda | "
                                                    "cuda:N, for every worker"),
):
    """Start the cluster (Ray, Redis, gateway, target and draft workers) and serve until Ctrl-C.
    Every option can also be set as an environment variable DRAFTHORSE_<NAME>."""
    from drafthorse.cluster.deployment.local import Cluster  # deferred: heavy (see the module doc)



    flags: dict[str, Any] = dict(model=model, draft_model=draft_model, drafter=drafter, eagle_head=eagle_head,
                                 medusa_head=medusa_head, layerskip_head=layerskip_head, eagle3_head=eagle3_head,
                                 num_targets=num_targets,
                                 num_drafts=num_drafts, gateway_port=port, http_port=http_port, host=host,
                                 redis_url=redis_url, ray_address=ray_address, dtype=dtype, device=device,
                                 allow_anonymous=allow_anonymous or None)
    try:
        s = Settings(**{k: v for k, v in flags.items() if v is not None})
        KeyRing.of(s)   # a malformed API key entry or an unreadable certificate stops the start here, named
        s.tls()
    except (ValidationError, ValueError) as e:
        _fail(str(e))
    _check_models(s.model, s.draft_model)
    if not s.ray_address:   # workers on this machine: a GPU it does not have stops the start here, named
        _check_device(s.device)
        if "drafter" not in s.model_fields_set:   # neither --drafter nor DRAFTHORSE_DRAFTER
            s = s.model_copy(update={"drafter": default_drafter(s.model, s.dtype, s.device)})
    cluster = Cluster(s).start()
    first = cluster.first_token()
    st = cluster.startup
    # from the process's start: interpreter, imports, Redis, Ray, workers (model load), first token
    since_exec = time.time() - psutil.Process().create_time()
    typer.echo(f"drafthorse serving {s.model} ({s.num_targets} target, {s.num_drafts} draft workers, "
               f"drafter {s.drafter}, device {s.device})\n"
               f"  gRPC gateway: {cluster.gateway}  (drafthorse.v1.Generator)\n"
               f"  OpenAI HTTP:  {cluster.http}/v1\n"
               f"  started in {since_exec:.1f} s: first token {first:.2f} s after the workers were ready in "
               f"{st['ready_s']:.1f} s (Redis {st['redis_s']:.1f}, Ray {st['ray_s']:.1f}, Serve and workers "
               f"{st['workers_s']:.1f})\n"
               f"  try: drafthorse generate --server {cluster.gateway} \"Hello!\"\nCtrl-C to stop.")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


@app.command()
def loadtest(
    server: str = typer.Option("127.0.0.1:50051", help="gRPC gateway HOST:PORT (loopback only, see --allow-remote)"),
    concurrency: str = typer.Option("1,4,16,32", help="comma list of concurrency levels"),
    rate: Optional[float] = typer.Option(None, help="open loop: Poisson arrivals at RATE requests/s (concurrency "
                                                    "then caps requests in flight); unset = closed loop"),
    questions: Path = typer.Option(DEV_QUESTIONS, help="Spec-Bench jsonl"),
    requests: int = typer.Option(32, min=1, help="requests per drafter and concurrency level"),
    max_seconds: float = typer.Option(120.0, min=0.1, help="time bound per level (in-flight requests are cut)"),
    max_new_tokens: int = typer.Option(128, min=1),
    drafters: str = typer.Option("none,ngram,ngram-fixed", help="comma list, one series each: none, ngram, "
                                 "draft-model, eagle, eagle3, medusa, layerskip, HEAD+ngram; NAME-fixed = that drafter "
                                 "without the adaptive policy (full tree every step)"),
    long_context: bool = typer.Option(False, help="~4k-token prompts built from the rag/summarization questions"),
    context_tokens: int = typer.Option(3700, min=16, help="prompt size for --long-context (tokens)"),
    tokenizer: str = typer.Option("smollm2", help="model whose tokenizer sizes --long-context prompts"),
    seed: int = typer.Option(0, help="seed of the Poisson arrivals"),
    allow_remote: bool = typer.Option(False, help="allow a non-loopback --server"),
    api_key: str = typer.Option("", envvar="DRAFTHORSE_API_KEY", help="API key (when the server has keys)"),
    out: Path = typer.Option(Path("loadtest_out"), help="writes OUT/loadtest.json and OUT/loadtest.png"),
):
    """Load a running cluster: throughput, TTFT, TPOT, latency (p50/p99), mean accepted tokens and
    errors per drafter and concurrency level. Bounded by --requests and --max-seconds per level."""
    from drafthorse.cluster.tools import loadtest as lt  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools.bench import load_questions  # deferred: heavy (see the module doc)


    try:
        lt.check_server(server, allow_remote)
        try:
            levels = [int(c) for c in concurrency.split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--concurrency must be a comma list of integers, got {concurrency!r}") from None
        kinds = [d.strip() for d in drafters.split(",") if d.strip()]
        qs = load_questions(questions)
        if long_context:
            count = lt.tokenizer_counter(tokenizer)
            if count is None:
                typer.echo(f"loadtest: no tokenizer for {tokenizer!r}; sizing prompts at ~4 characters a token",
                           err=True)
            prompts = lt.long_context_prompts(qs, context_tokens, count or lt.approx_tokens)
            sizes = [(count or lt.approx_tokens)(p) for p in prompts]
            typer.echo(f"loadtest: {len(prompts)} long-context prompts of {min(sizes)}..{max(sizes)} tokens "
                       f"(mean {sum(sizes) / len(sizes):.0f}, before the chat template)", err=True)
        else:
            prompts = lt.question_prompts(qs)
        lt.validate_args(prompts, kinds, levels, requests, max_seconds, max_new_tokens, rate)
        results = asyncio.run(lt.run_loadtest(server, prompts, kinds, levels, requests, max_seconds,
                                              max_new_tokens, rate, seed,
                                              progress=lambda m: typer.echo(m, err=True), api_key=api_key))
    except ValueError as e:
        _fail(str(e))
    results["env"].update(questions=str(questions), long_context=long_context,
                          context_tokens=context_tokens if long_context else None)
    if long_context:
        results["env"]["prompt_tokens_client"] = {"min": min(sizes), "max": max(sizes),
                                                  "mean": round(sum(sizes) / len(sizes), 1)}
    js, png = lt.write_outputs(results, out)
    typer.echo(lt.format_table(results))
    typer.echo(f"wrote {js} and {png}")


@app.command()
def soak(
    minutes: float = typer.Option(..., min=0.1, max=24 * 60, help="how long to load the cluster"),
    concurrency: int = typer.Option(16, min=1, max=256, help="streams kept in flight"),
    session_clients: int = typer.Option(2, min=0, max=64, help="clients holding multi-turn sessions, each turn "
                                                                "sent twice at once (one runs, one is refused)"),
    fault_every: float = typer.Option(30.0, min=0.0, help="seconds between faults (kill a draft worker, kill a "
                                                          "target, drain a target, in turn; the load goes on "
                                                          "until each has hit once); 0 = none"),
    max_new_tokens: int = typer.Option(64, min=1, max=2048),
    model: str = typer.Option("smollm2", help="target model"),
    draft_model: Optional[str] = typer.Option(None, help="draft LM for the draft workers (default: the target)"),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16 | float64 | int8 | int4"),
    targets: int = typer.Option(2, min=2, max=64, help="target workers (a fault must leave one)"),
    drafts: int = typer.Option(2, min=1, max=64, help="draft workers"),
    max_growth: float = typer.Option(20.0, min=0.0, help="fail if a process's RSS grows faster (MiB/min) over "
                                                         "the second half of the run"),
    out: Path = typer.Option(Path("soak_out"), help="writes soak.json and soak_memory.png here"),
):
    """Start a cluster, load it with greedy streams and periodic faults for MINUTES, and report memory per
    process over time, errors by code, throughput and lost tokens; exits 1 if any error, any lost token,
    a KV slot not free at the end or a growing process."""
    from drafthorse.cluster.tools.soak import run_soak, verdict, write  # deferred: heavy (see the module doc)

    context: dict[str, Any] = {"max_len": 512} if model.startswith("tiny:") else {}   # the tiny models' context
    try:
        s = Settings(model=model, draft_model=draft_model or model, dtype=dtype, num_targets=targets,
                     num_drafts=drafts, gateway_port=free_port(), http_port=0,
                     sessions_per_target=max(4, (concurrency + 2 * session_clients) // targets + 1), **context)
    except ValidationError as e:
        _fail(str(e))
    _check_models(s.model, s.draft_model)
    try:
        result = run_soak(s, minutes, concurrency, fault_every, max_new_tokens,
                          say=lambda m: typer.echo(m, err=True), session_clients=session_clients)
    except (RuntimeError, TimeoutError) as e:   # the cluster did not start (bad model, ports, ...)
        _fail(str(e))
    write(result, out)
    trend = max(result["memory_trend"].values(), key=lambda t: t["slope_mb_per_min"], default=None)
    typer.echo(f"{result['requests_ok']} requests, {result['tokens_per_s']} tok/s, errors {result['errors'] or 0}, "
               f"lost {result['lost']}, session turns {result['session_turns']}, slots {result['slots']}, "
               f"{len(result['faults'])} faults, steepest memory trend "
               f"{trend['slope_mb_per_min'] if trend else 'n/a'} MiB/min -> {out / 'soak.json'}")
    problems = verdict(result, max_growth)
    for p in problems:
        typer.echo(f"FAIL: {p}", err=True)
    raise typer.Exit(1 if problems else 0)


@app.command()
def distill(
    out: Path = typer.Option(..., help="corpus directory: written shard by shard; a second run resumes it"),
    model: str = typer.Option("smollm2", help="the target that writes the corpus"),
    dtype: str = typer.Option("auto", help="the target's dtype (its greedy answers are those at this dtype)"),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP),
    prompts: Path = typer.Option(DEV_QUESTIONS, help="Spec-Bench jsonl: the training questions (both turns)"),
    holdout_per_category: int = typer.Option(5, min=0, help="leave out the first N questions of each category "
                                                             "(what `bench --per-category N` measures on)"),
    question_shards: int = typer.Option(4, min=1, help="shards answering every training question (shard 0 "
                                                       "greedily, the others sampled)"),
    invented_shards: int = typer.Option(7, min=0, help="shards of user turns the target invents"),
    invented: int = typer.Option(256, min=1, help="user turns invented per invented shard"),
    max_new_tokens: int = typer.Option(256, min=1, help="answer length"),
    batch_size: int = typer.Option(64, min=1, help="sequences per target pass (does not change the corpus)"),
    shards: Optional[int] = typer.Option(None, min=1, help="write at most this many shards in this run"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None),
):
    """Write (or resume) a self-distillation corpus: the target's own answers as token ids, in shards
    (`train-drafter --corpus` reads it)."""
    from drafthorse.actors.models import loader  # deferred: heavy (see the module doc)
    from drafthorse.actors.training import tokens  # deferred: heavy (see the module doc)
    from drafthorse.actors.training.selfdistill import split_questions  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools.bench import load_questions  # deferred: heavy (see the module doc)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _threads(threads)
    try:
        train_q, _ = split_questions(load_questions(prompts), holdout_per_category)
        if not train_q:
            raise ValueError(f"{prompts}: no question left for training after holding out "
                             f"{holdout_per_category} per category")
        lm = loader.load(model, dtype, device=device)
        recipe = tokens.Recipe(lm.name, lm.dtype, train_q, question_shards, invented_shards, invented,
                               max_new_tokens, seed)
        result = tokens.build(lm, out, recipe, batch_size, shards)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps(result))


@app.command("train-drafter")
def train_drafter(
    kind: str = typer.Option(..., help="eagle | eagle3 | medusa | layerskip"),
    out: Path = typer.Option(..., help="checkpoint to write (.safetensors)"),
    model: str = typer.Option("smollm2", help="the target the head drafts for"),
    corpus: Optional[Path] = typer.Option(None, help="a token corpus written by `drafthorse distill` (the shards "
                                                     "so far); its features are computed here, cached at --data"),
    train_tokens: Optional[int] = typer.Option(None, min=1, help="train on a fixed random subset of the training "
                                                                 "sequences with this many answer tokens"),
    ttt_steps: int = typer.Option(4, min=1, max=16, help="eagle3: draft depths unrolled in training"),
    prompt_loss: Optional[bool] = typer.Option(None, "--prompt-loss/--no-prompt-loss",
                                               help="learn at prompt positions too, not only at answer positions "
                                                    "(default: eagle, medusa, layerskip do; eagle3 does not)"),
    prompts: Path = typer.Option(DEV_QUESTIONS, help="Spec-Bench jsonl: training prompts (first turns)"),
    holdout_per_category: int = typer.Option(5, min=0, help="leave out the first N questions of each category "
                                                             "(what `bench --per-category N` measures on)"),
    data: Optional[Path] = typer.Option(None, help="self-distillation corpus: read if it exists, else written "
                                                   "there (default: .cache/drafthorse/selfdistill/)"),
    invented: int = typer.Option(0, min=0, help="extra user prompts the target invents"),
    samples: int = typer.Option(1, min=0, help="sampled answers per prompt, besides the greedy one"),
    max_new_tokens: int = typer.Option(128, min=1, help="answer length when generating the corpus"),
    exit_layer: int = typer.Option(10, min=1, help="layerskip: draft with this many target layers"),
    epochs: int = typer.Option(4, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    batch_tokens: int = typer.Option(1024, min=16, help="tokens per optimizer step"),
    draft_vocab: int = typer.Option(8192, min=16, help="draft vocabulary: most frequent target tokens"),
    medusa_heads: int = typer.Option(4, min=1),
    topk: int = typer.Option(4, min=1, help="tree default saved with the head: children per node"),
    depth: int = typer.Option(6, min=1, help="tree default saved with the head: draft depth"),
    max_nodes: int = typer.Option(16, min=1, help="tree default saved with the head: nodes per tree"),
    seed: int = typer.Option(0),
    init: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,   # (checked before the teacher pass)
                                        help="start from this head's weights (more epochs on a trained head: "
                                             "same kind, corpus, --train-tokens and --seed)"),
    teacher_dtype: str = typer.Option("auto", help=TEACHER_DTYPE_HELP),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help=AMP_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + "; the target's features and the training run there"),
    threads: Optional[int] = typer.Option(None),
):
    """Train a draft head on the target's own answers (self-distillation) and save it."""
    from drafthorse.actors.drafters.heads import eagle3_layers  # deferred: heavy (see the module doc)
    from drafthorse.actors.models import loader  # deferred: heavy (see the module doc)
    from drafthorse.actors.training import selfdistill  # deferred: heavy (see the module doc)
    from drafthorse.actors.training.train import TrainConfig, Trainer  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools.bench import load_questions  # deferred: heavy (see the module doc)


    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _threads(threads)
    if kind not in kinds.HEAD_KINDS:
        _fail(f"--kind must be one of {', '.join(kinds.HEAD_KINDS)}, got {kind!r}")
    t0 = time.perf_counter()
    try:
        lm = loader.load(model, _teacher_dtype(teacher_dtype), device=device)
        if corpus is not None:   # the corpus's recipe names its training questions: the rest were held out
            feats, data, made = selfdistill.corpus_features(lm, corpus, exit_layer, data)
            trained = set(feats.meta["question_ids"])
            held = [q for q in load_questions(prompts) if q["question_id"] not in trained]
        else:
            train_q, held = selfdistill.split_questions(load_questions(prompts), holdout_per_category)
            if not train_q:
                raise ValueError(f"{prompts}: no question left for training after holding out "
                                 f"{holdout_per_category} per category")
            tag = (f"{Path(lm.name).stem}-q{len(train_q)}-i{invented}-s{samples}-n{max_new_tokens}-L{exit_layer}"
                   f"-seed{seed}-{lm.dtype}")
            data = data or selfdistill.CACHE / f"{tag}.safetensors"
            feats, made = selfdistill.cached(lm, data, exit_layer, lambda: selfdistill.build(
                lm, train_q, invented=invented, samples=samples, max_new_tokens=max_new_tokens, mid_layer=exit_layer,
                seed=seed, taps=eagle3_layers(lm.model.n_layers)))
        typer.echo(f"corpus: {'wrote' if made else 'read'} {data} ({feats.meta['sequences']} sequences, "
                   f"{feats.meta['tokens']} tokens)", err=True)
        cfg = TrainConfig(kind, epochs=epochs, lr=lr, batch_tokens=batch_tokens, draft_vocab=draft_vocab,
                          medusa_heads=medusa_heads, ttt_steps=ttt_steps, train_tokens=train_tokens, seed=seed,
                          prompt_loss=prompt_loss, amp=amp, init=None if init is None else str(init))
        trainer = Trainer(cfg, lm.model, lm.name, feats, lm.eos_ids)
        final = trainer.fit()
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    recipe = dict(command="drafthorse " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                  held_out_question_ids=[q["question_id"] for q in held], seconds=round(time.perf_counter() - t0, 1))
    trainer.checkpoint(dict(topk=topk, depth=min(depth, medusa_heads) if kind == "medusa" else depth,
                            max_nodes=max_nodes), recipe).save(out)
    typer.echo(json.dumps({"out": str(out), "kind": kind, **final, "draft_vocab": trainer.info["draft_vocab"],
                           "val_label_coverage": trainer.info["val_label_coverage"],
                           "train_seconds": trainer.info["train_seconds"]}))


@app.command("learning-curve")
def learning_curve(
    corpus: Path = typer.Option(..., help="a token corpus written by `drafthorse distill`"),
    kinds: str = typer.Option("eagle,eagle3", help="comma list of head kinds: eagle, eagle3, medusa"),
    tokens: str = typer.Option("50000,200000,1000000", help="comma list of training budgets (answer tokens)"),
    out: Path = typer.Option(Path("curve_out"), help="writes OUT/curve.json, OUT/curve.png, OUT/heads/, OUT/bench-N/"),
    model: str = typer.Option("smollm2", help="the target the corpus was written by"),
    dtype: str = typer.Option("auto", help="the target's dtype when the heads draft for it (bench)"),
    prompts: Path = typer.Option(DEV_QUESTIONS, help="Spec-Bench jsonl: the held-out questions come from it"),
    per_category: int = typer.Option(3, min=1, help="held-out questions per category the bench runs"),
    max_new_tokens: int = typer.Option(128, min=1),
    epochs: int = typer.Option(4, min=1),
    lr: float = typer.Option(1e-3, min=0.0),
    ttt_steps: int = typer.Option(4, min=1, max=16, help="eagle3: draft depths unrolled in training"),
    prompt_loss: Optional[bool] = typer.Option(None, "--prompt-loss/--no-prompt-loss",
                                               help="learn at prompt positions too, not only at answer positions "
                                                    "(default: eagle, medusa, layerskip do; eagle3 does not)"),
    draft_vocab: int = typer.Option(8192, min=16),
    exit_layer: int = typer.Option(10, min=1, help="the cached features' mid layer (as train-drafter's)"),
    data: Optional[Path] = typer.Option(None, help="the corpus's features (default: train-drafter's cache)"),
    teacher_dtype: str = typer.Option("auto", help=TEACHER_DTYPE_HELP),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help=AMP_HELP),
    device: Optional[str] = typer.Option(None, help=DEVICE_HELP + "; training and the bench alike"),
    threads: Optional[int] = typer.Option(None),
):
    """Train heads on growing subsets of a corpus and bench each on held-out questions: tau and speedup
    against training tokens, as a table, JSON and a plot."""
    from drafthorse.actors.models import loader  # deferred: heavy (see the module doc)
    from drafthorse.actors.training import selfdistill  # deferred: heavy (see the module doc)
    from drafthorse.actors.training.train import TrainConfig  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools import curve  # deferred: heavy (see the module doc)
    from drafthorse.cluster.tools.bench import load_questions  # deferred: heavy (see the module doc)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _threads(threads)
    try:
        budgets = [int(x) for x in tokens.split(",") if x.strip()]
        wanted = [k.strip() for k in kinds.split(",") if k.strip()]
        if not budgets or min(budgets) < 1:
            raise ValueError(f"--tokens {tokens!r}: expected a comma list of positive integers")
        train_lm = loader.load(model, _teacher_dtype(teacher_dtype), device=device)
        feats, data, _ = selfdistill.corpus_features(train_lm, corpus, exit_layer, data)
        qs = load_questions(prompts, per_category)
        if leaked := sorted(q["question_id"] for q in qs if q["question_id"] in set(feats.meta["question_ids"])):
            raise ValueError(f"questions {leaked} are in the corpus's training split: lower --per-category to "
                             "the corpus's held-out count")
        cfg = TrainConfig("eagle", epochs=epochs, lr=lr, ttt_steps=ttt_steps, draft_vocab=draft_vocab,
                          prompt_loss=prompt_loss, amp=amp)
        result = curve.run_curve(train_lm, loader.load(model, dtype, device=device), feats, wanted, budgets, qs,
                                 max_new_tokens, out, cfg)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(curve.format_table(result))
    typer.echo(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")


@app.command("drain-node")
def drain_node_cmd(
    deadline_s: float = typer.Option(25.0, min=0.0, help="give up waiting after this long; Serve stops what is "
                                                         "left at this deadline minus its graceful shutdown time"),
    address: str = typer.Option("auto", help="Ray cluster (auto: the one this machine belongs to)"),
    node_id: Optional[str] = typer.Option(None, help="Ray node id to drain (default: this machine's node)"),
):
    """Drain this Ray node before it stops (a Kubernetes preStop hook): Serve moves its replicas elsewhere,
    each finishing or handing over its streams; waits until none is left (exit 1 if some are)."""
    from drafthorse.cluster.deployment.nodedrain import drain_node  # deferred: heavy (see the module doc)

    try:
        result = drain_node(address, node_id, deadline_s)
    except (ConnectionError, RuntimeError, subprocess.TimeoutExpired) as e:
        _fail(f"drain-node: {e}")
    typer.echo(json.dumps(result))
    if result["replicas_left"]:
        typer.echo(f"error: {len(result['replicas_left'])} replica(s) still on the node after {deadline_s} s", err=True)
        raise typer.Exit(1)


@app.command("api-key")
def api_key(name: str = typer.Option("", help="owner name recorded with the key (sessions belong to it)")):
    """Make a public API key: prints the key (give it to the client, once) and the sha256 line to put
    in DRAFTHORSE_API_KEY_HASHES or DRAFTHORSE_API_KEYS_FILE (the server never stores the key)."""
    if ":" in name or any(c.isspace() for c in name):
        _fail("--name must not contain ':' or whitespace")
    key = new_key()
    typer.echo(f"key:  {key}\nhash: {digest_line(key, name)}")


def main() -> None:  # pragma: no cover
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
