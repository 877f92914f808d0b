"""A decoder forward pass in plain PyTorch over a preallocated KV cache: Llama, and the families that
differ from it in a few places (family.py: Mistral, Qwen2, Qwen3, Gemma 3).

It takes the weights of a transformers causal LM (any HF dir, GGUF, or a random tiny config) and
computes exactly what HF computes, but on arbitrary token sets: every call scores `n` new tokens at
given positions, attending to the first `ctx` cache positions through an explicit mask. That one
primitive is prefill, one-token decode and whole-tree verification alike."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import attention
from . import exact as _exact
from . import family as _family
from . import products as _products
from .kvcache import HOST, KVCache, KVPool
from .products import OutIn, Weight
from .quant import Int4Weight, Int8Weight

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)   # eq=False: tensors do not compare to one bool
class BatchItem:
    """One sequence's share of a forward: tokens [n] at positions [n], their K/V to cache positions
    start..start+n-1; mask [n, start + n] bool (True = may attend), or None for plain causal attention."""
    ids: torch.Tensor
    positions: torch.Tensor
    cache: KVCache
    start: int
    mask: torch.Tensor | None


@dataclass
class Layer:
    """A decoder layer's weights: its norms (before attention, before the MLP; Gemma's after each too;
    Qwen3's and Gemma's over each head's q and k), its products (PRODUCTS), q/k/v and gate/up fused,
    and their biases where the family has them."""
    ln1: torch.Tensor
    ln2: torch.Tensor
    products: dict[str, Weight]
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn: torch.Tensor | None = None
    post_mlp: torch.Tensor | None = None


PRODUCTS = ("qkv", "o", "gate_up", "down")   # a layer's weight products, q/k/v and gate/up fused


def _layer(layer: Any, gemma: bool) -> Layer:
    """An HF decoder layer's weights (detached views, products transposed)."""
    def weight(module: Any) -> torch.Tensor:
        return module.weight.detach()
    a = layer.self_attn
    biases = {key: b for key in PRODUCTS if (b := _bias(layer, key)) is not None}
    qk = hasattr(a, "q_norm")
    return Layer(weight(layer.input_layernorm),
                 weight(layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm),
                 {key: _t(_fused(layer, key)) for key in PRODUCTS}, biases,
                 weight(a.q_norm) if qk else None, weight(a.k_norm) if qk else None,
                 weight(layer.post_attention_layernorm) if gemma else None,
                 weight(layer.post_feedforward_layernorm) if gemma else None)


def _bias(layer: Any, key: str) -> torch.Tensor | None:
    """The bias of product `key` (fused like its weight; a part without one adds zeros), None without any."""
    a, mlp = layer.self_attn, layer.mlp
    parts = {"qkv": [a.q_proj, a.k_proj, a.v_proj], "o": [a.o_proj], "gate_up": [mlp.gate_proj, mlp.up_proj],
             "down": [mlp.down_proj]}[key]
    if all(getattr(p, "bias", None) is None for p in parts):
        return None
    return torch.cat([p.bias.detach() if getattr(p, "bias", None) is not None else
                      p.weight.new_zeros(p.weight.shape[0]) for p in parts])


def _fused(layer: Any, key: str) -> torch.Tensor:
    """An HF decoder layer's weight for product `key` ([out, in]): q/k/v, gate/up concatenated."""
    a, mlp = layer.self_attn, layer.mlp
    if key == "qkv":
        return torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
    if key == "gate_up":
        return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    return {"o": a.o_proj, "down": mlp.down_proj}[key].weight


