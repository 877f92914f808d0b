"""The speculative decoding loop: draft, verify in one target pass, commit, repeat.

    start(prompt):  prefill -> first token (the root of the first tree)
    step(seqs):     each sequence's drafter proposes a tree hanging off its root
                    one target pass scores every sequence's [root] + tree (ragged batch)
                    verify each -> commit root + accepted path -> emit accepted + bonus token

Plain autoregressive decoding is the same loop with empty trees, so every speedup is measured
against the same code, and a batch of one sequence is the single-request path: `BatchEngine` runs
sequences on runners (KV caches) handed to `start`, `SpecEngine` is the same loop over one runner of
its own with `generate` / `stream`. Tokens are emitted as they are committed; stops are checked per
token."""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from drafthorse.actors.drafters.base import Budget, Drafter, NoDrafter
from drafthorse.actors.models.kvcache import HOST
from drafthorse.actors.models.runner import ModelRunner, extend_batch, score_batch
from drafthorse.actors.spec.adaptive import Acceptance, AdaptivePolicy
from drafthorse.actors.spec.grammar import Grammars, GrammarState, compile_spec
from drafthorse.actors.spec.logprobs import TokenLogprob, token_logprobs
from drafthorse.actors.spec.sampling import Noise, SamplingParams, make_generator, probs_from_logits
from drafthorse.actors.spec.stats import GenerationStats
from drafthorse.actors.spec.stops import Decode, StopChecker
from drafthorse.actors.spec.tree import ROOT, DraftTree
from drafthorse.actors.spec.verify import verify_greedy, verify_sampling

log = logging.getLogger(__name__)


@dataclass
class Step:
    token_ids: list[int]                 # newly committed tokens (stop-truncated)
    finish_reason: str | None = None     # "stop" | "length" | None
    drafted: int = 0
    accepted: int = 0
    error: Exception | None = None       # this sequence failed (the others of its step did not)
    logprobs: list[TokenLogprob] | None = None   # one per token, when the request asks (params.logprobs)


@dataclass
class Generation:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Prompt:
    """A prompt to start on a runner (`BatchEngine.start_many`)."""
    runner: ModelRunner
    ids: list[int]
    params: SamplingParams
    drafter: Drafter | None = None
    stats: GenerationStats | None = None
    reuse_prefix: bool = False           # keep the K/V of the runner's common prefix with `ids`


@dataclass
class Sequence:
    """One generation in flight: its KV cache, drafter, randomness and stop state."""
    runner: ModelRunner
    drafter: Drafter
    params: SamplingParams
    stats: GenerationStats
    stopper: StopChecker
    noise: Noise                         # the target's sampling randomness, per context position
    draft_rng: torch.Generator
    root: int = 0                        # last committed token, not yet in the cache
    new: list[int] = field(default_factory=list)   # committed since the drafter last heard
    new_features: torch.Tensor | None = None        # the target states that predicted `new` (if wanted)
    max_nodes: int | None = None         # this step's tree cap, set by the adaptive policy
    adaptive: bool = True                # False: the policy leaves this sequence at the full budget
    acceptance: Acceptance = field(default_factory=Acceptance)
    grammar: GrammarState | None = None  # a structured output's place in its grammar
    t0: float = 0.0

    @property
    def finish_reason(self) -> str | None:
        return self.stopper.finish_reason


def whole_prompt(runner: ModelRunner, drafter: Drafter) -> bool:
    """Whether `drafter` needs every prompt state from the passes that start it: a feature drafter on a
    cache that keeps no output rows (KVPool.f). Its prompt then reuses nothing cached and is not chunked."""
    return drafter.wants_features and not runner.keeps_features


def reusable_prefix(runner: ModelRunner, prompt_ids: list[int], drafter: Drafter) -> int:
    """How many leading prompt tokens the runner's cache already holds and may keep: the common
    prefix, less at least one prompt token (scored again: its logits start the answer); none where the
    drafter needs the whole prompt's states (`whole_prompt`)."""
    if whole_prompt(runner, drafter):
        return 0
    keep, limit = 0, min(len(runner.tokens), len(prompt_ids) - 1)
    while keep < limit and runner.tokens[keep] == prompt_ids[keep]:
        keep += 1
    return keep


