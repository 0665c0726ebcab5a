"""A TCP reachability probe: the search checks a Ray cluster address before doing any work."""
from __future__ import annotations

import socket


def tcp_reachable(host: str, port: int, timeout: float = 5.0) -> str | None:
    """None when a TCP connection to host:port succeeds, else the reason."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
