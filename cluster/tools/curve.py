"""`drafthorse learning-curve`: how a head's acceptance grows with its training data, in one run.

For each budget of training answer tokens (a fixed random subset of the corpus's training split, the
smaller a prefix of the larger: `TrainConfig.train_tokens`) and each head kind, a head is trained on the
same features, then `bench` runs plain decoding beside every kind's head on the held-out questions. Per
point: tau (mean tokens per target forward), the speedup over plain decoding measured in that same bench
run, the answers equal to plain decoding, and validation top-1 per draft depth (the chance a chain draft
survives to that depth). Writes DIR/curve.json, DIR/curve.png (tau against training tokens, log scale,
one line per kind), the heads in DIR/heads/ and each budget's bench in DIR/bench-N/. curve.json is
written after each budget: a run with the same settings into the same DIR keeps the budgets done (a
1M-token point may take more than one session) and trains only the rest."""
from __future__ import annotations

import json
import os
from pathlib import Path

from drafthorse.actors.models.loader import LoadedModel
from drafthorse.actors.training.selfdistill import Corpus
from drafthorse.actors.training.train import TrainConfig, Trainer
from drafthorse.cluster.tools.bench import BASELINE, OVERALL, run_bench

KINDS = ("eagle", "eagle3", "medusa")
TREE = dict(topk=4, depth=6, max_nodes=16)   # saved tree (train-drafter's defaults); load_head sizes it here


def available(feats: Corpus, cfg: TrainConfig) -> int:
    """Answer tokens in the corpus's training split (the largest budget a curve can ask for)."""
    train, _ = feats.split(cfg.val_fraction, cfg.seed)
    answers = feats.offsets[1:] - feats.offsets[:-1] - feats.prompt_lens
    return int(answers[train].sum())


def run_curve(train_lm: LoadedModel, bench_lm: LoadedModel, feats: Corpus, kinds: list[str], budgets: list[int],
              questions: list[dict], max_new_tokens: int, out_dir: str | os.PathLike, cfg: TrainConfig,
              progress: bool = True) -> dict:
    """{"env", "points": [{"kind", "train_tokens", "tau", "speedup", "equal_to_ar", "val_top1_per_depth",
    "train_seconds"}]}; `cfg` is every head's training configuration but its kind and budget."""
    if bad := [k for k in kinds if k not in KINDS]:
        raise ValueError(f"learning curves are for {', '.join(KINDS)}, not {', '.join(bad)}")
    have = available(feats, cfg)
    if too_big := [b for b in budgets if b > have]:
        raise ValueError(f"budgets {too_big} exceed the {have} answer tokens of the corpus's training split")
    out = Path(out_dir)
    (out / "heads").mkdir(parents=True, exist_ok=True)
    settings = dict(corpus=feats.meta.get("corpus"), sequences=feats.meta.get("sequences"), epochs=cfg.epochs,
                    lr=cfg.lr, batch_tokens=cfg.batch_tokens, ttt_steps=cfg.ttt_steps, draft_vocab=cfg.draft_vocab,
                    prompt_loss=cfg.prompt_loss, amp=cfg.amp, teacher_dtype=feats.meta.get("teacher_dtype"),
                    medusa_heads=cfg.medusa_heads, seed=cfg.seed,
                    val_fraction=cfg.val_fraction, max_new_tokens=max_new_tokens,
                    question_ids=[q["question_id"] for q in questions], dtype=bench_lm.dtype)
    points, env = _done(out, settings)   # a run that stopped part way resumes after its last whole budget
    for budget in sorted(budgets):
        if all(any(p["kind"] == k and p["train_tokens"] == budget for p in points) for k in kinds):
            continue
        points = [p for p in points if not (p["train_tokens"] == budget and p["kind"] in kinds)]
        heads = {}
        trained = {}
        for kind in kinds:
            trainer = Trainer(TrainConfig(**{**cfg.__dict__, "kind": kind, "train_tokens": budget}),
                              train_lm.model, train_lm.name, feats, train_lm.eos_ids)
            final = trainer.fit(progress)
            heads[kind] = out / "heads" / f"{kind}-{budget}.safetensors"
            tree = dict(TREE, depth=min(TREE["depth"], cfg.medusa_heads) if kind == "medusa" else TREE["depth"])
            trainer.checkpoint(tree, dict(train_tokens=budget, curve=str(out))).save(heads[kind])
            trained[kind] = dict(final, train_seconds=trainer.info["train_seconds"])
        res = run_bench(questions, [BASELINE, *kinds], max_new_tokens, out / f"bench-{budget}", bench_lm,
                        progress=progress, heads={k: str(p) for k, p in heads.items()})
        env = res["env"]
        for kind in kinds:
            s = res["summary"][kind][OVERALL]
            points.append(dict(kind=kind, train_tokens=budget, tau=s["mean_accepted"], speedup=s["speedup"],
                               equal_to_ar=s["equal_to_ar"],
                               val_top1_per_depth=trained[kind].get("val_top1_per_depth"),
                               train_seconds=trained[kind]["train_seconds"]))
        _write(out, env, settings, have, points)   # what is done survives a run that stops
    points.sort(key=lambda p: (p["train_tokens"], KINDS.index(p["kind"])))
    result = _write(out, env, settings, have, points)
    plot(result, out / "curve.png")
    return result


