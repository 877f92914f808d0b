"""Lossless sampling, checked statistically: whatever the draft (chain or tree, drawn from q or
deterministic), the tokens emitted by verification must be distributed exactly as the target p.

One goodness-of-fit harness (`gof_pvalue`) serves three uses: the real rule must pass it, deliberately
wrong rules must fail it (so the test has power), and the whole engine with real drafters must pass
it against the target distribution computed by enumeration. All seeds are fixed: the outcomes are
deterministic, the thresholds only say how unlucky a correct implementation could be."""
from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from scipy import stats as sps

from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec import sampling
from drafthorse.actors.spec.sampling import SamplingParams, probs_from_logits
from drafthorse.actors.spec.tree import ROOT, DraftTree
from drafthorse.actors.spec.verify import verify_sampling

PASS_P = 1e-3     # a correct sampler fails with this probability per check
FAIL_P = 1e-6     # a wrong one must be rejected far more strongly than that


def gof_pvalue(samples, probs) -> float:
    """G-test of integer outcomes `samples` against the distribution `probs` (over range(len(probs))).
    Bins expected to hold fewer than 5 samples are pooled; an outcome of probability 0 gives 0.0."""
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()
    counts = np.bincount(np.asarray(samples, dtype=np.int64), minlength=len(probs)).astype(np.float64)
    assert len(counts) == len(probs), "outcome outside the support"
    n = counts.sum()
    if counts[probs <= 0].sum() > 0:
        return 0.0
    keep = probs > 0
    counts, expected = counts[keep], probs[keep] * n
    order = np.argsort(expected)
    counts, expected = counts[order], expected[order]
    k = int((expected < 5).sum())                 # pool the bins expected to hold < 5 samples ...
    while 0 < k < len(expected) and expected[:k].sum() < 5:
        k += 1                                    # ... with the next smallest until the pool has 5
    if k > 1:
        counts = np.concatenate([[counts[:k].sum()], counts[k:]])
        expected = np.concatenate([[expected[:k].sum()], expected[k:]])
    assert len(counts) >= 2, "too few samples for the test"
    return float(sps.power_divergence(counts, expected, lambda_="log-likelihood").pvalue)


def test_gof_harness_sanity():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    assert gof_pvalue(rng.choice(5, 20000, p=p), p) > PASS_P
    assert gof_pvalue(rng.choice(5, 20000, p=[0.45, 0.35, 0.15, 0.05, 0.0]), p) < FAIL_P
    assert gof_pvalue([0, 1, 4], p) == 0.0


# ====================================================================== unit level: verify_sampling

V = 6
N_UNIT = 20000
N_WRONG = 4000      # wrong rules fail by hundreds of orders of magnitude: fewer samples do


