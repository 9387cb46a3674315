"""containerd's Version service: which lamina a server is (``lamina version --address``).

The server answers ``containerd.services.version.v1.Version/Version`` with the
package version; the revision is empty (lamina records none at build time).
"""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from lamina import __version__
from lamina.api.client import connect
from lamina.api.errors import rpc_errors, servicer_method
from lamina.api.gen.containerd.services.version.v1 import version_pb2 as vpb
from lamina.api.gen.containerd.services.version.v1 import version_pb2_grpc as vpb_grpc

__all__ = ["VersionService", "add_version_service", "server_version"]


class VersionService(vpb_grpc.VersionServicer):
    """Answers with this process's lamina version."""

    @servicer_method
    def Version(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> vpb.VersionResponse:
        return vpb.VersionResponse(version=__version__, revision="")


def add_version_service(server: grpc.Server) -> None:
    """Register :class:`VersionService` on ``server``."""
    vpb_grpc.add_VersionServicer_to_server(  # type: ignore[no-untyped-call]
        VersionService(), server
    )


def server_version(address: str, *, timeout: float = 10.0) -> tuple[str, str]:
    """``(version, revision)`` of the server on ``address``; Unavailable if none answers."""
    with connect(address) as channel:
        stub = vpb_grpc.VersionStub(channel)  # type: ignore[no-untyped-call]
        with rpc_errors(f"version from {address}"):
            resp: vpb.VersionResponse = stub.Version(empty_pb2.Empty(), timeout=timeout)
    return resp.version, resp.revision
