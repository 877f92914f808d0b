"""The Serve deployment body of the gateway: the asyncio gRPC gateway on a thread of its own, and the Serve
app's HTTP ingress (the OpenAI-compatible API, which calls that gateway)."""
from __future__ import annotations

import asyncio
import logging
import threading

from transformers import AutoTokenizer

from drafthorse.actors.models.loader import DEFAULT_MODEL, resolve
from drafthorse.cluster.apikeys import KeyRing
from drafthorse.cluster.gateway import drain_gateway, serve_gateway
from drafthorse.cluster.openai_api import create_app
from drafthorse.runtime.settings import GatewaySettings

log = logging.getLogger(__name__)


class GatewayServer:
    """Serve deployment body: runs the asyncio gRPC gateway on a thread of its own, and is the Serve
    app's HTTP ingress: the OpenAI-compatible API (cluster/openai_api.py), which calls that gateway."""

    def __init__(self, s: GatewaySettings, *workers):
        self.s = s
        directory, gguf = resolve(DEFAULT_MODEL if s.model.startswith("tiny:") else s.model)
        tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
        ready = threading.Event()
        self.error: BaseException | None = None
        self.handles: dict = {}   # the gateway's grpc server and health servicer, for the drain

        def run() -> None:
            try:
                loop_ready = asyncio.Event()
                async def main():
                    self.loop = asyncio.get_running_loop()
                    task = asyncio.create_task(serve_gateway(s, tok, loop_ready, self.handles))
                    await loop_ready.wait()
                    ready.set()
                    await task
                asyncio.run(main())
            except BaseException as e:  # noqa: BLE001 - surfaced through check_health
                self.error = e
                ready.set()

        self.thread = threading.Thread(target=run, name="gateway", daemon=True)
        self.thread.start()
        ready.wait(60)
        if self.error is not None:
            raise RuntimeError(f"gateway failed to start: {self.error}")

    def check_health(self) -> None:
        if self.error is not None or not self.thread.is_alive():
            raise RuntimeError(f"gateway is down: {self.error}")

    def __del__(self):
        """Serve stops the replica: NOT_SERVING, refuse new calls, let streams finish (grace_s)."""
        try:
            if self.handles:
                asyncio.run_coroutine_threadsafe(
                    drain_gateway(self.handles["server"], self.handles["health"], self.s.grace_s),
                    self.loop).result(self.s.grace_s + 2)
        except Exception:  # best effort at teardown
            log.warning("gateway drain failed", exc_info=True)

    def __serve_build_asgi_app__(self):
        """Serve calls this after __init__: the FastAPI app its HTTP proxy routes to."""
        host = "127.0.0.1" if self.s.host in ("", "0.0.0.0", "::") else self.s.host
        return create_app(f"[{host}]:{self.s.gateway_port}" if ":" in host else f"{host}:{self.s.gateway_port}",
                          model=self.s.model, keys=KeyRing.of(self.s), max_body_bytes=self.s.max_request_bytes)
