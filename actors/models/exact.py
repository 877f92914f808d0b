"""Row-invariant decoding: a token is computed bit for bit the same way whether it is scored alone
(plain one-token decoding) or as one row of a k-token tree verification, at any dtype.

Why it is needed: at bfloat16 a 1-token decode and a k-token verify take different kernel paths and
round differently (measured on SmolLM2: every verify row differed from its decode row, by up to 0.9
in a hidden state), so greedy speculation would drift away from plain decoding. Two things differ, and batching
sequences must not add a third:

1. Matrix products with few rows, or the wrong number of rows. BLAS kernels pick a different code
   path (and summation order) for one row than for many (bf16 here: the MLP down projection; float32
   here: every GEMM below four rows), and a multithreaded kernel may split the rows among its threads
   so that at some row counts one row is computed apart, like a lone row (oneDNN's bf16 GEMM on 2
   threads of a CPU without native bf16: rows of M = 2 and 3, and the middle row of every odd M).
   `probe` measures, on this machine at its thread count and for the model's own product
   shapes, a minimum row count and a step from which every row of every M rounds alike, and exact
   forwards pad their rows up to such an M (`rows`) with dummy rows that are neither attended to nor
   cached.

2. Attention. A decode row attends to a contiguous prefix of length p + 1; the same position in a
   verify attends through a mask to a longer, partly masked context whose accepted branch may sit
   at scattered cache slots (tree siblings in between). Library kernels sum over keys in an order
   that depends on the key count and on where the keys sit. Here the keys of a row at position p
   are split at a point that depends on p alone, s(p) = max(0, floor((p - DEPTH) / CHUNK) * CHUNK):
     - keys [0, s(p)) are committed (a tree node is at most DEPTH below the committed prefix), so
       they are the same contiguous cache slice in decode and verify;
     - keys of logical positions [s(p), p] (at most WINDOW = DEPTH + CHUNK of them: the row's
       own ancestors in the tree, in order) are gathered into a fixed-length window, masked after p.
   Scores of both parts are concatenated, soft-maxed in float32 and applied to both parts' values,
   the committed ones in blocks of CHUNK keys summed block after block. Every product has the same
   shape in decode and verify, the row count aside, and the row count (of queries per group; for the
   batched window products, the batch) is padded as in 1; so each row comes out the same.

3. Batching. The groups of rows of all sequences in a forward (a group: a sequence's rows that share a
   split point) are attended in a few calls (`buckets`), each group padded to its bucket's row count and
   longest split. The padding adds masked keys at the end (zero terms in the same softmax lanes) and
   unread blocks after a group's last (the running sum is read at that block), so it leaves every sum
   as it was; `probe` checks on this machine that the products do not change with the batch, and
   falls back to one group a call where they do.

Everything else (embedding, RMSNorm, RoPE, SiLU, residuals) works row by row already. The prefill
is shared by plain and speculative decoding, so it keeps the fast path."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from .attention import cut as _cut
from .products import OutIn, Weight
from .quant import Int8Weight

log = logging.getLogger(__name__)

DEPTH = 32                 # deepest scratch node (below the committed prefix) an exact forward takes
CHUNK = 32                 # granularity of the split point s(p)
WINDOW = DEPTH + CHUNK     # keys gathered per row
_PROBE_TOP = 96                                         # rows of probe data
_COUNTS = list(range(1, 25)) + [28, 32, 40, 48]         # row counts probed
_STEPS = (1, 2, 4, 8)                                   # row-count granularities tried
MIN_CHUNK = 16                                          # fewest rows a chunked product may run in one call


def default_on(dtype: torch.dtype) -> bool:
    """Exact forwards by default below float32 (where rounding differences flip argmaxes);
    DRAFTHORSE_EXACT=1 / 0 forces them on / off for every dtype."""
    env = os.environ.get("DRAFTHORSE_EXACT", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return dtype in (torch.bfloat16, torch.float16)


@dataclass
class Group:
    """Rows of one sequence that share the split point."""
    rows: torch.Tensor | None   # row indices within the sequence (None = all of them)
    split: int                  # keys [0, split) come straight from the cache
    idx: torch.Tensor           # [g, WINDOW] cache slots of logical positions split .. split+WINDOW-1
    valid: torch.Tensor         # [g, WINDOW] bool: the row sees that window key


@dataclass(frozen=True)
class ExactRows:
    """What `probe` measured on this machine: the row counts at which a kernel computes every row alike.
    An exact forward runs a product with weight shape S on at least products[S][0] rows, a multiple of
    `step`, in calls of at most products[S][1] rows (None: any); each attention group on at least
    `attn_min` rows, a multiple of `attn_step`; groups of several sequences in one call where `batched`
    (their rows come out as each group's alone would), else one group a call."""
    ok: bool                                                   # False: none found, rows may differ here
    step: int
    products: dict[tuple[int, ...], tuple[int, int | None]]   # weight shape -> (min rows, max rows)
    attn_min: int
    attn_step: int
    batched: bool = True

    def window(self, shape: tuple[int, ...]) -> tuple[int, int | None]:
        """(min rows, max rows per call or None) of exact products with a weight of `shape`; for a shape
        the probe did not see, the most any weight needs."""
        widest = (max((lo for lo, _ in self.products.values()), default=1), None)
        return self.products.get(shape, widest)


def split_point(positions: torch.Tensor) -> torch.Tensor:
    return (torch.div(positions - DEPTH, CHUNK, rounding_mode="floor") * CHUNK).clamp_min(0)


def plan(positions: torch.Tensor, start: int, mask: torch.Tensor | None) -> list[Group]:
    """Per forward (not per layer): which cache slots each row reads. mask: [n, start + n] bool or
    None (a chain: row r sees slots [0, start + r])."""
    n = positions.numel()
    ctx = start + n
    if mask is None:
        mask = torch.ones(n, ctx, dtype=torch.bool).tril(diagonal=start)
    seen = mask.cumsum(-1)                     # [n, ctx]: visible slots up to here
    if not torch.equal(seen[:, -1], positions + 1):
        raise ValueError("exact forward: each row must see exactly its position + 1 slots")
    split = split_point(positions)
    # keys [0, split) must be the committed slots 0..split-1 (true unless a tree is deeper than DEPTH)
    inside = split > 0
    if inside.any():
        r = inside.nonzero(as_tuple=True)[0]
        if not torch.equal(seen[r, split[r] - 1], split[r]):
            raise ValueError(f"exact forward: tree nodes deeper than {DEPTH} below the committed prefix")
    logical = seen - 1                         # logical position of each visible slot
    sel = mask & (logical >= split[:, None])
    r_i, s_i = sel.nonzero(as_tuple=True)
    t_i = logical[r_i, s_i] - split[r_i]
    idx = torch.zeros(n, WINDOW, dtype=torch.long)   # invisible entries read slot 0 (finite, masked)
    idx[r_i, t_i] = s_i
    valid = torch.zeros(n, WINDOW, dtype=torch.bool)
    valid[r_i, t_i] = True
    values = split.unique().tolist()
    if len(values) == 1:
        return [Group(None, int(values[0]), idx, valid)]
    groups = []
    for s in values:
        rows = (split == s).nonzero(as_tuple=True)[0]
        groups.append(Group(rows, int(s), idx[rows], valid[rows]))
    return groups


@dataclass
class Bucket:
    """Groups (of any sequences of one pool) attended in one call: each padded to `m` rows (copies of
    its first row) and to `heads` committed keys (masked), which leave every real row's sums as they
    are (see `attend`)."""
    slots: torch.Tensor       # [U] each group's pool slot
    heads: int                # committed keys read per group: the longest split among them
    m: int                    # rows per group
    q_index: torch.Tensor     # [U * m] batch row of each padded row
    window: torch.Tensor      # [U * m * WINDOW * kv_heads] row of each window key and head in a layer's
                              # K/V viewed as [slots * kv_heads * max_len, d] (index_select: contiguous rows)
    bias: torch.Tensor        # [U, 1, m, 1, WINDOW + heads] additive: 0 = may attend, -inf = not
    last: torch.Tensor        # [U] each group's last committed block (split / CHUNK - 1; -1: none)
    real: torch.Tensor        # [rows] padded rows (of U * m) that are real
    rows: torch.Tensor        # [rows] their rows in the batch


def buckets(slots: list[int], offsets: list[int], plans: list[list[Group]], sizes: list[int],
            pool: tuple[int, int], dtype: torch.dtype, min_rows: int = 1, step: int = 1,
            batched: bool = True) -> list[Bucket]:
    """Per forward: sequence j (pool slot slots[j], batch rows offsets[j] ..) with its groups plans[j],
    in a pool of (kv_heads, max_len);
    the groups cut into buckets by split (attention.cut: padding costs at most SLACK over the real work),
    or one group a bucket when batching would change rows here (`ExactRows.batched`)."""
    units = _units(slots, offsets, plans, sizes)
    if batched:
        cuts = _cut([len(rows) for _, rows, _ in units], [g.split + WINDOW for _, _, g in units])
    else:
        cuts = [[u] for u in range(len(units))]
    return [_bucket([units[u] for u in c], pool, dtype, min_rows, step) for c in cuts]


def _units(slots: list[int], offsets: list[int], plans: list[list[Group]], sizes: list[int],
           ) -> list[tuple[int, torch.Tensor, Group]]:
    """Every group of the sequences: (pool slot, batch rows, group)."""
    return [(slot, first + (torch.arange(n) if g.rows is None else g.rows), g)
            for slot, first, groups, n in zip(slots, offsets, plans, sizes) for g in groups]


def _bucket(us: list[tuple[int, torch.Tensor, Group]], pool: tuple[int, int], dtype: torch.dtype, min_rows: int,
            step: int) -> Bucket:
    """One bucket of groups: (pool slot, batch rows, group) each."""
    m = rows(max(len(r) for _, r, _ in us), min_rows, step)
    heads = max(g.split for _, _, g in us)
    pad = lambda t, k: torch.cat([t, t[[0] * (m - k)]]) if k < m else t   # repeat the first row
    q_index = torch.stack([pad(r, len(r)) for _, r, _ in us])
    win_pos = torch.stack([pad(g.idx, len(r)) for _, r, g in us])
    valid = torch.stack([pad(g.valid, len(r)) for _, r, g in us])                         # [U, m, W]
    committed = torch.arange(heads)[None] < torch.tensor([g.split for _, _, g in us])[:, None]   # [U, S]
    see = torch.cat([valid, committed[:, None].expand(-1, m, -1)], -1)
    bias = torch.zeros(see.shape, dtype=dtype).masked_fill_(~see, float("-inf"))
    slot_t = torch.tensor([s for s, _, _ in us])
    kv, max_len = pool
    window = ((slot_t[:, None, None, None] * kv + torch.arange(kv)) * max_len + win_pos[..., None]).view(-1)
    real = torch.cat([u * m + torch.arange(len(r)) for u, (_, r, _) in enumerate(us)])
    return Bucket(slot_t, heads, m, q_index.view(-1), window, bias[:, None, :, None],
                  torch.tensor([g.split // CHUNK - 1 for _, _, g in us]), real, torch.cat([r for _, r, _ in us]))


def attend(bks: list[Bucket], k_pool: torch.Tensor, v_pool: torch.Tensor, q: torch.Tensor,
           scale: float) -> torch.Tensor:
    """q: [N, heads, d] (RoPE applied); k_pool, v_pool: [slots, kv_heads, max_len, d] of one layer, the
    rows' own keys already written. Returns [N, heads, d].

    Per bucket: a row's scores over its window (its own WINDOW keys) and over the committed keys
    [0, heads) of its slot, masked past its split; softmax in float32 over [window, committed] (masked
    keys past the real ones add exp(-inf) = 0 to the same lanes: the sums do not change); values: the
    window's in one product, the committed ones in blocks of CHUNK keys, summed block after block (in
    float32) by a running sum read at the group's last block, so that a row's sum has the same terms in
    the same order whatever the padding. Every product's shape depends on the padding only through its
    row and batch counts, which `probe` checks."""
    n, nh, d = q.shape
    kv = k_pool.shape[1]
    grp = nh // kv
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty_like(q)
    for b in bks:
        u, m, s = b.slots.numel(), b.m, b.heads
        qb = q[b.q_index].view(u, m, kv, grp, d).transpose(1, 2).contiguous()     # [U, kv, m, grp, d]
        kw = k_pool.view(-1, d).index_select(0, b.window).view(u, m, WINDOW, kv, d).permute(0, 3, 1, 4, 2)
        vw = v_pool.view(-1, d).index_select(0, b.window).view(u, m, WINDOW, kv, d).permute(0, 3, 1, 2, 4)
        scores = qb @ kw                                                             # [U, kv, m, grp, W]
        if s:
            kh = k_pool[:, :, :s].index_select(0, b.slots)                          # [U, kv, S, d]
            head = qb.view(u, kv, m * grp, d) @ kh.transpose(-1, -2)
            scores = torch.cat([scores, head.view(u, kv, m, grp, s)], -1)
        # scaled in the model's dtype as HF's eager attention does (exact for a power-of-two scale)
        w = torch.softmax(scores.mul_(scale).add_(b.bias), dim=-1, dtype=acc)
        o = w[..., :WINDOW].to(q.dtype) @ vw                                        # [U, kv, m, grp, d]
        if s:
            blocks = s // CHUNK
            vh = v_pool[:, :, :s].index_select(0, b.slots).view(u, kv, blocks, CHUNK, d)
            wh = w[..., WINDOW:].to(q.dtype).reshape(u, kv, m * grp, blocks, CHUNK).transpose(2, 3)
            run = (wh @ vh).to(acc).cumsum(2)                                        # [U, kv, blocks, m*grp, d]
            head = run[torch.arange(u), :, b.last.clamp_min(0)]                      # [U, kv, m*grp, d]
            head = head.masked_fill((b.last < 0)[:, None, None, None], 0)
            o = (o.to(acc) + head.view(u, kv, m, grp, d)).to(q.dtype)
        out[b.rows] = o.transpose(1, 2).reshape(u * m, nh, d)[b.real]
    return out


# ---------------------------------------------------------------- probing the machine's kernels

def _cancelling(rows: int, k: int, hot: list[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[rows, k] random values, each row with +B and -B at two of the positions `hot` (where the other
    operand is all ones): the huge terms cancel, so a row's result is the sum of the small ones less
    what the partial sums holding B lost, which depends on how the kernel groups the terms. Any change
    of summation order then shows in nearly every row (with plain random data, in a few percent)."""
    big = 2.0 ** min(20, math.frexp(torch.finfo(dtype).max)[1] - 4)
    x = torch.randn(rows, k, generator=gen)
    hot_t = torch.tensor(hot)
    pick = hot_t[torch.rand(rows, len(hot), generator=gen).argsort(-1)[:, :2]]
    r = torch.arange(rows)
    x[r, pick[:, 0]] = big
    x[r, pick[:, 1]] = -big
    return x.to(dtype)


def _hot(k: int) -> list[int]:
    return sorted({round(i * (k - 1) / 7) for i in range(8)})


def _unstable(op, x: torch.Tensor, counts) -> set[int]:
    """Row counts M at which op, run on M rows at a time (two blocks of them), does not give bit for bit
    the rows of one call on all of x's rows. op maps rows [M, ...] to results with rows in dim 0."""
    ref = op(x)
    bad = set()
    for m in counts:
        n = min(len(x) - len(x) % m, 2 * m)
        got = torch.cat([op(x[a:a + m].clone()) for a in range(0, n, m)])
        if not torch.equal(got, ref[:n]):
            bad.add(m)
    return bad


def _choose(unstable: list[set[int]], counts: list[int], chunked: bool = False) \
        -> tuple[int, list[int], list[int | None]] | None:
    """(step, [min rows per product], [max rows per product or None]): pad n rows to max(min rows, n
    rounded up to a multiple of step), the step common to all products, each product's min rows the
    smallest multiple of step from which every probed multiple of step is stable (max None). chunked:
    a product with no such tail may use a run of stable multiples [min, max] instead, max >= MIN_CHUNK,
    and run more than max rows as calls of max rows (AMX bf16 kernels here: stable up to 32 rows, not at
    40 or 48). Chosen for the fewest rows over n = 1..16; None if no step works."""
    best: tuple[int, int, list[int], list[int | None]] | None = None
    for step in _STEPS:
        mults = sorted(c for c in counts if c % step == 0)
        mins: list[int] = []
        maxes: list[int | None] = []
        for bad in unstable:
            runs: list[tuple[int, int]] = []         # maximal runs of stable multiples: (first, last)
            start: int | None = None
            for i, m in enumerate(mults):
                if m in bad:
                    start = None
                    continue
                start = m if start is None else start
                if i + 1 == len(mults) or mults[i + 1] in bad:
                    runs.append((start, m))
            tail = [r for r in runs if r[1] == mults[-1]]
            if tail:
                mins.append(tail[0][0])
                maxes.append(None)
                continue
            window = [r for r in runs if r[1] >= MIN_CHUNK] if chunked else []
            if not window:
                break                                # this product has no stable rows at this step
            lo, hi = max(window, key=lambda r: (r[1], -r[0]))
            mins.append(lo)
            maxes.append(hi)
        if len(mins) < len(unstable):
            continue
        cost = sum(rows(n, m0, step) for m0 in mins for n in range(1, 17))
        if best is None or cost < best[0]:
            best = (cost, step, mins, maxes)
    return None if best is None else best[1:]


def rows(n: int, min_rows: int, step: int = 1) -> int:
    """Rows an exact product of n real rows runs on: at least min_rows, a multiple of step."""
    return max(min_rows, -(-n // step) * step)


def probe(weights: dict[str, Weight], dtype: torch.dtype, heads: int, kv: int, d: int) -> ExactRows:
    """The row counts from which (and up to which, past which a product runs in chunks) every row of
    a model's products and attention comes out the same whatever the row count, at multiples of a
    step: of products with `weights` (a layer's and the LM head's, "lm_head") and of attention of
    `heads` query heads over `kv` key/value heads of size `d`, in `dtype`. Every row count up to 48 is
    probed: some kernels round a row differently only at some counts (2 threads, oneDNN bf16 GEMM
    without native bf16: one row of any odd count is computed like a lone row). Measured once per
    model, at the current thread count, which the result holds for (about a second for SmolLM2);
    warns when no such counts exist on this machine."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    top = _PROBE_TOP
    # products with weights, as `Llama._linear` runs them: x [M, in] @ w [in, out], w contiguous
    # (the LM head through its first columns, a view with the head's own leading dimension: its row
    # count decides the cost, not the kernel path)
    shapes: list[tuple[int, ...]] = []
    unstable: list[set[int]] = []
    for key, w in weights.items():
        if isinstance(w, Int8Weight):
            continue      # int8 products are row-invariant at every row count (quant.py)
        if isinstance(w, OutIn):
            w = w.dense()   # what an exact forward multiplies by
        shape = tuple(w.shape)
        if shape in shapes:
            continue
        hot = _hot(w.shape[0])
        if key == "lm_head":
            wp = torch.empty(*w.shape, dtype=dtype)[:, :4096]
            wp.copy_(w[:, :4096])
        else:
            wp = w.clone()
        wp[hot] = 1                                   # (a copy: the model's weights stay as they are)
        shapes.append(shape)
        x = _cancelling(top, w.shape[0], hot, dtype, gen)
        unstable.append(_unstable(lambda x, w=wp: x @ w, x, _COUNTS))
    linear = _choose(unstable, _COUNTS, chunked=True)
    # attention (`attend`), in rows of queries: the committed keys' products [kv, m * grp, d] @ [kv, d, T]
    # and, per block of CHUNK keys, [kv, m * grp, CHUNK] @ [kv, CHUNK, d], and the per-row window
    # products [1, m, grp, d] @ [1, m, d, W] and [1, m, grp, W] @ [1, m, W, d] (each row its own keys)
    grp = heads // kv
    t = 3 * CHUNK
    hot_d, hot_t, hot_w = _hot(d), _hot(t), _hot(WINDOW)
    keys = torch.randn(kv, 2 * t, d, generator=gen).to(dtype)[:, :t]
    keys[:, :, hot_d] = 1
    vals = torch.randn(kv, 2 * t, d, generator=gen).to(dtype)[:, :t]
    vals[:, hot_t] = 1
    counts = [c for c in _COUNTS if c * grp <= top]
    q_rows = _cancelling(top, d, hot_d, dtype, gen)          # one query head per row of the probe
    w_rows = _cancelling(top, CHUNK, _hot(CHUNK), dtype, gen)
    block = vals[:, :CHUNK].clone()
    block[:, _hot(CHUNK)] = 1
    head_k = lambda x: (x.expand(kv, -1, -1).contiguous() @ keys.transpose(-1, -2)).transpose(0, 1)
    head_v = lambda x: (x.expand(kv, -1, -1).contiguous() @ block).transpose(0, 1)
    attn_bad = [{m // grp for m in _unstable(op, x, [c * grp for c in counts])}
                for op, x in ((head_k, q_rows), (head_v, w_rows))]

    # per-row window products: a probe row holds a query group and its window's keys (values)
    def windowed(x, a, b, c, keys):
        lhs = x[:, :a * b].view(1, -1, a, b)
        rhs = x[:, a * b:].view(1, -1, c, b).transpose(-1, -2) if keys else x[:, a * b:].view(1, -1, b, c)
        return (lhs @ rhs)[0]
    lhs = _cancelling(top * grp, d, hot_d, dtype, gen).view(top, grp * d)
    rhs = torch.randn(top, WINDOW, d, generator=gen)
    rhs[:, :, hot_d] = 1
    attn_bad.append(_unstable(lambda x: windowed(x, grp, d, WINDOW, True),
                              torch.cat([lhs, rhs.to(dtype).view(top, -1)], 1), counts))
    lhs = _cancelling(top * grp, WINDOW, hot_w, dtype, gen).view(top, grp * WINDOW)
    rhs = torch.randn(top, WINDOW, d, generator=gen)
    rhs[:, hot_w] = 1
    attn_bad.append(_unstable(lambda x: windowed(x, grp, WINDOW, d, False),
                              torch.cat([lhs, rhs.to(dtype).view(top, -1)], 1), counts))
    attn = _choose(attn_bad, counts)
    batched = attn is not None and _batches_alike(dtype, heads, kv, d, max(attn[1]), attn[0], gen)
    if linear is None or attn is None:
        log.warning("exact decoding: this machine's %s matrix kernels round rows differently at every "
                    "row count probed; speculative output may differ from plain decoding", dtype)
        return ExactRows(False, 1, {shape: (1, None) for shape in shapes}, 1, 1)
    log.info("exact decoding (%s, %d threads): matmul rows padded to %s and to a multiple of %d (chunked: "
             "%s), attention rows to %d and to a multiple of %d, %s (probed in %.2f s)",
             str(dtype).removeprefix("torch."), torch.get_num_threads(), sorted(set(linear[1])), linear[0],
             sorted({m for m in linear[2] if m}) or "none", max(attn[1]), attn[0],
             "sequences batched" if batched else "one group of rows a call (batched calls round differently here)",
             time.perf_counter() - t0)
    return ExactRows(True, linear[0], dict(zip(shapes, zip(linear[1], linear[2]))), max(attn[1]), attn[0], batched)


def _batches_alike(dtype: torch.dtype, heads: int, kv: int, d: int, min_rows: int, step: int,
                   gen: torch.Generator) -> bool:
    """Whether `attend` gives every row the same bits in one bucket of many groups (other slots,
    splits, row counts: padded in rows and committed keys) as in a bucket of its group alone."""
    n_pos = 4 * CHUNK + WINDOW
    k_pool = torch.randn(4, kv, n_pos, d, generator=gen).to(dtype)
    v_pool = torch.randn(4, kv, n_pos, d, generator=gen).to(dtype)
    k_pool[..., _hot(d)] = 2.0 ** 8      # large products: an ordering change shows in most rows
    # a decode row early and late, a tree of five rows, a 40-row chain (a prefill chunk: three splits)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 0, 0, 1]],
                        dtype=torch.bool)
    seqs = [(torch.tensor([20]), 20, None), (torch.tensor([3 * CHUNK + 7]), 3 * CHUNK + 7, None),
            (torch.tensor([0, 1, 1, 2, 2]) + 2 * CHUNK + 3, 2 * CHUNK + 3,
             torch.cat([torch.ones(5, 2 * CHUNK + 3, dtype=torch.bool), tree], 1)),
            (torch.arange(CHUNK + 5, 2 * CHUNK + 45), CHUNK + 5, None)]
    plans = [plan(pos, start, mask) for pos, start, mask in seqs]
    sizes = [pos.numel() for pos, _, _ in seqs]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    q = torch.randn(sum(sizes), heads, d, generator=gen).to(dtype)
    slots = list(range(len(seqs)))
    alone = attend(buckets(slots, offsets, plans, sizes, (kv, n_pos), dtype, min_rows, step, batched=False),
                   k_pool, v_pool, q, d ** -0.5)
    together = attend([_bucket(_units(slots, offsets, plans, sizes), (kv, n_pos), dtype, min_rows, step)],
                      k_pool, v_pool, q, d ** -0.5)
    return torch.equal(alone, together)