class World:
    """A toy 'model' over V tokens: target p and draft q at the root, and after each first token."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.p1 = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
        self.p2 = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64), -1)  # p2[first]
        self.p3 = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)     # deeper
        self.q1 = torch.softmax(1.5 * torch.randn(V, generator=g, dtype=torch.float64), -1)
        self.q2 = torch.softmax(1.5 * torch.randn(V, V, generator=g, dtype=torch.float64), -1)
        self.np_q1, self.np_q2 = self.q1.numpy(), self.q2.numpy()

    @functools.cache  # noqa: B019 - one instance per test module, kept for its lifetime
    def q1_without(self, removed: frozenset) -> torch.Tensor:
        q = self.q1.clone()
        q[list(removed)] = 0.0
        return q / q.sum()

    def joint2(self) -> np.ndarray:
        """P(first = y, second = z) at index y * V + z."""
        return (self.p1[:, None] * self.p2).reshape(-1).numpy()


# --- drafts: each returns a DraftTree hanging off the root and the target rows [1 + n, V] ----------

def draft_chain_q(w: World, rng: np.random.Generator, q1: torch.Tensor, p1: torch.Tensor,
                  p2_of: callable):
    """Depth-2 chain: x0 ~ q1, x1 ~ q2[x0]."""
    x0 = int(rng.choice(V, p=q1.numpy()))
    x1 = int(rng.choice(V, p=w.np_q2[x0]))
    tree = DraftTree([x0, x1], [ROOT, 0], torch.stack([q1, w.q2[x0]]))
    return tree, torch.stack([p1, p2_of(x0), w.p3])


def draft_tree_q(w: World, rng, q1, p1, p2_of, record_true_q: bool = True):
    """Three root children drawn without replacement from q1 (each with the distribution it was
    drawn from: q1 renormalised without the earlier picks), each continued by one child ~ q2."""
    xs, qs = [], []
    for _ in range(3):
        q = w.q1_without(frozenset(xs)) if q1 is w.q1 else _without(q1, xs)
        xs.append(int(rng.choice(V, p=q.numpy())))
        qs.append(q if record_true_q else q1)
    ys = [int(rng.choice(V, p=w.np_q2[x])) for x in xs]
    tree = DraftTree(xs + ys, [ROOT, ROOT, ROOT, 0, 1, 2], torch.stack(qs + [w.q2[x] for x in xs]))
    return tree, torch.stack([p1] + [p2_of(x) for x in xs] + [w.p3] * 3)


def _without(q: torch.Tensor, removed: list[int]) -> torch.Tensor:
    q = q.clone()
    q[removed] = 0.0
    return q / q.sum()


def draft_tree_point(w: World, rng, q1, p1, p2_of):
    """Deterministic proposals (point masses, probs=None): 3 root children, 2 under the first."""
    a, b, c = 3, 0, 5
    tree = DraftTree([a, b, c, 1, 4, 2], [ROOT, ROOT, ROOT, 0, 0, 1], None)
    return tree, torch.stack([p1, p2_of(a), p2_of(b), p2_of(c), w.p3, w.p3, w.p3])


def draft_chain_point(w: World, rng, q1, p1, p2_of):
    x0 = 2
    tree = DraftTree([x0, 4], [ROOT, 0], None)
    return tree, torch.stack([p1, p2_of(x0), w.p3])


DRAFTS = {"chain_q": draft_chain_q, "tree_q": draft_tree_q, "tree_point": draft_tree_point,
          "chain_point": draft_chain_point}


def first_two_tokens(verify, w: World, draft, rng: np.random.Generator, gen: torch.Generator) -> int:
    """What an engine emits first: the accepted path and the bonus of one verification; when that is
    a single token y, a second step drafts again under y (target p2[y]). Returns y * V + z."""
    tree, target = draft(w, rng, w.q1, w.p1, lambda x: w.p2[x])
    path, bonus = verify(tree, target, gen)
    out = [tree.tokens[n] for n in path] + [bonus]
    if len(out) < 2:
        y = out[0]
        # the next step: the same kind of draft, with the root distributions of the state after y
        tree, target = draft(w, rng, w.q2[y], w.p2[y], lambda x: w.p3)
        path, bonus = verify(tree, target, gen)
        out += [tree.tokens[n] for n in path] + [bonus]
    return out[0] * V + out[1]


def sample_pvalues(verify, draft, n: int = N_UNIT, seed: int = 0, w: World | None = None
                   ) -> tuple[float, float]:
    """The statistical harness: p-values of (first token ~ p1, (first, second) ~ p1 x p2)."""
    w = w or World()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    pairs = np.array([first_two_tokens(verify, w, draft, rng, gen) for _ in range(n)])
    return gof_pvalue(pairs // V, w.p1.numpy()), gof_pvalue(pairs, w.joint2())


# --- deliberately wrong rules (copies of the algorithm with one mistake each) ----------------------

def verify_mutant(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator,
                  mistake: str) -> tuple[list[int], int]:
    children = tree.children()
    path: list[int] = []
    row = 0
    while True:
        p = target_probs[row]
        for c in children[row]:
            x = tree.tokens[c]
            q = None if tree.probs is None else tree.probs[c]
            qx = 1.0 if q is None else float(q[x])
            u = float(torch.rand((), generator=generator))
            if mistake == "always_accept" or u * qx < float(p[x]):
                path.append(c)
                row = c + 1
                break
            if mistake == "resample_from_p":   # forgets the residual: keeps trying against p
                continue
            residual = p.clone()
            if q is None:
                residual[x] = 0.0
            else:
                residual = torch.clamp_min(residual - q, 0.0)
            p = residual / residual.sum()
        else:
            return path, int(torch.multinomial(p, 1, generator=generator))


@pytest.mark.parametrize("draft", list(DRAFTS))
def test_verify_sampling_emits_target_distribution(draft):
    p_first, p_joint = sample_pvalues(verify_sampling, DRAFTS[draft])
    assert p_first > PASS_P, f"first token is not distributed as the target (p={p_first:.2e})"
    assert p_joint > PASS_P, f"first two tokens are not distributed as the target (p={p_joint:.2e})"


@pytest.mark.parametrize("mistake, draft", [
    ("always_accept", "chain_q"),
    ("always_accept", "tree_point"),
    ("resample_from_p", "chain_q"),
    ("resample_from_p", "tree_q"),
    ("resample_from_p", "tree_point"),
])
def test_wrong_rule_fails_the_same_test(mistake, draft):
    wrong = functools.partial(verify_mutant, mistake=mistake)
    p_first, p_joint = sample_pvalues(wrong, DRAFTS[draft], n=N_WRONG)
    assert min(p_first, p_joint) < FAIL_P, (p_first, p_joint)


def test_mutant_copy_without_mistake_passes():
    """The copy used for the wrong rules is faithful when it makes no mistake (so the failures above
    come from the mistake itself)."""
    right = functools.partial(verify_mutant, mistake="none")
    assert min(sample_pvalues(right, draft_tree_q, n=5000)) > PASS_P


def test_wrong_draft_probabilities_fail():
    """Children drawn without replacement but labelled with the original q (not the renormalised
    distribution each was actually drawn from): verification can no longer be exact."""
    wrong_draft = functools.partial(draft_tree_q, record_true_q=False)
    assert min(sample_pvalues(verify_sampling, wrong_draft, n=N_WRONG)) < FAIL_P


def test_verify_sampling_never_accepts_impossible_tokens():
    """A child with p(x) = 0 is always rejected and never emitted, a child with p(x) = 1 always accepted."""
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    for _ in range(200):
        tree = DraftTree([0, 2, 1], [ROOT, ROOT, ROOT], torch.stack([q, q, q]))
        path, bonus = verify_sampling(tree, torch.stack([p, p, p, p]), gen)
        assert path == [2] and bonus == 1
        path, bonus = verify_sampling(DraftTree([0, 3], [ROOT, ROOT]), torch.stack([p, p, p]), gen)
        assert path == [] and bonus == 1


# ====================================================================== end to end: engine + drafters

@pytest.mark.parametrize("top_k, top_p", [(2, 1.0), (0, 0.3), (3, 0.6)])
def test_sampled_tokens_stay_in_the_target_support(tiny, make_engine, top_k, top_p):
    """top-k / top-p narrower than the draft tree (branches=3): every emitted token must have non-zero
    processed target probability after its own prefix (checked with transformers' forward)."""
    lm, draft = tiny(0), tiny(100)
    engine = make_engine(lm, 128)
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, max_new_tokens=12)
    for seed in range(4):
        drafter = DraftModelDrafter(ModelRunner(draft.model, 128), depth=3, branches=3)
        g = engine.generate(PROMPT, SamplingParams(**{**params.__dict__, "seed": seed}), drafter)
        assert len(g.token_ids) == 12
        with torch.no_grad():
            logits = lm.hf(torch.tensor([PROMPT + g.token_ids])).logits[0, len(PROMPT) - 1:-1]
        support = probs_from_logits(logits, params) > 0
        assert support[torch.arange(12), torch.tensor(g.token_ids)].all(), g.token_ids



