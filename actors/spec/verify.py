"""Verification: walk the draft tree along the target and keep the longest path it agrees with,
plus one token of the target's own (the bonus). Both rules return (path, bonus) where `path` lists
accepted draft nodes from the root down.

Greedy: a child is accepted when it is the target's argmax at its parent. Output is exactly greedy
decoding of the target.

Sampling, point-mass drafts (n-gram, greedy chains: the tree has no probs): sample the target's token y
from p at each node with the randomness of its position, accept the child that is y, else emit y as the
bonus. y ~ p exactly, a child x is accepted with probability p(x) (as min(1, p(x) / 1) would), and the
tokens are those plain decoding draws with the same randomness, whatever was drafted.

Sampling, drafts with their own q (Leviathan et al. / Chen et al. for a chain; SpecInfer's
multi-candidate rule for a tree): at a node whose target distribution is p, try its children in order.
Child x, drawn from q, is accepted with probability min(1, p(x) / q(x)); after a rejection the target
distribution becomes the residual norm(max(p - q, 0)) and the next child is tried against it. When no
child is accepted the bonus token is drawn from the final residual. Each round is an exact sampler of
its residual, so the token emitted at every node is distributed exactly as p.

Both read the target's rows through `at(row)` when given one (a structured output's grammar masks each
row as the walk reaches it: grammar.py), else straight from the tensor."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .tree import DraftTree


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor,
                  at: Callable[[int], torch.Tensor] | None = None, choice: list[int] | None = None,
                  ) -> tuple[list[int], int]:
    """target_logits: [1 + n, V], row 0 at the root, row i + 1 at draft node i; choice: their argmaxes,
    read already (a batch reads all of a step's at once)."""
    children = tree.children()
    # one device->host transfer for the whole tree, unless rows must be read one by one
    if choice is None and at is None:
        choice = target_logits.argmax(dim=-1).tolist()
    path: list[int] = []
    row = 0
    while True:
        want = choice[row] if choice is not None else int(at(row).argmax())  # type: ignore[misc]
        nxt = next((c for c in children[row] if tree.tokens[c] == want), None)
        if nxt is None:
            return path, want
        path.append(nxt)
        row = nxt + 1


def verify_sampling(tree: DraftTree, target_probs: torch.Tensor | Callable[[int], torch.Tensor],
                    generator: torch.Generator | Callable[[int], torch.Generator]) -> tuple[list[int], int]:
    """target_probs: [1 + n, V] processed target distributions, row 0 at the root (or at(row)).
    generator: one for every draw, or draw(k): the one for the k-th token this step emits."""
    at = target_probs.__getitem__ if isinstance(target_probs, torch.Tensor) else target_probs
    draw = (lambda k: generator) if isinstance(generator, torch.Generator) else generator
    children = tree.children()
    path: list[int] = []
    row = 0
    while True:
        p = at(row)
        if tree.probs is None:   # point masses: the target's own draw decides
            y = int(torch.multinomial(p, 1, generator=draw(len(path))))
            nxt = next((c for c in children[row] if tree.tokens[c] == y), None)
            if nxt is None:
                return path, y
            path.append(nxt)
            row = nxt + 1
            continue
        generator = draw(len(path))
        for c in children[row]:
            x = tree.tokens[c]
            q = None if tree.probs is None else tree.probs[c]
            qx = 1.0 if q is None else float(q[x])
            # accept x with probability min(1, p(x) / q(x))
            if float(torch.rand((), generator=generator, device=generator.device)) * qx < float(p[x]):
                path.append(c)
                row = c + 1
                break
            # rejected: continue against the residual max(p - q, 0), renormalised
            residual = p.clone()
            if q is None:
                residual[x] = 0.0
            else:
                residual = torch.clamp_min(residual - q.to(residual.dtype), 0.0)
            total = residual.sum()
            if total > 0:  # total == 0 has probability zero (it needs p == q, where nothing is rejected)
                p = residual / total
        else:
            return path, int(torch.multinomial(p, 1, generator=generator))
