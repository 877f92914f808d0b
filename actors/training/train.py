"""Training draft heads on a self-distillation corpus (selfdistill.py). The target stays frozen; only
the head's own weights learn, against the target's greedy next tokens (and, for EAGLE, its features).

    eagle:      pairs (f_{i-1}, t_i) -> f̂_i;  smooth-L1(f̂_i, f_i) + w_cls * CE(LM_d(f̂_i), y_i), plus a
                second, unrolled pass that feeds the head its own predictions f̂_{i-1} instead of
                f_{i-1} (what it sees from depth 2 on when drafting)
    eagle3:     the same pairs, the feature of t_i being the target's low/mid/high streams fused
                (heads.eagle3_layers); no feature regression: the head's own LM head learns the target's
                distribution on the draft vocabulary (soft cross-entropy) at answer positions, and
                training-time test unrolls the head TTT_STEPS times on its own outputs, each step's
                query attending to the committed keys and its own chain of earlier steps' keys exactly
                as a draft at that depth does (`_ttt_attention`), losses weighted DEPTH_DECAY ** step
    medusa:     f_i -> head k -> CE(LM_d(.), y_{i+k})  for k = 1..K
    layerskip:  residual after L layers at i -> adapter -> final norm -> CE(LM_d(.), y_i)

Each kind learns at the answer positions, and (prompt_loss) at the prompt's too: by default eagle, medusa
and layer-skip do (measured: bench/2026-12-02-s11-avx512bf16), eagle3 does not (not measured yet);
y_i is the target's greedy next token after position i; LM_d the target's LM head restricted to the
draft vocabulary (the most frequent y in the training split). Validation reports top-1 agreement with
the target per draft depth at the answer positions of held-out sequences: the chance a chain draft is
accepted at that depth."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from drafthorse.actors.drafters.heads import (
    Checkpoint,
    EagleHead,
    ExitAdapter,
    MedusaHeads,
    eagle3_layers,
    fingerprint,
    head_config,
    load_checkpoint,
)
from drafthorse.actors.models.kvcache import HOST
from drafthorse.actors.models.llama import Llama
from drafthorse.actors.models.loader import native_bf16
from drafthorse.actors.training.selfdistill import Corpus

log = logging.getLogger(__name__)

W_CLS = 0.2          # EAGLE: weight of the token loss next to the feature regression
WINDOW = 384         # EAGLE trains on windows of this many positions (long prompts are cut in pieces)
DEPTH_DECAY = 0.8    # EAGLE-3: weight of training-time-test step k (as EAGLE-3's paper)
# learn at prompt positions too, by default: at 60k answer tokens they raised EAGLE's held-out top-1 from
# 29% to 39% (bench/2026-12-02-s11-avx512bf16); eagle3 keeps answers only until it is measured
PROMPT_LOSS = {"eagle": True, "medusa": True, "layerskip": True, "eagle3": False}


@dataclass
class TrainConfig:
    kind: str
    epochs: int = 4
    lr: float = 1e-3
    batch_tokens: int = 1024
    draft_vocab: int = 8192
    medusa_heads: int = 4
    ttt_steps: int = 4        # EAGLE-3: draft depths unrolled in training
    train_tokens: int | None = None   # train on a fixed random subset of the training split: this many answer tokens
    noise: float = 0.05       # EAGLE: gaussian noise on input features, times their std
    prompt_loss: bool | None = None   # learn at prompt positions too (None: the kind's PROMPT_LOSS)
    amp: bool | None = None   # products in bfloat16 under autocast, weights and losses in float32 (None: where
    #                           the device has native bfloat16, about 1.6x float32's speed for eagle3 there, and
    #                           the target is not float64)
    init: str | None = None   # start from this head's weights (same kind and draft vocabulary): more epochs
    val_fraction: float = 0.05
    seed: int = 0


def draft_vocab(corpus: Corpus, seqs: list[int], size: int, always: set[int]) -> torch.Tensor:
    """The `size` most frequent greedy next tokens of the training sequences (plus `always`, e.g. EOS)
    as sorted target ids."""
    labels = corpus.labels(seqs)
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1).double()
    for t in always:
        if t < len(counts):
            counts[t] = float("inf")
    k = min(size, int((counts > 0).sum()))
    return counts.topk(k).indices.sort().values


def _to_draft(labels: torch.Tensor, t2d: torch.Tensor) -> torch.Tensor:
    """Target ids -> draft indices, -100 (ignored by cross_entropy) outside the draft vocabulary."""
    return t2d[labels]


def _windows(corpus: Corpus, seqs: list[int]) -> list[tuple[int, int]]:
    """(start, end) ranges of the flat corpus, each within one sequence and at most WINDOW + 1 long."""
    out = []
    for s in seqs:
        a, b = int(corpus.offsets[s]), int(corpus.offsets[s + 1])
        for w in range(a, b - 1, WINDOW):
            out.append((w, min(b, w + WINDOW + 1)))
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, target: Llama, target_name: str, corpus: Corpus, eos_ids: set[int]):
        """Trains on the target's device: the corpus stays on the host, each batch goes to the device."""
        self.cfg, self.target, self.corpus = cfg, target, corpus
        self.dev = target.device
        self.train_seqs, self.val_seqs = corpus.split(cfg.val_fraction, cfg.seed)
        if cfg.train_tokens is not None:   # the split's own random order: a smaller subset is a prefix of a larger
            answers = (corpus.offsets[1:] - corpus.offsets[:-1] - corpus.prompt_lens).tolist()
            total = sum(answers[s] for s in self.train_seqs)
            if total < cfg.train_tokens:
                raise ValueError(f"train_tokens {cfg.train_tokens}: the training split has {total} answer tokens")
            keep, n = [], 0
            for s in self.train_seqs:
                if n >= cfg.train_tokens:
                    break
                keep.append(s)
                n += answers[s]
            self.train_seqs = keep
        self.d2t = draft_vocab(corpus, self.train_seqs, cfg.draft_vocab, eos_ids)
        self.t2d = torch.full((target.vocab_size,), -100, dtype=torch.long, device=HOST)
        self.t2d[self.d2t] = torch.arange(len(self.d2t), device=HOST)
        # frozen target parts, float32 for training
        self.lm_d = target.lm_head[self.d2t].float()          # [N, H]
        self.embed = target.embed
        self.norm = target.norm.float()
        self.target_name = target_name
        self.answer = corpus.answers()   # validation scores every kind on answer positions alone
        self.prompt_loss = PROMPT_LOSS.get(cfg.kind, True) if cfg.prompt_loss is None else cfg.prompt_loss
        # a float64 target asks for exact arithmetic (the tests' tiny ones): no autocast unless asked
        self.amp = cfg.amp if cfg.amp is not None else native_bf16(str(self.dev)) and target.dtype != torch.float64
        torch.manual_seed(cfg.seed)
        with torch.device(HOST):   # built on the host and then moved: the same initial weights on any device
            self.module = self._new_module(cfg, target, corpus)
        earlier: dict = {}
        if cfg.init is not None:
            earlier = self._warm_start(cfg.init, target, target_name)
        self.module.to(self.dev)
        covered = float((self.t2d[corpus.labels(self.val_seqs)] >= 0).float().mean()) if self.val_seqs else 1.0
        self.info: dict[str, object] = dict(draft_vocab=len(self.d2t), val_label_coverage=round(covered, 4),
                                            amp=self.amp, **earlier)

    def _warm_start(self, path: str, target: Llama, target_name: str) -> dict:
        """Load a head saved by an earlier run into the new module (its float16 weights, widened); the
        draft vocabulary must be the one this run would choose (same corpus, budget and seed), else its
        rows would name other tokens. Returns what the checkpoint's info should remember of it."""
        ckpt = load_checkpoint(path, target, target_name)
        if ckpt.kind != self.cfg.kind:
            raise ValueError(f"--init {path} is a {ckpt.kind} head, not {self.cfg.kind}")
        if not torch.equal(ckpt.d2t, self.d2t):
            raise ValueError(f"--init {path} drafts another vocabulary ({len(ckpt.d2t)} tokens) than this run's "
                             f"({len(self.d2t)}): train it on the same corpus with the same --train-tokens, "
                             "--draft-vocab and --seed")
        self.module.load_state_dict(ckpt.module.state_dict())
        before = ckpt.info.get("history") or []
        return dict(init=str(path), init_epochs=int(ckpt.info.get("init_epochs", 0)) + len(before),
                    init_seconds=float(ckpt.info.get("init_seconds", 0.0)) + float(ckpt.info.get("train_seconds", 0.0)))

    def _new_module(self, cfg: TrainConfig, target: Llama, corpus: Corpus) -> EagleHead | MedusaHeads | ExitAdapter:
        module: EagleHead | MedusaHeads | ExitAdapter
        if cfg.kind == "eagle":
            module = EagleHead(head_config("eagle", target))
        elif cfg.kind == "eagle3":
            taps = list(eagle3_layers(target.n_layers))
            if corpus.taps is None or corpus.meta.get("taps") != taps:
                raise ValueError(f"an eagle3 head reads the target's layers {taps}: the corpus has "
                                 f"{corpus.meta.get('taps') or 'none'} (build it with taps={taps})")
            module = EagleHead(head_config("eagle3", target, taps=taps, draft_vocab=len(self.d2t)))
            assert module.lm_head is not None
            with torch.no_grad():
                module.lm_head.copy_(self.lm_d)   # starts as the target's rows
        elif cfg.kind == "medusa":
            module = MedusaHeads(head_config("medusa", target, heads=cfg.medusa_heads))
        elif cfg.kind == "layerskip":
            module = ExitAdapter(head_config("layerskip", target, exit_layer=int(corpus.meta["mid_layer"])))
        else:
            raise ValueError(f"unknown head kind {cfg.kind!r}: choose eagle, medusa or layerskip")
        return module

    # ------------------------------------------------------------------ losses

    def _pairs(self, ranges: list[tuple[int, int]], prev: torch.Tensor):
        """Windows `ranges` of the corpus as EAGLE pairs, padded to [B, T] (with zeros): position i holds
        t_i's embedding, `prev`'s row at t_{i-1} (the feature that predicted t_i: final hidden states or
        tapped streams), the target's final hidden state at t_i, its greedy next token as a draft index
        (-100: none), whether the position is real, and its corpus index."""
        c = self.corpus
        at = torch.full((len(ranges), max(b - a for a, b in ranges) - 1), -1, dtype=torch.long, device=HOST)
        for r, (a, b) in enumerate(ranges):
            at[r, :b - a - 1] = torch.arange(a + 1, b, device=HOST)
        real = at >= 0
        i = at.clamp_min(1)
        dev = self.dev
        real_d = real.to(dev)
        zeroed = lambda t: t.to(dev).float() * real_d[..., None]
        return (zeroed(self.embed[c.tokens[i].to(dev)]), zeroed(prev[i - 1]), zeroed(c.feat[i]),
                torch.where(real, _to_draft(c.label[i], self.t2d), -100).to(dev), real_d, i)

    def _eagle_batch(self, ranges: list[tuple[int, int]], noise: bool):
        emb, inp, tgt, lab, real, idx = self._pairs(ranges, self.corpus.feat)
        if noise and self.cfg.noise > 0:
            inp = inp + torch.randn_like(inp) * self.cfg.noise * inp.std()
        return emb, inp, tgt, lab, real.long(), idx

    def _eagle_loss(self, ranges, train: bool):
        emb, inp, tgt, lab, mask, idx = self._eagle_batch(ranges, noise=train)
        ans = self.answer[idx].to(self.dev)
        m = mask.bool() & (ans | self.prompt_loss)   # the positions learnt from
        scored = ans[m]   # of those, the answers'
        pred1 = self.module(emb, inp, mask)
        # unrolled pass: each position gets the head's own prediction for the previous one
        inp2 = torch.cat([inp[:, :1], pred1[:, :-1]], dim=1)
        pred2 = self.module(emb, inp2, mask)
        losses, accs = [], []
        for pred in (pred1, pred2):
            reg = F.smooth_l1_loss(pred[m].float(), tgt[m])
            logits = (pred[m] @ self.lm_d.t()).float()   # (losses in float32 under autocast too)
            cls = F.cross_entropy(logits, lab[m], ignore_index=-100)
            losses.append(reg + W_CLS * cls)
            accs.append(_top1(logits[scored], lab[m][scored]))
        return losses[0] + losses[1], accs

    def eagle3_steps(self, ranges: list[tuple[int, int]]):
        """Training-time test over windows `ranges`: (logits [B, T, N] of each step, the target's
        distributions [B, T, N], positions learnt from [B, T], scored positions [B, T] (answers), labels
        [B, T]). Step s at window position i is the draft s levels below the committed pairs up to i - s."""
        c, m = self.corpus, self.module
        assert isinstance(m, EagleHead) and m.fuse is not None and m.lm_head is not None and c.taps is not None
        emb, taps, tfeat, lab, real, idx = self._pairs(ranges, c.taps)
        ans = self.answer[idx].to(self.dev)
        scored = real & ans
        learn = real & (ans | self.prompt_loss)
        B, T, H = emb.shape
        with torch.no_grad():   # the target's next-token distribution, on the draft vocabulary
            want = torch.softmax((tfeat @ self.lm_d.t()).float(), dim=-1)
        layer: Any = m.trunk.layers[0]   # (an HF LlamaDecoderLayer; nn.Module indexing types it loosely)
        cfg, attn = m.cfg, layer.self_attn
        nh, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        cos, sin = (t.to(self.dev) for t in _rope(T, d, cfg["rope_theta"]))
        feats = m.fused(taps)
        keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        steps = []
        for _ in range(self.cfg.ttt_steps):
            x = m.fc(torch.cat([emb, feats], dim=-1))
            h = layer.input_layernorm(x)
            q = _rotary(attn.q_proj(h).view(B, T, nh, d).transpose(1, 2), cos, sin)
            k = _rotary(attn.k_proj(h).view(B, T, kv, d).transpose(1, 2), cos, sin)
            keys.append((k, attn.v_proj(h).view(B, T, kv, d).transpose(1, 2)))
            o = _ttt_attention(q, keys, d ** -0.5)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(B, T, nh * d))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            out = m.trunk.norm(x)
            steps.append((out @ m.lm_head.t()).float())   # (losses in float32 under autocast too)
            feats = torch.cat([out.new_zeros(B, 1, H), out[:, :-1]], dim=1)   # position i drafts on from i - 1
        return steps, want, learn, scored, lab

    def _eagle3_loss(self, ranges, train: bool):
        steps, want, learn, scored, lab = self.eagle3_steps(ranges)
        losses, accs = [], []
        for s, logits in enumerate(steps):
            ok, hit = learn.clone(), scored.clone()
            ok[:, :s] = hit[:, :s] = False   # (their chains would start before the window)
            n = max(int(ok.sum()), 1)   # (a window's answer may end before step s has a position)
            losses.append(DEPTH_DECAY ** s * -(want[ok] * F.log_softmax(logits[ok], dim=-1)).sum() / n)
            accs.append(_top1(logits[hit], lab[hit]))
        return sum(losses), accs

    def _medusa_loss(self, ranges, train: bool):
        c = self.corpus
        K = self.module.cfg["heads"]
        feats, labels, scored = [], [], []
        for a, b in ranges:
            feats.append(c.feat[a:b].float())
            scored.append(self.answer[a:b])
            lab = torch.full((b - a, K), -1, dtype=torch.long, device=HOST)   # -1: past the sequence's end
            for k in range(1, K + 1):
                if b - a > k:
                    lab[:b - a - k, k - 1] = _to_draft(c.label[a + k:b], self.t2d)
            labels.append(lab)
        f, lab, ans = (torch.cat(t).to(self.dev) for t in (feats, labels, scored))
        out = (self.module(f) @ self.lm_d.t()).float()          # [n, K, N]
        ce_lab = torch.where((lab == -1) | ~(ans | self.prompt_loss)[:, None], -100, lab)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), ce_lab.reshape(-1), ignore_index=-100)
        return loss, [_top1(out[ok, k], lab[ok, k]) for k in range(K) for ok in [(lab[:, k] != -1) & ans]]

    def _layerskip_loss(self, ranges, train: bool):
        c = self.corpus
        idx = torch.cat([torch.arange(a, b, device=HOST) for a, b in ranges])
        h = self.module(c.mid[idx].to(self.dev).float())
        h = h.float()
        h = self.norm * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.target.eps))
        logits = (h @ self.lm_d.t()).float()
        lab = _to_draft(c.label[idx], self.t2d).to(self.dev)
        ans = self.answer[idx].to(self.dev)
        learn = ans | self.prompt_loss
        return F.cross_entropy(logits[learn], lab[learn], ignore_index=-100), [_top1(logits[ans], lab[ans])]

    def loss(self, ranges, train: bool):
        # under amp the float32 products (the head's, the draft LM head's) run in bfloat16; each kind's
        # loss is computed in float32 (its logits are cast back)
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
            return {"eagle": self._eagle_loss, "eagle3": self._eagle3_loss, "medusa": self._medusa_loss,
                    "layerskip": self._layerskip_loss}[self.cfg.kind](ranges, train)

    # ------------------------------------------------------------------ loop

    def _batches(self, seqs: list[int], shuffle: bool, gen: torch.Generator | None = None):
        ranges = _windows(self.corpus, seqs)
        if not self.prompt_loss:   # windows of prompt alone would add no loss
            ranges = [(a, b) for a, b in ranges if bool(self.answer[a + 1:b].any())]
        order = torch.randperm(len(ranges), generator=gen, device=HOST).tolist() if shuffle else range(len(ranges))
        batch, tokens = [], 0
        for i in order:
            a, b = ranges[i]
            batch.append((a, b))
            tokens += b - a
            if tokens >= self.cfg.batch_tokens:
                yield batch
                batch, tokens = [], 0
        if batch:
            yield batch

    def fit(self, progress: bool = True) -> dict:
        cfg = self.cfg
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        steps = cfg.epochs * sum(1 for _ in self._batches(self.train_seqs, False))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20))
            * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        gen = torch.Generator().manual_seed(cfg.seed)
        history = []
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"train {cfg.kind}", unit="batch", disable=not progress)
        for epoch in range(cfg.epochs):
            self.module.train()
            total, n = 0.0, 0
            for batch in self._batches(self.train_seqs, True, gen):
                loss, _ = self.loss(batch, train=True)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                total, n = total + float(loss.detach()), n + 1
                bar.update(1)
                bar.set_postfix(loss=f"{total / n:.3f}")
            val = self.validate()
            history.append(dict(epoch=epoch + 1, train_loss=round(total / max(n, 1), 4), **val))
            log.info("%s epoch %d: %s", cfg.kind, epoch + 1, history[-1])
        bar.close()
        self.info.update(train_seconds=round(time.perf_counter() - t0, 1), history=history,
                         train_sequences=len(self.train_seqs), val_sequences=len(self.val_seqs),
                         train_answer_tokens=int(sum(self.corpus.offsets[s + 1] - self.corpus.offsets[s]
                                                     - self.corpus.prompt_lens[s] for s in self.train_seqs)),
                         train_tokens=int(sum(self.corpus.offsets[s + 1] - self.corpus.offsets[s]
                                              for s in self.train_seqs)))
        return history[-1] if history else {}

    @torch.no_grad()
    def validate(self) -> dict:
        """Held-out loss and top-1 agreement with the target per draft depth, at answer positions (what a
        head drafts when serving; prompt positions would flatter or hurt kinds unevenly)."""
        self.module.eval()
        total, n = 0.0, 0
        hits: list[tuple[int, int]] = []   # (hits, counted) per draft depth
        for batch in self._batches(self.val_seqs, False):
            loss, accs = self.loss(batch, train=False)
            total, n = total + float(loss), n + 1
            hits = [(h[0] + a[0], h[1] + a[1]) for h, a in zip(hits, accs)] if hits else accs
        if not n:
            return {}
        return dict(val_loss=round(total / n, 4),
                    val_top1_per_depth=[round(h / max(c, 1), 4) for h, c in hits])

    def checkpoint(self, defaults: dict, recipe: dict) -> Checkpoint:
        self.module.eval().requires_grad_(False)
        return Checkpoint(self.cfg.kind, self.module, self.d2t,
                          dict(name=self.target_name, fingerprint=fingerprint(self.target)),
                          dict(self.info, defaults=defaults, recipe=recipe, corpus=self.corpus.meta))


