"""Token trees (structure, trie building, validation) and the runner's tree attention / KV compaction."""
from __future__ import annotations

import random

import pytest
import torch

from drafthorse.actors.models.runner import ContextFull, ModelRunner
from drafthorse.actors.spec.tree import ROOT, DraftTree, ancestor_mask, build_trie

# A hand-built tree (node: token, parent):
#   root ─ 0:10 ─ 2:12 ─ 4:14
#        │      └ 3:13
#        └ 1:11 ─ 5:15 ─ 6:16
TOKENS = [10, 11, 12, 13, 14, 15, 16]
PARENTS = [ROOT, ROOT, 0, 0, 2, 1, 5]


def _ancestors(parents: list[int], i: int) -> set[int]:
    """Node i and all its ancestors, by walking up (the definition, independent of the code)."""
    out = set()
    while i != ROOT:
        out.add(i)
        i = parents[i]
    return out


def _path_to(parents: list[int], i: int) -> list[int]:
    """Nodes from the root's child down to i."""
    path = []
    while i != ROOT:
        path.append(i)
        i = parents[i]
    return path[::-1]


# ---------------------------------------------------------------- structure

def test_depths_children_of_hand_built_tree():
    tree = DraftTree(list(TOKENS), list(PARENTS))
    assert len(tree) == 7
    assert tree.depths() == [1, 1, 2, 2, 3, 2, 3]
    assert tree.children() == [[0, 1], [2, 3], [5], [4], [], [], [6], []]


def test_ancestor_mask_of_hand_built_tree():
    mask = ancestor_mask(PARENTS)
    expected = torch.tensor([
        # 0  1  2  3  4  5  6
        [1, 0, 0, 0, 0, 0, 0],  # 0
        [0, 1, 0, 0, 0, 0, 0],  # 1
        [1, 0, 1, 0, 0, 0, 0],  # 2
        [1, 0, 0, 1, 0, 0, 0],  # 3
        [1, 0, 1, 0, 1, 0, 0],  # 4
        [0, 1, 0, 0, 0, 1, 0],  # 5
        [0, 1, 0, 0, 0, 1, 1],  # 6
    ], dtype=torch.bool)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)


def test_ancestor_mask_matches_definition_on_random_trees():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 20)
        parents = [ROOT] + [rng.randint(ROOT, i - 1) for i in range(1, n)]
        mask = ancestor_mask(parents)
        for i in range(n):
            assert {j for j in range(n) if mask[i, j]} == _ancestors(parents, i)
        depths = DraftTree([0] * n, parents).depths()
        assert depths == [len(_ancestors(parents, i)) for i in range(n)]


def test_chain_is_a_tree():
    n = 5
    tree = DraftTree(list(range(100, 100 + n)), [ROOT] + list(range(n - 1)))
    tree.validate(vocab_size=200, max_nodes=n, max_depth=n)
    assert tree.depths() == [1, 2, 3, 4, 5]
    assert tree.children() == [[0], [1], [2], [3], [4], []]
    assert torch.equal(ancestor_mask(tree.parents), torch.ones(n, n, dtype=torch.bool).tril())


def test_empty_tree():
    tree = DraftTree()
    assert len(tree) == 0 and tree.depths() == [] and tree.children() == [[]]
    tree.validate(vocab_size=10, max_nodes=0, max_depth=0)
    assert ancestor_mask([]).shape == (0, 0)


# ---------------------------------------------------------------- build_trie

def _check_trie(tree: DraftTree, continuations: list[list[int]], max_nodes: int, complete: bool):
    n = len(tree)
    assert n <= max_nodes
    assert all(ROOT <= p < i for i, p in enumerate(tree.parents))
    # siblings never repeat a token (shared prefixes are merged)
    for kids in tree.children():
        toks = [tree.tokens[c] for c in kids]
        assert len(toks) == len(set(toks))
    paths = {tuple(tree.tokens[j] for j in _path_to(tree.parents, i)) for i in range(n)}
    prefixes = {tuple(s[:k]) for s in continuations for k in range(1, len(s) + 1)}
    assert paths <= prefixes              # nothing invented
    assert len(paths) == n                # one node per distinct prefix
    if complete:
        assert paths == prefixes          # nothing lost


