"""What every drafthorse gRPC server shares: bounded message sizes, a shared-token check on internal
calls, optional mutual TLS between the processes, health checking and reflection (so grpcurl /
grpc_health_probe / Kubernetes probes work), and errors that name the request field at fault."""
from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from drafthorse.runtime.errors import BadField

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Target features (eagle) of a long context would outgrow any message bound (4096 tokens x hidden 4096
# x 4 bytes = 64 MiB): a Draft request carries at most this many bytes of them, a longer context goes
# in several requests (actors/workers/remote_drafter.py). SmolLM2 (hidden 576) fits ~7k float32 rows in one.
FEATURE_CHUNK_BYTES = 16 * 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
           ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
# Health and reflection answer without a token: probes and tools must reach them.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Trailing metadata naming the request field an error is about (see `abort`). Not google.rpc's
# BadRequest in grpc-status-details-bin: that needs grpcio-status, which nothing else here uses.
FIELD_KEY = "drafthorse-field"


@dataclass(frozen=True)
class MutualTls:
    """Certificates for the internal gRPC (gateway -> target -> draft workers): every peer presents
    `cert` and accepts only peers whose certificate `ca` signed, so a plaintext or foreign peer cannot
    connect at all (the shared token is still checked on top). Workers advertise IP addresses; a
    certificate rarely names them, so `server_name` (when set) is the name every peer's certificate
    must carry instead (gRPC's ssl_target_name_override)."""
    cert: bytes
    key: bytes
    ca: bytes
    server_name: str = ""

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, ca_file: str, server_name: str = "") -> MutualTls:
        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read the TLS {what} {path!r}: {e.strerror}") from None
        return cls(read(cert_file, "certificate"), read(key_file, "key"), read(ca_file, "CA bundle"), server_name)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def abort(context, error: Exception | str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
          field: str | None = None):
    """context.abort(code, str(error)), the field at fault (`field`, else a BadField's) in the trailing
    metadata. A sync context raises here; a
    grpc.aio one returns the coroutine to await."""
    field = field or (error.field if isinstance(error, BadField) else None)
    if field:
        context.set_trailing_metadata(((FIELD_KEY, field),))
    return context.abort(code, str(error))


def field_of(error: grpc.RpcError) -> str | None:
    """The request field a failed call's error is about (as `abort` sent it), or None."""
    return dict(error.trailing_metadata() or ()).get(FIELD_KEY)


def channel(address: str, tls: MutualTls | None = None, aio: bool = False):
    """A client channel to another drafthorse process: mutual TLS when configured, else plaintext."""
    mod = grpc.aio if aio else grpc
    if tls is None:
        return mod.insecure_channel(address, options=OPTIONS)
    return mod.secure_channel(address, tls.channel_credentials(), options=OPTIONS + tls.options())


def is_loopback(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def token_ok(metadata: Iterable, token: str) -> bool:
    """Constant-time comparison of the bearer token in `metadata` with `token`."""
    sent = next((v for k, v in metadata or () if k == "authorization"), "")
    return hmac.compare_digest(str(sent).encode(), f"Bearer {token}".encode())


class TokenAuth(grpc.ServerInterceptor):
    """Refuses every call but health/reflection that lacks `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self.token = token

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong internal auth token")
        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_PREFIXES) or token_ok(details.invocation_metadata, self.token):
            return continuation(details)
        handler = continuation(details)
        return self._deny_stream if handler is not None and handler.response_streaming else self._deny_unary


def start_server(register: Callable[[grpc.Server], None], service_names: list[str], host: str = "127.0.0.1",
                 port: int = 0, token: str = "", max_workers: int = 8, tls: MutualTls | None = None,
                 ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A sync gRPC server with health + reflection; returns (server, bound port, health servicer)."""
    interceptors = [TokenAuth(token)] if token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=OPTIONS,
                         interceptors=interceptors, maximum_concurrent_rpcs=max_workers * 4)
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_secure_port(f"{host}:{port}", tls.server_credentials()) if tls else \
        server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind a gRPC server to {host}:{port}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def set_not_serving(health_servicer: health.HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
