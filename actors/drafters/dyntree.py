"""Dynamic draft trees (EAGLE-2): grow the tree where the drafter is confident.

Every node carries a score, the sum of the draft's log-probabilities along its path from the root
(its joint confidence, an estimate of the chance the whole path is accepted). Depth by depth, the
`topk` best-scoring nodes of the newest level are expanded, each into its `topk` most likely children
(one batched draft step per depth); at the end the `max_nodes` best-scoring nodes of everything
proposed are kept. A child never scores above its parent, so the kept set is closed under ancestors,
and growth stops early once nothing left to expand can beat the kept set.

Sampling stays lossless because no drawn node is ever discarded: children are drawn without
replacement from the draft distribution (each node's distribution goes to the verifier), how many are
drawn is fixed before drawing, and growth stops at the budget. Which nodes get expanded may depend
on what was drawn: that only decides where the next proposals hang, not what they are."""
from __future__ import annotations

from collections.abc import Callable

import torch

from drafthorse.actors.models.kvcache import HOST
from drafthorse.actors.spec.sampling import SamplingParams, probs_from_logits
from drafthorse.actors.spec.tree import ROOT, DraftTree

from .base import Budget

Expand = Callable[[list[int], DraftTree], torch.Tensor]   # nodes of the tree -> their draft logits [m, N]


def grow(first: torch.Tensor, expand: Expand, budget: Budget, params: SamplingParams,
         generator: torch.Generator, topk: int, depth: int, vocab_size: int,
         d2t: torch.Tensor | None = None) -> DraftTree:
    """first: the root's draft logits [N] (N = draft vocabulary, d2t maps it to target ids; None =
    the target's own). expand(nodes, tree) scores the given nodes of the tree grown so far and returns
    the draft logits of their children."""
    depth = min(depth, budget.max_depth)
    greedy = params.greedy
    tree = DraftTree(probs=None if greedy else torch.empty(0, vocab_size, device=HOST))
    if depth < 1 or budget.max_nodes < 1:
        return tree
    scores: list[float] = []
    qs: list[torch.Tensor] = []
    to_target = (lambda i: int(d2t[i])) if d2t is not None else int
    # the tree grows on the host: a level's logits come off the device once, its choices are per node
    level, logits = [ROOT], first[None].to(HOST)
    for d in range(1, depth + 1):
        base = torch.tensor([0.0 if p == ROOT else scores[p] for p in level], dtype=torch.float64, device=HOST)
        start = len(tree.tokens)
        if greedy:
            lp = torch.log_softmax(logits.double(), dim=-1).clamp(max=0.0)
            top = lp.topk(min(topk, lp.shape[-1]), dim=-1)
            cand = (base[:, None] + top.values).flatten()
            # no more than max_nodes of one level can survive the final cut
            for c in cand.topk(min(budget.max_nodes, cand.numel())).indices.tolist():
                r, j = divmod(c, top.indices.shape[1])
                tree.tokens.append(to_target(top.indices[r, j]))
                tree.parents.append(level[r])
                scores.append(float(cand[c]))
        else:
            q_all = probs_from_logits(logits, params).double()
            for r, parent in enumerate(level):        # best parents first: they draw while there is room
                q = q_all[r]
                for _ in range(min(topk, budget.max_nodes - len(tree.tokens))):
                    total = q.sum()
                    if total <= 0:
                        break
                    q = q / total
                    t = int(torch.multinomial(q, 1, generator=generator))
                    tree.tokens.append(to_target(t))
                    tree.parents.append(parent)
                    scores.append(float(base[r]) + float(torch.log(q[t])))
                    qs.append(_full(q, d2t, vocab_size))
                    q = q.clone()
                    q[t] = 0.0                        # without replacement
        new = list(range(start, len(tree.tokens)))
        if d == depth or not new or (not greedy and len(tree.tokens) >= budget.max_nodes):
            break
        level = sorted(new, key=lambda n: -scores[n])[:topk]
        if greedy and len(scores) >= budget.max_nodes:
            # a child scores at most its parent and loses ties to earlier nodes: once no node to
            # expand beats the max_nodes-th best score so far, no deeper node can make the final cut
            cut = sorted(scores, reverse=True)[budget.max_nodes - 1]
            if scores[level[0]] <= cut:
                break
        logits = expand(level, tree).to(HOST)
    if not greedy:
        tree.probs = torch.stack(qs).float() if qs else tree.probs
        return tree
    return _best(tree, scores, budget.max_nodes)


def _full(q: torch.Tensor, d2t: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """A draft-vocabulary distribution as one over the target's vocabulary (zero elsewhere)."""
    if d2t is None:
        return q
    out = torch.zeros(vocab_size, dtype=q.dtype, device=HOST)
    out[d2t] = q
    return out


def _best(tree: DraftTree, scores: list[float], max_nodes: int) -> DraftTree:
    """The max_nodes best-scoring nodes (ties: the earlier node), still in topological order."""
    if len(tree.tokens) <= max_nodes:
        return tree
    order = sorted(range(len(scores)), key=lambda n: (-scores[n], n))[:max_nodes]
    keep = sorted(order)
    new_index: dict[int, int] = {}
    out = DraftTree()
    for n in keep:
        p = tree.parents[n]
        if p != ROOT and p not in new_index:   # (cannot happen: a parent outscores its child)
            continue
        new_index[n] = len(out.tokens)
        out.tokens.append(tree.tokens[n])
        out.parents.append(ROOT if p == ROOT else new_index[p])
    return out
