"""What a decoder family computes differently from Llama, read from its transformers config.

    llama, mistral   the baseline (Mistral: sliding-window attention where its config sets a window)
    qwen2            q/k/v projections with biases
    qwen3            RMSNorm over each head's q and k before RoPE
    gemma3_text      norms scale by (1 + w) in float32; a norm after attention and around the MLP
                     ("sandwich"); embeddings scaled by sqrt(hidden); GELU-tanh MLP; attention scaled by
                     query_pre_attn_scalar; q/k norms; local (sliding-window) layers with their own RoPE base
                     between global ones; final logits soft-capped where configured

Sliding windows: a local layer lets a token see the `window` positions up to its own (llama.py gives
those layers masks of their own, attention.py and exact.py a lower key bound that depends on the
row's position alone)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class Family:
    name: str
    gemma: bool = False                  # (1 + w) norms, sandwich norms, scaled embeddings
    qk_norm: bool = False
    activation: str = "silu"
    scale: float | None = None           # attention scale; None: head_dim ** -0.5
    embed_scale: float | None = None
    layer_types: tuple[str, ...] = ()    # per layer: "full_attention" | "sliding_attention"
    rope: dict[str, tuple[float, float]] = field(default_factory=dict)   # layer type -> (theta, linear factor)
    window: int | None = None            # the sliding layers' window
    final_softcap: float | None = None


def _rope(params: dict, default_theta: float) -> tuple[float, float]:
    """(theta, linear factor) of one RoPE parameter set; other RoPE types are refused."""
    kind = params.get("rope_type", "default") or "default"
    if kind not in ("default", "linear"):
        raise ValueError(f"unsupported rope_type {kind!r} (default and linear RoPE are served)")
    return float(params.get("rope_theta", default_theta)), float(params.get("factor", 1.0)) if kind == "linear" else 1.0


def of(cfg: Any) -> Family:
    """The family of a transformers config (a LlamaConfig-like namespace without model_type is Llama)."""
    name = getattr(cfg, "model_type", "llama") or "llama"
    if name not in SUPPORTED:
        raise ValueError(f"unsupported architecture {name!r}: drafthorse runs {', '.join(SUPPORTED)}")
    n = cfg.num_hidden_layers
    types = tuple(getattr(cfg, "layer_types", None) or ["full_attention"] * n)
    window = getattr(cfg, "sliding_window", None) if name in ("mistral", "gemma3_text") or \
        getattr(cfg, "use_sliding_window", False) else None
    if window and name == "mistral" and not getattr(cfg, "layer_types", None):
        types = ("sliding_attention",) * n           # Mistral's window applies to every layer
    if not window or "sliding_attention" not in types:
        window, types = None, ("full_attention",) * n
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r} ({', '.join(ACTIVATIONS)} are served)")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ValueError("attention logit soft-capping is not served")
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = getattr(cfg, "rope_theta", None) or 10000.0
    if all(t in params for t in set(types)):        # one parameter set per layer type (Gemma 3)
        rope = {t: _rope(params[t], theta) for t in set(types)}
    else:
        rope = {t: _rope(params, theta) for t in set(types)}
    gemma = name == "gemma3_text"
    return Family(name=name, gemma=gemma, qk_norm=name in ("qwen3", "gemma3_text"), activation=act,
                  scale=cfg.query_pre_attn_scalar ** -0.5 if gemma else None,
                  embed_scale=cfg.hidden_size ** 0.5 if gemma else None, layer_types=types, rope=rope,
                  window=window, final_softcap=getattr(cfg, "final_logit_softcapping", None))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """As the family's own RMSNorm: normalise in float32; Llama scales in the model dtype by w, Gemma in
    float32 by (1 + w)."""
    wide = x.dtype == torch.float32   # no casts to dispatch (a decode step runs 61 norms)
    h = x if wide else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (h * (1.0 + weight.float())).to(x.dtype)
    return weight * (h if wide else h.to(x.dtype))
