"""The K/V cache: one preallocated tensor pair for all of a worker's sequences, slot-major.

    pool.k, pool.v: [layers, slots, kv_heads, length, head_dim]   (length: max_len rounded up to `align`)
    KVCache(pool, slot): one sequence's view, [layers, kv_heads, max_len, head_dim]
    pool.f: [slots, length, features], or None: the target's output rows (the states feature heads draft
    from) at every cached position, kept where a feature head is served, so that a cached prefix
    carries its states too (the head catches up over a reused prompt without the target scoring it again)

A batched forward (llama.py) writes every new K/V row of a step with one indexed copy per layer and
reads each sequence's keys from its slot, so a token's K/V sit in the same place and are read the same
way whatever else shares the pass. Slot-major (not paged): a worker serves a few dozen sessions of up
to max_len tokens each, and a slot's keys are one strided view that attention reads without a copy.
Allocated as anonymous memory pages: they read as zeros, so a padded attention row that reads past its
sequence's context (attention.py) reads finite values, never the garbage (possibly NaN, which a zero
weight does not cancel) of reused heap memory. Pages are committed when first written, so a long
max_len costs only what sequences fill; or all at once (`commit`), as a target worker does: its pool is
its memory budget, and a worker that cannot hold it fails at start, not under load, and then keeps a
flat footprint (slots x max_len, reported at start-up). On a GPU the pool is one zeroed allocation of the
device's memory (all of it committed: a GPU has no lazily committed pages)."""
from __future__ import annotations

import math
import mmap
import threading

import torch

HOST = torch.device("cpu")   # where a forward's bookkeeping (positions, masks, layouts) is built, whatever the device


class KVPool:
    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 align: int = 1, commit: bool = False, device: torch.device | str = HOST, features: int = 0):
        if slots < 1 or max_len < 1:
            raise ValueError(f"a KV pool needs at least one slot and one position, got {slots} x {max_len}")
        # align: exact attention reads committed keys in whole blocks (exact.VBLOCK), up to past max_len
        shape = (layers, slots, kv_heads, -(-max_len // align) * align, head_dim)
        device = torch.device(device)
        shapes = [shape, shape] + ([(slots, shape[3], features)] if features else [])
        if device.type != "cpu":
            held = [torch.zeros(sh, dtype=dtype, device=device) for sh in shapes]
        else:
            held = [_zero_pages(sh, dtype) for sh in shapes]
        if commit and device.type == "cpu":   # write every page now (zeros: what they read as anyway)
            for t in held:
                t.zero_()
        self.k, self.v = held[:2]
        self.f: torch.Tensor | None = held[2] if features else None
        self.slots, self.max_len = slots, max_len
        self._free = list(range(slots - 1, -1, -1))   # for take(): lowest slot first
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """The most memory the pool can hold (every slot full)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.f) if t is not None)

    def cache(self, slot: int) -> KVCache:
        """Slot `slot`, managed by the caller (a target worker's SlotPool hands out all of them)."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is outside the pool's {self.slots}")
        return KVCache(self, slot)

    @property
    def free(self) -> int:
        """Slots `take` can still hand out."""
        return len(self._free)

    def take(self) -> KVCache | None:
        """A free slot, until its release(); None when every slot is taken."""
        with self._lock:
            return KVCache(self, self._free.pop(), taken=True) if self._free else None

    def _give_back(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)


def _zero_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor on fresh anonymous pages (the tensor keeps the mapping alive)."""
    count = math.prod(shape)
    mem = mmap.mmap(-1, max(1, count * dtype.itemsize))
    return torch.frombuffer(mem, dtype=dtype, count=count).view(shape)   # (frombuffer: always on the host)


class KVCache:
    """One sequence's slot of a pool: k, v are views [layers, kv_heads, length, head_dim]; f [length,
    features] or None."""

    def __init__(self, pool: KVPool, slot: int, taken: bool = False):
        self.pool, self.slot, self._taken = pool, slot, taken
        self.k, self.v = pool.k[:, slot], pool.v[:, slot]
        self.f = None if pool.f is None else pool.f[slot]
        self.max_len = pool.max_len

    def release(self) -> None:
        """Give a slot from `take` back to its pool (once; a no-op otherwise)."""
        if self._taken:
            self._taken = False
            self.pool._give_back(self.slot)

    def move(self, src: torch.Tensor, dst_start: int) -> None:
        """Copy the slots `src` (ascending, src[i] >= dst_start + i) to dst_start.. : keeps an accepted
        branch and drops its rejected siblings without touching the rest of the cache."""
        n = src.numel()
        src = src.to(self.k.device, non_blocking=True)
        self.k[:, :, dst_start:dst_start + n] = self.k[:, :, src]
        self.v[:, :, dst_start:dst_start + n] = self.v[:, :, src]
        if self.f is not None:
            self.f[dst_start:dst_start + n] = self.f[src]