class BatchEngine:
    """Any number of sequences, each on a runner of its own: `start` one, `step` them all together."""

    def __init__(self, eos_ids: set[int], decode: Decode | None = None, max_tree_nodes: int = 64,
                 max_tree_depth: int = 16, policy: AdaptivePolicy | None = None, prefill_chunk: int = 256,
                 grammars: Grammars | None = None):
        # prompts enter the cache in pieces of this many tokens (0: whole), aligned from the reused
        # prefix: the same pieces in every path, so a prompt's K/V never depend on what ran beside it
        self.prefill_chunk = prefill_chunk
        self.policy = policy                 # None: every sequence drafts up to max_tree_nodes
        self.eos_ids = eos_ids
        self.decode = decode
        self.max_tree_nodes = max_tree_nodes
        self.max_tree_depth = max_tree_depth
        self._pool: ThreadPoolExecutor | None = None
        self.grammars = grammars             # structured outputs over the model's tokenizer (None: refused)

    def check_request(self, runner: ModelRunner, prompt_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the parameter for anything this engine cannot serve on `runner`."""
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        if any(not 0 <= t < runner.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {runner.vocab_size})")
        if len(prompt_ids) >= runner.max_len:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens, the model's context is "
                             f"{runner.max_len}: shorten the prompt")
        params.validate()
        if params.stop and self.decode is None:
            raise ValueError("stop strings need a tokenizer")
        if params.constraint is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need the model's tokenizer")
            compile_spec(*params.constraint)   # BadField("constraint") for a grammar that does not compile

    # ------------------------------------------------------------------ one sequence

    def start(self, runner: ModelRunner, prompt_ids: list[int], params: SamplingParams,
              drafter: Drafter | None = None, stats: GenerationStats | None = None, reuse_prefix: bool = False,
              ) -> tuple[Sequence, Step]:
        """Prefill `runner` and commit the first token. reuse_prefix keeps the K/V of the longest
        common prefix of the runner's tokens and this prompt (a session's next turn)."""
        return self.start_many([Prompt(runner, prompt_ids, params, drafter, stats, reuse_prefix)])[0]

    def start_many(self, prompts: list[Prompt]) -> list[tuple[Sequence, Step]]:
        """`start` several prompts (each on its own runner of one model) with one forward per round of
        prefill pieces: every prompt's next piece of `prefill_chunk` tokens, aligned from its reused
        prefix as when alone, so each prompt's K/V and first token are those of its start alone."""
        for p in prompts:
            self.check_request(p.runner, p.ids, p.params)
        seqs, todo = [], []
        for p in prompts:
            drafter = p.drafter or NoDrafter()
            seq = Sequence(runner=p.runner, drafter=drafter, params=p.params,
                           stats=p.stats if p.stats is not None else GenerationStats(),
                           stopper=StopChecker(p.params.max_new_tokens, self.eos_ids, p.params.stop, self.decode),
                           noise=Noise(p.params.seed),
                           draft_rng=make_generator(p.params.seed, salt=1))  # the drafter's randomness is its own
            seq.stats.prompt_tokens = len(p.ids)
            if p.params.constraint is not None and self.grammars is not None:
                seq.grammar = self.grammars.state(compile_spec(*p.params.constraint))
            keep = reusable_prefix(p.runner, p.ids, drafter) if p.reuse_prefix else 0
            p.runner.truncate(keep)
            seq.stats.reused_prefix_tokens = keep
            seq.t0 = time.perf_counter()
            seqs.append(seq)
            todo.append(p.ids[keep:])
        logits: list[torch.Tensor] = [torch.empty(0, device=HOST)] * len(prompts)
        hidden: list[list[torch.Tensor]] = [[] for _ in prompts]
        # a feature drafter starts from every prompt state: read back from the cache where it keeps them
        # (a reused prefix's too), else gathered from these passes
        gather = [whole_prompt(p.runner, s.drafter) for s, p in zip(seqs, prompts)]
        done = [0] * len(prompts)
        step = self.prefill_chunk or max(map(len, todo))
        while live := [i for i in range(len(prompts)) if done[i] < len(todo[i])]:
            pieces = [todo[i][done[i]:done[i] + step] for i in live]
            for i, piece, (lg, h) in zip(live, pieces, extend_batch([prompts[i].runner for i in live], pieces)):
                logits[i] = lg
                hidden[i].append(h if gather[i] else h[-1:])
                done[i] += len(piece)
        out = []
        for p, seq, lg, hs, gathered in zip(prompts, seqs, logits, hidden, gather):
            kept = seq.drafter.wants_features and not gathered
            h = p.runner.features(len(p.ids)) if kept else torch.cat(hs)
            if seq.grammar is not None or not p.params.greedy:
                lg = lg.to(HOST)   # drawn from on the host, by the request's seeded generator
            seq.root = self._pick(lg if seq.grammar is None else seq.grammar.constrain(lg), p.params,
                                  seq.noise.at(len(p.ids)))
            if seq.grammar is not None:
                seq.grammar.consume(seq.root)
            seq.stats.prefill_s = time.perf_counter() - seq.t0
            seq.stats.record_step(0, 0)
            first = self._emit(seq, [seq.root], 0, 0, lg[None])
            seq.drafter.bind(p.runner)
            if seq.drafter.wants_features:   # (drafters without features keep the two-argument calls)
                seq.drafter.begin(p.ids, h[:-1])
            else:
                seq.drafter.begin(p.ids)
            seq.new = [seq.root]
            seq.new_features = h[-1:] if seq.drafter.wants_features else None
            out.append((seq, first))
        return out

    # ------------------------------------------------------------------ many sequences

    def step(self, seqs: list[Sequence]) -> list[Step]:
        """One speculative step for every unfinished sequence, with one target forward pass."""
        steps: dict[int, Step] = {}
        live = []
        for i, seq in enumerate(seqs):
            if seq.finish_reason is not None:
                steps[i] = Step([], seq.finish_reason)
            elif seq.runner.room < 1:  # no slot left to score the root (which yields the bonus token)
                seq.stopper.finish_reason = "length"
                steps[i] = Step([], "length")
            else:
                live.append(i)
        if not live:
            return [steps[i] for i in range(len(seqs))]

        # sequences that can draft (not plain decoding) and did not opt out of the policy
        adapt = [i for i in live if seqs[i].adaptive and not isinstance(seqs[i].drafter, NoDrafter)]
        if self.policy is not None and adapt:   # its inputs and choice go to each request's stats
            ratio = self.policy.cost.ratio
            for i, nodes in zip(adapt, self.policy.choose([seqs[i].acceptance.alpha for i in adapt])):
                seqs[i].max_nodes = nodes
                st = seqs[i].stats
                st.budget_nodes += nodes
                st.acceptance_estimate, st.row_cost_ratio = seqs[i].acceptance.alpha, ratio
        for i in live:
            seqs[i].stats.batch_sequences += len(live)
        t0 = time.perf_counter()
        trees = self._draft([seqs[i] for i in live])
        if self.policy is not None and any(trees):
            self.policy.observe_draft(time.perf_counter() - t0)
        # a structured output's tree loses the nodes its grammar forbids before it is scored
        pruned = [g.prune(tree) if (g := seqs[i].grammar) is not None else (tree, list(range(len(tree))))
                  for i, tree in zip(live, trees)]
        t = time.perf_counter()
        scored = score_batch([seqs[i].runner for i in live],
                             [[seqs[i].root] + kept.tokens for i, (kept, _) in zip(live, pruned)],
                             [[ROOT] + [p + 1 for p in kept.parents] for kept, _ in pruned])
        forward_s = time.perf_counter() - t
        # one read back from the device for the whole step: whether each sequence's logits are finite, and
        # every row's argmax (what greedy verification walks); sampled and constrained sequences take
        # their rows to the host, where their seeded generators draw
        read = torch.cat([torch.stack([torch.isfinite(lg).all() for lg, _ in scored]).long(),
                          *(lg.argmax(-1) for lg, _ in scored)]).tolist()
        finite, argmax = read[:len(scored)], read[len(scored):]
        first = 0
        for i, tree, (_, row), (logits, hidden), ok in zip(live, trees, pruned, scored, finite):
            seq = seqs[i]
            t1 = time.perf_counter()
            choice, first = argmax[first:first + len(logits)], first + len(logits)
            try:   # a sequence whose numbers went bad fails alone, not the step's other sequences
                if not ok:
                    raise FloatingPointError("the target's logits are not finite")
                draw = seq.noise.from_position(seq.runner.length + 1)   # (the root sits at runner.length)
                g, params = seq.grammar, seq.params
                if g is not None or not params.greedy:
                    logits = logits.to(HOST)
                if g is None and params.greedy:
                    path, bonus = verify_greedy(tree, logits, choice=choice)
                elif g is None:
                    path, bonus = verify_sampling(tree, probs_from_logits(logits, params), draw)
                elif params.greedy:   # rows masked one by one as the walk reaches them
                    path, bonus = verify_greedy(tree, logits, g.walker(tree, row, logits, lambda x: x))
                else:
                    path, bonus = verify_sampling(
                        tree, g.walker(tree, row, logits, functools.partial(probs_from_logits, params=params)), draw)
                if g is not None:
                    g.consume(bonus)
            except (FloatingPointError, RuntimeError) as e:
                seq.runner.discard()
                seq.stopper.finish_reason = "error"
                steps[i] = Step([], "error", error=e)
                continue
            rows = [0] + [row[n] + 1 for n in path]   # the scored rows of the root and the accepted nodes
            seq.runner.commit(rows)
            seq.stats.verify_s += forward_s + time.perf_counter() - t1  # the pass is shared: each waits for it
            new = [tree.tokens[n] for n in path] + [bonus]
            seq.stats.record_step(len(tree), len(path))
            seq.acceptance.update(max(tree.depths(), default=0), len(path))
            # row 0 (the root) chose the first new token, each accepted node's row the one after it
            steps[i] = self._emit(seq, new, len(tree), len(path), logits[rows])
            seq.root, seq.new = bonus, new
            if seq.drafter.wants_features:  # rows that predicted each new token: the root, then the path
                seq.new_features = hidden[rows]
        if self.policy is not None:   # the pass and the verification after it: a row costs both
            self.policy.cost.observe(sum(1 + len(kept) for kept, _ in pruned), time.perf_counter() - t)
        return [steps[i] for i in range(len(seqs))]

    def _draft(self, seqs: list[Sequence]) -> list[DraftTree]:
        """Each sequence's tree. Calls to remote drafters overlap on threads: they wait on the network,
        and a draft worker batches the forwards of calls that arrive together (models/combiner.py).
        Everything else runs on this thread, where the target's torch work runs: torch work on a second
        thread keeps an OpenMP team there, and then libgomp's idle threads sleep instead of spinning
        between parallel regions, doubling a decoding step (workers/worker.in_passing_thread)."""
        budgets = [self._budget(s) for s in seqs]
        remote = [i for i, (s, b) in enumerate(zip(seqs, budgets)) if s.drafter.waits_on_network and b]
        trees: dict[int, DraftTree] = {}
        if len(remote) > 1:
            if self._pool is None:   # one thread per sequence of a full batch
                self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="draft")
            trees = dict(zip(remote, self._pool.map(lambda i: self._propose(seqs[i], budgets[i]), remote)))
        return [trees[i] if i in trees else self._propose(s, b) for i, (s, b) in enumerate(zip(seqs, budgets))]

    def _budget(self, seq: Sequence) -> Budget | None:
        """This step's tree bound for seq, None when it drafts nothing (plain decoding, no room, a zero
        policy budget, the last token)."""
        if isinstance(seq.drafter, NoDrafter):
            return None
        left = seq.params.max_new_tokens - len(seq.stopper.tokens)  # the bonus token is free
        cap = self.max_tree_nodes if seq.max_nodes is None else min(seq.max_nodes, self.max_tree_nodes)
        budget = Budget(max_nodes=min(cap, seq.runner.room - 1),
                        max_depth=min(self.max_tree_depth, left - 1, seq.runner.room - 1))
        return budget if budget.max_depth > 0 and budget.max_nodes > 0 else None

    def _propose(self, seq: Sequence, budget: Budget | None) -> DraftTree:
        """seq's tree; a drafter that fails (a bad tree, a draft worker that refuses us) is dropped for the
        rest of the sequence, which goes on as plain decoding: still exact, and nothing else fails."""
        t = time.perf_counter()
        tree = DraftTree()
        try:
            if seq.drafter.wants_features:
                seq.drafter.extend(seq.new, seq.new_features)
            else:
                seq.drafter.extend(seq.new)
            if budget is not None:
                tree = seq.drafter.propose(budget, seq.params, seq.draft_rng)
                if not seq.drafter.checked_trees:
                    tree.validate(seq.runner.vocab_size, budget.max_nodes, budget.max_depth)
        except Exception as e:  # noqa: BLE001 - any drafter fault: this sequence decodes alone from here
            log.warning("drafter %s failed (%s: %s); the sequence continues without it",
                        seq.drafter.name, type(e).__name__, e)
            seq.drafter.close()
            seq.drafter, tree = NoDrafter(), DraftTree()
        seq.new, seq.new_features = [], None
        seq.stats.draft_s += time.perf_counter() - t
        return tree

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator) -> int:
        if params.greedy:
            return int(logits.argmax())
        return int(torch.multinomial(probs_from_logits(logits, params), 1, generator=rng))

    @staticmethod
    def _emit(seq: Sequence, tokens: list[int], drafted: int, accepted: int, rows: torch.Tensor) -> Step:
        """rows [len(tokens), V]: the target logits each token was chosen from."""
        kept = seq.stopper.feed(tokens)
        seq.stats.generated_tokens += len(kept)
        seq.stats.total_s = time.perf_counter() - seq.t0
        if seq.grammar is not None:
            seq.stats.grammar_s = seq.grammar.seconds
        lp = None if seq.params.logprobs is None else token_logprobs(rows[:len(kept)].to(HOST), kept,
                                                                        seq.params.logprobs)
        return Step(kept, seq.stopper.finish_reason, drafted, accepted, logprobs=lp)


