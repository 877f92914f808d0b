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
   threads of a CPU without native bf16: rows of M = 2 and 3, and the middle row of every odd M). The
   paths need not follow the row count in order (AMX bf16, 576 x 3072: one rounding at M = 1-27, 29,
   31, 33-39, 49-52, another at 28, 30, 32, 40-48, 53-64). `probe` runs, on this machine at its thread
   count and for the model's own product shapes, every row count up to PROBE_ROWS, groups the counts
   that give every row the same bits (`_classes`) and picks one class per product (`_pick`); exact
   forwards run each product in calls of a count of its class (`rows`; dummy rows pad a call, and more
   rows than the class's largest count go in several calls), so no call ever runs at a row count the
   probe did not see round alike.

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
   the committed ones in blocks of VBLOCK keys summed block after block (a row's last block padded
   with zero weights: every block product has VBLOCK keys). Every product has the same
   shape in decode and verify, the row count aside, and the row count (of queries per group; for the
   batched window products, the batch) is padded as in 1; so each row comes out the same.

3. Batching. The groups of rows of all sequences in a forward (a group: a sequence's rows that share a
   split point) are attended in a few calls (`buckets`), each group padded to its bucket's row count and
   longest split. The padding adds masked keys at the end (zero terms in the same softmax lanes) and
   value blocks of zero weight after a group's last (a sequential running sum adds exact zeros), so it
   leaves every sum as it was; `probe` checks on this machine that the products do not change with the
   batch, and falls back to one group a call where they do.

Everything else (embedding, RMSNorm, RoPE, SiLU, residuals) works row by row already. The prefill
is shared by plain and speculative decoding, so it keeps the fast path."""
from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass

import torch

from .attention import cut as _cut
from .kvcache import HOST
from .products import OutIn, Weight
from .quant import Int4Weight, Int8Weight

log = logging.getLogger(__name__)

DEPTH = 32                 # deepest scratch node (below the committed prefix) an exact forward takes
CHUNK = 32                 # granularity of the split point s(p)
WINDOW = DEPTH + CHUNK     # keys gathered per row
VBLOCK = 128               # committed keys per value product (a multiple of CHUNK): fewer, larger products
                           # and a shorter running sum than CHUNK-key blocks (a 3.6k prompt's exact prefill
                           # on 2 AMX cores: 19.8 s with 32-key blocks, most of it the running sum)
PROBE_ROWS = 64            # every row count up to this is probed; no exact call runs more rows
CALL_ROWS = 8              # a call's fixed cost, in rows, when choosing among row counts


def default_on(dtype: torch.dtype) -> bool:
    """Exact forwards by default below float32 (where rounding differences flip argmaxes);
    DRAFTHORSE_EXACT=1 / 0 forces them on / off for every dtype."""
    env = os.environ.get("DRAFTHORSE_EXACT", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return dtype in (torch.bfloat16, torch.float16)


def prefill_on() -> bool:
    """Whether exact forwards compute prompt rows exactly too (default), so that a token's K/V are the
    same whether it entered the cache in a prompt, a decode step or a verify: a request resumed on
    another worker after a failover, or a session's next turn (whose prompt holds the last answer),
    then continues as it would have. DRAFTHORSE_EXACT_PREFILL=0 prefills with the library kernels
    instead: faster first tokens on long prompts, but a resumed request may then differ from an
    undisturbed one where two tokens nearly tie."""
    return os.environ.get("DRAFTHORSE_EXACT_PREFILL", "").strip().lower() not in ("0", "false", "no", "off")


@dataclass
class Group:
    """Rows of one sequence that share the split point and their window's cache slots (a chain's rows
    all do; a tree's branches go to groups of their own)."""
    rows: torch.Tensor | None   # row indices within the sequence (None = all of them)
    split: int                  # keys [0, split) come straight from the cache
    idx: torch.Tensor           # [WINDOW] cache slots of logical positions split .. split+WINDOW-1
    valid: torch.Tensor         # [g, WINDOW] bool: the row sees that window key
    lo: torch.Tensor            # [g] the first committed key the row sees (a sliding layer's window; else 0)


@dataclass(frozen=True)
class ExactRows:
    """What `probe` measured on this machine: the row counts at which a kernel computes every row alike.
    An exact forward runs a product with weight shape S in calls of a row count in products[S] (padded
    up to the next one; calls of the largest while more rows are left); each attention group on a row
    count in `attn` (a larger group in pieces); groups of several sequences in one call where `batched`
    (their rows come out as each group's alone would), else one group a call."""
    ok: bool                                         # False: none found, rows may differ here
    products: dict[tuple[int, ...], tuple[int, ...]]  # weight shape -> row counts its calls may run on
    attn: tuple[int, ...]
    batched: bool = True

    def counts(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The row counts exact products with a weight of `shape` run on."""
        if shape not in self.products:   # a model's layers share their shapes: all were probed
            raise ValueError(f"exact forward: no probed row counts for a product with a {shape} weight")
        return self.products[shape]


def split_point(positions: torch.Tensor) -> torch.Tensor:
    return (torch.div(positions - DEPTH, CHUNK, rounding_mode="floor") * CHUNK).clamp_min(0)


def plan(positions: torch.Tensor, start: int, mask: torch.Tensor | None, window: int | None = None) -> list[Group]:
    """Per forward (not per layer) and kind of layer: which cache slots each row reads. mask: [n, start + n]
    bool or None (a chain: row r sees slots [0, start + r]); window: a sliding layer's, a row at position
    p sees no key before p - window + 1 (depending on p alone, so its rows stay those of any other path:
    masked keys add zero terms in place)."""
    n = positions.numel()
    ctx = start + n
    if mask is None:
        mask = torch.ones(n, ctx, dtype=torch.bool, device=HOST).tril(diagonal=start)
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
    idx = torch.zeros(n, WINDOW, dtype=torch.long, device=HOST)   # invisible entries: slot 0 (finite, masked)
    idx[r_i, t_i] = s_i
    valid = torch.zeros(n, WINDOW, dtype=torch.bool, device=HOST)
    valid[r_i, t_i] = True
    lo = torch.zeros(n, dtype=torch.long, device=HOST)
    if window is not None:
        lo = (positions - window + 1).clamp_min(0)
        key_pos = split[:, None] + torch.arange(WINDOW, device=HOST)[None]   # window key t's logical position
        valid &= key_pos >= lo[:, None]
    values = split.unique().tolist()
    groups = []
    for s in values:
        rows = None if len(values) == 1 else (split == s).nonzero(as_tuple=True)[0]
        r = torch.arange(n, device=HOST) if rows is None else rows
        shared = idx[r].amax(0)   # (where rows agree on every key both see: a chain's rows always do)
        if bool(((idx[r] == shared) | ~valid[r]).all()):
            groups.append(Group(rows, int(s), shared, valid[r], lo[r]))
            continue
        for sub in _consistent(idx[r], valid[r]):   # tree branches: rows whose windows differ apart
            groups.append(Group(r[sub], int(s), idx[r][sub].amax(0), valid[r][sub], lo[r][sub]))
    return groups


def _consistent(idx: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """Rows [g, WINDOW] cut into sets that agree on the slot of every window key two of them see (a row
    joins the first set it agrees with)."""
    sets: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []   # (rows, slots, seen)
    for i in range(len(idx)):
        for rows, slots, seen in sets:
            both = seen & valid[i]
            if bool((slots[both] == idx[i][both]).all()):
                rows.append(i)
                slots[valid[i]] = idx[i][valid[i]]
                seen |= valid[i]
                break
        else:
            sets.append(([i], idx[i].clone(), valid[i].clone()))
    return [torch.tensor(rows, device=HOST) for rows, _, _ in sets]


@dataclass
class Bucket:
    """Groups (of any sequences of one pool) attended in one call: each padded to `m` rows (copies of
    its first row) and to `heads` committed keys (masked), which leave every real row's sums as they
    are (see `attend`)."""
    slots: torch.Tensor       # [U] each group's pool slot
    first: int | None         # the groups sit at slots first, first + 1, .. (one each): their committed keys
                              # are a view of the pool; None: gathered by `slots`
    heads: int                # committed keys read per group: the longest split among them
    m: int                    # rows per group
    q_index: torch.Tensor | None  # [U * m] batch row of each padded row (None: the batch's rows as they are)
    window: torch.Tensor      # [U * kv_heads * WINDOW] row of each group's window key per head in a layer's
                              # K/V viewed as [slots * kv_heads * max_len, d] (index_select: contiguous rows)
    bias: torch.Tensor        # [U, 1, m, 1, WINDOW + heads] additive: 0 = may attend, -inf = not
    real: torch.Tensor | None  # [rows] padded rows (of U * m) that are real (None: all of them)
    rows: torch.Tensor | None  # [rows] their rows in the batch (None: the batch's rows, in order)


def buckets(slots: list[int], offsets: list[int], plans: list[list[Group]], sizes: list[int],
            pool: tuple[int, int], dtype: torch.dtype, counts: tuple[int, ...] = (1,),
            batched: bool = True, device: torch.device = HOST) -> list[Bucket]:
    """Per forward: sequence j (pool slot slots[j], batch rows offsets[j] ..) with its groups plans[j],
    in a pool of (kv_heads, length); a group's rows padded to a row count in `counts` (`ExactRows.attn`);
    the groups cut into buckets by split (attention.cut: padding costs at most SLACK over the real work),
    or one group a bucket when batching would change rows here (`ExactRows.batched`). Built on the host,
    then moved to `device` (the pool's)."""
    units = _units(slots, offsets, plans, sizes, max(counts))
    if batched:
        cuts = _cut([len(rows) for _, rows, _ in units], [g.split + WINDOW for _, _, g in units])
    else:
        cuts = [[u] for u in range(len(units))]
    # within a bucket by slot (the order is free): groups at consecutive slots read their keys in place
    return [_bucket(sorted((units[u] for u in c), key=lambda unit: unit[0]), pool, dtype, counts, sum(sizes), device)
            for c in cuts]


def _units(slots: list[int], offsets: list[int], plans: list[list[Group]], sizes: list[int], top: int,
           ) -> list[tuple[int, torch.Tensor, Group]]:
    """Every group of the sequences, in pieces of at most `top` rows (a group's rows are independent
    queries over the same keys): (pool slot, batch rows, group)."""
    out: list[tuple[int, torch.Tensor, Group]] = []
    for slot, first, groups, n in zip(slots, offsets, plans, sizes):
        for g in groups:
            rs = torch.arange(n, device=HOST) if g.rows is None else g.rows
            for a in range(0, len(rs), top):
                out.append((slot, first + rs[a:a + top], Group(rs[a:a + top], g.split, g.idx, g.valid[a:a + top],
                                                               g.lo[a:a + top])))
    return out


def _bucket(us: list[tuple[int, torch.Tensor, Group]], pool: tuple[int, int], dtype: torch.dtype,
            counts: tuple[int, ...], total: int, device: torch.device = HOST) -> Bucket:
    """One bucket of groups: (pool slot, batch rows, group) each, of a batch of `total` rows."""
    m = rows(max(len(r) for _, r, _ in us), counts)
    heads = _up(max(g.split for _, _, g in us), VBLOCK)   # (the pool's length is a multiple of VBLOCK)
    pad = lambda t, k: torch.cat([t, t[[0] * (m - k)]]) if k < m else t   # repeat the first row
    q_index = torch.stack([pad(r, len(r)) for _, r, _ in us])
    win_pos = torch.stack([g.idx for _, _, g in us])                                     # [U, W]
    valid = torch.stack([pad(g.valid, len(r)) for _, r, g in us])                         # [U, m, W]
    key = torch.arange(heads, device=HOST)[None, None]
    lo = torch.stack([pad(g.lo, len(r)) for _, r, g in us])                               # [U, m]
    split = torch.tensor([g.split for _, _, g in us], device=HOST)
    committed = (key < split[:, None, None]) & (key >= lo[..., None])                     # [U, m, S]
    see = torch.cat([valid, committed], -1)
    bias = torch.zeros(see.shape, dtype=dtype, device=HOST).masked_fill_(~see, float("-inf"))
    slots = [s for s, _, _ in us]
    slot_t = torch.tensor(slots, device=HOST)
    kv, max_len = pool
    window = ((slot_t[:, None, None] * kv + torch.arange(kv, device=HOST)[:, None]) * max_len
              + win_pos[:, None]).view(-1)
    real = torch.cat([u * m + torch.arange(len(r), device=HOST) for u, (_, r, _) in enumerate(us)])
    rows_t = torch.cat([r for _, r, _ in us])
    first = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else None
    padded = real.numel() < len(us) * m
    in_order = not padded and torch.equal(rows_t, torch.arange(total, device=HOST))   # the whole batch, in order
    to = lambda t: t.to(device, non_blocking=True)
    return Bucket(to(slot_t), first, heads, m, None if in_order else to(q_index.view(-1)), to(window),
                  to(bias[:, None, :, None]), to(real) if padded else None, None if in_order else to(rows_t))


def _up(n: int, k: int) -> int:
    return -(-n // k) * k


def attend(bks: list[Bucket], k_pool: torch.Tensor, v_pool: torch.Tensor, q: torch.Tensor,
           scale: float) -> torch.Tensor:
    """q: [N, heads, d] (RoPE applied); k_pool, v_pool: [slots, kv_heads, max_len, d] of one layer, the
    rows' own keys already written. Returns [N, heads, d].

    Per bucket, each group's query rows of one K/V head as a batch entry of [U * kv, m * grp, d]: the
    scores over its window (its own WINDOW keys) and over the committed keys [0, heads) of its slot,
    masked past its split, side by side; softmax in float32 over [window, committed] (masked keys past
    the real ones add exp(-inf) = 0 to the same lanes: the sums do not change); values: the window's in
    one product, the committed ones in blocks of VBLOCK keys, summed block after block in float32 (a
    group's blocks past its own carry zero weights, which add nothing). Every product's shape depends on
    the padding only through its row and batch counts, which `probe` checks; committed keys are read in
    place where the groups sit at consecutive slots (at float32) and gathered where not, which `probe`
    checks gives the same bits."""
    n, nh, d = q.shape
    kv = k_pool.shape[1]
    grp = nh // kv
    acc = torch.promote_types(q.dtype, torch.float32)
    k_rows, v_rows = k_pool.view(-1, d), v_pool.view(-1, d)
    out = None if len(bks) == 1 and bks[0].rows is None and bks[0].real is None else torch.empty_like(q)
    for b in bks:
        u, m, s = b.slots.numel(), b.m, b.heads
        g = m * grp
        qb = (q if b.q_index is None else q[b.q_index]).view(u, m, kv, grp, d).transpose(1, 2).reshape(u * kv, g, d)
        kw = k_rows.index_select(0, b.window).view(u * kv, WINDOW, d)
        vw = v_rows.index_select(0, b.window).view(u * kv, WINDOW, d)
        scores = torch.bmm(qb, kw.mT)
        if s:
            # [U * kv, S, d]; (measured: bfloat16's bmm copies strided keys slowly to transpose them)
            kh = _committed(k_pool, b, s, in_place=q.dtype in (torch.float32, torch.float64)).flatten(0, 1)
            vh = _committed(v_pool, b, s, in_place=True).flatten(0, 1)
            scores = torch.cat([scores, torch.bmm(qb, kh.mT)], -1)
        # scaled in the model's dtype as HF's eager attention does (exact for a power-of-two scale);
        # the softmax computes in float32 and rounds its weights to the model's dtype, which the value
        # products take (one pass less than a float32 result cast afterwards)
        w = torch.softmax(scores.mul_(scale).view(u, kv, m, grp, -1).add_(b.bias), dim=-1).view(u * kv, g, -1)
        o = torch.bmm(w[..., :WINDOW], vw)                                                   # [U * kv, g, d]
        if s:
            blocks = s // VBLOCK
            wh = w[..., WINDOW:].unflatten(-1, (blocks, VBLOCK)).transpose(1, 2)    # [U * kv, blocks, g, V]
            parts = wh @ vh.unflatten(1, (blocks, VBLOCK))                          # [U * kv, blocks, g, d]
            head = parts[:, 0].to(acc)          # summed block after block (blocks past a group's own add 0)
            for j in range(1, blocks):
                head.add_(parts[:, j])
            o = (o.to(acc) + head).to(q.dtype)
        o = o.view(u, kv, m, grp, d).transpose(1, 2).reshape(u * m, nh, d)
        if out is None:
            return o
        out[b.rows if b.rows is not None else slice(None)] = o if b.real is None else o[b.real]
    assert out is not None
    return out


def _committed(pool: torch.Tensor, b: Bucket, s: int, in_place: bool) -> torch.Tensor:
    """The first s keys (or values) of each group's slot, [U, kv, s, d]: with in_place, a view of the pool
    where the groups sit at consecutive slots; else gathered."""
    if in_place and b.first is not None:
        return pool[b.first:b.first + b.slots.numel(), :, :s]
    return pool[:, :, :s].index_select(0, b.slots)


# ---------------------------------------------------------------- probing the machine's kernels

def _cancelling(rows: int, k: int, hot: list[int], dtype: torch.dtype, gen: torch.Generator,
               device: torch.device = HOST) -> torch.Tensor:
    """[rows, k] random values, each row with +B and -B at two of the positions `hot` (where the other
    operand is all ones): the huge terms cancel, so a row's result is the sum of the small ones less
    what the partial sums holding B lost, which depends on how the kernel groups the terms. Any change
    of summation order then shows in nearly every row (with plain random data, in a few percent)."""
    big = 2.0 ** min(20, math.frexp(torch.finfo(dtype).max)[1] - 4)
    x = torch.randn(rows, k, generator=gen, device=HOST)
    hot_t = torch.tensor(hot, device=HOST)
    pick = hot_t[torch.rand(rows, len(hot), generator=gen, device=HOST).argsort(-1)[:, :2]]
    r = torch.arange(rows, device=HOST)
    x[r, pick[:, 0]] = big
    x[r, pick[:, 1]] = -big
    return x.to(dtype).to(device)


def _hot(k: int) -> list[int]:
    return sorted({round(i * (k - 1) / 7) for i in range(8)})


def _classes(op, x: torch.Tensor, counts: list[int], unit: int = 1) -> list[set[int]]:
    """The counts grouped by the bits they give: op (rows [M, ...] -> results with rows in dim 0) run on
    x's rows in calls of c * unit rows, for each c in counts, compared on the first 2 * max(counts) * unit
    rows (x holds 3 * max(counts) * unit); every count of a class gives every one of them the same bits."""
    span = 2 * max(counts) * unit
    refs: list[tuple[torch.Tensor, set[int]]] = []
    for c in counts:
        m = c * unit
        got = torch.cat([op(x[a:a + m].clone()) for a in range(0, span, m)])[:span]
        for ref, members in refs:
            if torch.equal(got, ref):
                members.add(c)
                break
        else:
            refs.append((got, {c}))
    return [members for _, members in refs]


def _pick(per_op: list[list[set[int]]]) -> tuple[int, ...] | None:
    """One class of each op's (`_classes`) whose common counts cost the fewest rows over n = 1 ..
    PROBE_ROWS (`_cost`); None when no choice has a count in common."""
    best: tuple[int, tuple[int, ...]] | None = None
    for choice in itertools.product(*per_op):
        common = tuple(sorted(set.intersection(*choice)))
        if common and (best is None or _cost(common) < best[0]):
            best = (_cost(common), common)
    return None if best is None else best[1]


def _cost(counts: tuple[int, ...]) -> int:
    """What n = 1 .. PROBE_ROWS real rows cost on these counts: the rows computed (calls of the largest
    count while more are left, the rest padded to the next count) and CALL_ROWS a call."""
    top, total = counts[-1], 0
    for n in range(1, PROBE_ROWS + 1):
        full, rest = divmod(n, top)
        total += full * (top + CALL_ROWS) + (rows(rest, counts) + CALL_ROWS if rest else 0)
    return total


def rows(n: int, counts: tuple[int, ...]) -> int:
    """Rows a call of n real rows (n <= max(counts)) runs on: the smallest count that holds them."""
    return counts[bisect.bisect_left(counts, n)]


def probe(weights: dict[str, Weight], dtype: torch.dtype, heads: int, kv: int, d: int) -> ExactRows:
    """The row counts at which every row of a model's products and attention comes out the same
    whatever the row count: of products with `weights` (a layer's and the LM head's, "lm_head") and of
    attention of `heads` query heads over `kv` key/value heads of size `d`, in `dtype`. Every row count
    up to PROBE_ROWS is run (kernels switch paths at counts in no order; see the module doc), and exact
    calls keep to the counts of one class. Measured once per model, at the current thread count, which
    the result holds for (about a second for SmolLM2); warns when no such counts exist on this machine."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)   # (probe data is drawn on the host, then moved: the same everywhere)
    dense = [w.dense() if isinstance(w, OutIn) else w for w in weights.values()
             if not isinstance(w, Int8Weight | Int4Weight)]
    dev = dense[0].device if dense else HOST   # the kernels probed are the weights' device's
    counts = list(range(1, PROBE_ROWS + 1))
    top = 3 * PROBE_ROWS
    # products with weights, as `Llama._linear` runs them: x [M, in] @ w [in, out], w contiguous
    # (the LM head through its first columns, a view with the head's own leading dimension: its row
    # count decides the cost, not the kernel path)
    linear: dict[tuple[int, ...], tuple[int, ...] | None] = {}
    for key, w in weights.items():
        if isinstance(w, Int8Weight | Int4Weight):
            continue      # int8 and int4 products are row-invariant at every row count (quant.py)
        if isinstance(w, OutIn):
            w = w.dense()   # what an exact forward multiplies by
        shape = tuple(w.shape)
        if shape in linear:
            continue
        hot = _hot(w.shape[0])
        if key == "lm_head":
            wp = torch.empty(*w.shape, dtype=dtype, device=dev)[:, :4096]
            wp.copy_(w[:, :4096])
        else:
            wp = w.clone()
        wp[hot] = 1                                   # (a copy: the model's weights stay as they are)
        x = _cancelling(top, w.shape[0], hot, dtype, gen, dev)
        linear[shape] = _pick([_classes(lambda x, w=wp: x @ w, x, counts)])
    # attention (`attend`), in rows of queries m * grp: the products of a group's window keys (gathered,
    # contiguous) [kv, m * grp, d] @ [kv, d, W] and of the committed keys [kv, m * grp, d] @ [kv, d, T] (read
    # in place from the pool, or gathered); of the window's weights, the first W columns of a wider row,
    # [kv, m * grp, W] @ [kv, W, d], and per block of VBLOCK committed keys [kv, m * grp, VBLOCK] @ [kv, VBLOCK, d]
    grp = heads // kv
    t = max(3 * CHUNK, VBLOCK)
    hot_d, hot_t = _hot(d), _hot(t)
    keys = torch.randn(kv, 2 * t, d, generator=gen, device=HOST).to(dtype).to(dev)[:, :t]   # (strided, as the pool)
    keys[:, :, hot_d] = 1
    vals = torch.randn(kv, 2 * t, d, generator=gen, device=HOST).to(dtype).to(dev)[:, :t]
    vals[:, hot_t] = 1
    q_rows = _cancelling(top * grp, d, hot_d, dtype, gen, dev)     # one query head per row of the probe
    by_head = lambda x: x.expand(kv, -1, -1).contiguous()
    score_ops = [lambda x, k=k: torch.bmm(by_head(x), k.mT).transpose(0, 1)
                 for k in (keys[:, :WINDOW].contiguous(), keys, keys.contiguous())]
    per_op = [_classes(op, q_rows, counts, grp) for op in score_ops]
    window = vals[:, :WINDOW].contiguous()
    window[:, _hot(WINDOW)] = 1
    wide = lambda x: torch.cat([by_head(x), by_head(x)], -1)[..., :WINDOW]
    per_op.append(_classes(lambda x: torch.bmm(wide(x), window).transpose(0, 1),
                           _cancelling(top * grp, WINDOW, _hot(WINDOW), dtype, gen, dev), counts, grp))
    block = vals[:, :VBLOCK].clone()
    block[:, _hot(VBLOCK)] = 1
    per_op.append(_classes(lambda x: (by_head(x) @ block).transpose(0, 1),
                           _cancelling(top * grp, VBLOCK, _hot(VBLOCK), dtype, gen, dev), counts, grp))
    attn = _pick(per_op)
    batched = attn is not None and _batches_alike(dtype, heads, kv, d, attn, gen, dev)
    if attn is None or any(c is None for c in linear.values()):
        log.warning("exact decoding: this machine's %s matrix kernels round rows differently at every "
                    "row count probed; speculative output may differ from plain decoding", dtype)
        every = tuple(counts)   # (rows may differ anyway: calls as they come, PROBE_ROWS at most)
        return ExactRows(False, {shape: every for shape in linear}, every)
    products = {shape: c for shape, c in linear.items() if c is not None}
    log.info("exact decoding (%s, %s): each product's calls on %s, attention groups on %s rows, "
             "%s (probed in %.2f s)", str(dtype).removeprefix("torch."),
             f"{torch.get_num_threads()} threads" if dev.type == "cpu" else str(dev),
             "; ".join(_spans(c) for c in products.values()) + " rows" if products else "any number of rows (codes)",
             _spans(attn),
             "sequences batched" if batched else "one group of rows a call (batched calls round differently here)",
             time.perf_counter() - t0)
    return ExactRows(True, products, attn, batched)


def _spans(counts: tuple[int, ...]) -> str:
    """1-4,6,8-9: a class of row counts for the start-up line."""
    runs: list[list[int]] = []
    for c in counts:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _batches_alike(dtype: torch.dtype, heads: int, kv: int, d: int, counts: tuple[int, ...],
                   gen: torch.Generator, device: torch.device = HOST) -> bool:
    """Whether `attend` gives every row the same bits in one bucket of many groups (other slots,
    splits, row counts: padded in rows and committed keys) as in a bucket of its group alone."""
    late = VBLOCK + 2 * CHUNK + 7    # a decode row whose committed keys take two value blocks
    n_pos = _up(late + WINDOW, VBLOCK)
    k_pool = torch.randn(4, kv, n_pos, d, generator=gen, device=HOST).to(dtype).to(device)
    v_pool = torch.randn(4, kv, n_pos, d, generator=gen, device=HOST).to(dtype).to(device)
    k_pool[..., _hot(d)] = 2.0 ** 8      # large products: an ordering change shows in most rows
    # a decode row early and late, a tree of five rows, a 40-row chain (a prefill chunk: three splits)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 1, 0, 0, 1]],
                        dtype=torch.bool, device=HOST)
    seqs = [(torch.tensor([20], device=HOST), 20, None), (torch.tensor([late], device=HOST), late, None),
            (torch.tensor([0, 1, 1, 2, 2], device=HOST) + 2 * CHUNK + 3, 2 * CHUNK + 3,
             torch.cat([torch.ones(5, 2 * CHUNK + 3, dtype=torch.bool, device=HOST), tree], 1)),
            (torch.arange(CHUNK + 5, 2 * CHUNK + 45, device=HOST), CHUNK + 5, None)]
    plans = [plan(pos, start, mask) for pos, start, mask in seqs]
    sizes = [pos.numel() for pos, _, _ in seqs]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    q = torch.randn(sum(sizes), heads, d, generator=gen, device=HOST).to(dtype).to(device)
    slots = list(range(len(seqs)))
    alone = attend(buckets(slots, offsets, plans, sizes, (kv, n_pos), dtype, counts, batched=False, device=device),
                   k_pool, v_pool, q, d ** -0.5)
    together = attend([_bucket(_units(slots, offsets, plans, sizes, max(counts)), (kv, n_pos), dtype, counts,
                               sum(sizes), device)],
                      k_pool, v_pool, q, d ** -0.5)
    return torch.equal(alone, together)
