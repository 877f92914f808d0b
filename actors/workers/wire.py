"""Conversions between engine objects and the drafthorse.v1 wire messages, and nothing else.

Whatever comes off the wire is untrusted: `*_from_proto` validate and raise ValueError, so callers can
map that to INVALID_ARGUMENT (server) or a protocol error (client)."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from drafthorse.actors.spec.logprobs import TokenLogprob
from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.spec.tree import DraftTree
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb


def tree_to_proto(tree: DraftTree) -> pb.TokenTree:
    msg = pb.TokenTree(token_ids=tree.tokens, parents=tree.parents)
    if tree.probs is not None and len(tree):
        # float32 on the wire; the drafters already compute q in float32, so this is exact for them
        probs = tree.probs.detach().to("cpu", torch.float32)
        for row in probs:
            ids = row.nonzero().squeeze(1)
            msg.probs.add(ids=ids.tolist(), probs=row[ids].tolist())
    return msg


def tree_from_proto(msg: pb.TokenTree, vocab_size: int, max_nodes: int | None = None,
                    max_depth: int | None = None) -> DraftTree:
    """A DraftTree with dense [n, V] float32 probs (None when the message carries point masses), validated
    here, once, against the budget it was asked for (no bound given: its structure only)."""
    n = len(msg.token_ids)
    if len(msg.probs) not in (0, n):
        raise ValueError(f"tree has {n} nodes but {len(msg.probs)} distributions")
    tree = DraftTree(list(msg.token_ids), list(msg.parents))
    tree.validate(vocab_size, n if max_nodes is None else max_nodes, max_depth)  # ids in range, parents topological
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
        tree.check_probs()
    return tree


def sampling_to_proto(params: SamplingParams) -> pb.Sampling:
    msg = pb.Sampling(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def logprobs_to_proto(logprobs: list[TokenLogprob], token_bytes: Callable[[int], bytes]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=t.token_id, logprob=t.logprob, token=token_bytes(t.token_id),
                            top=[pb.Logprob(token_id=i, logprob=v, token=token_bytes(i)) for i, v in t.top])
            for t in logprobs]


def constraint_from_proto(msg: pb.Constraint) -> tuple[str, str] | None:
    """(kind, spec) for SamplingParams.constraint; None when unset."""
    kind = msg.WhichOneof("kind")
    if kind is None or (kind == "json_object" and not msg.json_object):
        return None
    return kind, "" if kind == "json_object" else getattr(msg, kind)


def sampling_from_proto(msg: pb.Sampling, max_new_tokens: int = 128, stop: tuple[str, ...] = (),
                        constraint: tuple[str, str] | None = None) -> SamplingParams:
    """Unvalidated: call .validate() on the result (it names the offending parameter)."""
    return SamplingParams(temperature=msg.temperature, top_k=msg.top_k, constraint=constraint,
                          top_p=msg.top_p if msg.top_p != 0.0 else 1.0,  # proto3 default 0 means off
                          seed=msg.seed if msg.HasField("seed") else None,
                          logprobs=msg.logprobs if msg.HasField("logprobs") else None,
                          max_new_tokens=max_new_tokens, stop=tuple(stop))


# features travel as raw bytes (never pickle), little-endian, in the dtype the target computed them in:
# bit-exact, so a remote drafter sees the very numbers an in-process one would
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}   # reinterpret as ints: numpy has no bfloat16


def features_to_proto(feats: torch.Tensor) -> pb.Features:
    """[rows, dim] -> Features."""
    name = str(feats.dtype).removeprefix("torch.")
    if name not in FEATURE_DTYPES or feats.dim() != 2:
        raise ValueError(f"features must be [rows, dim] of {', '.join(FEATURE_DTYPES)}, got {feats.dtype} "
                         f"{tuple(feats.shape)}")
    t = feats.detach().to("cpu").contiguous()
    size = t.element_size()
    data = t.view(_BITS[size]).numpy().astype(f"<i{size}", copy=False).tobytes()
    return pb.Features(data=data, dtype=name, rows=t.shape[0], dim=t.shape[1])


def features_from_proto(msg: pb.Features, rows: int, dim: int) -> torch.Tensor:
    """A [rows, dim] tensor, after checking the message describes exactly that."""
    if msg.dtype not in FEATURE_DTYPES:
        raise ValueError(f"features dtype {msg.dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
    if msg.rows != rows:
        raise ValueError(f"features have {msg.rows} rows, expected {rows} (one per token that has a predecessor)")
    if msg.dim != dim:
        raise ValueError(f"features have dim {msg.dim}, this drafter's target has hidden size {dim}")
    dtype = FEATURE_DTYPES[msg.dtype]
    size = torch.empty((), dtype=dtype).element_size()
    if len(msg.data) != rows * dim * size:
        raise ValueError(f"features data is {len(msg.data)} bytes, {rows} x {dim} {msg.dtype} is {rows * dim * size}")
    ints = np.frombuffer(msg.data, dtype=f"<i{size}").astype(f"=i{size}")  # a writable, native-order copy
    feats = torch.from_numpy(ints).view(dtype).reshape(rows, dim)
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("features must be finite")
    return feats
