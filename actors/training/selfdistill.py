"""Training data for draft heads, written by the target itself (self-distillation; nothing downloaded).

    prompts:    Spec-Bench questions of the training split, plus user turns the target invents
                when asked to continue an empty user message (temperature 1, a seed per batch)
    answers:    per prompt one greedy answer (what greedy serving will see) and `samples` answers
                at temperature > 0 (more contexts), batched `generate` of the target
    features:   one teacher-forced pass of the target over each prompt + answer keeps, per position,
                the final hidden state (EAGLE, Medusa), the residual stream after `mid_layer` layers
                (layer-skip) and the target's greedy next token (the label every head learns)

The result is a flat, padded-free store (tokens, offsets, features, labels) saved with safetensors
and reused by every head kind; its recipe (counts, seeds, question ids) travels in the metadata."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from drafthorse.actors.engine import BatchEngine, Sequence
from drafthorse.actors.models.loader import LoadedModel, chat_prompt
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams

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

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def seq(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def labels(self, seqs: list[int]) -> torch.Tensor:
        """The greedy next tokens at every position of the given sequences."""
        return torch.cat([self.label[self.seq(s)] for s in seqs])

    def save(self, path: str | Path) -> None:
        save_file({"tokens": self.tokens, "offsets": self.offsets, "prompt_lens": self.prompt_lens,
                   "feat": self.feat.contiguous(), "mid": self.mid.contiguous(), "label": self.label},
                  str(path), metadata={"meta": json.dumps(self.meta)})

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
        t = load_file(str(path))
        return cls(t["tokens"], t["offsets"], t["prompt_lens"], t["feat"], t["mid"], t["label"], meta)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """Sequence indices for training and validation (validation: whole sequences, never mixed)."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, int(len(order) * val_fraction)) if len(order) > 1 else 0
        return order[n_val:], order[:n_val]


def _batched_generate(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                      batch_size: int, seed: int, desc: str, stop_ids: set[int]) -> list[list[int]]:
    """The target's continuations of `prompts` (token ids, without the prompt), ended by a stop id.

    Runs on drafthorse's own engine: `batch_size` sequences per target pass (continuous batching: a
    finished sequence's place goes to the next prompt), plain decoding: with many sequences per pass
    the target is compute-bound, and draft trees would only add rows."""
    engine = BatchEngine(set(stop_ids), None, max_tree_nodes=8, max_tree_depth=4)
    runners = [ModelRunner(lm.model, min(lm.model.max_len, max(map(len, prompts)) + max_new_tokens + 16))
               for _ in range(min(batch_size, len(prompts)))]
    results: dict[int, list[int]] = {}
    todo = list(range(len(prompts)))
    live: list[tuple[int, Sequence, list[int]]] = []   # (prompt index, sequence, tokens so far)
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False)
    while todo or live:
        while todo and len(live) < len(runners):
            i = todo.pop(0)
            free = [r for r in runners if all(r is not s.runner for _, s, _ in live)]
            params = SamplingParams(temperature=temperature, top_p=0.95 if temperature > 0 else 1.0,
                                    seed=seed * 100003 + i, max_new_tokens=max_new_tokens)
            seq, step = engine.start(free[0], prompts[i], params)
            live.append((i, seq, list(step.token_ids)))
        steps = engine.step([s for _, s, _ in live])
        still = []
        for (i, seq, toks), st in zip(live, steps):
            toks += st.token_ids
            if seq.finish_reason is None:
                still.append((i, seq, toks))
            else:
                results[i] = toks
                bar.update(1)
        live = still
    bar.close()
    return [results[i] for i in range(len(prompts))]


def _tokenizer(lm: LoadedModel) -> PreTrainedTokenizerBase:
    if lm.tokenizer is None:
        raise ValueError(f"{lm.name} has no tokenizer: self-distillation needs one")
    return lm.tokenizer