E2E_VOCAB = 8
E2E_TOKENS = 3          # joint distribution of the first 3 tokens (512 outcomes)
E2E_N = 3000
PROMPT = [1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]


def exact_joint(lm, params: SamplingParams) -> np.ndarray:
    """P(t1, t2, t3 | PROMPT) by enumeration from transformers' forward (not the engine's runner),
    through the same logits processing."""
    def probs(prefixes):
        with torch.no_grad():
            logits = lm.hf(torch.tensor([PROMPT + list(x) for x in prefixes])).logits[:, -1]
        return probs_from_logits(logits, params)

    joint = probs([()])[0]
    for depth in range(1, E2E_TOKENS):
        prefixes = list(itertools.product(range(E2E_VOCAB), repeat=depth))
        joint = (joint.reshape(-1, 1) * probs(prefixes)).reshape(-1)
    return joint.numpy()


E2E_CASES = {
    "chain": (lambda d: DraftModelDrafter(ModelRunner(d.model, 64), depth=4, branches=1), {}),
    "tree": (lambda d: DraftModelDrafter(ModelRunner(d.model, 64), depth=3, branches=3), {}),
    "ngram": (lambda d: NgramDrafter(max_ngram=3, depth=4), {}),
    "tree_topk_topp": (lambda d: DraftModelDrafter(ModelRunner(d.model, 64), depth=3, branches=3),
                       dict(temperature=0.9, top_k=5, top_p=0.85)),
}


