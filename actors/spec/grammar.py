"""Structured outputs: a grammar (llguidance) says which tokens may come next, and the target's
distribution is masked to them before anything is chosen from it.

Under speculation the constrained distribution is the one verified. Draft nodes the grammar forbids
at their place in the tree are pruned before the target scores the tree: no row is spent on them,
and verification still walks the whole tree, so a pruned child is rejected as it would have been
(greedy: it is not the masked argmax; sampling: its masked probability is 0, and the residual takes
its q off, exactly as for a scored rejection). The grammar state advances along the accepted path
row by row, so each row is masked as plain constrained decoding would mask it."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from drafthorse.actors.spec.tree import ROOT, DraftTree
from drafthorse.runtime.errors import BadField

KINDS = ("json_schema", "json_object", "regex", "lark")
MAX_SPEC_CHARS = 64 * 1024
# JSON as one line with a space after ':' and ',' (a schema's "x-guidance" may say otherwise): free
# whitespace lets a model pad forever, where it has to end
JSON_LAYOUT: llguidance._lib.JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ",
                                              "key_separator": ": "}


@functools.lru_cache(maxsize=64)
def compile_spec(kind: str, text: str) -> str:
    """An llguidance grammar for a constraint of `kind`; BadField("constraint") naming what is wrong.
    Cached: a request's constraint is checked at the gateway and again where it runs, and clients send
    the same few schemas over and over."""
    if kind not in KINDS:
        raise BadField("constraint", f"constraint kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if len(text) > MAX_SPEC_CHARS:
        raise BadField("constraint", f"constraint is longer than {MAX_SPEC_CHARS} characters")
    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_LAYOUT)
        elif kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text, JSON_LAYOUT)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(text)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
    except Exception as e:  # noqa: BLE001 - malformed JSON, a schema it cannot read: the caller's to fix
        raise BadField("constraint", f"{kind}: {e}") from None
    if err := llguidance.LLMatcher.validate_grammar(grammar):
        raise BadField("constraint", f"{kind}: {err}")
    return grammar


class Grammars:
    """Grammar states over one model's tokenizer (building its token table takes about a second: once)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: set[int]):
        # the model's end tokens end a grammar too; rows past the tokenizer's vocabulary stay forbidden
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        self.vocab_size = vocab_size

    def state(self, grammar: str) -> GrammarState:
        return GrammarState(llguidance.LLMatcher(self.tok, grammar, log_level=0), self.vocab_size)


class GrammarState:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.m = matcher
        self.vocab_size = vocab_size
        self.seconds = 0.0   # spent on masks, pruning and steps (GenerationStats.grammar_s)
        self._bits = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self._check()

    def _check(self) -> None:
        """RuntimeError (this sequence fails, not its batch) once the matcher is in its error state."""
        if self.m.is_error():
            raise RuntimeError(f"grammar: {self.m.get_error()}")

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar accepts next."""
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(self.m, self._bits, 0)
        bits = self._bits[0]
        shifts = torch.arange(32, dtype=torch.int32, device="cpu")   # (the matcher's bitmask is on the host)
        allowed = ((bits[:, None] >> shifts) & 1).bool().flatten()[:self.vocab_size]
        self.seconds += time.perf_counter() - t
        return allowed

    def constrain(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] with the forbidden tokens at -inf."""
        return logits.masked_fill(~self.allowed(), float("-inf"))

    def consume(self, token: int) -> None:
        t = time.perf_counter()
        self.m.consume_token(token)
        self.seconds += time.perf_counter() - t
        self._check()

    def prune(self, tree: DraftTree) -> tuple[DraftTree, list[int]]:
        """(the nodes the grammar allows, each with all its ancestors; row[i]: node i's index in it, -1 if
        pruned). A node is checked with its path from the root: one validate call per leaf's path."""
        t = time.perf_counter()
        keep = [False] * len(tree)
        for leaf in set(range(len(tree))) - set(tree.parents):
            path = [leaf]
            while tree.parents[path[-1]] != ROOT:
                path.append(tree.parents[path[-1]])
            path.reverse()
            ok = self.m.validate_tokens([tree.tokens[n] for n in path])
            for n in path[:ok]:
                keep[n] = True
        row, kept = [-1] * len(tree), DraftTree()
        for i, k in enumerate(keep):
            if k:
                row[i] = len(kept)
                kept.tokens.append(tree.tokens[i])
                kept.parents.append(ROOT if tree.parents[i] == ROOT else row[tree.parents[i]])
        if tree.probs is not None:
            kept.probs = tree.probs[[i for i, k in enumerate(keep) if k]]
        self.seconds += time.perf_counter() - t
        return kept, row

    def walker(self, tree: DraftTree, row: list[int], rows: torch.Tensor,
               transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[int], torch.Tensor]:
        """at(r): the masked row r of the full tree (0: the root, i + 1: node i), for a verification that
        visits the root, then each node it accepts, in order: each call after the first consumes the
        accepted node's token, so the mask is the one after the path so far. transform: the
        processing the verification wants (probabilities when sampling)."""
        def at(r: int) -> torch.Tensor:
            if r:
                self.consume(tree.tokens[r - 1])
            return transform(self.constrain(rows[0 if r == 0 else row[r - 1] + 1]))
        return at