class SpecEngine(BatchEngine):
    """One sequence at a time on `runner`: generate, or stream, a prompt's continuation."""

    def __init__(self, runner: ModelRunner, eos_ids: set[int], decode: Decode | None = None,
                 max_tree_nodes: int = 64, max_tree_depth: int = 16, policy: AdaptivePolicy | None = None,
                 prefill_chunk: int = 256, grammars: Grammars | None = None):
        super().__init__(eos_ids, decode, max_tree_nodes, max_tree_depth, policy, prefill_chunk, grammars)
        self.runner = runner

    def stream(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter | None = None,
               stats: GenerationStats | None = None, reuse_prefix: bool = False) -> Iterator[Step]:
        """Yield committed tokens step by step."""
        seq, step = self.start(self.runner, prompt_ids, params, drafter, stats, reuse_prefix)
        try:
            yield step
            while seq.finish_reason is None:
                step = self.step([seq])[0]
                if step.error is not None:
                    raise step.error
                yield step
        finally:
            seq.drafter.close()

    def generate(self, prompt_ids: list[int], params: SamplingParams, drafter: Drafter | None = None,
                 ) -> Generation:
        out = Generation()
        for step in self.stream(prompt_ids, params, drafter, out.stats):
            out.token_ids += step.token_ids
            out.logprobs += step.logprobs or []
            out.finish_reason = step.finish_reason or out.finish_reason
        if self.decode is not None:
            stopper = StopChecker(params.max_new_tokens, self.eos_ids, params.stop, self.decode)
            stopper.tokens = out.token_ids
            out.text = stopper.text()
        return out
