"""API keys for the public APIs (gRPC gateway, OpenAI-compatible HTTP).

The server keeps only SHA-256 digests of the keys (`sha256:<hex>[:name]`, from DRAFTHORSE_API_KEY_HASHES
or one per line in DRAFTHORSE_API_KEYS_FILE); a presented key (`authorization: Bearer <key>`) is hashed
and compared with every digest in constant time. A key's name (default: the first 12 hex digits of its
digest, which reveal nothing usable) identifies its owner: a session belongs to the key that opened it.
With no digests configured the APIs are open (the default on loopback). `drafthorse api-key` makes a
key and the line to configure."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from drafthorse.runtime.rpc import is_loopback
from drafthorse.runtime.settings import GatewaySettings

PREFIX = "sha256:"


def new_key() -> str:
    return "dh-" + secrets.token_urlsafe(32)


def digest_line(key: str, name: str = "") -> str:
    """What to configure for `key`: sha256:<hex>[:name]."""
    return PREFIX + hashlib.sha256(key.encode()).hexdigest() + (f":{name}" if name else "")


def bearer(pairs) -> str:
    """The key in an `authorization: Bearer <key>` header / metadata pair list ('' if none)."""
    for k, v in pairs or ():
        if str(k).lower() == "authorization":
            v = str(v)
            return v[7:].strip() if v[:7].lower() == "bearer " else ""
    return ""


@dataclass(frozen=True)
class KeyRing:
    digests: tuple[bytes, ...] = ()
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, lines, source: str = "api key hashes") -> KeyRing:
        digests, names = [], []
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            body = line.removeprefix(PREFIX)
            hexpart, _, name = body.partition(":")
            try:
                if not line.startswith(PREFIX) or len(hexpart) != 64:
                    raise ValueError
                digest = bytes.fromhex(hexpart)
            except ValueError:
                # never echo the line: it might be a key pasted by mistake
                raise ValueError(f"{source}, entry {n}: expected sha256:<64 hex digits>[:name] "
                                 "(make one with `drafthorse api-key`)") from None
            digests.append(digest)
            names.append(name or hexpart[:12])
        return cls(tuple(digests), tuple(names))

    @classmethod
    def of(cls, s: GatewaySettings) -> KeyRing:
        """The public API keys the settings configure; ValueError names a malformed entry, and refuses
        public APIs open to anyone beyond this host unless the settings say so (allow_anonymous)."""
        ring = cls.load(s.api_key_hashes, s.api_keys_file)
        if not ring.enabled and not s.allow_anonymous and not is_loopback(s.host):
            raise ValueError(f"the public APIs would listen on {s.host} with no API keys: add keys "
                             "(DRAFTHORSE_API_KEY_HASHES or DRAFTHORSE_API_KEYS_FILE; `drafthorse api-key` makes "
                             "one) or serve them open explicitly (--allow-anonymous, DRAFTHORSE_ALLOW_ANONYMOUS=1)")
        return ring

    @classmethod
    def load(cls, hashes: list[str] | None = None, file: str | None = None) -> KeyRing:
        lines = list(hashes or [])
        ring = cls.parse(lines)
        if file:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"api keys file {file}: {e.strerror}") from None
            more = cls.parse(text.splitlines(), f"api keys file {file}")
            ring = cls(ring.digests + more.digests, ring.names + more.names)
        return ring

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def identify(self, presented: str) -> str | None:
        """The owner name of a valid key, else None. Every digest is compared (no early exit), each
        in constant time, so timing says nothing about which digest came close."""
        if not presented:
            return None
        d = hashlib.sha256(presented.encode()).digest()
        found = None
        for digest, name in zip(self.digests, self.names):
            if hmac.compare_digest(d, digest):
                found = name
        return found
