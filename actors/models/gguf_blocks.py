"""A GGUF's quantised blocks as int4 kernel weights (quant.Int4Weight), read as stored: the products run
from the file's own codes, never from a dense copy (the converted model stays loaded beside them for
the embedding, the norms, head fingerprints and the hf baselines).

GGML blocks hold 32 weights of one output row: Q4_0 (scale d, codes q: w = d (q - 8)), Q4_1 (d, minimum
m: w = d q + m) and Q8_0 (d, 8-bit q: w = d q); a Q4_K block holds 8 groups of 32 (w = d sc q - dmin m,
with 6-bit sc and m per group). The kernel computes w = (code - 8) scale + zero per group of 32, so

    Q4_0: scale d, zero 0           Q4_1: scale d, zero m + 8d       Q4_K: scale d sc, zero 8 d sc - dmin m
    Q8_0: two 4-bit halves, q = 16 hi + lo: hi + 8 with scale 16d, zero 0; lo with scale d, zero 8d

(the kernel reads scales in bfloat16: d and m lose their last three bits). Other block types (Q6_K,
Q5_*, float16) are not read here; the caller quantises those weights from the dense model instead.

llama.cpp stores a Llama's q and k rows in its own RoPE order, which transformers undoes when it
converts; the rows are matched to the converted (dense) weight here, and any tensor whose blocks do
not reproduce it is refused, so a layout this code does not know can never load silently wrong."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from .quant import Int4Weight, int4_values

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]   # Int4Weight's (q, scale, zero, halves)

READ = ("Q4_0", "Q4_1", "Q8_0", "Q4_K")
# a product's GGUF tensor per HF parameter (llama.cpp's names; the same for every family served)
_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'blk.3.ffn_up.weight'; 'lm_head' -> 'output.weight'."""
    if hf_name == "lm_head":
        return "output.weight"
    _, _, i, module = hf_name.split(".", 3)
    return f"blk.{i}.{_NAMES[module]}.weight"


# a fused product's parts (llama.py's PRODUCTS), in the order they are concatenated
PARTS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
         "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def products(path: str | Path, hf_model) -> dict[str, Int4Weight]:
    """The products of `hf_model` (converted from the GGUF at `path`) whose blocks the file holds in a type
    READ knows, as kernel weights: "i.key" per layer i and PRODUCTS key, and "lm_head"."""
    blocks, cfg = Blocks(path), hf_model.config
    heads = (cfg.num_attention_heads, cfg.num_key_value_heads)
    out: dict[str, Int4Weight] = {}
    for i, layer in enumerate(hf_model.model.layers):
        for key, names in PARTS.items():
            parts = [blocks.codes(f"model.layers.{i}.{name}", layer.get_submodule(name).weight.detach(), heads)
                     for name in names]
            if all(p is not None for p in parts):
                out[f"{i}.{key}"] = Int4Weight(*_fuse(parts))   # type: ignore[arg-type]
    head = blocks.codes("lm_head", hf_model.lm_head.weight.detach(), heads)
    if head is not None:
        out["lm_head"] = Int4Weight(*head)
    return out


class Blocks:
    """The tensors of a GGUF file, by name."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.tensors = {t.name: t for t in GGUFReader(path).tensors}

    def codes(self, hf_name: str, dense: torch.Tensor, heads: tuple[int, int]) -> Codes | None:
        """HF module `hf_name`'s weight as stored, checked against `dense` (its converted weight [out, in]);
        None when the file holds it in a block type not read here. heads: (query heads, kv heads)."""
        t = self.tensors.get(gguf_name(hf_name))
        if t is None and hf_name == "lm_head":
            t = self.tensors.get("token_embd.weight")     # tied to the embedding
        if t is None or t.tensor_type.name not in READ:
            return None
        blocks = np.asarray(t.data).reshape(dense.shape[0], -1, _BLOCK_BYTES[t.tensor_type.name])
        codes = _codes(t.tensor_type.name, blocks)
        ref = dense.float()
        for order in _orders(dense.shape[0], heads):
            mine = codes if order is None else _reordered(codes, order)
            got = int4_values(*mine)
            # up to the scales' rounding to bfloat16 (2^-8 of a row's largest weight at most), where a
            # wrong row order is off by whole weights
            if got.shape == ref.shape and bool(((got - ref).abs() <= 2 ** -6 * ref.abs().amax(1, keepdim=True)).all()):
                return mine
        raise ValueError(f"{self.path}: the {t.tensor_type.name} blocks of {t.name} do not reproduce the converted "
                         f"weight of {hf_name} in any row order known here: refusing to run them")


# bytes per block: Q4_0/Q4_1/Q8_0 blocks of 32 (float16 d, and m for Q4_1, then the codes); Q4_K blocks of
# 256 (float16 d and dmin, 12 bytes of 6-bit scales and minimums for 8 groups of 32, then the codes)
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144}


def _codes(kind: str, blocks: np.ndarray) -> Codes:
    """Blocks [out, in / 32, bytes] of one tensor in the kernel's terms."""
    out = blocks.shape[0]
    if kind == "Q8_0":
        d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).astype(np.int16)).reshape(out, -1)
        hi, lo = (q >> 4) + 8, q & 15                      # q = 16 (hi - 8) + lo, hi - 8 in -8..7
        return torch.cat([hi, lo]), torch.cat([16 * d, d]), torch.cat([torch.zeros_like(d), 8 * d]), True
    if kind == "Q4_K":
        return _codes_q4k(blocks)
    head = 4 if kind == "Q4_1" else 2
    fields = blocks[..., :head].copy().view(np.float16).astype(np.float32)   # [out, groups, 1 or 2]
    d = torch.from_numpy(fields[..., 0])
    zero = torch.from_numpy(fields[..., 1]) + 8 * d if kind == "Q4_1" else torch.zeros_like(d)
    packed = torch.from_numpy(blocks[..., head:].copy())      # [out, groups, 16]: weight j low, j + 16 high
    return torch.cat([packed & 15, packed >> 4], dim=-1).reshape(out, -1), d, zero, False


