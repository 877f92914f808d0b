"""A Llama-family forward pass in plain PyTorch over a preallocated KV cache.

It takes the weights of a transformers `LlamaForCausalLM` (any HF dir, GGUF, or a random tiny
config) and computes exactly what HF computes, but on arbitrary token sets: every call scores `n`
new tokens at given positions, attending to the first `ctx` cache slots through an explicit mask.
That one primitive is prefill, one-token decode and whole-tree verification alike."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of one sequence: [layers, kv_heads, max_len, head_dim] each."""

    def __init__(self, layers: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype):
        # torch.empty: pages are only touched when written, so a long max_len costs nothing up front
        self.k = torch.empty(layers, kv_heads, max_len, head_dim, dtype=dtype)
        self.v = torch.empty(layers, kv_heads, max_len, head_dim, dtype=dtype)
        self.max_len = max_len

    def move(self, src: torch.Tensor, dst_start: int) -> None:
        """Copy the slots `src` (ascending, src[i] >= dst_start + i) to dst_start.. : keeps an accepted
        branch and drops its rejected siblings without touching the rest of the cache."""
        n = src.numel()
        self.k[:, :, dst_start:dst_start + n] = self.k[:, :, src]
        self.v[:, :, dst_start:dst_start + n] = self.v[:, :, src]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # as HF: normalise in float32, scale in the model dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Llama(nn.Module):
    def __init__(self, hf_model: nn.Module, max_len: int):
        super().__init__()
        cfg = hf_model.config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"unsupported rope_type {rope.get('rope_type')!r} (only default RoPE)")
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_len = min(max_len, cfg.max_position_embeddings)
        self.config = cfg
        m = hf_model.model
        self.dtype = m.embed_tokens.weight.dtype
        # detached views of HF's parameters: no copy, no autograd
        self.embed = m.embed_tokens.weight.detach()
        self.lm_head = hf_model.lm_head.weight.detach()
        self.norm = m.norm.weight.detach()
        # weights of each layer, q/k/v and gate/up fused: one matmul instead of three (two)
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                o=a.o_proj.weight.detach(), gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                down=mlp.down_proj.weight.detach()))
        # RoPE tables computed as HF does (float32 outer product, then cast)
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        freqs = torch.arange(self.max_len).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.dtype)
        self.sin = emb.sin().to(self.dtype)

    def new_cache(self, max_len: int | None = None) -> KVCache:
        return KVCache(self.n_layers, self.n_kv, min(max_len or self.max_len, self.max_len), self.head_dim, self.dtype)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Score tokens [n] at positions [n]; their K/V go to cache slots start..start+n-1.

        mask: [n, start + n] bool (True = may attend), or None for plain causal attention.
        Returns the final hidden states [n, hidden] (before the LM head)."""
        n = tokens.numel()
        ctx = start + n
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions][None], self.sin[positions][None]   # [1, n, d]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if mask is not None:
            attn_mask, causal = mask[None], False
        elif n == 1:
            attn_mask, causal = None, False
        else:
            # causal over new tokens, everything before `start` visible
            attn_mask = torch.ones(n, ctx, dtype=torch.bool).tril(diagonal=start)[None]
            causal = False
        for i, w in enumerate(self.layers):
            h = _rms_norm(x, w["ln1"], self.eps)
            q, k, v = F.linear(h, w["qkv"]).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(n, self.n_heads, self.head_dim).transpose(0, 1)
            k = k.view(n, self.n_kv, self.head_dim).transpose(0, 1)
            v = v.view(n, self.n_kv, self.head_dim).transpose(0, 1)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache.k[i, :, start:ctx] = k
            cache.v[i, :, start:ctx] = v
            o = F.scaled_dot_product_attention(
                q[None], cache.k[i, :, :ctx][None], cache.v[i, :, :ctx][None],
                attn_mask=attn_mask, is_causal=causal, enable_gqa=self.n_heads != self.n_kv)[0]
            x = x + F.linear(o.transpose(0, 1).reshape(n, q_size), w["o"])
            h = _rms_norm(x, w["ln2"], self.eps)
            gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w["down"])
        return _rms_norm(x, self.norm, self.eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)
