"""Shared fixtures: thread count, tiny model factories (cached: building one costs ~0.1 s), engines."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from drafthorse.actors.models import loader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# SmolLM2 at bfloat16 where the CPU has no bfloat16 instructions runs on emulation, measured on a 2-core
# AVX2 machine: its load's exact-rows probe 300 s, a token 1.7 s (float32: 22 s, 0.1 s), so one test
# would take many minutes; there the tiny models' bfloat16 tests cover the exact path
needs_native_bf16 = pytest.mark.skipif(
    not loader.native_bf16(env=False),
    reason="SmolLM2 at bfloat16 needs a CPU with native bfloat16 (AVX-512 BF16 or AMX) to run in test time")


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """Tiny models are faster on one thread; the SmolLM2 module raises this to 2 for itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.cache
def _tiny(seed: int, vocab_size: int, hidden_size: int, eos_token_id: int | None, max_len: int):
    from drafthorse.actors.models.loader import tiny_llama
    return tiny_llama(seed, vocab_size=vocab_size, hidden_size=hidden_size, eos_token_id=eos_token_id,
                      max_len=max_len, dtype=torch.float64)


@pytest.fixture(scope="session")
def tiny():
    """tiny(seed, vocab_size=128, hidden_size=64, eos_token_id=None, max_len=512) -> LoadedModel
    (float64, cached per argument set: treat it as read-only)."""
    def make(seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, eos_token_id: int | None = None,
             max_len: int = 512):
        return _tiny(seed, vocab_size, hidden_size, eos_token_id, max_len)
    return make


@pytest.fixture(scope="session")
def make_engine():
    """make_engine(lm, max_len=None, decode=None) -> SpecEngine over a fresh ModelRunner."""
    from drafthorse.actors.engine import SpecEngine
    from drafthorse.actors.models.runner import ModelRunner

    def make(lm, max_len: int | None = None, decode=None, **kw):
        return SpecEngine(ModelRunner(lm.model, max_len), lm.eos_ids, decode=decode, **kw)
    return make


def _hf_greedy(lm, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = lm.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=0,
                             top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="session")
def hf_greedy():
    """hf_greedy(lm, prompt, max_new_tokens) -> token ids from transformers' own greedy `generate`
    (stops at the model's EOS when it has one, like the engine)."""
    return _hf_greedy


def start_gateway(settings, tokenizer, timeout_s: float = 30) -> None:
    """Run the gRPC gateway (cluster/gateway.py) for `settings` on its own event loop in a daemon
    thread; returns once it listens."""
    import asyncio
    import threading

    from drafthorse.cluster.gateway import serve_gateway
    ready = threading.Event()

    def main():
        async def go():
            ev = asyncio.Event()
            task = asyncio.create_task(serve_gateway(settings, tokenizer, ev))
            await ev.wait()
            ready.set()
            await task
        asyncio.run(go())
    threading.Thread(target=main, daemon=True).start()
    assert ready.wait(timeout_s), "the gateway did not start"


def make_pki(directory, name: str = "drafthorse-internal", ca_name: str = "drafthorse test CA") -> dict[str, str]:
    """A CA and one certificate it signed (for servers and clients alike: the workers are both), named
    `name` and 127.0.0.1, written as PEM files; returns the Settings fields that point at them."""
    import datetime
    import ipaddress
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            b = (b.add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                              x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                 critical=False)
                  .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                        ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files = {"tls_ca_file": d / "ca.pem", "tls_cert_file": d / "cert.pem", "tls_key_file": d / "key.pem"}
    files["tls_ca_file"].write_bytes(cert(ca_name, ca_key, ca_name, ca_key, True).public_bytes(serialization.Encoding.PEM))
    files["tls_cert_file"].write_bytes(cert(name, key, ca_name, ca_key, False).public_bytes(serialization.Encoding.PEM))
    files["tls_key_file"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return {k: str(v) for k, v in files.items()}