@pytest.mark.parametrize("case", list(E2E_CASES))
def test_engine_sampling_is_lossless(tiny, make_engine, case):
    make_drafter, extra = E2E_CASES[case]
    target = tiny(0, vocab_size=E2E_VOCAB, hidden_size=32)
    draft = tiny(1, vocab_size=E2E_VOCAB, hidden_size=32)
    engine = make_engine(target, 64)
    kw = dict(temperature=1.0, max_new_tokens=E2E_TOKENS + 1)
    kw.update(extra)
    outcomes, drafted, accepted = [], 0, 0
    for i in range(E2E_N):
        g = engine.generate(PROMPT, SamplingParams(seed=7919 * i + 13, **kw), make_drafter(draft))
        assert len(g.token_ids) == E2E_TOKENS + 1
        outcomes.append(int(np.ravel_multi_index(g.token_ids[:E2E_TOKENS], (E2E_VOCAB,) * E2E_TOKENS)))
        drafted += g.stats.drafted_tokens
        accepted += g.stats.accepted_tokens
    # the drafter must actually have been used, accepted and rejected, or the test proves nothing
    assert 0 < accepted < drafted
    params = SamplingParams(**{k: v for k, v in kw.items() if k != "max_new_tokens"})
    pval = gof_pvalue(outcomes, exact_joint(target, params))
    assert pval > PASS_P, f"{case}: engine output is not distributed as the target (p={pval:.2e})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_p_from_the_likeliest_candidates_equals_sorting_the_whole_vocabulary(dtype, monkeypatch):
    """top-p cuts among the TOP_P_CANDIDATES likeliest tokens where their mass reaches top_p, and sorts the
    whole row where it does not: either way the nucleus is the one sorting the whole row gives (and at
    float64 the one of a softmax over the sorted row)."""
    gen = torch.Generator().manual_seed(0)
    wide = narrow = 0
    rows = []
    for scale, top_p in itertools.product((0.05, 1.0, 4.0, 12.0), (0.2, 0.9, 0.95, 0.999)):
        x = (torch.randn(16, 3000, generator=gen, dtype=torch.float64) * scale).to(dtype)
        rows.append((x, top_p, sampling._top_p_drop(x, top_p)))
        kept = (~rows[-1][2]).sum(-1)
        wide += int((kept > sampling.TOP_P_CANDIDATES).sum())
        narrow += int((kept <= sampling.TOP_P_CANDIDATES).sum())
    assert wide and narrow   # both ways were taken
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 3000)   # every row sorted whole
    for x, top_p, got in rows:
        assert torch.equal(got, sampling._top_p_drop(x, top_p)), (top_p, x.std())
        if dtype == torch.float64:
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            p = torch.softmax(sorted_x, dim=-1)
            drop = (p.cumsum(-1) - p) >= top_p
            assert torch.equal(got, drop.scatter(-1, order, drop))