def _done(out: Path, settings: dict) -> tuple[list[dict], dict]:
    """(points, bench env) of OUT/curve.json when it was written with these settings and its heads are
    there; ([], {}) when there is none; ValueError when it holds a curve of other settings."""
    path = out / "curve.json"
    if not path.is_file():
        return [], {}
    old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("settings") != settings:
        diff = sorted(k for k in settings if (old.get("settings") or {}).get(k) != settings[k])
        raise ValueError(f"{path} holds a curve of other settings (differs in {', '.join(diff)}): "
                         "pass the same settings to resume it, or another --out")
    kept = [p for p in old["points"] if (out / "heads" / f"{p['kind']}-{p['train_tokens']}.safetensors").is_file()]
    return kept, old["env"]


def _write(out: Path, env: dict, settings: dict, have: int, points: list[dict]) -> dict:
    result = {"env": dict(env, corpus=settings["corpus"], epochs=settings["epochs"], lr=settings["lr"],
                          ttt_steps=settings["ttt_steps"], draft_vocab=settings["draft_vocab"], available_tokens=have),
              "settings": settings, "points": points}
    (out / "curve.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # deferred: plots only
    from matplotlib.figure import Figure  # deferred: plots only

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for kind in dict.fromkeys(p["kind"] for p in result["points"]):
        pts = [p for p in result["points"] if p["kind"] == kind]
        ax.plot([p["train_tokens"] for p in pts], [p["tau"] or 0.0 for p in pts], marker="o", label=kind)
    ax.set_xscale("log")
    ax.set_xlabel("training answer tokens")
    ax.set_ylabel("tau: tokens per target forward (held-out questions)")
    env = result["env"]
    ax.set_title(f"{Path(str(env.get('model'))).name} · {env.get('dtype')} · {env.get('epochs')} epochs · "
                 f"{len(env.get('question_ids', []))} prompts · {' '.join(env.get('cpu_flags', []))}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def format_table(result: dict) -> str:
    """Markdown: one row per point."""
    rows = ["| kind | training answer tokens | tau | × plain | = plain | val top-1 per depth | train s |",
            "|---|---:|---:|---:|---:|---|---:|"]
    for p in result["points"]:
        eq = p["equal_to_ar"]
        rows.append(f"| {p['kind']} | {p['train_tokens']:,} | {p['tau']:.2f} | {p['speedup']:.2f} | "
                    f"{eq['equal']}/{eq['total']} | {' '.join(f'{a:.3f}' for a in p['val_top1_per_depth'] or [])} | "
                    f"{p['train_seconds']:.0f} |")
    return "\n".join(rows)
