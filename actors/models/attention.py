"""Attention of a ragged batch over the KV pool: every sequence of a step in a few calls per layer.

A step mixes decode rows (1 token), verify trees (1 + nodes) and prefill chunks (up to 256 tokens) of
sequences at very different context lengths. `Layout` (built once per forward, not per layer) sorts
the sequences by context length and cuts them into buckets where padding to the bucket's longest
context and most rows costs at most SLACK more than the real work (so a prefill chunk of 256 rows does
not pad the decode rows beside it to 256).
Per layer and bucket: one read of the bucket's keys and values (a view of the pool over the range of
its slots where that range is not much wider than the bucket, else an indexed copy), one
`scaled_dot_product_attention` with the tree/causal mask and the context lengths as one additive mask,
one indexed copy of the real rows back.

Padded rows attend to their sequence's first key (a softmax over nothing is NaN) and are dropped.
A layout is built on the host (small index arithmetic on Python lists) and moved to the pool's device in
one go per forward: a GPU step then reads its indices and masks from device memory in every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kvcache import HOST, KVPool

SLACK = 0.5   # a bucket's padded work may exceed its real work by this fraction
SPAN = 2.0    # a bucket reads a view of its slots' whole range when that is at most this many times its size


@dataclass
class Bucket:
    slots: torch.Tensor | slice   # the sequences' pool slots, or a slice of consecutive ones
    length: int                   # keys read per sequence: the longest context in the bucket
    q_index: torch.Tensor         # [B * n_max] batch row of each padded query row
    n_max: int
    mask: torch.Tensor            # [B, 1, per_kv * n_max, length] additive: 0 = may attend, -inf = not
    real: torch.Tensor            # [rows] padded rows (of B * n_max) that are real, in batch row order
    rows: torch.Tensor | None     # [rows] their rows in the batch (None: all rows, in order)


@dataclass
class Layout:
    """Where a forward's rows go in the pool and which keys each reads; the same for every layer."""
    pool: KVPool
    row_slot: torch.Tensor        # [N] pool slot of each row
    row_pos: torch.Tensor         # [N] cache position each row's K/V are written to
    buckets: list[Bucket]
    exact: list | None = None     # exact forwards: exact.py's buckets instead


def cut(ns: list[int], ctxs: list[int]) -> list[list[int]]:
    """Sequences (indices) in buckets: by context length, a new bucket when padding would cost more
    than SLACK over the real work (rows x keys)."""
    order = sorted(range(len(ns)), key=lambda j: (ctxs[j], ns[j], j))
    out: list[list[int]] = []
    cur: list[int] = []
    real = n_max = 0
    for j in order:
        work = ns[j] * ctxs[j]
        m = max(n_max, ns[j])
        if cur and (len(cur) + 1) * m * ctxs[j] > (1 + SLACK) * (real + work):
            out.append(cur)
            cur, real, m = [], 0, ns[j]
        cur.append(j)
        real, n_max = real + work, m
    out.append(cur)
    return out


