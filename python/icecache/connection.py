"""Where the client connects: the same rules as the C++ client.

Order (``client/client.h`` ClientOptions):

1. ``address`` argument, else ``$ICECACHE_ADDRESS``: a TCP ``host:port``,
   always TLS, with ``ca`` (PEM file; default: the system roots) and a bearer
   token (``token`` argument, else ``$ICECACHE_TOKEN``).
2. Otherwise a Unix socket: ``socket`` argument, else ``$ICECACHE_SOCKET``,
   else the daemon's default search order (``common/socket_path.h``, shared
   by the C++ daemon and client): the first that exists of
   ``/run/icecache/icecached.sock``, ``$XDG_RUNTIME_DIR/icecached.sock``
   (only when that variable is absolute and the path fits a sockaddr_un),
   ``/tmp/icecached-<uid>.sock``; when none exists, where a daemon of this
   uid would listen (the first whose directory is writable, else the last).
   A leading ``unix:`` is accepted; the path must be absolute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

from .errors import InvalidArgumentError, NotFoundError

__all__ = ["Target", "default_socket_candidates", "default_socket_path", "resolve_target"]


@dataclass(frozen=True)
class Target:
    """A resolved connection target.

    ``grpc_target`` is what gRPC dials ("unix:/path" or "host:port");
    ``tls`` is True for TCP; ``token`` and ``ca_pem`` are for TCP only.
    """

    grpc_target: str
    tls: bool
    token: str = ""
    ca_pem: Optional[bytes] = None


MAX_UNIX_SOCKET_PATH = 107  # sizeof(sockaddr_un::sun_path) - 1


def default_socket_candidates() -> List[str]:
    """The daemon's default socket paths, in search order."""
    candidates = ["/run/icecache/icecached.sock"]
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/"):
        path = xdg.rstrip("/") + "/icecached.sock"
        if len(path.encode()) <= MAX_UNIX_SOCKET_PATH:
            candidates.append(path)
    candidates.append(f"/tmp/icecached-{os.getuid()}.sock")
    return candidates


def _dir_writable(path: str) -> bool:
    d = os.path.dirname(path)
    return os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK)


def default_socket_path() -> str:
    """The first default socket path that exists, else where a daemon of
    this uid would listen (first candidate with a writable directory)."""
    candidates = default_socket_candidates()
    for path in candidates:
        if os.path.exists(path):
            return path
    return next((c for c in candidates if _dir_writable(c)), candidates[-1])


def resolve_target(
    socket: Optional[str] = None,
    address: Optional[str] = None,
    ca: Optional[str] = None,
    token: Optional[str] = None,
) -> Target:
    """Applies the search order above. Raises InvalidArgumentError for a
    relative socket path and NotFoundError for a CA file that cannot be read."""
    address = address or os.environ.get("ICECACHE_ADDRESS", "")
    if address:
        ca_pem = None
        if ca:
            try:
                with open(ca, "rb") as f:
                    ca_pem = f.read()
            except OSError as e:
                raise NotFoundError(f"cannot read CA file '{ca}': {e.strerror}") from e
        return Target(
            grpc_target=address,
            tls=True,
            token=token or os.environ.get("ICECACHE_TOKEN", ""),
            ca_pem=ca_pem,
        )
    path = socket or os.environ.get("ICECACHE_SOCKET", "") or default_socket_path()
    if path.startswith("unix:"):
        path = path[len("unix:") :]
    if not path.startswith("/"):
        raise InvalidArgumentError(
            f"socket path '{path}' must be absolute (e.g. /run/icecache/icecached.sock)"
        )
    return Target(grpc_target="unix:" + path, tls=False)