def _codes_q4k(blocks: np.ndarray) -> Codes:
    """Q4_K blocks [out, in / 256, 144]: group g of a block is w = d sc_g q - dmin m_g (llama.cpp's
    get_scale_min_k4 unpacks sc, m); the codes of groups 2c and 2c + 1 share 32 bytes (low, high nibbles)."""
    out, n = blocks.shape[:2]
    d, dmin = (blocks[..., a:a + 2].copy().view(np.float16)[..., 0].astype(np.float32) for a in (0, 2))
    b = blocks[..., 4:16].astype(np.int32)
    sc = np.concatenate([b[..., :4] & 63, (b[..., 8:] & 15) | ((b[..., :4] >> 6) << 4)], -1)      # [out, n, 8]
    mn = np.concatenate([b[..., 4:8] & 63, (b[..., 8:] >> 4) | ((b[..., 4:8] >> 6) << 4)], -1)
    qs = torch.from_numpy(blocks[..., 16:].copy()).view(out, n, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], dim=3).reshape(out, -1)
    scale = torch.from_numpy(d[..., None] * sc).reshape(out, -1)
    zero = torch.from_numpy(-dmin[..., None] * mn).reshape(out, -1) + 8 * scale
    return q, scale, zero, False


def _reordered(codes: Codes, order: np.ndarray) -> Codes:
    """The codes with their output rows in `order` (both halves alike)."""
    q, scale, zero, halves = codes
    idx = torch.from_numpy(order)
    if halves:
        idx = torch.cat([idx, idx + len(order)])
    return q[idx], scale[idx], zero[idx], halves


def _fuse(parts: list[Codes]) -> Codes:
    """Parts of one product (rows concatenated: q, k, v or gate, up) as one weight; 8-bit parts as all
    their high halves, then all their low halves, 4-bit parts beside them given a high half of zeros."""
    if not any(h for *_, h in parts):
        return (torch.cat([q for q, *_ in parts]), torch.cat([s for _, s, _, _ in parts]),
                torch.cat([z for _, _, z, _ in parts]), False)
    his, los = [], []
    for q, s, z, halves in parts:
        if halves:
            n = q.shape[0] // 2
            his.append((q[:n], s[:n], z[:n]))
            los.append((q[n:], s[n:], z[n:]))
        else:   # code 8, zero 0: (8 - 8) scale + 0 = 0
            his.append((torch.full_like(q, 8), torch.ones_like(s), torch.zeros_like(z)))
            los.append((q, s, z))
    rows = his + los
    return (torch.cat([q for q, _, _ in rows]), torch.cat([s for _, s, _ in rows]),
            torch.cat([z for _, _, z in rows]), True)


def _orders(n: int, heads: tuple[int, int]) -> list[np.ndarray | None]:
    """Row orders to try: as stored, then llama.cpp's RoPE order undone for query or kv heads."""
    orders: list[np.ndarray | None] = [None]
    for h in sorted(set(heads)):
        if n % (2 * h) == 0:
            orders.append(np.arange(n).reshape(h, n // h // 2, 2).swapaxes(1, 2).reshape(n))
    return orders


