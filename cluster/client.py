"""A small gRPC client for the gateway: what `drafthorse generate --server` uses."""
from __future__ import annotations

import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.actors.workers.wire import sampling_to_proto
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2 as pb
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc


def key_metadata(api_key: str) -> tuple:
    """gRPC metadata carrying a public API key (none when empty)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def request(prompt: str, params: SamplingParams, drafter: str = "", raw: bool = False,
            session: str | None = None, new_session: bool = False) -> pb.GenerateRequest:
    r = pb.GenerateRequest(max_new_tokens=params.max_new_tokens, stop=list(params.stop), drafter=drafter,
                           session_id=session or "", new_session=new_session)
    r.sampling.CopyFrom(sampling_to_proto(params))
    if raw:
        r.prompt = prompt
    else:
        r.chat.messages.add(role="user", content=prompt)
    return r


def generate_remote(server: str, prompt: str, params: SamplingParams, drafter: str, raw: bool,
                    session: str | None, json_out: bool, timeout_s: float = 600, api_key: str = "") -> None:
    with grpc.insecure_channel(server) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        ids, text, last = [], [], None
        try:
            for msg in stub.Generate(request(prompt, params, drafter, raw, session), timeout=timeout_s,
                                     metadata=key_metadata(api_key)):
                ids += msg.token_ids
                text.append(msg.text_delta)
                last = msg
                if not json_out:
                    sys.stdout.write(msg.text_delta)
                    sys.stdout.flush()
        except grpc.RpcError as e:
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            raise SystemExit(1) from None
    if json_out:
        stats = MessageToDict(last.stats, preserving_proto_field_name=True) if last else {}
        print(json.dumps({"text": "".join(text), "token_ids": ids,
                          "finish_reason": last.finish_reason if last else "",
                          "session_id": last.session_id if last else "", "stats": stats}))
    else:
        sys.stdout.write("\n")
