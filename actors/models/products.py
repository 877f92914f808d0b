"""Which layout a weight product runs fastest in on this machine, measured once at load.

A layer product multiplies a few rows x [M, in] (a decode row, a verify tree, a batch's step) by a
weight. Stored [in, out], `x @ w` is what exact forwards run (exact.py probes that very product) and the
fastest for one row. But BLAS picks very different kernels by shape: on an AVX2 CPU at float32 (2
threads, SmolLM2) the transposed product `w_t @ x.T` with w_t [out, in] ran 2-3x faster for 4-48 rows
of the wide products (gate/up 576 x 3072 at 4 rows: 1.5 -> 0.45 ms; the 49,152-wide LM head at 32
rows: 65 -> 33 ms), and at 2-3 rows, a short chain's verify, too (the whole 2-row verify 90-97 -> 52-70
ms after 300 tokens, where `x @ w` costs twice a row's). Other CPUs and dtypes differ, so `cut` times
both on the model's own weights, and forwards that need not be exact take the transposed product from
the row count where it clearly wins, at the price of a second copy of those weights."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .quant import Int4Weight, Int8Weight

ROWS = (2, 3, 4, 16)  # row counts timed (a chain, a small tree, a batch step); one row always runs `x @ w`
MIN_SIZE = 1 << 18    # smaller weights (tiny test models) are not worth a second copy
MARGIN = 0.9          # the transposed product must be at least 10% faster to be taken


class OutIn:
    """A weight in both layouts: `x @ w` ([in, out]) for fewer than `cut` rows, the transposed product
    `w_t @ x.T` (w_t [out, in]) from there. `shape` is the [in, out] weight's, as for every weight."""

    def __init__(self, w: torch.Tensor, cut: int):
        self.small, self.w, self.cut = w, w.t().contiguous(), cut
        self.shape = tuple(w.shape)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x @ w: x [n, in] -> [n, out] (from `cut` rows a transposed view: its rows are columns)."""
        return (self.w @ x.t()).t() if x.shape[0] >= self.cut else x @ self.small

    def dense(self) -> torch.Tensor:
        """The weight [in, out], as exact forwards multiply by it."""
        return self.small


# a product's weight [in, out]: dense, int8, int4, or in both layouts
Weight = torch.Tensor | Int8Weight | Int4Weight | OutIn


def best_time(f: Callable[[], object], reps: int = 2) -> float:
    """The fastest of `reps` timed calls of f, after one untimed call."""
    f()                  # the first call pays for allocation and kernel dispatch
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def cut(ws: list[torch.Tensor], wts: list[torch.Tensor]) -> int | None:
    """The row count (of ROWS) from which the transposed products `wt @ x.T` are clearly faster than
    `x @ w`, timed over the same product of every layer in turn (ws [in, out], wts their [out, in]
    copies) as a forward streams them: one weight timed again and again would be read from the cache,
    where a forward reads it from memory. None: never, or the weights are too small to matter."""
    if ws[0].numel() < MIN_SIZE:
        return None
    gen = torch.Generator().manual_seed(0)
    for m in ROWS:
        x = torch.randn(m, ws[0].shape[0], generator=gen).to(ws[0].dtype)
        xt = x.t()
        if best_time(lambda: [wt @ xt for wt in wts]) < MARGIN * best_time(lambda: [x @ w for w in ws]):  # noqa: B023 - timed now
            return m
    return None
