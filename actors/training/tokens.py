"""The self-distillation corpus as token ids: conversations the target writes itself, kept in shards
that a later run resumes, and that any machine turns into training features (selfdistill.from_sequences).

    DIR/recipe.json              what every shard holds (target, seeds, counts, question ids);
                                 a shard is made from the recipe and its index alone, so generation
                                 resumes at the first missing shard and a run with another recipe is
                                 refused rather than mixed in. The dtype is the shard's own (its meta):
                                 a machine without native bfloat16 resumes a bfloat16 corpus in float32
                                 (the same model's answers, apart at near-ties), and the shards say which
    DIR/shard-00000.safetensors  tokens (uint16 where the vocabulary fits, else int32), offsets,
                                 prompt_lens, and per sequence its sampling temperature and kind

Shards come in two kinds:
    question shards (the first `question_shards`): every training-split question, and a second turn
        after its answer (the question's own, or one of FOLLOW_UPS: multi-turn contexts; the rag and
        summarization categories bring the long ones); shard 0 answers greedily (what greedy serving
        sees), the later ones sample at TEMPERATURES in turn
    invented shards: `invented` user turns the target writes itself (the chat template opened for a user
        message, temperature 1), each answered greedily and once sampled
Every sampled answer has a seed of its own (recipe seed, shard, sequence)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from drafthorse.actors.engine import BatchEngine, Prompt, Sequence
from drafthorse.actors.models.loader import LoadedModel, chat_prompt
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.sampling import SamplingParams

log = logging.getLogger(__name__)

FORMAT = "drafthorse-corpus/1"
RESUMABLE = {"dtype"}              # recipe fields a run may differ in (the shard records its own)
TEMPERATURES = (0.7, 1.0)          # sampled answers, in turn (the 0.7-1.0)
KINDS = ("question", "question-turn2", "invented")
# second turns for questions that have none of their own (the training split's: Spec-Bench's two-turn
# questions open their categories, which `bench` holds out)
FOLLOW_UPS = ("Can you make that shorter?", "Please explain that in more detail.", "Give me a concrete example.",
              "Summarize your answer in three bullet points.", "What are the main drawbacks or limitations?",
              "Rewrite it so that a ten-year-old understands it.", "Why is that? Walk me through your reasoning.",
              "Say it again, more formally.")


@dataclass
class Recipe:
    target: str                    # the model name the corpus was written by
    dtype: str                     # the dtype it was started at (each shard's meta holds its own)
    questions: list[dict]          # training-split Spec-Bench records (ids, categories, turns)
    question_shards: int = 4
    invented_shards: int = 7
    invented: int = 256            # user turns invented per invented shard
    max_new_tokens: int = 256
    seed: int = 0
    format: str = FORMAT

    @property
    def shards(self) -> int:
        return self.question_shards + self.invented_shards

    def temperature(self, shard: int) -> float:
        """A question shard's temperature (0: greedy); invented shards sample at this too."""
        return 0.0 if shard == 0 else TEMPERATURES[(shard - 1) % len(TEMPERATURES)]

    def seed_of(self, shard: int, seq: int) -> int:
        return (self.seed * 1_000_003 + shard) * 100_003 + seq


@dataclass
class Shard:
    seqs: list[list[int]] = field(default_factory=list)     # prompt + answer each
    prompt_lens: list[int] = field(default_factory=list)
    temps: list[float] = field(default_factory=list)
    kinds: list[int] = field(default_factory=list)          # index into KINDS

    def add(self, prompt: list[int], answer: list[int], temp: float, kind: str) -> None:
        if answer:
            self.seqs.append(prompt + answer)
            self.prompt_lens.append(len(prompt))
            self.temps.append(temp)
            self.kinds.append(KINDS.index(kind))

    @property
    def answer_tokens(self) -> int:
        return sum(len(s) for s in self.seqs) - sum(self.prompt_lens)

    def save(self, path: Path, vocab_size: int, meta: dict) -> None:
        width = np.uint16 if vocab_size <= 2 ** 16 else np.int32
        tensors = {"tokens": np.array([t for s in self.seqs for t in s], dtype=width),
                   "offsets": np.cumsum([0] + [len(s) for s in self.seqs]).astype(np.int64),
                   "prompt_lens": np.array(self.prompt_lens, dtype=np.int32),
                   "temps": np.array(self.temps, dtype=np.float64),
                   "kinds": np.array(self.kinds, dtype=np.int8)}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(meta)})
        tmp.replace(path)   # whole shards only: a run stopped mid-write leaves no half shard behind

    @classmethod
    def load(cls, path: Path) -> Shard:
        with safe_open(str(path), "np") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise ValueError(f"{path}: not a drafthorse corpus shard")
            t = {k: f.get_tensor(k) for k in f.keys()}
        off = t["offsets"].tolist()
        toks = t["tokens"].astype(np.int64)
        return cls([toks[a:b].tolist() for a, b in zip(off, off[1:])], t["prompt_lens"].tolist(),
                   t["temps"].tolist(), t["kinds"].tolist())


def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.safetensors"


