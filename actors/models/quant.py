"""Weight-only int8 and int4 (opt-in `--dtype int8` / `int4`): a float32 model whose big matrices are
stored as 8- or 4-bit codes, multiplied by torch's weight-pack CPU kernels.

Decoding a small model on a CPU is bound by reading the weights: int8 reads a quarter of float32's
bytes (SmolLM2, one-token forward on this 2-core CPU: 34 ms float32 -> 22 ms int8), int4 about a
sixth of bfloat16's (the products of a SmolLM2 step: 32 ms bfloat16 -> 7 ms int4, AVX-512 BF16).
int4 takes a GGUF's 4-bit blocks as they are stored (gguf_blocks.py). Both kernels take bfloat16
activations (float32 ones run 10-20x slower), so each product rounds its input rows to bfloat16;
everything else (norms, RoPE, attention, KV cache, residuals) stays float32.

Each is a different model from the float32 one (quantised weights), so "lossless" means: identical
to the same quantised model decoding alone. The kernels compute every row on its own (checked at
every row count with cancellation-sensitive data, tests/test_dtype.py), so decode and verify rows of
products agree bit for bit without the padding exact.py needs for BLAS kernels."""
from __future__ import annotations

import torch


class Int8Weight:
    """A weight [in, out] (as `Llama` stores them, for `x @ w`) as int8 [out, in] + scales [out]."""

    def __init__(self, w_t: torch.Tensor):
        w = w_t.detach().t().float()
        # symmetric per output channel: the largest |w| of a row maps to 127; the kernel takes the
        # scales in bfloat16, so round them first and quantise against the rounded ones
        self.scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127.0).to(torch.bfloat16)
        self.q = torch.round(w / self.scale.float()[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        self.shape = tuple(w_t.shape)    # the dense weight's [in, out]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x @ w: x [n, in] (any float dtype) -> [n, out] in x's dtype."""
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.q, self.scale)
        return y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The dense [in, out] float32 weight this stores (what the int8 model multiplies by)."""
        return (self.q.float() * self.scale.float()[:, None]).t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.scale.numel()


GROUP = 32   # int4 weights: one scale and zero per 32 inputs of an output (the GGUF's Q4_0/Q4_1 block)


class Int4Weight:
    """A weight [in, out] as 4-bit codes in groups of GROUP inputs, w = (q - 8) * scale + zero per group,
    multiplied by torch's int4 weight-pack CPU kernel (bfloat16 activations, like int8's; float32 ones
    take a path 20x slower). Built from a GGUF's blocks as stored (gguf_blocks.py) or by quantising a
    dense weight (`quantize`). `halves`: the codes hold an 8-bit weight as two 4-bit parts over 2 x out
    columns, w = hi + lo (a Q8_0 LM head: one call reads both, the halves are summed in float32).

    Like int8 it is its own model ("lossless": identical to the same int4 model decoding alone), and
    the kernel computes each row on its own at every row count (tests/test_dtype.py), so decode and
    verify rows agree bit for bit without padding."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, halves: bool = False):
        """q [out', in] codes 0..15 (any integer dtype); scale, zero [out', in / GROUP] (float32);
        out' = out, or 2 x out with `halves` (the high parts' rows, then the low parts')."""
        n, k = q.shape
        if k % GROUP or scale.shape != (n, k // GROUP) or zero.shape != scale.shape:
            raise ValueError(f"int4 weight: codes {tuple(q.shape)} need {GROUP}-wide groups and scales "
                             f"[{n}, {k // GROUP}], got {tuple(scale.shape)} and {tuple(zero.shape)}")
        self.halves = halves
        self.shape = (k, n // 2 if halves else n)    # the dense weight's [in, out]
        # the kernel packs outputs in 16s: each part padded with zero weights (code 8, zero 0), cut off again
        parts = [t.chunk(2) if halves else (t,) for t in (q, scale, zero)]
        pad = -self.shape[1] % 16
        fill = (8, 1.0, 0.0)
        q, scale, zero = (torch.cat([torch.cat([p, p.new_full((pad, p.shape[1]), f)]) for p in ps])
                          for ps, f in zip(parts, fill))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # the kernel's table: [in / GROUP, out', 2] (scale, zero) in the activations' dtype
        self.scale_zero = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()

    @classmethod
    def packed_as(cls, packed: torch.Tensor, scale_zero: torch.Tensor, shape: tuple[int, int],
                  halves: bool) -> Int4Weight:
        """A weight from its kernel tables as an earlier one held them (gguf_cache: the packed layout is
        torch's own, so the cache entry names the torch version)."""
        w = cls.__new__(cls)
        w.packed, w.scale_zero, w.shape, w.halves = packed, scale_zero, (int(shape[0]), int(shape[1])), bool(halves)
        return w

    @classmethod
    def quantize(cls, w_t: torch.Tensor) -> Int4Weight:
        """A dense weight [in, out] rounded to the nearest of 16 levels from each group's minimum to its
        maximum (GGUF's Q4_1)."""
        if w_t.shape[0] % GROUP:
            raise ValueError(f"int4 quantises in groups of {GROUP} inputs, and a weight of this model has "
                             f"{w_t.shape[0]}: load it at another dtype (int8 takes any shape)")
        w = w_t.detach().t().float()
        g = w.reshape(w.shape[0], -1, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(1e-12).bfloat16().float()   # as the kernel will read it
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15)
        return cls(q.reshape(w.shape).to(torch.uint8), scale, lo + 8 * scale)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x @ w: x [n, in] (any float dtype) -> [n, out] in x's dtype."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed, GROUP,
                                                       self.scale_zero)
        return self._out(y, x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The dense [in, out] float32 weight the kernel multiplies by: its product with an identity on
        the kernel's float32 path (slow: small weights and tests; `int4_values` computes it from codes)."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(self.shape[0]), self.packed, GROUP,
                                                       self.scale_zero.float())
        return self._out(y, torch.float32)

    def _out(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The kernel's output [n, out'] as [n, out]: halves summed in float32, padding cut off."""
        n = self.shape[1]
        if self.halves:
            hi, lo = y.float().chunk(2, dim=1)
            return (hi[:, :n] + lo[:, :n]).to(dtype)
        return (y if y.shape[1] == n else y[:, :n]).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * 2


def int4_values(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, halves: bool = False) -> torch.Tensor:
    """The dense weight [out, in] (float32) that Int4Weight(q, scale, zero, halves) multiplies by."""
    rb = lambda t: t.to(torch.bfloat16).float().repeat_interleave(GROUP, dim=1)   # as the kernel reads them
    w = (q.float() - 8) * rb(scale) + rb(zero)
    if halves:
        hi, lo = w.chunk(2, dim=0)
        return hi + lo
    return w