def _t(w: torch.Tensor) -> torch.Tensor:
    """A weight [out, in] as a contiguous [in, out] copy for `x @ w`."""
    return w.detach().t().contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Llama(nn.Module):
    def __init__(self, hf_model: Any, max_len: int, tune: bool = True):
        """hf_model: a transformers causal LM of a family.py family, or anything with a
        LlamaForCausalLM's attributes (heads.py). tune: time the product layouts now (products.py);
        False for a model about to be quantised, whose products then run as codes."""
        super().__init__()
        cfg = hf_model.config
        self.family = fam = _family.of(cfg)   # ValueError naming an architecture it does not serve
        self.n_layers: int = cfg.num_hidden_layers
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv: int = cfg.num_key_value_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps: float = cfg.rms_norm_eps
        self.vocab_size: int = cfg.vocab_size
        self.max_len: int = min(max_len, cfg.max_position_embeddings)
        self.config = cfg
        m = hf_model.model
        self.dtype: torch.dtype = m.embed_tokens.weight.dtype
        # detached views of HF's parameters: no copy, no autograd
        self.embed: torch.Tensor = m.embed_tokens.weight.detach()
        self.lm_head: torch.Tensor = hf_model.lm_head.weight.detach()
        self.norm: torch.Tensor = m.norm.weight.detach()
        # weights of each layer, q/k/v and gate/up fused (one matmul instead of three, two), stored
        # transposed ([in, out], contiguous) for `x @ w`, the product exact forwards run; where another
        # layout is faster on this machine, forwards that need not be exact use it (products.py, `tune`)
        self.layers = [_layer(layer, fam.gemma) for layer in m.layers]
        self.lm_head_t: Weight = _t(self.lm_head)
        self.head_cut: int | None = None     # rows from which the LM head runs as lm_head @ x.T
        # layers whose output residual streams every full forward also returns, after the final hidden
        # states (EAGLE-3 heads draft from them: `tap`)
        self.taps: tuple[int, ...] = ()
        # new pools keep every cached position's output row (KVPool.f): set where a feature head drafts
        # from this target, whose prompts may then reuse cached prefixes and enter the cache in chunks
        self.keep_features = False
        # RoPE tables computed as HF does (float32 outer product, then cast), one per layer type
        self.rope = {kind: self._rope_table(theta, factor) for kind, (theta, factor) in fam.rope.items()}
        # row-invariant decode/verify (exact.py): on by default below float32
        self.quantized: str | None = None   # "int8" / "int4": weight-only codes (quant.py)
        self._exact = False
        self._exact_rows: _exact.ExactRows | None = None
        self.exact_prefill = _exact.prefill_on()  # prompts' rows exact too (where exact): see exact.prefill_on
        self._hf_layers = m.layers               # dense weights, for `dense` once quantised
        self.exact = self.exact_by_default
        if tune and not self.exact and self.device.type == "cpu":   # (layouts timed for CPU BLAS)
            self.tune()

    @property
    def device(self) -> torch.device:
        """Where the weights, the KV cache and every forward's work live (loader.resolve_device)."""
        return self.embed.device

    def tap(self, layers: tuple[int, ...]) -> None:
        """Return the residual streams after `layers` too, from the next forward on: each row of
        forward_batch's result becomes [final hidden | after taps[0] | after taps[1] ...], H columns each
        (`logits` reads the first H)."""
        if any(not 0 <= i < self.n_layers - 1 for i in layers):
            raise ValueError(f"taps {layers}: layers 0 .. {self.n_layers - 2} only (the last one's output is the "
                             "final hidden state)")
        self.taps = tuple(sorted(set(self.taps) | set(layers)))

    def _rope_table(self, theta: float, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        # on the CPU, then moved: the same table bits on every device
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=HOST).float()
                                    / self.head_dim))
        freqs = torch.arange(self.max_len, device=HOST).float()[:, None] * (inv_freq / factor)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype).to(self.device), emb.sin().to(self.dtype).to(self.device)

    def tune(self) -> None:
        """Each product in the layouts its non-exact forwards run fastest with here (products.py): where
        the transposed product wins from some row count on, the layers keep an [out, in] copy too."""
        cuts, extra = {}, 0
        for key in PRODUCTS:
            ws = [w for layer in self.layers if isinstance(w := layer.products[key], torch.Tensor)]
            if len(ws) < len(self.layers):
                continue
            tuned = [OutIn(w, 0) for w in ws]
            at = _products.cut(ws, [t.w for t in tuned])
            if at is not None:
                for layer, t in zip(self.layers, tuned):
                    t.cut = at
                    layer.products[key] = t
                cuts[key], extra = at, extra + sum(w.nbytes for w in ws)
        if isinstance(self.lm_head_t, torch.Tensor):
            self.head_cut = _products.cut([self.lm_head_t], [self.lm_head])
            if self.head_cut is not None:
                cuts["lm_head"] = self.head_cut
        if cuts:
            log.info("transposed products (rows from which): %s; their second layout takes %.2f GiB",
                     ", ".join(f"{k} {m}" for k, m in cuts.items()), extra / 2 ** 30)

    @property
    def exact(self) -> bool:
        """Forwards compute each row as any row count would (exact.py)."""
        return self._exact

    @exact.setter
    def exact(self, on: bool) -> None:
        self._exact = on
        if on:   # exact forwards run x @ w [in, out], the product exact.py probes
            for layer in self.layers:
                for key, w in layer.products.items():
                    if isinstance(w, OutIn):
                        layer.products[key] = w.dense()
            self.head_cut = None

    def quantize_int8(self) -> None:
        """Weight-only int8 for every layer product and the LM head (quant.py); the embedding stays
        dense (a gather reads one row per token). Exact decode/verify turns on: int8 products are
        row-invariant already, so it only costs the attention split."""
        self._quantize("int8", {})

    def quantize_int4(self, stored: dict[str, Int4Weight]) -> None:
        """Weight-only int4 for every layer product and the LM head: `stored` ("i.key", "lm_head": a
        GGUF's blocks as stored, gguf_blocks.products), the others quantised from the dense weights."""
        self._quantize("int4", stored)

    def _quantize(self, kind: str, stored: dict[str, Int4Weight]) -> None:
        if self.dtype != torch.float32:
            raise ValueError(f"{kind} weights need a float32 model, got {self.dtype}")
        codes: Callable[[torch.Tensor], Weight] = Int8Weight if kind == "int8" else Int4Weight.quantize
        own = 0
        for i, layer in enumerate(self.layers):
            for key in PRODUCTS:
                from_file = stored.get(f"{i}.{key}")
                layer.products[key] = from_file if from_file is not None else codes(self.dense(i, key))
                own += from_file is None
        head = stored.get("lm_head")
        self.lm_head_t = head if head is not None else codes(self.lm_head.t())
        if kind == "int4":
            log.info("int4 weights: %d of %d products as the GGUF stores them, %d quantised here",
                     len(stored), len(self.layers) * len(PRODUCTS) + 1, own + (head is None))
        self.head_cut = None
        self.quantized = kind
        self.exact = self.exact_by_default
        self._exact_rows = None

    @property
    def exact_by_default(self) -> bool:
        """Exact decode/verify rows unless DRAFTHORSE_EXACT says otherwise: below float32, and for int8 and
        int4 (whose products round their inputs to bfloat16)."""
        return _exact.default_on(torch.bfloat16 if self.quantized else self.dtype)

    @property
    def exact_rows(self) -> _exact.ExactRows:
        """The row counts exact forwards pad to on this machine: probed on first use (exact.probe), or
        as set (tests)."""
        if self._exact_rows is None:
            self._exact_rows = _exact.probe({**self.layers[0].products, "lm_head": self.lm_head_t}, self.dtype,
                                            self.n_heads, self.n_kv, self.head_dim)
        return self._exact_rows

    @exact_rows.setter
    def exact_rows(self, rows: _exact.ExactRows) -> None:
        self._exact_rows = rows

    def dense(self, i: int, key: str) -> torch.Tensor:
        """Layer i's weight `key` ([in, out], as stored) as the source model has it, quantised or not."""
        w = self.layers[i].products[key]
        if isinstance(w, OutIn):
            return w.dense()
        return w if isinstance(w, torch.Tensor) else _t(_fused(self._hf_layers[i], key))

    def _linear(self, x: torch.Tensor, w: Weight, exact: bool) -> torch.Tensor:
        """x @ w (w: [in, out]); in exact forwards in calls on row counts at which w's products round
        every row alike (exact.probe): padded with dummy zero rows (dropped again) up to the next such
        count, and in several calls of the largest while more rows are left."""
        if isinstance(w, OutIn):
            if not exact:
                return w.mm(x)
            w = w.dense()             # an exact forward on a non-exact model: the probed x @ w
        if isinstance(w, Int8Weight | Int4Weight):
            return w.mm(x)            # row-invariant at every row count (quant.py): no padding
        n = x.shape[0]
        if not exact:
            return x @ w
        counts = self.exact_rows.counts(tuple(w.shape))
        top = counts[-1]
        if n > top:   # more rows than a probed call holds
            return torch.cat([self._linear(x[i:i + top], w, True) for i in range(0, n, top)])
        need = _exact.rows(n, counts)
        if n == need:
            return x @ w
        return (torch.cat([x, x.new_zeros(need - n, x.shape[1])]) @ w)[:n]

    def weight_bytes(self) -> int:
        """Bytes of weights one forward reads: every layer's products (in the layout exact forwards run)
        and norms, the final norm and the LM head (the embedding: one row a token, left out)."""
        def size(w: Weight) -> int:
            if isinstance(w, OutIn):
                w = w.dense()
            return w.nbytes if isinstance(w, Int8Weight | Int4Weight) else w.numel() * w.element_size()
        norms = [t for layer in self.layers for t in (layer.ln1, layer.ln2, layer.q_norm, layer.k_norm,
                                                      layer.post_attn, layer.post_mlp) if t is not None]
        return (sum(size(w) for layer in self.layers for w in layer.products.values()) + size(self.lm_head_t)
                + sum(t.numel() * t.element_size() for t in [*norms, self.norm]))

    def new_pool(self, slots: int, max_len: int | None = None, commit: bool = False) -> KVPool:
        """K/V for `slots` sequences of up to max_len tokens (the model's context at most), and their output
        rows where `keep_features`; `commit`: all its memory now (kvcache.py)."""
        features = self.config.hidden_size * (1 + len(self.taps)) if self.keep_features else 0
        return KVPool(self.n_layers, slots, self.n_kv, min(max_len or self.max_len, self.max_len), self.head_dim,
                      self.dtype, align=_exact.VBLOCK, commit=commit, device=self.device, features=features)

    @property
    def prefixes_travel(self) -> bool:
        """Whether another slot's K/V of a prefix may stand in for this slot's own prefill of it. Exact
        forwards need exact prefill for that (a token's K/V then do not depend on how it entered the
        cache); wider dtypes round prefill products with whatever shares their pass already, and a
        copy is one more such pass."""
        return self.exact_prefill if self.exact else self.dtype in (torch.float32, torch.float64)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """A cache of its own (a pool of one slot)."""
        return self.new_pool(1, max_len).cache(0)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                mask: torch.Tensor | None, exact: bool = False) -> torch.Tensor:
        """Score tokens [n] at positions [n]; their K/V go to cache slots start..start+n-1.

        mask: [n, start + n] bool (True = may attend), or None for plain causal attention.
        exact: compute each row as any other row count would (exact.py).
        Returns the final hidden states [n, hidden] (before the LM head)."""
        return self.forward_batch([BatchItem(tokens, positions, cache, start, mask)], exact=exact)[0]

    @torch.inference_mode()
    def forward_batch(self, items: list[BatchItem], exact: bool | None = None, embeds: torch.Tensor | None = None,
                      layers: int | None = None, prefill: bool = False) -> list[torch.Tensor]:
        """Several sequences in one pass (ragged: each its own tokens, positions, cache and mask).

        Every product runs on all rows together; each layer writes all new K/V with one indexed copy
        per pool and runs attention for all sequences in a few bucketed calls (attention.py). Returns
        each sequence's final hidden states (and the residual streams of `taps` after them). exact
        (default: the model's setting): row-invariant, so a sequence's rows do not depend on how many
        rows share the pass; its attention runs in exact.py's buckets. embeds: the input rows instead
        of the tokens' embeddings (a draft head's own inputs); layers: run only the first `layers`
        layers and return the residual stream after them (layer-skip drafting; their K/V go to the
        cache like any other). prefill: chains entering the cache (prompts): products as the model's
        exact setting has them, and attention too (exact buckets, so a prompt token's K/V are those a
        decode or verify row would give it) unless `exact_prefill` is off; then each sequence's
        attention runs in an SDPA call of its own, so its rows are still those of its prefill alone
        whatever shares the pass."""
        sizes = [it.ids.numel() for it in items]
        fam = self.family
        dev = self.device
        if embeds is None:
            x = F.embedding(torch.cat([it.ids for it in items]).to(dev, non_blocking=True), self.embed)
            if fam.embed_scale is not None:   # as Gemma: the scale cast to the model dtype, then multiplied
                x = x * torch.tensor(fam.embed_scale, dtype=x.dtype, device=HOST)   # (a scalar: no copy to dev)
        else:
            x = embeds
        pos = torch.cat([it.positions for it in items])   # (on the host: the layouts are built there)
        pos_d = pos.to(dev, non_blocking=True)
        if prefill:   # products as the model's exact setting has them; attention too, unless opted out
            exact, mm_exact = self.exact and self.exact_prefill, self.exact
        else:
            exact = mm_exact = self.exact if exact is None else exact
        rope = {kind: (cos[pos_d][:, None], sin[pos_d][:, None]) for kind, (cos, sin) in self.rope.items()}  # [N, 1, d]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        # where each row reads its keys, per kind of layer: once per forward, not per layer (a sliding
        # layer's own only where some row sees past its window)
        full = self._groups(items, sizes, exact, prefill, None)
        groups = {"full_attention": full}
        if fam.window:
            groups["sliding_attention"] = self._groups(items, sizes, exact, prefill, fam.window) \
                if int(pos.max()) >= fam.window else full
        total = x.shape[0]
        taps = self.taps if layers is None else ()
        kept = []
        for i, w in enumerate(self.layers[:layers]):
            h = self.rms(x, w.ln1)
            q_k, v = self._product(h, w, "qkv", mm_exact).split([q_size + kv_size, kv_size], dim=-1)
            v = v.view(total, self.n_kv, self.head_dim)
            cos, sin = rope[fam.layer_types[i]]
            if w.q_norm is None or w.k_norm is None:   # q and k side by side: rotated in one pass
                qk = q_k.view(total, self.n_heads + self.n_kv, self.head_dim)
                q, k = (qk * cos + _rotate_half(qk) * sin).split([self.n_heads, self.n_kv], dim=1)
            else:   # normed over each head's q and k before RoPE (Qwen3, Gemma 3)
                q, k = q_k.split([q_size, kv_size], dim=-1)
                q = self.rms(q.view(total, self.n_heads, self.head_dim), w.q_norm)
                k = self.rms(k.view(total, self.n_kv, self.head_dim), w.k_norm)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            o = self._product(self._attend(i, q, k, v, groups[fam.layer_types[i]]).reshape(total, q_size), w, "o",
                              mm_exact)
            x = x + (o if w.post_attn is None else self.rms(o, w.post_attn))
            h = self.rms(x, w.ln2)
            gate, up = self._product(h, w, "gate_up", mm_exact).chunk(2, dim=-1)
            act = F.silu(gate) if fam.activation == "silu" else F.gelu(gate, approximate="tanh")
            o = self._product(act * up, w, "down", mm_exact)
            x = x + (o if w.post_mlp is None else self.rms(o, w.post_mlp))
            if i in taps:
                kept.append(x)
        if layers is not None:
            return list(x.split(sizes))
        h = self.rms(x, self.norm)
        return list((torch.cat([h, *kept], dim=-1) if kept else h).split(sizes))

    def _groups(self, items: list[BatchItem], sizes: list[int], exact: bool, prefill: bool,
                window: int | None) -> list[tuple[torch.Tensor | None, attention.Layout]]:
        """(batch rows, layout) per KV pool (a worker's sequences share one; a drafter's runner may have its
        own); window: a sliding layer's (a row sees only the `window` positions up to its own)."""
        plans = [_exact.plan(it.positions, it.start, it.mask, window) for it in items] if exact else []
        offsets = list(itertools.accumulate(sizes, initial=0))   # each sequence's first row
        by_pool: dict[int, list[int]] = {}
        for j, it in enumerate(items):
            by_pool.setdefault(id(it.cache.pool), []).append(j)
        groups = []
        for js in by_pool.values():
            rows = None if len(by_pool) == 1 else torch.cat(
                [torch.arange(offsets[j], offsets[j + 1], device=self.device) for j in js])
            lay = attention.layout(items[js[0]].cache.pool, [items[j].cache.slot for j in js],
                                   [items[j].start for j in js], [sizes[j] for j in js],
                                   [items[j].mask for j in js], buckets=not exact,
                                   per_kv=self.n_heads // self.n_kv, alone=prefill,
                                   window=window, positions=[items[j].positions for j in js])
            if exact:
                rs = self.exact_rows
                firsts = list(itertools.accumulate([sizes[j] for j in js], initial=0))   # rows within the pool's
                pool = items[js[0]].cache.pool
                lay.exact = _exact.buckets([items[j].cache.slot for j in js], firsts, [plans[j] for j in js],
                                           [sizes[j] for j in js], (self.n_kv, pool.k.shape[3]), self.dtype,
                                           rs.attn, rs.batched, self.device)
            groups.append((rows, lay))
        return groups

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The family's RMSNorm of x with `weight`."""
        return _family.rms_norm(x, weight, self.eps, self.family.gemma)

    def _product(self, x: torch.Tensor, w: Layer, key: str, exact: bool) -> torch.Tensor:
        """Layer product `key` on x, plus its bias where the family has one."""
        out = self._linear(x, w.products[key], exact)
        return out if key not in w.biases else out + w.biases[key]

    def _attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list) -> torch.Tensor:
        """Layer i's attention: the rows' K/V into their slots (one indexed copy per pool), then every
        sequence's rows in a few bucketed calls (attention.py; exact.py's buckets when exact)."""
        if len(groups) == 1:
            _, lay = groups[0]
            attention.write(lay, i, k, v)
            return self._attend_pool(i, lay, q)
        o = torch.empty_like(q)
        for rows, lay in groups:
            attention.write(lay, i, k[rows], v[rows])
            o[rows] = self._attend_pool(i, lay, q[rows])
        return o

    def _attend_pool(self, i: int, lay: attention.Layout, q: torch.Tensor) -> torch.Tensor:
        scale = self.family.scale
        if lay.exact is None:
            return attention.attend(lay, i, q, scale)
        return _exact.attend(lay.exact, lay.pool.k[i], lay.pool.v[i], q, scale or self.head_dim ** -0.5)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # in at least float32, as HF's generate takes them: argmax over bfloat16 is 5x slower
        if self.taps:   # rows with tapped streams after the final hidden state
            hidden = hidden[..., :self.config.hidden_size].contiguous()
        if self.head_cut is not None and hidden.shape[0] >= self.head_cut:
            out = (self.lm_head @ hidden.t()).t().contiguous()   # (never exact: head_cut is None then)
        else:
            out = self._linear(hidden, self.lm_head_t, self.exact)
        if self.family.final_softcap:   # as Gemma, in the model dtype
            out = torch.tanh(out / self.family.final_softcap) * self.family.final_softcap
        return out if out.dtype in (torch.float32, torch.float64) else out.float()