def invent_prompts(lm: LoadedModel, n: int, batch_size: int, seed: int, max_tokens: int = 96) -> list[str]:
    """User turns written by the target: the chat template opened for a user message, sampled at
    temperature 1 (variety over quality: they only need to be the kind of text users send)."""
    tok = _tokenizer(lm)
    # (casts: both are strings here; transformers types them as strings or lists)
    text = cast(str, tok.apply_chat_template([{"role": "user", "content": "@@"}], tokenize=False))
    opening = text[:text.index("@@")]
    base = tok.encode(opening, add_special_tokens=False)
    end_ids = set(lm.eos_ids) | set(tok.encode("<|im_end|>", add_special_tokens=False))
    conts = _batched_generate(lm, [base] * n, max_tokens, 1.0, batch_size, seed, "inventing prompts", end_ids)
    out = []
    for c in conts:
        if c and c[-1] in end_ids:   # a finished user turn only
            s = cast(str, tok.decode(c[:-1], skip_special_tokens=True)).strip()
            if len(s) >= 8:
                out.append(s)
    return out


@torch.inference_mode()
def teacher_pass(lm: LoadedModel, seqs: list[list[int]], mid_layer: int, batch_tokens: int = 4096,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(final hidden, hidden after mid_layer layers, greedy next token) at every position of seqs."""
    feats, mids, labels = [], [], []
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    parts: dict[int, tuple] = {}
    bar = tqdm(total=len(seqs), desc="target features", unit="seq", leave=False)
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
        out = lm.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        final, mid = out.hidden_states[-1], out.hidden_states[mid_layer]
        lab = out.logits.argmax(-1)
        for r, i in enumerate(idx):
            n = len(seqs[i])
            # stored in float16: half the memory, and hidden states stay far inside its range
            parts[i] = (final[r, :n].half(), mid[r, :n].half(), lab[r, :n].clone())
        bar.update(len(idx))
        b = e
    bar.close()
    for i in range(len(seqs)):
        f, m, lab = parts.pop(i)
        feats.append(f)
        mids.append(m)
        labels.append(lab)
    return torch.cat(feats), torch.cat(mids), torch.cat(labels)


def build(lm: LoadedModel, questions: list[dict], *, invented: int = 0, samples: int = 1,
          max_new_tokens: int = 192, temperature: float = 0.8, batch_size: int = 16, mid_layer: int = 8,
          seed: int = 0) -> Corpus:
    """The whole recipe (see the module docstring). `questions` are Spec-Bench records (first turn)."""
    t0 = time.perf_counter()
    user = [q["turns"][0] for q in questions]
    made = invent_prompts(lm, invented, batch_size, seed + 7919) if invented else []
    log.info("%d questions + %d invented prompts", len(user), len(made))
    tok = _tokenizer(lm)
    prompts = [chat_prompt(tok, [{"role": "user", "content": u}]) for u in user + made]
    stop = set(lm.eos_ids) | set(tok.encode("<|im_end|>", add_special_tokens=False))
    seqs: list[list[int]] = []
    plens: list[int] = []
    runs = [(0.0, seed)] + [(temperature, seed + 1000 * (k + 1)) for k in range(samples)]
    for temp, s in runs:
        answers = _batched_generate(lm, prompts, max_new_tokens, temp, batch_size, s,
                                    f"answers (T={temp})", stop)
        for p, a in zip(prompts, answers):
            if a:
                seqs.append(p + a)
                plens.append(len(p))
    meta = dict(questions=[q["question_id"] for q in questions], invented=len(made), samples=samples,
                temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    corpus = from_sequences(lm, seqs, plens, mid_layer, meta)
    corpus.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return corpus


def from_sequences(lm: LoadedModel, seqs: list[list[int]], prompt_lens: list[int], mid_layer: int,
                   meta: dict | None = None) -> Corpus:
    """A corpus of the given token sequences (prompt + answer each) with the target's features."""
    feat, mid, label = teacher_pass(lm, seqs, mid_layer)
    offsets = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    meta = dict(meta or {}, target=lm.name, mid_layer=mid_layer, sequences=len(seqs), tokens=int(offsets[-1]),
                answer_tokens=int(offsets[-1]) - sum(prompt_lens))
    return Corpus(torch.tensor([t for s in seqs for t in s]), offsets, torch.tensor(prompt_lens), feat, mid,
                  label, meta)


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