def open_corpus(out: Path, recipe: Recipe) -> None:
    """DIR ready for `recipe`: its recipe written, or the one there checked to be the same."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe.json"
    mine = asdict(recipe)
    if path.is_file():
        there = json.loads(path.read_text())
        diff = sorted(k for k in mine.keys() | there.keys() if k not in RESUMABLE and mine.get(k) != there.get(k))
        if diff:
            raise ValueError(f"{out} holds a corpus of another recipe (differs in {', '.join(diff)}): "
                             "pass the same settings to resume it, or another --out")
        return
    path.write_text(json.dumps(mine, indent=1) + "\n")


def read_recipe(out: Path) -> Recipe:
    path = out / "recipe.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out}: no corpus here (no recipe.json; write one with `drafthorse distill`)")
    return Recipe(**json.loads(path.read_text()))


def build(lm: LoadedModel, out: Path, recipe: Recipe, batch_size: int = 64, limit: int | None = None) -> dict:
    """Write the recipe's missing shards (at most `limit` of them this run); returns a summary."""
    open_corpus(out, recipe)
    stop = stop_ids(lm)
    todo = [k for k in range(recipe.shards) if not shard_path(out, k).is_file()][:limit]
    made = 0
    for k in tqdm(todo, desc="corpus shards", unit="shard"):
        t0 = time.perf_counter()
        shard = (_question_shard if k < recipe.question_shards else _invented_shard)(lm, recipe, k, batch_size, stop)
        seconds = time.perf_counter() - t0
        shard.save(shard_path(out, k), lm.model.vocab_size,
                   dict(shard=k, dtype=lm.dtype, seconds=round(seconds, 1), sequences=len(shard.seqs),
                        answer_tokens=shard.answer_tokens, batch_size=batch_size, threads=torch.get_num_threads()))
        made += 1
        log.info("shard %d (%s): %d sequences, %d answer tokens in %.0f s (%.0f tokens/s)", k, lm.dtype,
                 len(shard.seqs), shard.answer_tokens, seconds, shard.answer_tokens / seconds)
    return summary(out) | {"made_now": made}


def summary(out: Path) -> dict:
    recipe = read_recipe(out)
    done = [k for k in range(recipe.shards) if shard_path(out, k).is_file()]
    metas = [shard_meta(shard_path(out, k), recipe) for k in done]
    return dict(out=str(out), shards_done=len(done), shards=recipe.shards,
                sequences=sum(int(m["sequences"]) for m in metas),
                answer_tokens=sum(int(m["answer_tokens"]) for m in metas),
                dtypes={str(k): m["dtype"] for k, m in zip(done, metas)})


def shard_meta(path: Path, recipe: Recipe) -> dict:
    with safe_open(str(path), "np") as f:
        meta = json.loads((f.metadata() or {})["meta"])
    return {"dtype": recipe.dtype} | meta   # (shards from before dtypes were per shard: the recipe's)


def load(out: Path, max_answer_tokens: int | None = None, seed: int = 0) -> tuple[list[list[int]], list[int], dict]:
    """(sequences, prompt lengths, recipe + counts) of the shards written so far; with
    `max_answer_tokens`, a subset of whole sequences drawn in a fixed random order until their answers
    reach it (the same subset every time: learning curves)."""
    recipe = read_recipe(out)
    seqs: list[list[int]] = []
    plens: list[int] = []
    dtypes = set()
    for k in range(recipe.shards):
        if shard_path(out, k).is_file():
            s = Shard.load(shard_path(out, k))
            seqs += s.seqs
            plens += s.prompt_lens
            dtypes.add(shard_meta(shard_path(out, k), recipe)["dtype"])
    if not seqs:
        raise ValueError(f"{out}: no shard written yet (run `drafthorse distill --out {out}`)")
    if max_answer_tokens is not None:
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
        keep, total = [], 0
        for i in order:
            if total >= max_answer_tokens:
                break
            keep.append(i)
            total += len(seqs[i]) - plens[i]
        keep.sort()
        seqs, plens = [seqs[i] for i in keep], [plens[i] for i in keep]
    meta = dict(corpus=str(out), recipe_seed=recipe.seed, dtypes=sorted(dtypes),
                question_ids=[q["question_id"] for q in recipe.questions], sequences=len(seqs),
                answer_tokens=sum(len(s) for s in seqs) - sum(plens))
    return seqs, plens, meta


# ---------------------------------------------------------------- the two kinds of shard

def _question_shard(lm: LoadedModel, r: Recipe, k: int, batch: int, stop: set[int]) -> Shard:
    tok = tokenizer_of(lm)
    temp = r.temperature(k)
    first = [chat_prompt(tok, [{"role": "user", "content": q["turns"][0]}]) for q in r.questions]
    answers = generate(lm, first, r.max_new_tokens, temp, batch, [r.seed_of(k, i) for i in range(len(first))],
                       f"shard {k}: questions (T={temp})", stop)
    shard = Shard()
    chats = []
    for i, (q, p, a) in enumerate(zip(r.questions, first, answers)):
        shard.add(p, a, temp, "question")
        if a:
            reply = cast(str, tok.decode([t for t in a if t not in stop], skip_special_tokens=True))
            then = q["turns"][1] if len(q["turns"]) > 1 else FOLLOW_UPS[(k + i) % len(FOLLOW_UPS)]
            chats.append(chat_prompt(tok, [{"role": "user", "content": q["turns"][0]},
                                           {"role": "assistant", "content": reply},
                                           {"role": "user", "content": then}]))
    n = len(first)
    seconds = generate(lm, chats, r.max_new_tokens, temp, batch, [r.seed_of(k, n + i) for i in range(len(chats))],
                       f"shard {k}: second turns (T={temp})", stop)
    for p, a in zip(chats, seconds):
        shard.add(p, a, temp, "question-turn2")
    return shard


