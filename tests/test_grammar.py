"""Structured outputs (actors/spec/grammar.py, llguidance): the output follows its grammar; greedy
speculation equals constrained plain decoding whatever drafts; under sampling the constrained
distribution is kept (a two-sample test against plain decoding); forbidden draft nodes are pruned."""
from __future__ import annotations

import collections
import json
import re

import pytest
import torch
from scipy.stats import chi2_contingency

from drafthorse.actors.drafters.base import Budget, Drafter
from drafthorse.actors.drafters.draft_model import DraftModelDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import SpecEngine
from drafthorse.actors.models import loader
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.spec.grammar import Grammars, compile_spec
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import ROOT, DraftTree
from drafthorse.runtime.errors import BadField

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
EMAIL = r"[a-z]{3,8}@[a-z]{2,6}\.(com|org)"


@pytest.fixture(scope="module")
def models():
    """tiny:0 / tiny:1 (SmolLM2's tokenizer on tiny random weights, float64) and their grammars."""
    lm, draft = loader.load("tiny:0", max_len=512), loader.load("tiny:1", max_len=512)
    return lm, draft, Grammars(lm.tokenizer, lm.vocab_size, lm.eos_ids)


class Scattered(Drafter):
    """Two chains of two nodes below the root, every node drawn from q, uniform over a few one-character
    tokens (some of which the grammar allows at that place, some not): trees that get both pruned and
    accepted, with a q of their own, as a sampling drafter's."""
    name = "scattered"

    def __init__(self, ids: list[int], vocab_size: int):
        self.ids = ids
        self.q = torch.zeros(vocab_size, dtype=torch.float32)
        self.q[ids] = 1 / len(ids)

    def begin(self, prompt_ids, features=None) -> None:
        pass

    def extend(self, token_ids, features=None) -> None:
        pass

    def propose(self, budget: Budget, params: SamplingParams, generator: torch.Generator) -> DraftTree:
        tree = DraftTree()
        for _ in range(min(2, budget.max_nodes // 2)):
            parent = ROOT
            for _ in range(min(2, budget.max_depth)):
                tree.tokens.append(self.ids[int(torch.randint(len(self.ids), (), generator=generator))])
                tree.parents.append(parent)
                parent = len(tree.tokens) - 1
        tree.probs = self.q.expand(len(tree), -1).clone()
        return tree


def engine(lm, grammars):
    return SpecEngine(ModelRunner(lm.model, 512), lm.eos_ids,
                      decode=lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True), grammars=grammars)


def drafters(lm, draft):
    return {"none": lambda: None, "ngram": NgramDrafter,
            "draft_tree": lambda: DraftModelDrafter(ModelRunner(draft.model, 512), depth=4, branches=3),
            "self_chain": lambda: DraftModelDrafter(ModelRunner(lm.model, 512), depth=5, branches=1)}


def prompts(lm):
    return [lm.tokenizer(t)["input_ids"] for t in ("Give me a person as JSON:", "{\"name\": \"Ada\", \"age\":",
                                                    "Write an email address.")]


@pytest.mark.parametrize("kind, spec", [("json_schema", json.dumps(SCHEMA)), ("json_object", ""), ("regex", EMAIL)])
def test_greedy_constrained_speculation_equals_constrained_plain_and_follows_the_grammar(models, kind, spec):
    lm, draft, grammars = models
    eng = engine(lm, grammars)
    params = SamplingParams(max_new_tokens=64, constraint=(kind, spec))
    for prompt in prompts(lm):
        runs = {name: eng.generate(prompt, params, make()) for name, make in drafters(lm, draft).items()}
        plain = runs["none"]
        for name, g in runs.items():
            assert g.token_ids == plain.token_ids, name
        if kind == "json_object":   # a random model may write one key for ever: what it wrote is JSON so far
            assert plain.text.startswith("{") and (plain.finish_reason == "length"
                                                   or isinstance(json.loads(plain.text), dict))
            continue
        assert plain.finish_reason == "stop", plain.text   # the grammar ended and the model had to stop
        if kind == "regex":
            assert re.fullmatch(EMAIL, plain.text), plain.text
        else:
            value = json.loads(plain.text)
            assert isinstance(value, dict)
            if kind == "json_schema":
                assert set(value) == {"name", "age"} and 0 <= value["age"] <= 120 and len(value["name"]) <= 12
    # unconstrained decoding of these prompts is not valid JSON: the grammar did the work
    free = eng.generate(prompts(lm)[0], SamplingParams(max_new_tokens=32))
    with pytest.raises(ValueError):
        json.loads(free.text)


def test_constrained_sampling_keeps_the_constrained_distribution(models):
    """Outputs of a 3-token grammar sampled 300 times with a drafter (its trees pruned by the grammar) and
    without: the same distribution (chi-square over the outputs seen, p > 1e-3), at temperature 1."""
    lm, draft, grammars = models
    eng = engine(lm, grammars)
    prompt = prompts(lm)[2]
    ids = [lm.tokenizer.convert_tokens_to_ids(t) for t in "abcxyz12"]
    counts, accepted = {}, 0
    for name in ("none", "scattered"):
        c: collections.Counter = collections.Counter()
        for seed in range(300):
            params = SamplingParams(temperature=1.0, seed=seed + (0 if name == "none" else 10_000), max_new_tokens=8,
                                    constraint=("regex", "(a|b|c)(x|y)(1|2)"))
            g = eng.generate(prompt, params, None if name == "none" else Scattered(ids, lm.vocab_size))
            assert re.fullmatch("(a|b|c)(x|y)(1|2)", g.text), g.text
            c[g.text] += 1
            accepted += g.stats.accepted_tokens
        counts[name] = c
    keys = sorted(set(counts["none"]) | set(counts["scattered"]))
    chi2, p, _, _ = chi2_contingency([[counts[n][k] for k in keys] for n in ("none", "scattered")])
    assert len(keys) >= 4 and p > 1e-3, (chi2, p, counts)
    assert accepted > 50, accepted   # drafts that the grammar kept were verified and accepted


def test_forbidden_draft_nodes_are_pruned_with_their_subtrees(models):
    lm, _, grammars = models
    tok = lm.tokenizer
    a, b, x, one = (tok.convert_tokens_to_ids(t) for t in ("a", "b", "x", "1"))
    state = grammars.state(compile_spec("regex", "a(x|y)1"))
    # root -> a -> x -> 1 (allowed), root -> b (forbidden) -> x, a -> 1 (forbidden)
    tree = DraftTree([a, x, one, b, x, one], [ROOT, 0, 1, ROOT, 3, 0])
    kept, row = state.prune(tree)
    assert kept.tokens == [a, x, one] and kept.parents == [ROOT, 0, 1] and row == [0, 1, 2, -1, -1, -1]
    allowed = state.allowed()
    assert allowed[a] and not allowed[b] and not allowed[x] and allowed.shape == (lm.vocab_size,)
    assert all(tok.decode([t]) in ("a", "ax", "ay", "ax1", "ay1") for t in allowed.nonzero().flatten().tolist())


@pytest.mark.parametrize("kind, spec, needle", [
    ("json_schema", "{not json", "json_schema"), ("regex", "(unclosed", "regex"), ("yaml", "x", "kind must be one of"),
    ("lark", "start: undefined_rule", "lark"), ("regex", "a" * 70_000, "longer than")])
def test_a_bad_constraint_is_refused_naming_it(kind, spec, needle):
    with pytest.raises(BadField, match=needle) as e:
        compile_spec(kind, spec)
    assert e.value.field == "constraint"
