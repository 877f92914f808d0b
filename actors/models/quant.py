"""Weight-only int8 (opt-in `--dtype int8`): a float32 model whose big matrices are stored as int8
with one scale per output channel, multiplied by torch's int8 weight-pack kernel (AVX-512 VNNI where
the CPU has it).

Decoding a small model on a CPU is bound by reading the weights: int8 reads a quarter of float32's
bytes (SmolLM2, one-token forward on this 2-core CPU: 34 ms float32 -> 22 ms int8). The kernel takes
bfloat16 activations (with float32 ones it is 10x slower), so each product rounds its input rows to
bfloat16; everything else (norms, RoPE, attention, KV cache, residuals) stays float32.

It is a different model from the float32 one (quantised weights), so "lossless" means: identical to
the same int8 model decoding alone. The kernel computes every row on its own (checked at every row
count 1-48 with cancellation-sensitive data, tests/test_dtype.py), so decode and verify rows of
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


def supported() -> bool:
    """Whether this torch build has the int8 weight-pack kernel for the CPU."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")
