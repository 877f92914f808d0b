"""ModelRunner: one sequence's KV cache and the three things speculation needs from a model.

    committed prefix          scratch (speculative nodes, not yet kept)
    [0 ........ length)       [length ........ length + len(scratch))

- `extend(tokens)`: score a chain after the prefix and keep it (prefill, and catching up).
- `score(tokens, parents)`: add speculative nodes (a tree, possibly grown level by level) to the
  scratch area and score them in one forward pass through a tree attention mask.
- `commit(path)`: keep one root-to-leaf path of scratch nodes. Only the kept nodes' K/V move (a few
  slots); rejected siblings are simply overwritten by the next call.
"""
from __future__ import annotations

import statistics
import time

import torch

from drafthorse.actors.spec.tree import ROOT, ancestor_mask

from .combiner import Combiner
from .kvcache import HOST, KVCache
from .llama import BatchItem, Llama


class ContextFull(Exception):
    """The sequence would not fit in the model's context (max_len)."""


class ModelRunner:
    def __init__(self, model: Llama, max_len: int | None = None, combiner: Combiner | None = None,
                 cache: KVCache | None = None):
        """combiner: a Combiner over `model` that this runner's forwards go through (draft workers:
        concurrent sessions share a pass), or None to run them alone. cache: a slot of a pool shared
        with other runners (a worker's batch: one attention pass for all); else a slot taken from the
        combiner's pool (given back by close()) while one is free; else a cache of its own."""
        self.model = model
        self.combiner = combiner
        if cache is None and combiner is not None and combiner.kv is not None:
            cache = combiner.kv.take()
        self.cache = cache if cache is not None else model.new_cache(max_len)
        self.max_len = self.cache.max_len
        self.vocab_size = model.vocab_size
        self.reset()

    def close(self) -> None:
        """Done with this runner: a slot taken from a combiner's pool goes back to it."""
        self.reset()
        self.cache.release()

    def reset(self) -> None:
        self.length = 0
        self.tokens: list[int] = []      # the committed token ids
        self._clear_scratch()

    def copy_prefix(self, donor: ModelRunner, length: int) -> None:
        """Hold the first `length` committed tokens of `donor` (a runner of the same pool): their K/V
        copied, not computed (Llama.prefixes_travel says when that is what a prefill would give)."""
        if length > donor.length:
            raise ValueError(f"donor holds {donor.length} tokens, not {length}")
        self.reset()
        self.cache.k[:, :, :length] = donor.cache.k[:, :, :length]
        self.cache.v[:, :, :length] = donor.cache.v[:, :, :length]
        if self.cache.f is not None and donor.cache.f is not None:
            self.cache.f[:length] = donor.cache.f[:length]
        self.length, self.tokens = length, donor.tokens[:length]

    def truncate(self, length: int) -> None:
        """Forget everything after the first `length` committed tokens (their K/V stay valid)."""
        self.length = min(length, self.length)
        del self.tokens[self.length:]
        self._clear_scratch()

    def _clear_scratch(self) -> None:
        self._scratch_tokens: list[int] = []
        self._parents: list[int] = []    # scratch node -> scratch parent or ROOT (= the prefix end)
        self._depths: list[int] = []
        self._anc = torch.zeros(0, 0, dtype=torch.bool, device=HOST)

    @property
    def scratch_size(self) -> int:
        return len(self._parents)

    @property
    def keeps_features(self) -> bool:
        """Whether the cache keeps every position's output row (KVPool.f): `features` then reads a
        cached prefix's too."""
        return self.cache.f is not None

    def features(self, n: int) -> torch.Tensor:
        """The output rows of the first n committed positions (a copy), where the cache keeps them."""
        if self.cache.f is None or n > self.length:
            raise ValueError(f"the cache keeps no output rows for {n} positions (holds {self.length})")
        return self.cache.f[:n].clone()

    def _keep_rows(self, start: int, hidden: torch.Tensor) -> None:
        """Output rows of positions start.. into the cache, where it keeps them (a scratch node's move
        with its K/V when committed)."""
        if self.cache.f is not None:
            self.cache.f[start:start + hidden.shape[0]] = hidden

    @property
    def room(self) -> int:
        """Free slots after the committed prefix."""
        return self.max_len - self.length

    def extend(self, tokens: list[int], embeds: torch.Tensor | None = None, all_hidden: bool = False,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a chain to the committed prefix; returns (logits, hidden) at its last token (hidden
        at every token with all_hidden). embeds: input rows instead of the tokens' embeddings."""
        hidden, logits = self._forward(self._add_chain(tokens), None, embeds, logit_rows=slice(-1, None))
        assert logits is not None
        self._keep_rows(self.length, hidden)
        self._keep_chain(tokens)
        return logits[0], hidden if all_hidden else hidden[-1]

    def _add_chain(self, tokens: list[int]) -> BatchItem:
        """The forward's inputs for a chain after the committed prefix."""
        if not tokens:
            raise ValueError("extend needs at least one token")
        if self.length + len(tokens) > self.max_len:
            raise ContextFull(f"{self.length + len(tokens)} tokens exceed the context of {self.max_len}")
        self._clear_scratch()
        pos = torch.arange(self.length, self.length + len(tokens), device=HOST)
        return BatchItem(torch.tensor(tokens, dtype=torch.long, device=HOST), pos, self.cache, self.length, None)

    def _keep_chain(self, tokens: list[int]) -> None:
        self.length += len(tokens)
        self.tokens += tokens

    def _forward(self, item: BatchItem, exact: bool | None, embeds: torch.Tensor | None, layers: int | None = None,
                 logit_rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward of this sequence: (hidden, logits of logit_rows, None without). Through the
        combiner when this runner has one. exact None: a prefill (Llama.forward_batch)."""
        if self.combiner is not None:
            return self.combiner.forward(item, exact, embeds, layers, logit_rows)
        hidden = self.model.forward_batch([item], exact=bool(exact), embeds=embeds, layers=layers,
                                          prefill=exact is None)[0]
        return hidden, None if logit_rows is None else self.model.logits(hidden[logit_rows])

    def score(self, tokens: list[int], parents: list[int], embeds: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add nodes to the scratch tree (parents index earlier scratch nodes, ROOT = the prefix end)
        and return their (logits [n, V], hidden [n, H]). embeds: input rows instead of embeddings."""
        item = self._add_scratch(tokens, parents)
        hidden, logits = self._forward(item, self.model.exact, embeds, logit_rows=slice(None))
        assert logits is not None
        self._keep_rows(item.start, hidden)
        return logits, hidden

    def partial(self, tokens: list[int], parents: list[int], layers: int) -> torch.Tensor:
        """Like `score`, through the first `layers` layers only: the residual stream [n, H] after them.
        Their K/V fill those layers' scratch slots, which the next full pass overwrites."""
        return self._forward(self._add_scratch(tokens, parents), False, None, layers=layers)[0]

    def _add_scratch(self, tokens: list[int], parents: list[int]) -> BatchItem:
        """Record new scratch nodes; return their forward's inputs."""
        n, base = len(tokens), len(self._parents)
        if self.length + base + n > self.max_len:
            raise ContextFull(f"{self.length + base + n} tokens exceed the context of {self.max_len}")
        all_parents = self._parents + list(parents)
        depths = list(self._depths)
        for p in parents:
            depths.append(0 if p == ROOT else depths[p] + 1)
        anc = ancestor_mask(all_parents)
        self._parents, self._depths, self._anc = all_parents, depths, anc
        self._scratch_tokens += tokens
        start = self.length + base
        pos = torch.tensor(depths[base:], dtype=torch.long, device=HOST) + self.length
        if all(p == i - 1 for i, p in enumerate(all_parents)):
            mask = None  # a chain: plain causal attention
        else:
            mask = torch.ones(n, start + n, dtype=torch.bool, device=HOST)
            mask[:, self.length:] = anc[base:]
        return BatchItem(torch.tensor(tokens, dtype=torch.long, device=HOST), pos, self.cache, start, mask)

    def commit(self, path: list[int]) -> None:
        """Keep scratch nodes `path` (a chain from a depth-0 node down) after the prefix."""
        if path:
            for prev, node in zip([ROOT] + path, path):
                if not 0 <= node < len(self._parents) or self._parents[node] != prev:
                    raise ValueError(f"commit path {path} is not a chain of scratch nodes from the root")
            if path != list(range(len(path))):
                self.cache.move(torch.tensor(path, device=HOST) + self.length, self.length)
            self.length += len(path)
            self.tokens += [self._scratch_tokens[i] for i in path]
        self._clear_scratch()

    def discard(self) -> None:
        self._clear_scratch()


def score_batch(runners: list[ModelRunner], tokens: list[list[int]], parents: list[list[int]],
                embeds: torch.Tensor | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Score scratch nodes of several sequences (one runner each, same model) in one forward pass."""
    model = runners[0].model
    items = [r._add_scratch(t, p) for r, t, p in zip(runners, tokens, parents)]
    hidden = model.forward_batch(items, embeds=embeds)
    for r, item, h in zip(runners, items, hidden):
        r._keep_rows(item.start, h)
    logits = model.logits(torch.cat(hidden)).split([h.shape[0] for h in hidden])
    return list(zip(logits, hidden))


def extend_batch(runners: list[ModelRunner], tokens: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`extend` several runners (same model) by a chain each in one forward pass: (logits at the chain's
    last token, hidden at every token) each. The rows of each come out as from its own `extend`."""
    model = runners[0].model
    items = [r._add_chain(t) for r, t in zip(runners, tokens)]
    hidden = model.forward_batch(items, prefill=True)
    logits = model.logits(torch.stack([h[-1] for h in hidden]))
    for r, t, h in zip(runners, tokens, hidden):
        r._keep_rows(r.length, h)
        r._keep_chain(t)
    return list(zip(logits, hidden))


def pass_cost(model: Llama, context: int, rows: tuple[int, ...] = (1, 2, 3, 5, 9), reps: int = 5,
              branches: int = 1) -> tuple[float, float]:
    """(a, b): a verify pass over n rows costs about a + b*n seconds on this machine: the least-squares
    line through the median time of each row count, the rows being scratch nodes after a `context`-token
    prefix as a verify runs them: a chain, or with `branches` > 1 a tree whose nodes have that many
    children each (a tree's rows pay for their mask and, on the exact path, for one attention group per
    branch). The counts take turns, `reps` rounds, so a passing slowdown of the machine lands on all of
    them alike instead of bending the line; the context is a chat turn's, since a row's attention grows
    with it; a model of a shorter context is probed after as many tokens as fit."""
    context = max(1, min(context, model.max_len - max(rows) - 1))
    runner = ModelRunner(model, context + max(rows) + 1)
    runner.extend([i % model.vocab_size for i in range(context)])
    times: dict[int, list[float]] = {n: [] for n in rows}
    for _ in range(reps):
        for n in rows:
            parents = [ROOT if i < branches else (i - branches) // branches for i in range(n)]
            t0 = time.perf_counter()
            logits, _ = runner.score([i % model.vocab_size for i in range(n)], parents)
            logits.argmax(-1).tolist()   # (a device's work is done once its result is read)
            times[n].append(time.perf_counter() - t0)
            runner.discard()
    return cost_line(times)


def cost_line(times: dict[int, list[float]]) -> tuple[float, float]:
    """(a, b) of the least-squares line a + b*n through the median of each row count n's times (b >= 0,
    a > 0): one slow round per count does not move it."""
    x, y = list(times), [statistics.median(t) for t in times.values()]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    spread = sum((xi - mx) ** 2 for xi in x)
    b = max(sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / spread, 0.0) if spread else 0.0
    return max(my - b * mx, 1e-9), b