def test_build_trie_merges_shared_prefixes():
    conts = [[1, 2, 3], [1, 2, 4], [5, 6], [1, 7], [1, 2, 3]]
    tree = build_trie(conts, max_nodes=100)
    # distinct prefixes: 1, 12, 123, 124, 5, 56, 17
    assert len(tree) == 7
    _check_trie(tree, conts, 100, complete=True)
    # the first continuation is the first chain
    assert tree.tokens[:3] == [1, 2, 3] and tree.parents[:3] == [ROOT, 0, 1]
    assert [tree.tokens[c] for c in tree.children()[0]] == [1, 5]


def test_build_trie_respects_max_nodes_in_priority_order():
    conts = [[1, 2, 3], [1, 2, 4], [5, 6], [1, 7]]
    tree = build_trie(conts, max_nodes=4)
    assert len(tree) == 4
    _check_trie(tree, conts, 4, complete=False)
    paths = {tuple(tree.tokens[j] for j in _path_to(tree.parents, i)) for i in range(len(tree))}
    # higher-priority continuations are kept whole before lower ones get any node
    assert {(1,), (1, 2), (1, 2, 3), (1, 2, 4)} == paths
    assert len(build_trie(conts, max_nodes=0)) == 0


def test_build_trie_random():
    rng = random.Random(1)
    for _ in range(100):
        conts = [[rng.randint(0, 3) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(0, 6))]
        max_nodes = rng.randint(0, 20)
        tree = build_trie(conts, max_nodes)
        prefixes = {tuple(s[:k]) for s in conts for k in range(1, len(s) + 1)}
        _check_trie(tree, conts, max_nodes, complete=len(prefixes) <= max_nodes)
        tree.validate(vocab_size=4, max_nodes=max(max_nodes, 1))


# ---------------------------------------------------------------- validate

def test_validate_accepts_good_tree_with_probs():
    probs = torch.full((7, 20), 1 / 20)
    tree = DraftTree(list(TOKENS), list(PARENTS), probs)
    assert tree.validate(vocab_size=20, max_nodes=7, max_depth=3) is tree


@pytest.mark.parametrize("tokens, parents, probs_shape, vocab, max_nodes, max_depth, match", [
    ([1, 2], [ROOT], None, 10, 8, None, "parents"),                      # length mismatch
    ([1, 2, 3], [ROOT, 5, 0], None, 10, 8, None, "parent"),               # parent out of range
    ([1, 2, 3], [ROOT, -2, 0], None, 10, 8, None, "parent"),              # below ROOT
    ([1, 2], [1, ROOT], None, 10, 8, None, "parent"),                     # forward reference
    ([1, 2], [ROOT, 1], None, 10, 8, None, "parent"),                     # self loop
    ([1, 2, 3], [ROOT, 2, 1], None, 10, 8, None, "parent"),               # cycle 1 <-> 2
    ([1, 10], [ROOT, 0], None, 10, 8, None, "token"),                     # token == vocab
    ([-1, 2], [ROOT, 0], None, 10, 8, None, "token"),                     # negative token
    ([1, 2, 3], [ROOT, 0, 1], None, 10, 2, None, "nodes"),                # oversized
    ([1, 2, 3], [ROOT, 0, 1], None, 10, 8, 2, "deeper"),                  # too deep
    ([1, 2], [ROOT, 0], (2, 9), 10, 8, None, "probs"),                    # wrong vocab dim
    ([1, 2], [ROOT, 0], (3, 10), 10, 8, None, "probs"),                   # wrong node dim
    ([1, 2], [ROOT, 0], (10,), 10, 8, None, "probs"),                     # wrong rank
])
def test_validate_rejects(tokens, parents, probs_shape, vocab, max_nodes, max_depth, match):
    probs = None if probs_shape is None else torch.full(probs_shape, 0.1)
    with pytest.raises(ValueError, match=match):
        DraftTree(tokens, parents, probs).validate(vocab, max_nodes, max_depth)


# ---------------------------------------------------------------- runner: tree attention and commit

PREFIX = [5, 17, 3, 99, 42, 8, 61]


def _hf_next_logits(lm, ids: list[int]) -> torch.Tensor:
    """Next-token logits after `ids` from transformers' own forward (no cache): the reference."""
    with torch.no_grad():
        return lm.hf(torch.tensor([ids])).logits[0, -1]


