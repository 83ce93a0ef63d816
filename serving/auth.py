"""Bearer-token authentication of the HTTP API, and which hosts may be bound without it.

The token comes from a file (`--token-file`, surrounding whitespace stripped) or, without one, from the
environment variable `COMPRESS_SERVE_TOKEN`. `serve()` checks it before binding; each worker reads it
again from the same place (the config handed to the workers names the file, never the token). A token is
printable ASCII without spaces, so it fits an `Authorization: Bearer <token>` header as is.

With a token every endpoint but `OPEN_PATHS` needs `Authorization: Bearer <token>`, compared with
`hmac.compare_digest` over sha256 digests (so neither the content nor the length of the token leaks through
timing). Messages never quote the token. Each worker reads the token when it starts: rotating it means
restarting the server. This module imports only the standard library.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ipaddress
import os
import re
from typing import Mapping

from serving.config import ServeConfig

logger = logging.getLogger(__name__)

TOKEN_ENV = "COMPRESS_SERVE_TOKEN"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes of orchestrators, which hold no token
_TOKEN_CHARS = re.compile(r"[!-~]+")


class TokenError(ValueError):
    """The configured token cannot be used; the message is one line and never contains the token."""


def _check(token: str, where: str) -> str:
    token = token.strip()
    if not token:
        raise TokenError(f"{where} is empty")
    if not _TOKEN_CHARS.fullmatch(token):
        raise TokenError(f"{where}: the token must be printable ASCII without spaces")
    return token


def read_token_file(path: str) -> str:
    try:
        if os.stat(path).st_mode & 0o077:
            logger.warning("token file %s can be read by other users of this machine (chmod 600 it)", path)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TokenError(f"token file {path} is not UTF-8 text") from None
    return _check(text, f"token file {path}")


def resolve_token(token_file: str | None, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(token, where it came from: "file", "env" or None). The file wins over the environment."""
    if token_file is not None:
        return read_token_file(token_file), "file"
    if TOKEN_ENV in environ:
        return _check(environ[TOKEN_ENV], TOKEN_ENV), "env"
    return None, None


def digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def worker_token(config: ServeConfig) -> bytes | None:
    """The sha256 digest of the token a worker checks requests against, read where serve() found it; fails
    closed."""
    if config.token_file is not None:
        return digest(read_token_file(config.token_file).encode())
    if config.token_env:
        if TOKEN_ENV not in os.environ:
            raise TokenError(f"{TOKEN_ENV} is not set in this worker's environment")
        return digest(_check(os.environ[TOKEN_ENV], TOKEN_ENV).encode())
    return None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and `localhost`; anything else may be reachable from elsewhere."""
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def authorized(headers: list[tuple[bytes, bytes]], token_digest: bytes) -> bool:
    """Whether the first Authorization header is `Bearer <token>` (scheme case-insensitive)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(digest(credentials.strip()), token_digest)
    return False
