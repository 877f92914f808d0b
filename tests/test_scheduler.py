"""The target worker's continuous-batching scheduler: chunked prefill between decoding steps, outputs
equal to each request decoding alone, session prefixes, cancellation mid-prefill."""
from __future__ import annotations

import queue
import threading
import time

import pytest
import torch

from drafthorse.actors.drafters.base import NoDrafter
from drafthorse.actors.drafters.ngram import NgramDrafter
from drafthorse.actors.engine import BatchEngine, SpecEngine
from drafthorse.actors.models.loader import tiny_llama
from drafthorse.actors.models.runner import ModelRunner
from drafthorse.actors.scheduler import Request, Scheduler, SlotPool
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.gateway import prefix_scope

CHUNK = 16
LONG = [(7 * i + 3) % 120 for i in range(150)]      # 150 tokens: 9 chunks of 16, the rest at start


class Recording(queue.Queue):
    """A request's output queue that notes how many batched steps the scheduler had run at each put."""

    def __init__(self, sched_ref: list):
        super().__init__()
        self.sched_ref, self.at = sched_ref, []

    def put(self, item, *a, **kw):
        self.at.append(self.sched_ref[0].steps if self.sched_ref else 0)
        super().put(item, *a, **kw)


def drain(req: Request, timeout: float = 60) -> list[int]:
    out = []
    while (step := req.out.get(timeout=timeout)) is not None:
        if isinstance(step, Exception):
            raise step
        out += step.token_ids
    return out


@pytest.fixture
def sched(tiny):
    lm = tiny(0)
    engine = BatchEngine(lm.eos_ids, prefill_chunk=CHUNK)
    s = Scheduler(engine, SlotPool(lm.model, 3, 512), max_waiting=8)
    yield lm, s
    s.stop()


def alone(lm, prompt, params, drafter=None, chunk=CHUNK):
    return SpecEngine(ModelRunner(lm.model, 512), lm.eos_ids, prefill_chunk=chunk).generate(
        prompt, params, drafter).token_ids


def test_long_prompt_prefills_in_chunks_between_steps(sched):
    lm, s = sched
    ref = [s]
    short = Request([5, 6, 7, 8, 5, 6, 7], SamplingParams(max_new_tokens=60), NgramDrafter(), out=Recording(ref))
    s.submit(short)
    first = short.out.get(timeout=30)            # running now
    long = Request(LONG, SamplingParams(max_new_tokens=12), NoDrafter(), out=Recording(ref))
    submitted = s.steps
    s.submit(long)
    got_long = drain(long)
    got_short = first.token_ids + drain(short)
    # the long prompt's 9 chunks went in between the short request's steps, one per step
    assert long.out.at[0] - submitted >= 8, (submitted, long.out.at[:3])
    assert got_long == alone(lm, LONG, SamplingParams(max_new_tokens=12))
    assert got_short == alone(lm, [5, 6, 7, 8, 5, 6, 7], SamplingParams(max_new_tokens=60), NgramDrafter())
    # chunking changes nothing a greedy reader can see on this (float64) model: same as one pass
    assert got_long == alone(lm, LONG, SamplingParams(max_new_tokens=12), chunk=0)


def test_session_turn_reuses_its_prefix_and_chunks_the_rest(sched):
    lm, s = sched
    params = SamplingParams(max_new_tokens=8)
    turn1 = Request(LONG[:40], params, NoDrafter(), session_id="s1")
    s.submit(turn1)
    reply = drain(turn1)
    prompt2 = LONG[:40] + reply + LONG[40:]
    turn2 = Request(prompt2, params, NoDrafter(), session_id="s1")
    s.submit(turn2)
    got = drain(turn2)
    assert turn2.stats.reused_prefix_tokens >= 40
    # the same reuse and chunk boundaries as the engine alone on that slot
    r = ModelRunner(lm.model, 512)
    eng = SpecEngine(r, lm.eos_ids, prefill_chunk=CHUNK)
    assert eng.generate(LONG[:40], params).token_ids == reply
    seq, first = eng.start(r, prompt2, params, reuse_prefix=True)
    want = list(first.token_ids)
    while seq.finish_reason is None:
        want += eng.step([seq])[0].token_ids
    assert got == want


