"""Conversions between engine objects and the drafthorse.v1 wire messages, and nothing else.

Whatever comes off the wire is untrusted: `*_from_proto` validate and raise ValueError, so callers can
map that to INVALID_ARGUMENT (server) or a protocol error (client)."""
from __future__ import annotations

import math

import torch

from actors.spec.sampling import SamplingParams
from actors.spec.tree import DraftTree
from protos.drafthorse.v1 import drafthorse_pb2 as pb


def tree_to_proto(tree: DraftTree) -> pb.TokenTree:
    msg = pb.TokenTree(token_ids=tree.tokens, parents=tree.parents)
    if tree.probs is not None and len(tree):
        # float32 on the wire; the drafters already compute q in float32, so this is exact for them
        probs = tree.probs.detach().to("cpu", torch.float32)
        for row in probs:
            ids = row.nonzero().squeeze(1)
            msg.probs.add(ids=ids.tolist(), probs=row[ids].tolist())
    return msg


def tree_from_proto(msg: pb.TokenTree, vocab_size: int) -> DraftTree:
    """A DraftTree with dense [n, V] float32 probs (None when the message carries point masses)."""
    n = len(msg.token_ids)
    if len(msg.probs) not in (0, n):
        raise ValueError(f"tree has {n} nodes but {len(msg.probs)} distributions")
    tree = DraftTree(list(msg.token_ids), list(msg.parents))
    tree.validate(vocab_size, max_nodes=n)  # lengths, ids in range, parents topological
    if len(msg.probs):
        probs = torch.zeros(n, vocab_size, dtype=torch.float32)
        for i, d in enumerate(msg.probs):
            if len(d.ids) != len(d.probs):
                raise ValueError(f"tree node {i}: {len(d.ids)} ids but {len(d.probs)} probabilities")
            if any(not 0 <= t < vocab_size for t in d.ids):
                raise ValueError(f"tree node {i}: distribution id outside the vocabulary [0, {vocab_size})")
            if len(set(d.ids)) != len(d.ids):
                raise ValueError(f"tree node {i}: repeated ids in distribution")
            if any(not (p >= 0.0 and math.isfinite(p)) for p in d.probs):  # also catches NaN
                raise ValueError(f"tree node {i}: probabilities must be finite and >= 0")
            if len(d.ids):
                probs[i, torch.tensor(list(d.ids), dtype=torch.long)] = torch.tensor(list(d.probs), dtype=torch.float32)
        tree.probs = probs
    return tree


def sampling_to_proto(params: SamplingParams) -> pb.Sampling:
    msg = pb.Sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def sampling_from_proto(msg: pb.Sampling, max_new_tokens: int = 128, stop: tuple[str, ...] = ()) -> SamplingParams:
    """Unvalidated: call .validate() on the result (it names the offending parameter)."""
    return SamplingParams(temperature=msg.temperature, top_k=msg.top_k,
                          top_p=msg.top_p if msg.top_p != 0.0 else 1.0,  # proto3 default 0 means off
                          seed=msg.seed if msg.HasField("seed") else None,
                          max_new_tokens=max_new_tokens, stop=tuple(stop))