def _invented_shard(lm: LoadedModel, r: Recipe, k: int, batch: int, stop: set[int]) -> Shard:
    tok = tokenizer_of(lm)
    users = invent_prompts(lm, r.invented, batch, r.seed_of(k, 0))
    prompts = [chat_prompt(tok, [{"role": "user", "content": u}]) for u in users]
    shard = Shard()
    seeds = [r.seed_of(k, 1 + i) for i in range(len(prompts))]   # (seed_of(k, 0): the invented turns')
    for temp in (0.0, r.temperature(k)):
        for p, a in zip(prompts, generate(lm, prompts, r.max_new_tokens, temp, batch, seeds,
                                          f"shard {k}: invented (T={temp})", stop)):
            shard.add(p, a, temp, "invented")
    return shard


def invent_prompts(lm: LoadedModel, n: int, batch_size: int, seed: int, max_tokens: int = 96) -> list[str]:
    """User turns written by the target: the chat template opened for a user message, sampled at
    temperature 1 (variety over quality: they only need to be the kind of text users send)."""
    tok = tokenizer_of(lm)
    # (casts: both are strings here; transformers types them as strings or lists)
    text = cast(str, tok.apply_chat_template([{"role": "user", "content": "@@"}], tokenize=False))
    opening = text[:text.index("@@")]
    base = tok.encode(opening, add_special_tokens=False)
    end_ids = stop_ids(lm)
    conts = generate(lm, [base] * n, max_tokens, 1.0, batch_size, [seed * 100_003 + i for i in range(n)],
                     "inventing prompts", end_ids)
    out = []
    for c in conts:
        if c and c[-1] in end_ids:   # a finished user turn only
            s = cast(str, tok.decode(c[:-1], skip_special_tokens=True)).strip()
            if len(s) >= 8:
                out.append(s)
    return out


def generate(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             batch_size: int, seeds: list[int], desc: str, stop_ids: set[int]) -> list[list[int]]:
    """The target's continuations of `prompts` (token ids, without the prompt), ended by a stop id.

    Runs on drafthorse's own engine as a target worker does: `batch_size` sequences share one K/V pool
    and one target pass a step (continuous batching: finished sequences' slots go to the next prompts,
    prefilled together), plain decoding: with many sequences per pass the target is compute-bound, and
    draft trees would only add rows. `seeds`: one per prompt (its sampled answer's)."""
    if not prompts:
        return []
    engine = BatchEngine(set(stop_ids), None)
    slots = min(batch_size, len(prompts))
    kv = lm.model.new_pool(slots, min(lm.model.max_len, max(map(len, prompts)) + max_new_tokens + 16))
    free = [ModelRunner(lm.model, cache=kv.cache(i)) for i in range(slots)]
    results: dict[int, list[int]] = {}
    # admitted shortest first: sequences that share a pass have similar contexts, so attention reads them
    # in few buckets, views of the pool rather than gathered copies (the answers do not depend on it)
    todo = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    live: list[tuple[int, Sequence, list[int]]] = []   # (prompt index, sequence, tokens so far)
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", leave=False)
    while todo or live:
        if todo and free:
            take, todo = todo[:len(free)], todo[len(free):]
            starts = [Prompt(free.pop(), prompts[i], SamplingParams(
                temperature=temperature, top_p=0.95 if temperature > 0 else 1.0, seed=seeds[i],
                max_new_tokens=max_new_tokens)) for i in take]
            for i, (seq, step) in zip(take, engine.start_many(starts)):
                live.append((i, seq, list(step.token_ids)))
        steps = engine.step([s for _, s, _ in live])
        still = []
        for (i, seq, toks), st in zip(live, steps):
            toks += st.token_ids
            if seq.finish_reason is None:
                still.append((i, seq, toks))
            else:
                results[i] = toks
                free.append(seq.runner)
                bar.update(1)
        live = still
    bar.close()
    return [results[i] for i in range(len(prompts))]


def stop_ids(lm: LoadedModel) -> set[int]:
    """The tokens that end a turn: the model's EOS ids and the chat template's end-of-turn token."""
    return set(lm.eos_ids) | set(tokenizer_of(lm).encode("<|im_end|>", add_special_tokens=False))


def tokenizer_of(lm: LoadedModel) -> PreTrainedTokenizerBase:
    if lm.tokenizer is None:
        raise ValueError(f"{lm.name} has no tokenizer: self-distillation needs one")
    return lm.tokenizer
