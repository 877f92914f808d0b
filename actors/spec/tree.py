"""Token trees. A draft is a tree hanging off the last committed token (the root); a chain is a tree
whose every node has the previous one as parent. Nodes are stored in topological order, so a node's
parent always has a smaller index, and everything derived (depth, ancestor mask, positions) follows
in one pass."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROOT = -1  # parent index of a depth-1 node: the last committed token


@dataclass
class DraftTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    # Per-node distribution the node was drawn from, [n, V] float, for lossless sampling.
    # None means every node is a deterministic proposal (a point mass on its token).
    probs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def validate(self, vocab_size: int, max_nodes: int, max_depth: int | None = None) -> DraftTree:
        """Reject malformed trees with ValueError (they may come from another process)."""
        n = len(self.tokens)
        if len(self.parents) != n:
            raise ValueError(f"tree has {n} tokens but {len(self.parents)} parents")
        if n > max_nodes:
            raise ValueError(f"tree has {n} nodes, more than the budget of {max_nodes}")
        for i, (t, p) in enumerate(zip(self.tokens, self.parents)):
            if not 0 <= t < vocab_size:
                raise ValueError(f"tree node {i}: token id {t} outside the vocabulary [0, {vocab_size})")
            if not ROOT <= p < i:
                raise ValueError(f"tree node {i}: parent {p} must be {ROOT} (root) or an earlier node")
        if max_depth is not None and n and max(self.depths()) > max_depth:
            raise ValueError(f"tree is deeper than {max_depth}")
        if self.probs is not None:
            if tuple(self.probs.shape) != (n, vocab_size):
                raise ValueError(f"tree probs have shape {tuple(self.probs.shape)}, expected ({n}, {vocab_size})")
            self.check_probs()
        return self

    def check_probs(self, tolerance: float = 1e-3) -> None:
        """Each node's distribution is one it could have been drawn from: finite, >= 0, summing to 1, and
        giving its own token a positive probability. The acceptance rule divides by q(x): a node with
        q(x) = 0 would be accepted whenever p(x) > 0, and the output would no longer follow the target."""
        q = self.probs
        if q is None or not len(q):
            return
        if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
            raise ValueError("tree probs must be finite and >= 0")
        bad = ((q.sum(-1, dtype=torch.float64) - 1).abs() > tolerance).nonzero()
        if len(bad):
            raise ValueError(f"tree node {int(bad[0])}: its distribution sums to {float(q[bad[0]].sum()):.6g}, not 1")
        own = q[torch.arange(len(q), device=q.device), torch.tensor(self.tokens, device=q.device)]
        if bool((own <= 0).any()):
            i = int((own <= 0).nonzero()[0])
            raise ValueError(f"tree node {i}: token {self.tokens[i]} has probability 0 in its own distribution")

    def depths(self) -> list[int]:
        """Depth of each node; children of the root have depth 1."""
        d: list[int] = []
        for p in self.parents:
            d.append(1 if p == ROOT else d[p] + 1)
        return d

    def children(self) -> list[list[int]]:
        """children[0] are the root's children; children[i + 1] are node i's, in proposal order."""
        ch: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            ch[p + 1].append(i)
        return ch


def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[n, n] bool: mask[i, j] is True when node j is node i or one of its ancestors (parents[i] < i,
    ROOT for none). Row i is its parent's row plus itself: tree attention."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool, device="cpu")   # (a forward's bookkeeping: on the host)
    for i, p in enumerate(parents):
        if p != ROOT:
            mask[i, :p + 1] = mask[p, :p + 1]
        mask[i, i] = True
    return mask


def build_trie(continuations: list[list[int]], max_nodes: int) -> DraftTree:
    """Merge token sequences into a tree sharing common prefixes, in priority order, within max_nodes."""
    tree = DraftTree()
    index: dict[tuple[int, int], int] = {}  # (parent, token) -> node
    for seq in continuations:
        parent = ROOT
        for tok in seq:
            node = index.get((parent, tok))
            if node is None:
                if len(tree.tokens) >= max_nodes:
                    break
                node = len(tree.tokens)
                tree.tokens.append(tok)
                tree.parents.append(parent)
                index[(parent, tok)] = node
            parent = node
    return tree
