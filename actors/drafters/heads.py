"""Trained draft heads over a frozen target, and their checkpoints.

    EagleHead      (target feature f_{i-1}, embedding of token t_i) -> fc -> one decoder layer -> f̂_i;
                   the target's own LM head turns f̂_i into the next token's distribution, and f̂_i
                   feeds the next draft step (autoregression at the feature level)
                   eagle3 (EAGLE-3): the feature of a committed token is the target's low, middle and
                   high residual streams (`eagle3_layers`) fused by a projection; the head predicts
                   tokens through an LM head of its own (no feature regression), and f̂ is only what
                   it feeds itself
    MedusaHeads    K residual blocks on the last feature f_{n-1}; block k predicts token t_{n+k}
    ExitAdapter    the residual stream after the target's first L layers -> one residual block ->
                   the target's final norm and LM head (layer-skip self-speculation)

Every head predicts over a reduced draft vocabulary: the target's LM head restricted to the most
frequent target tokens in the training data (`d2t`, draft index -> target id), a fraction of the full
head's cost per draft step. Only the heads' own weights are saved (fp16 safetensors), with the
config, d2t and the target's fingerprint: a head refuses to load against another target."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel

from drafthorse.actors.models.llama import Llama
from drafthorse.runtime.kinds import HEAD_KINDS


def fingerprint(model: Llama) -> str:
    """Identity of a target's weights, the same at every dtype it is loaded in (hashed in bfloat16;
    an int8 model hashes the weights it was quantised from)."""
    h = hashlib.sha256()
    h.update(json.dumps([model.n_layers, model.n_heads, model.n_kv, model.head_dim, model.vocab_size]).encode())
    for t in (model.embed[:1024], model.lm_head[-1024:], model.norm, model.dense(0, "qkv")[:, :256],
              model.dense(model.n_layers - 1, "down")[:256]):
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:24]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class ResBlock(nn.Module):
    """x + W_out silu(W_in x); W_out starts at zero, so an untrained block is the identity."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.inp = nn.Linear(dim, inner, bias=False)
        self.out = nn.Linear(inner, dim, bias=False)
        nn.init.zeros_(self.out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(F.silu(self.inp(x)))


def eagle3_layers(n_layers: int) -> tuple[int, ...]:
    """The target layers whose outputs an EAGLE-3 head fuses: low, middle, high (as SpecForge picks them:
    1, N/2 - 1, N - 4), kept below the last layer (whose output is the final hidden state) in a shallow
    target, where they may coincide."""
    return tuple(sorted({min(max(i, 0), n_layers - 2) for i in (1, n_layers // 2 - 1, n_layers - 4)}))


class EagleHead(nn.Module):
    def __init__(self, cfg: dict):
        """cfg["taps"]: the target layers fused into a committed token's feature (eagle3), else the
        target's final hidden state is the feature; cfg["draft_vocab"]: an LM head of its own over that
        many draft tokens (eagle3), else the target's rows of them."""
        super().__init__()
        H = cfg["hidden_size"]
        self.cfg = cfg
        # each tapped stream RMS-normed first: residual streams grow with depth, and a few of their
        # dimensions are outliers hundreds of times the rest (as EAGLE-3 norms its fused input)
        self.tap_norms = nn.ModuleList(RMSNorm(H, cfg["rms_norm_eps"]) for _ in cfg.get("taps") or ())
        self.fuse = nn.Linear(H * len(cfg["taps"]), H, bias=False) if cfg.get("taps") else None
        self.lm_head = nn.Parameter(torch.zeros(cfg["draft_vocab"], H)) if cfg.get("draft_vocab") else None
        self.fc = nn.Linear(2 * H, H, bias=False)
        # one Llama decoder layer (and its final norm) with the target's dimensions; vocab 1: the
        # head reads the target's embeddings, it has none of its own
        # (rope_theta: a parameter in transformers 4, taken from its kwargs by 5, whose signature lacks it)
        self.trunk = LlamaModel(LlamaConfig(  # type: ignore[call-arg]
            vocab_size=1, hidden_size=H, intermediate_size=cfg["intermediate_size"], num_hidden_layers=1,
            num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_key_value_heads"],
            head_dim=cfg["head_dim"], rms_norm_eps=cfg["rms_norm_eps"], max_position_embeddings=cfg["max_len"],
            rope_theta=cfg["rope_theta"], pad_token_id=None, bos_token_id=None, eos_token_id=None))

    def inputs(self, emb: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([emb, feat], dim=-1))

    def fused(self, taps: torch.Tensor) -> torch.Tensor:
        """[..., k * H] tapped streams (eagle3) -> the feature [..., H] of the token they predicted."""
        assert self.fuse is not None
        parts = taps.chunk(len(self.tap_norms), dim=-1)
        return self.fuse(torch.cat([norm(p) for norm, p in zip(self.tap_norms, parts)], dim=-1))

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, attention_mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """Training: [B, T, H] embeddings of t_i and features f_{i-1} -> predicted f̂_i [B, T, H]."""
        return self.trunk(inputs_embeds=self.inputs(emb, feat), attention_mask=attention_mask).last_hidden_state

    def as_llama(self, target: Llama, d2t: torch.Tensor, max_len: int) -> Llama:
        """The head as a 1-layer `Llama` for inference (KV cache, tree attention, ModelRunner), reading
        the target's embeddings and its LM head rows of the draft vocabulary; weights in target dtype."""
        trunk = self.trunk.to(target.device, target.dtype)   # type: ignore[arg-type]  # .to unbound in its types
        cfg = trunk.config
        lm_head = target.lm_head[d2t] if self.lm_head is None else self.lm_head.detach().to(target.device, target.dtype)
        shell = SimpleNamespace(
            config=SimpleNamespace(**{**cfg.to_dict(), "vocab_size": target.vocab_size}),
            model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=target.embed), layers=trunk.layers,
                                  norm=trunk.norm),
            lm_head=SimpleNamespace(weight=lm_head))
        head = Llama(shell, max_len, tune=target.quantized is None)
        if target.quantized == "int8":   # a quantised target's head reads codes too: a draft step stays cheap
            head.quantize_int8()
        elif target.quantized == "int4":
            head.quantize_int4({})
        head.exact = False     # a proposal only: the fast kernels are right for it
        return head


class MedusaHeads(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(ResBlock(cfg["hidden_size"], cfg["hidden_size"]) for _ in range(cfg["heads"]))

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., K, H]: block k's feature for the token k + 1 steps past the LM head's."""
        return torch.stack([b(feat) for b in self.blocks], dim=-2)


class ExitAdapter(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.block = ResBlock(cfg["hidden_size"], cfg["hidden_size"])

    def forward(self, mid: torch.Tensor) -> torch.Tensor:
        """Residual stream after `exit_layer` layers -> a feature for the target's final norm + LM head."""
        return self.block(self.norm(mid))


MODULES = {"eagle": EagleHead, "eagle3": EagleHead, "medusa": MedusaHeads, "layerskip": ExitAdapter}


def head_config(kind: str, target: Llama, **extra) -> dict:
    """The dimensions a head of `kind` takes from its target, plus kind-specific settings."""
    cfg = target.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    return dict(kind=kind, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_attention_heads=target.n_heads, num_key_value_heads=target.n_kv, head_dim=target.head_dim,
                rms_norm_eps=target.eps, rope_theta=rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)),
                max_len=target.max_len, **extra)


@dataclass
class Checkpoint:
    kind: str
    module: nn.Module
    d2t: torch.Tensor                       # [N] target ids of the draft vocabulary
    target: dict                            # {"name", "fingerprint"}
    info: dict = field(default_factory=dict)  # training recipe and validation results

    def save(self, path: str | Path) -> None:
        tensors = {f"module.{k}": v.detach().to("cpu", torch.float16).contiguous()
                   for k, v in self.module.state_dict().items()}
        tensors["d2t"] = self.d2t.to("cpu", torch.int64).contiguous()
        meta = {"format": "drafthorse-head/1", "kind": self.kind, "config": json.dumps(self.module.cfg),
                "target": json.dumps(self.target), "info": json.dumps(self.info)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)


def load_checkpoint(path: str | Path, target: Llama, target_name: str = "") -> Checkpoint:
    """A saved head, checked against `target` (ValueError naming both when it was trained for another)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"draft head {path}: no such file (train one with `drafthorse train-drafter`)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is the same answer to the user
        raise ValueError(f"draft head {path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != "drafthorse-head/1" or meta.get("kind") not in HEAD_KINDS:
        raise ValueError(f"draft head {path}: not a drafthorse head checkpoint")
    trained_for = json.loads(meta["target"])
    mine = fingerprint(target)
    if trained_for.get("fingerprint") != mine:
        raise ValueError(f"draft head {path} was trained for target {trained_for.get('name')!r} "
                         f"(fingerprint {trained_for.get('fingerprint')}), but this target is {target_name!r} "
                         f"(fingerprint {mine}): train a head for it with `drafthorse train-drafter`")
    kind, cfg = meta["kind"], json.loads(meta["config"])
    module = MODULES[kind](cfg)
    state = {k.removeprefix("module."): v.to(torch.float32) for k, v in tensors.items() if k.startswith("module.")}
    module.load_state_dict(state)
    module.eval().requires_grad_(False)
    return Checkpoint(kind, module, tensors["d2t"].long(), trained_for, json.loads(meta.get("info", "{}")))
