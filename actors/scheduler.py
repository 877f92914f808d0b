"""Continuous batching for one target worker: requests join and leave between steps, and every
step verifies the trees of all running requests in one target pass.

    submit(request) -> waiting (bounded: RESOURCE_EXHAUSTED beyond) -> prefilling -> running
    loop: admit while slots are free -> one prefill round -> engine.step(running) -> hand out steps

Chunked prefill: a long prompt enters its KV cache `prefill_chunk` tokens per loop iteration, between
the running requests' steps, so it delays them by a round at a time instead of its whole prefill;
its last piece goes through `engine.start_many` with prefix reuse, which scores only what is not
cached. A round prefills the pieces of several requests in one pass (up to `prefill_tokens`).
Each request's handler thread reads its own queue, so slow clients never stall the batch; a
cancelled request leaves at the next step boundary and frees its slot.

Shared prefixes: a request whose prompt starts like the context a slot holds (a running request's, or
a finished one's not yet reused) copies those K/V into its slot instead of prefilling them (the n
choices of one prompt; one system prompt), and one with the very prompt of a request still prefilling
waits for it rather than computing it twice. Only within one prefix scope (an API key and cache salt):
the time to a first token must not tell one tenant what another asked. A feature head's request shares
and chunks too where the slots keep every position's output row (KVPool.f, the states it drafts from)."""
from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from drafthorse.actors.drafters.base import Drafter
from drafthorse.actors.engine import BatchEngine, Prompt, Sequence, reusable_prefix, whole_prompt
from drafthorse.actors.models.llama import Llama
from drafthorse.actors.models.runner import ModelRunner, extend_batch
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.stats import GenerationStats

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room: the waiting queue is full."""


class Busy(Exception):
    """Every KV slot is in use."""


class SlotPool:
    """A fixed number of KV slots, one K/V tensor for all (allocated once: a step's sequences share
    one attention pass per layer). A finished session keeps its slot (and prefix) until the slot is
    needed by someone else, least recently used first."""

    def __init__(self, model: Llama, capacity: int, max_len: int):
        self.model = model
        self.kv = model.new_pool(capacity, max_len, commit=True)   # the worker's memory budget, held from start
        self.capacity = capacity
        self.free: OrderedDict[str, ModelRunner] = OrderedDict(
            (f"_{i}", ModelRunner(model, cache=self.kv.cache(i))) for i in range(capacity))
        self.lent = 0   # acquired, not yet released: free + lent == capacity, always (Scheduler.audit)
        self.lock = threading.Lock()

    def acquire(self, session_id: str) -> tuple[ModelRunner, bool]:
        """(runner, holds this session's prefix). Raises Busy when every slot is in use."""
        with self.lock:
            if session_id and session_id in self.free:
                self.lent += 1
                return self.free.pop(session_id), True
            if not self.free:
                raise Busy()
            self.lent += 1
            return self.free.popitem(last=False)[1], False

    def release(self, session_id: str, runner: ModelRunner) -> None:
        """The slot is free again, holding session_id's prefix. Two turns of one session that ran at once
        both release under its id: the one released last keeps the name, the other stays a free slot
        (emptied), never dropped."""
        with self.lock:
            if session_id and session_id in self.free:
                older = self.free.pop(session_id)
                older.reset()
                self.free[f"_{uuid.uuid4().hex}"] = older
            self.free[session_id or f"_{uuid.uuid4().hex}"] = runner
            self.lent -= 1

    def counts(self) -> tuple[int, int]:
        """(free, lent), read together."""
        with self.lock:
            return len(self.free), self.lent

    def idle(self) -> list[ModelRunner]:
        """The free slots' runners (what they hold may be a prefix worth copying)."""
        with self.lock:
            return list(self.free.values())

    def forget(self, session_id: str) -> None:
        with self.lock:
            if session_id in self.free:
                runner = self.free.pop(session_id)
                runner.reset()
                self.free[f"_{uuid.uuid4().hex}"] = runner


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    drafter: Drafter
    session_id: str = ""
    adaptive: bool = True          # False: the full tree budget every step (no adaptive policy)
    prefix_scope: str = ""         # shares cached prefixes only with requests of the same scope
    stats: GenerationStats = field(default_factory=GenerationStats)
    out: queue.Queue = field(default_factory=queue.Queue)   # Step, then None; or an Exception
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Admitted:
    """A request on its KV slot, until its prompt is in the cache."""
    req: Request
    runner: ModelRunner
    cached: bool                   # the slot holds this session's prefix
    checked: bool = False          # validated, and the cache cut to what start() would keep


class Scheduler:
    def __init__(self, engine: BatchEngine, pool: SlotPool, max_waiting: int, prefill_tokens: int = 1024):
        self.engine, self.pool, self.max_waiting = engine, pool, max_waiting
        self.prefill_tokens = prefill_tokens   # prompt tokens prefilled per loop iteration (at least one request)
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[_Admitted] = deque()
        self.running: list[tuple[Request, Sequence]] = []
        self.cv = threading.Condition()
        self.steps = 0
        self.last_batch = 0
        self.fault = ""   # what `audit` found broken; health fails with it (Serve replaces the worker)
        self.share = pool.model.prefixes_travel   # copy prefixes between slots (Llama.prefixes_travel)
        self.shared_tokens = 0                    # prompt tokens copied instead of prefilled
        self._scope: dict[int, str] = {}          # id(runner) -> the prefix scope of what its slot holds
        self._stop = False
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cv:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull()
            self.waiting.append(req)
            self.cv.notify()

    def stop(self) -> None:
        with self.cv:
            self._stop = True
            self.cv.notify()

    @property
    def load(self) -> int:
        return len(self.running) + len(self.prefilling) + len(self.waiting)

    def audit(self) -> None:
        """Every KV slot is free or held by a request this loop tracks. A slot lost (released twice,
        never released, dropped) shrinks the worker for good while its heartbeat still advertises it, so
        the first mismatch is kept in `fault` for the health check. Runs on the loop's own thread, between
        iterations, where the lists it counts are not changing."""
        free, lent = self.pool.counts()
        held = len(self.prefilling) + len(self.running)
        if not self.fault and (free + lent != self.pool.capacity or lent != held):
            self.fault = (f"KV slots: {free} free + {lent} lent of {self.pool.capacity} configured, "
                          f"{held} held by requests")
            log.error("%s", self.fault)

    def check(self) -> None:
        """Raises when this scheduler can no longer serve: its thread died, or its slots do not add up."""
        if not self.thread.is_alive():
            raise RuntimeError("the scheduler thread is not running")
        if self.fault:
            raise RuntimeError(self.fault)

    def _loop(self) -> None:
        while True:
            self.audit()
            with self.cv:
                while not self._stop and not self.waiting and not self.running and not self.prefilling:
                    self.cv.wait()
                if self._stop:
                    return
                admit = []
                while self.waiting:
                    try:
                        runner, cached = self.pool.acquire(self.waiting[0].session_id)
                    except Busy:  # every slot in use: wait for one to free
                        break
                    admit.append(_Admitted(self.waiting.popleft(), runner, cached))
            self.prefilling.extend(admit)
            self._prefill()
            self.running = [(r, seq) for r, seq in self.running if not self._done(r, seq)]
            if not self.running:
                continue
            try:
                steps = self.engine.step([seq for _, seq in self.running])
            except Exception as e:  # a bug must not wedge every request
                log.exception("batched step failed")
                for r, seq in self.running:
                    r.out.put(e)
                    self._finish(r, seq.runner)
                self.running = []
                continue
            self.steps += 1
            self.last_batch = len(self.running)
            for (r, _), step in zip(self.running, steps):
                r.out.put(step if step.error is None else step.error)   # (a failed one is finished next round)

    def _prefill(self) -> None:
        """One round of prefill for the admitted requests, in at most two passes: those whose uncached
        prompt fits in one chunk start together (`engine.start_many`; so does a feature drafter's
        where the slots keep no output rows: it needs every prompt state from one engine call), every
        longer one gets its next chunk
        (`extend_batch`); up to `prefill_tokens` a round (at least one request), the rest wait for the
        next. Chunks are the engine's own (`prefill_chunk`, aligned from the reused prefix), and a
        prefill pass computes each prompt as alone, so its K/V never depend on what shares the pass."""
        chunk = self.engine.prefill_chunk
        starts: list[_Admitted] = []
        pieces: list[_Admitted] = []
        later: deque[_Admitted] = deque()
        budget = self.prefill_tokens
        underway: set[tuple[str, tuple[int, ...]]] = set()   # (scope, prompt) this round sees being prefilled
        for a in list(self.prefilling):
            req, r = a.req, a.runner
            if req.cancelled.is_set():
                self._finish(req, r)
                continue
            prompt = (req.prefix_scope, tuple(req.prompt_ids))
            whole = whole_prompt(r, req.drafter)   # one engine call, from nothing cached
            if not a.checked and self.share and prompt in underway and not whole:
                later.append(a)   # the same prompt is being prefilled: copy it once that one runs
                continue
            if not a.checked:   # checked once; the slot's cache cut to what start() would keep
                a.checked = True
                try:
                    self.engine.check_request(r, req.prompt_ids, req.params)
                except ValueError as e:
                    self._fail(req, r, e)
                    continue
                # the slot's own context is kept as far as it matches: a session's, or (sharing) one of its scope
                own = a.cached or (self.share and self._scope.get(id(r)) == req.prefix_scope)
                r.truncate(reusable_prefix(r, req.prompt_ids, req.drafter) if own else 0)
                self._scope[id(r)] = req.prefix_scope
                if self.share and not whole:
                    self._borrow(r, req)
            underway.add(prompt)
            todo = len(req.prompt_ids) - r.length
            final = not chunk or todo <= chunk or whole
            cost = todo if final else chunk
            if (starts or pieces) and cost > budget:
                later.append(a)
                continue
            budget -= cost
            if final:
                starts.append(a)
            else:
                pieces.append(a)
                later.append(a)
        self.prefilling = later
        if pieces:
            self._extend(pieces, chunk)
        if starts:
            self._start(starts)

    def _borrow(self, runner: ModelRunner, req: Request) -> None:
        """Copy into runner the longest prefix of req's prompt another slot of its scope holds (a running
        request's, or a free one's), if longer than what runner holds already; what start() would keep of
        it (`reusable_prefix`: not the prompt's last token, scored again for its logits). Free slots change
        hands only on this thread, so their K/V stay put while copied."""
        best, donor = runner.length, None
        for other in [seq.runner for _, seq in self.running] + self.pool.idle():
            if self._scope.get(id(other)) == req.prefix_scope and \
                    (k := reusable_prefix(other, req.prompt_ids, req.drafter)) > best:
                best, donor = k, other
        if donor is not None:
            with self.pool.lock:   # a free donor's `forget` (a handler thread) waits for the copy
                if donor.length >= best:   # (unless it forgot its context meanwhile: then nothing is copied)
                    runner.copy_prefix(donor, best)
                    self.shared_tokens += best

    def _extend(self, pieces: list[_Admitted], chunk: int) -> None:
        """The next chunk of each of these prompts, in one pass; alone where that fails, so that only
        a failing request ends."""
        try:
            extend_batch([a.runner for a in pieces], [a.req.prompt_ids[a.runner.length:a.runner.length + chunk]
                                                      for a in pieces])
        except Exception as e:  # noqa: BLE001 - a prefill failure must not wedge the loop
            if len(pieces) > 1:
                for a in pieces:
                    self._extend([a], chunk)
                return
            self.prefilling.remove(pieces[0])
            self._fail(pieces[0].req, pieces[0].runner, e)

    def _start(self, admitted: list[_Admitted]) -> None:
        """Start these requests (their last prefill piece and first token) in one pass; alone where
        that fails, so that only a failing request ends."""
        for a in [a for a in admitted if a.req.cancelled.is_set()]:
            admitted.remove(a)
            self._finish(a.req, a.runner)
        if not admitted:
            return
        prompts = [Prompt(a.runner, a.req.prompt_ids, a.req.params, a.req.drafter, a.req.stats,
                          reuse_prefix=a.cached or a.runner.length > 0) for a in admitted]
        try:
            started = self.engine.start_many(prompts)
        except Exception as e:  # noqa: BLE001 - bad input (ValueError) or a prefill failure
            if len(admitted) > 1:
                for a in admitted:
                    self._start([a])
                return
            self._fail(admitted[0].req, admitted[0].runner, e)
            return
        for a, (seq, step) in zip(admitted, started):
            seq.adaptive = a.req.adaptive
            a.req.out.put(step)
            self.running.append((a.req, seq))

    def _fail(self, req: Request, runner: ModelRunner, e: Exception) -> None:
        """The request ends with `e` (its handler turns it into a status); its slot is emptied."""
        runner.reset()
        req.out.put(e)
        self._finish(req, runner)

    def _done(self, r: Request, seq: Sequence) -> bool:
        if r.cancelled.is_set() or seq.finish_reason is not None:
            self._finish(r, seq.runner)
            return True
        return False

    def _finish(self, r: Request, runner: ModelRunner) -> None:
        """The request leaves: end its stream, free its drafter, hand its slot back."""
        r.out.put(None)
        try:
            r.drafter.close()
        finally:
            self.pool.release(r.session_id, runner)