def _rope(T: int, d: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, d] of positions 0..T-1 (relative positions are all attention sees)."""
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=HOST).float() / d))
    f = torch.arange(T, device=HOST).float()[:, None] * inv[None]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _ttt_attention(q: torch.Tensor, keys: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """Attention of training-time-test step s = len(keys) - 1: q [B, heads, T, d]; keys[j] = step j's
    (k, v) [B, kv_heads, T, d]. The query of step s at position i is a draft node s levels below a
    committed prefix ending at t_{i-s}: it sees step 0's keys at positions <= i - s (the committed
    pairs) and, for j = 1..s, step j's key at position i - s + j (its chain's nodes above it, and itself),
    as the head's tree attention shows a node its ancestors when drafting."""
    s = len(keys) - 1
    T = q.shape[2]
    grp = q.shape[1] // keys[0][0].shape[1]
    wide = lambda t: t.repeat_interleave(grp, dim=1)
    pos = torch.arange(T, device=q.device)
    k0, v0 = wide(keys[0][0]), wide(keys[0][1])
    parts = [(q @ k0.transpose(-1, -2) * scale).masked_fill(~(pos[None] <= pos[:, None] - s), float("-inf"))]
    chain = []
    for j in range(1, s + 1):   # step j's key at i - (s - j): shifted down the positions by s - j
        shift = s - j
        kj, vj = (F.pad(wide(t), (0, 0, shift, 0))[:, :, :T] for t in keys[j])
        parts.append(((q * kj).sum(-1, keepdim=True) * scale).masked_fill((pos < shift)[:, None], float("-inf")))
        chain.append(vj)
    w = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
    out = w[..., :T] @ v0
    for j, vj in enumerate(chain):
        out = out + w[..., T + j:T + j + 1] * vj
    return out


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(hits, counted) of argmax == label over labelled rows (an unlabelled row is outside the draft
    vocabulary: it counts as a miss, as it would when drafting)."""
    valid = labels != -100
    return int((logits.argmax(-1)[valid] == labels[valid]).sum()), int(labels.numel())
