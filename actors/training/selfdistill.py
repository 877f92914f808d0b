"""Training data for draft heads, written by the target itself (self-distillation; nothing downloaded).

    prompts:    Spec-Bench questions of the training split, plus user turns the target invents
                when asked to continue an empty user message (temperature 1, a seed per batch)
    answers:    per prompt one greedy answer (what greedy serving will see) and `samples` answers
                at temperature > 0 (more contexts), batched `generate` of the target
    features:   one teacher-forced pass of the target over each prompt + answer keeps, per position,
                the final hidden state (EAGLE, Medusa; and the target's distribution, through its LM
                head), the residual stream after `mid_layer` layers (layer-skip), those after the `taps`
                layers (EAGLE-3) and the target's greedy next token (the label every head learns)

The result is a flat, padded-free store (tokens, offsets, features, labels) saved with safetensors
and reused by every head kind; its recipe (counts, seeds, question ids) travels in the metadata."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from drafthorse.actors.drafters.heads import eagle3_layers
from drafthorse.actors.models.loader import LoadedModel, chat_prompt
from drafthorse.actors.training import tokens
from drafthorse.actors.training.tokens import generate, invent_prompts, stop_ids, tokenizer_of

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    tokens: torch.Tensor      # [N] long: every sequence, concatenated
    offsets: torch.Tensor     # [S + 1] long: sequence s is tokens[offsets[s]:offsets[s+1]]
    prompt_lens: torch.Tensor  # [S] long: how many leading tokens of each sequence are the prompt
    feat: torch.Tensor        # [N, H]: the target's final (normed) hidden state at each position
    mid: torch.Tensor         # [N, H]: the residual stream after `mid_layer` layers
    label: torch.Tensor       # [N] long: the target's greedy next token after each position
    meta: dict
    taps: torch.Tensor | None = None   # [N, k * H]: the residual streams after meta["taps"]'s k layers

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def seq(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def labels(self, seqs: list[int]) -> torch.Tensor:
        """The greedy next tokens at every position of the given sequences."""
        return torch.cat([self.label[self.seq(s)] for s in seqs])

    def answers(self) -> torch.Tensor:
        """[N] bool: the positions whose next token is an answer token (the last prompt token's on)."""
        out = torch.zeros(len(self.tokens), dtype=torch.bool, device="cpu")
        for s, plen in enumerate(self.prompt_lens.tolist()):
            out[int(self.offsets[s]) + plen - 1:int(self.offsets[s + 1])] = True
        return out

    def save(self, path: str | Path) -> None:
        tensors = {"tokens": self.tokens, "offsets": self.offsets, "prompt_lens": self.prompt_lens,
                   "feat": self.feat.contiguous(), "mid": self.mid.contiguous(), "label": self.label}
        if self.taps is not None:
            tensors["taps"] = self.taps.contiguous()
        save_file(tensors, str(path), metadata={"meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        t = load_file(str(path))
        return cls(t["tokens"], t["offsets"], t["prompt_lens"], t["feat"], t["mid"], t["label"], meta, t.get("taps"))

    def split(self, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """Sequence indices for training and validation (validation: whole sequences, never mixed)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed), device="cpu").tolist()
        n_val = max(1, int(len(order) * val_fraction)) if len(order) > 1 else 0
        return order[n_val:], order[:n_val]


@torch.inference_mode()
def teacher_pass(lm: LoadedModel, seqs: list[list[int]], mid_layer: int, taps: tuple[int, ...] = (),
                 batch_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(final hidden, hidden after mid_layer layers, greedy next token, the streams after the `taps`
    layers side by side or None) at every position of seqs, the flat layout of a Corpus. Hidden states
    are kept in float16 (half the memory; they stay far inside its range), written in place."""
    H = lm.hf.config.hidden_size
    starts = [0]
    for s in seqs:
        starts.append(starts[-1] + len(s))
    feat = torch.empty(starts[-1], H, dtype=torch.float16)
    mid = torch.empty(starts[-1], H, dtype=torch.float16)
    tapped = torch.empty(starts[-1], H * len(taps), dtype=torch.float16) if taps else None
    label = torch.empty(starts[-1], dtype=torch.long)
    carrier = carriers(seqs)
    order = sorted((i for i in range(len(seqs)) if carrier[i] == i), key=lambda i: len(seqs[i]))
    bar = tqdm(total=sum(len(seqs[i]) for i in order), desc="target features", unit="tok", unit_scale=True,
               leave=False)
    b = 0
    while b < len(order):
        e = b + 1
        while e < len(order) and (e - b + 1) * len(seqs[order[e]]) <= batch_tokens:
            e += 1
        idx = order[b:e]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):   # right padding: positions start at 0 in every row
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        out = lm.hf(input_ids=ids.to(lm.hf.device), attention_mask=mask.to(lm.hf.device), output_hidden_states=True)
        hs = out.hidden_states   # [0]: the embeddings, [j]: after layer j - 1, [-1]: the final (normed) one
        # to the host once per batch (in float16, as kept)
        last, middle, lab = hs[-1].half().cpu(), hs[mid_layer].half().cpu(), out.logits.argmax(-1).cpu()
        taps_h = torch.cat([hs[t + 1] for t in taps], dim=-1).half().cpu() if taps else None
        for r, i in enumerate(idx):
            at = slice(starts[i], starts[i + 1])
            n = len(seqs[i])
            feat[at], mid[at], label[at] = last[r, :n], middle[r, :n], lab[r, :n]
            if tapped is not None and taps_h is not None:
                tapped[at] = taps_h[r, :n]
        bar.update(sum(len(seqs[i]) for i in idx))
        b = e
    bar.close()
    for i, j in enumerate(carrier):   # a prefix of another sequence: its positions' rows are that one's
        if i != j:
            at, src = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j] + len(seqs[i]))
            feat[at], mid[at], label[at] = feat[src], mid[src], label[src]
            if tapped is not None:
                tapped[at] = tapped[src]
    return feat, mid, label, tapped


def carriers(seqs: list[list[int]]) -> list[int]:
    """For each sequence, one that starts with it and that no other extends (itself if none does). A
    causal target's rows at a sequence's positions are those of any sequence it begins, so one pass over
    the carrier serves both (a corpus's first turn is the start of its second turn's prompt)."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])   # a prefix sorts right before what extends it
    out = list(range(len(seqs)))
    for a, b in zip(reversed(order[:-1]), reversed(order[1:])):
        if seqs[b][:len(seqs[a])] == seqs[a]:
            out[a] = out[b]
    return out


def build(lm: LoadedModel, questions: list[dict], *, invented: int = 0, samples: int = 1,
          max_new_tokens: int = 192, temperature: float = 0.8, batch_size: int = 16, mid_layer: int = 8,
          seed: int = 0, taps: tuple[int, ...] = ()) -> Corpus:
    """The whole recipe (see the module docstring). `questions` are Spec-Bench records (first turn)."""
    t0 = time.perf_counter()
    user = [q["turns"][0] for q in questions]
    made = invent_prompts(lm, invented, batch_size, seed + 7919) if invented else []
    log.info("%d questions + %d invented prompts", len(user), len(made))
    tok = tokenizer_of(lm)
    prompts = [chat_prompt(tok, [{"role": "user", "content": u}]) for u in user + made]
    stop = stop_ids(lm)
    seqs: list[list[int]] = []
    plens: list[int] = []
    runs = [(0.0, seed)] + [(temperature, seed + 1000 * (k + 1)) for k in range(samples)]
    for temp, s in runs:
        answers = generate(lm, prompts, max_new_tokens, temp, batch_size,
                           [s * 100_003 + i for i in range(len(prompts))], f"answers (T={temp})", stop)
        for p, a in zip(prompts, answers):
            if a:
                seqs.append(p + a)
                plens.append(len(p))
    meta = dict(questions=[q["question_id"] for q in questions], invented=len(made), samples=samples,
                temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    corpus = from_sequences(lm, seqs, plens, mid_layer, meta, taps)
    corpus.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return corpus


def from_sequences(lm: LoadedModel, seqs: list[list[int]], prompt_lens: list[int], mid_layer: int,
                   meta: dict | None = None, taps: tuple[int, ...] = ()) -> Corpus:
    """A corpus of the given token sequences (prompt + answer each) with the target's features (and
    the streams after the `taps` layers, for EAGLE-3 heads)."""
    feat, mid, label, tapped = teacher_pass(lm, seqs, mid_layer, taps)
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    meta = dict(meta or {}, target=lm.name, teacher_dtype=lm.dtype, mid_layer=mid_layer, taps=list(taps),
                sequences=len(seqs),
                tokens=int(offsets[-1]), answer_tokens=int(offsets[-1]) - sum(prompt_lens))
    return Corpus(torch.tensor([t for s in seqs for t in s]), offsets, torch.tensor(prompt_lens), feat, mid,
                  label, meta, tapped)


CACHE = Path(".cache/drafthorse/selfdistill")


def cached(lm: LoadedModel, data: Path, mid_layer: int, make, sequences: int | None = None) -> tuple[Corpus, bool]:
    """(features, computed now): read from `data` where they were computed before for this target at
    this dtype, exit layer, EAGLE-3 taps (and number of sequences), else `make()` and written there."""
    taps = list(eagle3_layers(lm.model.n_layers))
    if data.is_file():
        feats = Corpus.load(data)
        m = feats.meta
        if (m.get("target") != lm.name or int(m.get("mid_layer", -1)) != mid_layer or m.get("taps") != taps
                or m.get("teacher_dtype", "float32") != lm.dtype
                or (sequences is not None and m.get("sequences") != sequences)):
            raise ValueError(f"features {data} were computed for {m.get('target')!r} at "
                             f"{m.get('teacher_dtype', 'float32')} with mid_layer {m.get('mid_layer')}, taps "
                             f"{m.get('taps')} and {m.get('sequences')} sequences, not for {lm.name!r} at "
                             f"{lm.dtype} with mid_layer {mid_layer}: pass another --data")
        return feats, False
    feats = make()
    data.parent.mkdir(parents=True, exist_ok=True)
    feats.save(data)
    return feats, True


def corpus_features(lm: LoadedModel, corpus: Path, mid_layer: int, data: Path | None = None,
                    ) -> tuple[Corpus, Path, bool]:
    """(features, where they are kept, computed now) of a token corpus's shards so far (tokens.py), with
    the streams every head kind reads (the EAGLE-3 taps included): one file serves them all."""
    seqs, plens, meta = tokens.load(corpus)
    data = data or CACHE / f"{corpus.name}-{meta['sequences']}-L{mid_layer}-{lm.dtype}.safetensors"
    taps = eagle3_layers(lm.model.n_layers)
    feats, made = cached(lm, data, mid_layer, lambda: from_sequences(lm, seqs, plens, mid_layer, meta, taps),
                         meta["sequences"])
    return feats, data, made


def split_questions(questions: list[dict], holdout_per_category: int) -> tuple[list[dict], list[dict]]:
    """(training, held out): the first `holdout_per_category` questions of each category in file order
    are held out, the ones `drafthorse bench --per-category N` (N <= holdout) measures on."""
    seen: dict[str, int] = {}
    train: list[dict] = []
    held: list[dict] = []
    for q in questions:
        seen[q["category"]] = seen.get(q["category"], 0) + 1
        (held if seen[q["category"]] <= holdout_per_category else train).append(q)
    return train, held