def layout(pool: KVPool, slots: list[int], starts: list[int], ns: list[int],
           masks: list[torch.Tensor | None], buckets: bool = True, per_kv: int = 1, alone: bool = False,
           window: int | None = None, positions: list[torch.Tensor] | None = None) -> Layout:
    """Sequence j: slot slots[j], ns[j] new rows written at cache positions starts[j].., attending
    through masks[j] ([n, start + n] bool) or causally (None: every earlier position and itself);
    window (a sliding layer's, with the rows' positions[j]): a row at position p sees no cache slot
    before p - window + 1 (committed slots hold their own positions; a tree's nodes lie within the window).
    buckets=False: only where the rows go (exact forwards attend through exact.py's buckets); per_kv: query
    heads per K/V head (the masks are laid out for them once here, not per layer); alone: every sequence
    in a bucket of its own (the one it has in a forward by itself: prefill chunks, whose K/V must not
    depend on what shares the pass)."""
    n_t, start_t = torch.tensor(ns, device=HOST), torch.tensor(starts, device=HOST)
    row_slot = torch.repeat_interleave(torch.tensor(slots, device=HOST), n_t)
    first = torch.cumsum(n_t, 0) - n_t                   # each sequence's first row in the batch
    row_pos = torch.arange(int(n_t.sum()), device=HOST) - torch.repeat_interleave(first - start_t, n_t)
    ctxs = [s + n for s, n in zip(starts, ns)]
    groups = ([[j] for j in range(len(ns))] if alone else cut(ns, ctxs)) if buckets else []
    out = []
    for g in groups:
        n_max, length = max(ns[j] for j in g), max(ctxs[j] for j in g)
        # within a bucket the order is free: by slot, so that its keys can be a view of the pool, with
        # idle rows for the slots in between where they are few (reading their keys costs less than
        # gathering the members' keys into a copy: measured about 2.5x less per key on this CPU)
        g = sorted(g, key=lambda j: slots[j])
        lo, span = slots[g[0]], slots[g[-1]] - slots[g[0]] + 1
        members: list[int | None] = list(g)
        if span <= SPAN * len(g):
            members = [None] * span
            for j in g:
                members[slots[j] - lo] = j
        b = len(members)
        n = torch.tensor([ns[j] if j is not None else 0 for j in members], device=HOST)[:, None]
        st = torch.tensor([starts[j] if j is not None else 0 for j in members], device=HOST)[:, None]
        fst = torch.tensor([int(first[j]) if j is not None else 0 for j in members], device=HOST)[:, None]
        r = torch.arange(n_max, device=HOST)[None]       # [1, n_max]
        live = r < n                                     # [b, n_max]: real rows
        q_index = fst + torch.where(live, r, 0)          # a padded row repeats its sequence's first
        # causal by default: row r sees positions 0 .. start + r; a padded row sees position 0 alone
        key = torch.arange(length, device=HOST)[None, None]
        mask = torch.where(live[..., None], key <= (st + r)[..., None], key == 0)
        for i, seq in enumerate(members):
            if seq is None or (tree := masks[seq]) is None:
                continue                                 # an idle slot, or causal
            mask[i, :ns[seq]] = False                    # a tree: its own mask
            mask[i, :ns[seq], :ctxs[seq]] = tree
        if window is not None and positions is not None:
            for i, seq in enumerate(members):
                if seq is not None:
                    mask[i, :ns[seq]] &= key[0] > (positions[seq] - window)[:, None]
        # additive, in the pool's dtype, one row per (query group, row): see `attend`
        bias = torch.zeros(b, 1, n_max, length, dtype=pool.k.dtype, device=HOST).masked_fill_(~mask[:, None],
                                                                                            float("-inf"))
        bias = bias.expand(b, per_kv, n_max, length).reshape(b, 1, per_kv * n_max, length)
        view = b == span
        in_order = len(groups) == 1 and members == list(range(len(ns)))
        rows = None if in_order else (q_index[live])
        to = lambda t: t.to(pool.k.device, non_blocking=True)   # (no wait for the device's queue)
        out.append(Bucket(slice(lo, lo + b) if view else to(torch.tensor([slots[j] for j in g], device=HOST)),
                          length, to(q_index.view(-1)), n_max, to(bias), to(live.view(-1).nonzero().view(-1)),
                          None if rows is None else to(rows)))
    return Layout(pool, row_slot.to(pool.k.device, non_blocking=True), row_pos.to(pool.k.device, non_blocking=True),
                  out)


def write(lay: Layout, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """The rows' K/V ([N, kv_heads, d]) into their slots and positions: one indexed copy each."""
    lay.pool.k[layer][lay.row_slot, :, lay.row_pos] = k
    lay.pool.v[layer][lay.row_slot, :, lay.row_pos] = v


def attend(lay: Layout, layer: int, q: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """q: [N, heads, d] (RoPE applied; the rows' own K/V written) -> [N, heads, d]; scale: of the scores
    (None: d ** -0.5). Grouped-query heads ride as extra query rows of their K/V head (keys and values are
    read once, not repeated per group)."""
    kl, vl = lay.pool.k[layer], lay.pool.v[layer]
    _, heads, d = q.shape
    kv = kl.shape[1]
    grp = heads // kv
    out = None if len(lay.buckets) == 1 and lay.buckets[0].rows is None else torch.empty_like(q)
    for b in lay.buckets:
        keys, vals = kl[b.slots, :, :b.length], vl[b.slots, :, :b.length]
        batch = keys.shape[0]
        qb = (q[b.q_index].view(batch, b.n_max, kv, grp, d).permute(0, 2, 3, 1, 4)
              .reshape(batch, kv, grp * b.n_max, d))
        o = F.scaled_dot_product_attention(qb, keys, vals, attn_mask=b.mask, scale=scale)
        o = o.view(batch, kv, grp, b.n_max, d).permute(0, 3, 1, 2, 4).reshape(batch * b.n_max, heads, d)[b.real]
        if out is None:
            return o
        out[b.rows if b.rows is not None else slice(None)] = o
    assert out is not None
    return out
