"""lamina over gRPC: containerd's Snapshots, Content and Images services on a unix socket.

* :mod:`lamina.api.server` serves a :class:`~lamina.metadata.root.Root` (``lamina serve``);
  containerd uses it as a proxy plugin (``lamina config containerd``).
* :mod:`lamina.api.client` talks to such a server with the same Python
  protocols the local stores implement (``lamina --address SOCK ...``).
* :mod:`lamina.api.errors` maps :class:`~lamina.errors.LaminaError` classes to
  gRPC status codes and back, so a remote store raises what a local one does.

The messages are containerd's (package, service, message names and field
numbers): ``containerd.services.snapshots.v1``, ``containerd.services.content.v1``,
``containerd.services.images.v1``, ``containerd.types.Mount`` and
``containerd.types.Descriptor`` (with one field of lamina's own, far above
containerd's numbers: the target's platform); lamina adds one service of its own,
``lamina.services.introspection.v1.Introspection``, for snapshotter capabilities.
The ``.proto`` files are in the repository's ``protos/`` (the generator's input,
kept out of the package as containerd keeps its API in its own module); ``scripts/gen-protos.sh``
regenerates ``lamina/api/gen``.
"""

from __future__ import annotations

import os

from lamina import rootless

__all__ = ["DEFAULT_ADDRESS", "default_address", "grpc_target"]

DEFAULT_ADDRESS = "/run/lamina/lamina.sock"

#: Message size limit both ways (containerd uses 16 MiB as well).
MAX_MESSAGE_SIZE = 16 << 20

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
]


def default_address() -> str:
    """``$LAMINA_ADDRESS``, else /run/lamina/lamina.sock for root, else a per-user socket."""
    env = os.environ.get("LAMINA_ADDRESS")
    if env:
        return env
    if os.geteuid() == 0 and not rootless.active():
        return DEFAULT_ADDRESS
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/lamina-{rootless.host_uid()}"
    return os.path.join(runtime, "lamina", "lamina.sock")


def grpc_target(address: str) -> str:
    """The gRPC target for a socket path (``unix:`` URIs are passed through)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return address
    return "unix:" + os.path.abspath(address)