def _chain_logits(lm, ids: list[int]) -> torch.Tensor:
    runner = ModelRunner(lm.model, 64)
    logits, _ = runner.extend(ids)
    return logits


@pytest.mark.parametrize("seed", [0, 1])
def test_tree_in_one_pass_equals_each_path_as_a_chain(tiny, seed):
    lm = tiny(seed)
    runner = ModelRunner(lm.model, 64)
    runner.extend(PREFIX)
    logits, hidden = runner.score(list(TOKENS), list(PARENTS))
    assert logits.shape == (len(TOKENS), lm.vocab_size) and hidden.shape[0] == len(TOKENS)
    for i in range(len(TOKENS)):
        path_tokens = [TOKENS[j] for j in _path_to(PARENTS, i)]
        chain = _chain_logits(lm, PREFIX + path_tokens)
        assert torch.allclose(logits[i], chain, atol=1e-9, rtol=1e-9), f"node {i}"
        assert torch.allclose(logits[i], _hf_next_logits(lm, PREFIX + path_tokens), atol=1e-8, rtol=1e-8)


def test_tree_grown_level_by_level_equals_one_pass(tiny):
    lm = tiny(0)
    one = ModelRunner(lm.model, 64)
    one.extend(PREFIX)
    full, _ = one.score(list(TOKENS), list(PARENTS))
    grown = ModelRunner(lm.model, 64)
    grown.extend(PREFIX)
    # the same tree in three calls, each adding one level (nodes keep their indices: 0-1, 2-3-5, 4-6)
    a, _ = grown.score([10, 11], [ROOT, ROOT])
    b, _ = grown.score([12, 13, 15], [0, 0, 1])
    c, _ = grown.score([14, 16], [2, 4])
    assert grown.scratch_size == 7
    order = [0, 1, 2, 3, 5, 4, 6]  # full-tree index of each grown node
    assert torch.allclose(torch.cat([a, b, c]), full[order], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("path", [[1, 5, 6], [0, 3], [0, 2, 4], [1], []])
def test_commit_branch_then_decode_equals_direct_extension(tiny, path):
    lm = tiny(0)
    runner = ModelRunner(lm.model, 64)
    runner.extend(PREFIX)
    runner.score(list(TOKENS), list(PARENTS))
    runner.commit(path)
    kept = [TOKENS[j] for j in path]
    assert runner.length == len(PREFIX) + len(path) and runner.scratch_size == 0

    direct = ModelRunner(lm.model, 64)
    direct.extend(PREFIX + kept)
    # one more token, then another small tree, then a commit again: the cache must stay right
    la, _ = runner.extend([7])
    lb, _ = direct.extend([7])
    assert torch.allclose(la, lb, atol=1e-9, rtol=1e-9)
    assert torch.allclose(la, _hf_next_logits(lm, PREFIX + kept + [7]), atol=1e-8, rtol=1e-8)

    ta, _ = runner.score([30, 31, 32, 33], [ROOT, ROOT, 1, 2])
    tb, _ = direct.score([30, 31, 32, 33], [ROOT, ROOT, 1, 2])
    assert torch.allclose(ta, tb, atol=1e-9, rtol=1e-9)
    runner.commit([1, 2])
    direct.reset()
    direct.extend(PREFIX + kept + [7, 31, 32])
    assert torch.allclose(runner.extend([9])[0], direct.extend([9])[0], atol=1e-9, rtol=1e-9)


def test_commit_rejects_non_chain(tiny):
    lm = tiny(0)
    runner = ModelRunner(lm.model, 64)
    runner.extend(PREFIX)
    runner.score(list(TOKENS), list(PARENTS))
    for bad in ([2], [0, 5], [0, 2, 3], [7], [1, 5, 6, 7]):
        with pytest.raises(ValueError, match="commit path"):
            runner.commit(bad)
    assert runner.length == len(PREFIX)


def test_runner_context_full(tiny):
    lm = tiny(0)
    runner = ModelRunner(lm.model, 10)
    runner.extend(PREFIX)  # 7 of 10
    with pytest.raises(ContextFull):
        runner.extend([1, 2, 3, 4])
    with pytest.raises(ContextFull):
        runner.score([1, 2, 3, 4], [ROOT, 0, 1, 2])
    runner.score([1, 2, 3], [ROOT, 0, 1])  # exactly fits
    with pytest.raises(ValueError):
        runner.extend([])
