"""systemd's readiness protocol (sd_notify), for ``lamina serve`` under ``Type=notify``.

systemd passes a datagram socket in ``$NOTIFY_SOCKET``: a filesystem path, or
an abstract-namespace name written with a leading ``@``. A service sends
newline-separated ``KEY=VALUE`` assignments to it: ``READY=1`` once it serves,
``STOPPING=1`` when it begins to shut down, ``STATUS=...`` as free text.
Without ``$NOTIFY_SOCKET`` (not started by systemd) :func:`notify` does nothing.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify"]


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``.

    Returns False when there is no socket to tell; an unreachable socket raises
    OSError (systemd would then not learn of readiness, and should be told).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        raise OSError(f"NOTIFY_SOCKET is neither a path nor an abstract name: {address!r}")
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message)
    return True
