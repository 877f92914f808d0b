"""`drafthorse serve`, the README's main command, as a user runs it: a separate process that starts
Redis/Ray/workers, reports its start-up times and first token, answers a generation over gRPC, and
exits cleanly on SIGTERM."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import grpc
import pytest

from drafthorse.actors.spec.sampling import SamplingParams
from drafthorse.cluster.cli import default_drafter
from drafthorse.cluster.client import request
from drafthorse.protos.drafthorse.v1 import drafthorse_pb2_grpc as pb_grpc
from drafthorse.runtime.redis_store import free_port

pytestmark = pytest.mark.cluster

STARTED = re.compile(r"started in ([\d.]+) s: first token ([\d.]+) s after the workers were ready in ([\d.]+) s")


def test_serve_reports_start_up_and_answers(tmp_path):
    port = free_port()
    env = dict(os.environ, DRAFTHORSE_MODEL="tiny:0", DRAFTHORSE_GATEWAY_PORT=str(port), DRAFTHORSE_HTTP_PORT="0",
               DRAFTHORSE_KEY_PREFIX=f"test-serve-{uuid.uuid4().hex[:8]}:", DRAFTHORSE_DRAFTER="ngram",
               RAY_ADDRESS="")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "drafthorse.cluster.cli", "serve"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        m = None
        while time.monotonic() < deadline and proc.poll() is None:
            m = STARTED.search(log.read_text())
            if m:
                break
            time.sleep(0.5)
        assert m, f"serve did not report its start-up (exit {proc.poll()}):\n{log.read_text()[-3000:]}"
        since_exec, first, ready = map(float, m.groups())
        assert 0 < first < ready < since_exec, m.group(0)
        assert f"gRPC gateway: 127.0.0.1:{port}" in log.read_text()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            msgs = list(pb_grpc.GeneratorStub(ch).Generate(request("Hello", SamplingParams(max_new_tokens=4)),
                                                           timeout=60))
        assert sum(len(m.token_ids) for m in msgs) == 4 and msgs[-1].finish_reason == "length"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0, log.read_text()[-3000:]


@pytest.mark.parametrize("native,model,dtype,want", [
    ("1", "smollm2", "auto", "eagle3+ngram"),    # an EAGLE-3 head ships for it, bfloat16 computes natively
    ("1", "smollm2", "bfloat16", "eagle3+ngram"),
    ("0", "smollm2", "auto", "ngram"),           # float32 CPU: the two tie
    ("1", "smollm2", "float32", "ngram"),
    ("1", "smollm2", "int4", "ngram"),
    ("1", "tiny:0", "auto", "ngram"),            # no head ships for it
])
def test_serve_picks_its_default_drafter_for_the_machine(monkeypatch, native, model, dtype, want):
    monkeypatch.setenv("DRAFTHORSE_NATIVE_BF16", native)
    assert default_drafter(model, dtype, "cpu") == want
