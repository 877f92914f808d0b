"""Head-training recipes side by side on one fixed subset of the SmolLM2 corpus, from the repository root:

    python bench/2026-12-02-s11-avx512bf16/ab.py ANSWER_TOKENS SPEC [SPEC ...]

SPEC: comma-separated TrainConfig fields, e.g. kind=eagle,epochs=2,lr=0.002,prompt_loss=0. The subset's
features are computed once (a float32 teacher pass) and kept in .cache/drafthorse/ab/; each run prints
its final validation (top-1 per draft depth at held-out answer positions) as a JSON line."""
import json
import sys
import time
from pathlib import Path

import torch

from drafthorse.actors.models import loader
from drafthorse.actors.drafters.heads import eagle3_layers
from drafthorse.actors.training import tokens
from drafthorse.actors.training.selfdistill import Corpus, from_sequences
from drafthorse.actors.training.train import TrainConfig, Trainer

torch.set_num_threads(2)

feats_path = Path(f".cache/drafthorse/ab/feats-{sys.argv[1]}.safetensors")
lm = loader.load("smollm2", "float32")
if feats_path.is_file():
    feats = Corpus.load(feats_path)
else:
    seqs, plens, meta = tokens.load(Path("actors/training/corpus/smollm2"), max_answer_tokens=int(sys.argv[1]),
                                    seed=0)
    t = time.perf_counter()
    feats = from_sequences(lm, seqs, plens, 10, meta, eagle3_layers(lm.model.n_layers))
    print("features", feats.meta["tokens"], "tokens", round(time.perf_counter() - t), "s", flush=True)
    feats_path.parent.mkdir(parents=True, exist_ok=True)
    feats.save(feats_path)
for spec in sys.argv[2:]:
    kv = dict(x.split("=") for x in spec.split(","))
    kind = kv.pop("kind")
    cfg = TrainConfig(kind, **{k: (v == "1" if k == "prompt_loss" else type(getattr(TrainConfig(kind), k))(v))
                               for k, v in kv.items()})
    tr = Trainer(cfg, lm.model, lm.name, feats, lm.eos_ids)
    final = tr.fit(progress=False)
    out = dict(spec=spec, **final, train_s=tr.info["train_seconds"],
               hist=[h.get("val_top1_per_depth") for h in tr.info["history"]])
    print(json.dumps(out), flush=True)