def test_cancel_during_prefill_frees_the_slot(sched):
    lm, s = sched
    reqs = [Request(LONG, SamplingParams(max_new_tokens=4), NoDrafter()) for _ in range(3)]
    for r in reqs:
        s.submit(r)
    reqs[2].cancelled.set()
    for r in reqs[:2]:
        assert len(drain(r)) == 4
    assert reqs[2].out.get(timeout=30) is None or reqs[2].out.get(timeout=30) is None
    # every slot is free again: three more requests are admitted at once
    more = [Request([1, 2, 3], SamplingParams(max_new_tokens=2), NoDrafter()) for _ in range(3)]
    for r in more:
        s.submit(r)
    assert all(len(drain(r)) == 2 for r in more)
    deadline = time.monotonic() + 5
    while s.load and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.load == 0


def test_bad_long_prompt_fails_cleanly(sched):
    lm, s = sched
    bad = Request(LONG[:100] + [10 ** 6] + LONG[100:], SamplingParams(max_new_tokens=4), NoDrafter())
    s.submit(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        drain(bad)
    ok = Request([1, 2, 3], SamplingParams(max_new_tokens=3), NoDrafter())
    s.submit(ok)
    assert len(drain(ok)) == 3


@pytest.mark.parametrize("budget,passes", [(1024, 1), (5, 3)])
def test_waiting_prompts_are_prefilled_in_one_pass(tiny, budget, passes):
    """Requests that arrive together start with one prefill pass for all (not one each), up to the
    scheduler's prefill_tokens a pass (at least one request), and each output is its output alone."""
    lm = tiny(0)
    engine = BatchEngine(lm.eos_ids, prefill_chunk=CHUNK)
    model = lm.model
    calls = []
    forward = model.forward_batch
    model.forward_batch = lambda items, **kw: calls.append((len(items), kw.get("prefill"))) or forward(items, **kw)
    try:
        s = Scheduler(engine, SlotPool(model, 3, 512), max_waiting=8, prefill_tokens=budget)
        s.stop()                     # hold the loop: all three must be waiting when it runs
        s.thread.join()
        prompts = [[5, 6, 7, 8], [(3 * i) % 120 for i in range(12)], [9, 1, 9, 2, 9]]
        reqs = [Request(p, SamplingParams(max_new_tokens=6), NoDrafter()) for p in prompts]
        for r in reqs:
            s.submit(r)
        s._stop = False
        s.thread = threading.Thread(target=s._loop, daemon=True)
        s.thread.start()
        got = [drain(r) for r in reqs]
        s.stop()
    finally:
        del model.forward_batch
    prefills = [n for n, prefill in calls if prefill]
    assert prefills == ([3] if passes == 1 else [1, 1, 1]), calls[:6]
    assert got == [alone(lm, p, SamplingParams(max_new_tokens=6)) for p in prompts]


def test_two_turns_of_one_session_at_once_lose_no_slot(tiny):
    """Both turns release their slot under the session's id: the second used to overwrite the first in the
    free list, and that slot was gone for good (a few such pairs emptied a worker)."""
    pool = SlotPool(tiny(0).model, 2, 64)
    a, cached_a = pool.acquire("s")
    b, cached_b = pool.acquire("s")       # the session's prefix is in use: another slot
    assert a is not b and not cached_a and not cached_b and not pool.free
    a.extend([1, 2, 3])
    b.extend([1, 2, 3, 4])
    pool.release("s", a)
    pool.release("s", b)
    assert len(pool.free) == 2
    again, cached = pool.acquire("s")
    assert again is b and cached and again.length == 4      # the last released holds the session
    other, cached = pool.acquire("")
    assert other is a and not cached and other.length == 0


def test_slots_add_up_and_a_lost_one_fails_the_health_check(sched):
    """After a mixed load (two turns of one session at once among others) every slot is free again and
    the check passes; a slot that leaves the pool without a request holding it (what the overwrite in
    release used to do) is found at the loop's next iteration and fails the check, as does a dead loop."""
    lm, s = sched
    reqs = [Request([5, 6, 7, 8], SamplingParams(max_new_tokens=6), NgramDrafter(), session_id=sid)
            for sid in ("a", "a", "b", "", "")]
    for r in reqs:
        s.submit(r)
    for r in reqs:
        drain(r)
    deadline = time.monotonic() + 10
    while s.pool.counts() != (3, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.pool.counts() == (3, 0)
    s.check()
    s.pool.acquire("")                           # lost: lent, held by no request
    s.submit(Request([5, 6], SamplingParams(max_new_tokens=2), NoDrafter()))   # the loop turns once more
    while not s.fault and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match=r"KV slots: \d free \+ \d lent of 3 configured"):
        s.check()
    s.stop()
    s.thread.join(10)
    s.fault = ""
    with pytest.raises(RuntimeError, match="not running"):
        s.check()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("together", [True, False])
def test_choices_of_one_prompt_prefill_it_once_and_each_equals_its_run_alone(dtype, together):
    """n choices: one prefills the prompt, the others copy its K/V (waiting for it when admitted in the same
    round); each, sampled with its own seed, equals its generation alone (bitwise rows at bfloat16)."""
    lm = tiny_llama(3, dtype=dtype)
    s = Scheduler(BatchEngine(lm.eos_ids, prefill_chunk=CHUNK), SlotPool(lm.model, 4, 512), max_waiting=8)
    try:
        prompt = LONG[:60]
        params = [SamplingParams(temperature=0.9, seed=10 + i, max_new_tokens=200 if i == 0 else 24) for i in range(4)]
        reqs = [Request(list(prompt), p, NgramDrafter()) for p in params]
        if not together:   # the first runs (its first token is out) before the others come
            s.submit(reqs[0])
            while reqs[0].out.empty():
                time.sleep(0.001)
        with s.cv:   # held: the rest are admitted in one round
            for r in reqs[0 if together else 1:]:
                s.submit(r)
        outs = [drain(r) for r in reqs]
        assert s.shared_tokens == 3 * 59 and [r.stats.reused_prefix_tokens for r in reqs[1:]] == [59, 59, 59]
        for p, out in zip(params, outs):
            assert out == alone(lm, prompt, p, NgramDrafter())
        # a different prompt with a common start copies that much
        other = Request(prompt[:40] + [1, 2, 3], SamplingParams(max_new_tokens=4), NoDrafter())
        slow = Request(list(prompt), SamplingParams(max_new_tokens=400), NoDrafter())
        s.submit(slow)
        time.sleep(0.3)
        s.submit(other)
        assert drain(other) == alone(lm, prompt[:40] + [1, 2, 3], SamplingParams(max_new_tokens=4))
        assert other.stats.reused_prefix_tokens == 40
        slow.cancelled.set()
        drain(slow)
    finally:
        s.stop()


@pytest.mark.parametrize("key,salt", [("mallory", ""), ("alice", "run-2"), ("", "alice")])
def test_prefixes_are_shared_within_a_scope_only(sched, key, salt):
    """Another API key's request with the same prompt (or the same key's with another cache_salt) prefills
    it itself (its first token's time must not tell it the prompt was seen); the same key's copies it,
    from a running slot or a finished one. Scopes as the gateway makes them."""
    lm, s = sched
    prompt = LONG[:40]
    alice = prefix_scope("alice", "")
    first = Request(list(prompt), SamplingParams(max_new_tokens=300), NoDrafter(), prefix_scope=alice)
    s.submit(first)
    while first.out.empty():
        time.sleep(0.001)
    other = Request(list(prompt), SamplingParams(max_new_tokens=4), NoDrafter(), prefix_scope=prefix_scope(key, salt))
    s.submit(other)
    assert drain(other) == alone(lm, prompt, SamplingParams(max_new_tokens=4))
    assert s.shared_tokens == 0 and other.stats.reused_prefix_tokens < 39   # (its own chunks count as reused)
    first.cancelled.set()
    drain(first)
    again = Request(list(prompt), SamplingParams(max_new_tokens=4), NoDrafter(), prefix_scope=alice)
    s.submit(again)   # alice's slot is free now, its context still there
    assert drain(again) == alone(lm, prompt, SamplingParams(max_new_tokens=4))
    assert again.stats.reused_prefix_tokens == 39
