"""Batching forwards across threads: concurrent callers of one model share one `forward_batch`.

A draft worker answers many sessions' Draft RPCs on gRPC threads; each session's drafter scores its
own few tokens per step (a catch-up chain, then one tree level at a time). One pass over all of them
reads the weights once instead of once per session. Flat combining: a caller queues its forward; if
no pass is running it becomes the leader, takes every compatible queued forward (its own included),
runs them as one ragged batch and hands each caller its rows; callers that arrived meanwhile wait and
one of them leads the next pass. A lone caller pays only a lock: no timer, no added latency.

Only drafters use it (a ModelRunner given a combiner): what a drafter proposes does not change what
the target generates, so the batch's rounding (a row computed among others) cannot affect output."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .kvcache import KVPool
from .llama import BatchItem, Llama


@dataclass(eq=False)   # compared by identity (queue removal), never by tensor contents
class _Call:
    item: BatchItem
    key: tuple[bool | None, int | None, bool]   # forwards that can share a pass: (exact, None: prefill;
                                                #  layers, with embeds)
    embeds: torch.Tensor | None
    logit_rows: slice | None             # rows whose logits the caller wants
    done: bool = False
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    error: BaseException | None = None


@dataclass
class Combiner:
    model: Llama
    kv: KVPool | None = None             # slots for the callers' runners: a pass then attends in one go too
    max_rows: int = 4096                 # rows per pass at most (bounds the activations)
    passes: int = 0                      # forward passes run
    calls: int = 0                       # forwards served
    _cv: threading.Condition = field(default_factory=threading.Condition)
    _queue: list[_Call] = field(default_factory=list)
    _busy: bool = False

    def forward(self, item: BatchItem, exact: bool | None, embeds: torch.Tensor | None, layers: int | None,
                logit_rows: slice | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden [n, H], logits of `logit_rows` or None) of one sequence's forward."""
        call = _Call(item, (exact, layers, embeds is not None), embeds, logit_rows)
        with self._cv:
            self._queue.append(call)
            while self._busy and not call.done:
                self._cv.wait()
            if call.done:
                return self._result(call)
            self._busy = True
            self._queue.remove(call)
            batch, rows = [call], call.item.ids.numel()
            for c in list(self._queue):
                n = c.item.ids.numel()
                if c.key == call.key and rows + n <= self.max_rows:
                    batch.append(c)
                    rows += n
                    self._queue.remove(c)
        try:
            self._run(batch)
        finally:
            with self._cv:
                self._busy = False
                self.passes += 1
                self.calls += len(batch)
                self._cv.notify_all()
        return self._result(call)

    def _run(self, batch: list[_Call]) -> None:
        exact, layers, with_embeds = batch[0].key
        try:
            embeds = torch.cat([c.embeds for c in batch if c.embeds is not None]) if with_embeds else None
            hidden = self.model.forward_batch([c.item for c in batch], exact=bool(exact), embeds=embeds,
                                              layers=layers, prefill=exact is None)
            want = [h[c.logit_rows] for c, h in zip(batch, hidden) if c.logit_rows is not None]
            logits = iter(self.model.logits(torch.cat(want)).split([w.shape[0] for w in want]) if want else ())
            for c, h in zip(batch, hidden):
                c.hidden = h
                c.logits = next(logits) if c.logit_rows is not None else None
        except Exception as e:  # noqa: BLE001 - handed to the callers: each gets its own error
            if len(batch) > 1:   # find the faulty call: alone, each fails or succeeds on its own
                for c in batch:
                    self._run([c])
                return
            batch[0].error = e
        for c in batch:
            c.done = True

    @staticmethod
    def _result(call: _Call) -> tuple[torch.Tensor, torch.Tensor | None]:
        if call.error is not None:
            raise call.error
        assert call.hidden is not None   # done, and no error
        return call.hidden, call.logits
