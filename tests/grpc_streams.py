"""Content Write streams a test holds open, and the error a response stream ends with
(shared by the tests of lamina serve's stream limits)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import grpc

from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.gen.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc
from lamina.api.owner import CALL_METADATA

__all__ = ["DEADLINE", "Silent", "fails_with"]

DEADLINE = 60.0
"""How long an event may take on a loaded 2-core machine before a test fails."""


class Silent:
    """Write streams that send ``first`` and then nothing until released."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.stub = cpb_grpc.ContentStub(channel)  # type: ignore[no-untyped-call]
        self.release = threading.Event()
        self.calls: list[grpc.Future] = []

    def open(self, first: Iterable[cpb.WriteContentRequest] = ()) -> Iterator[
        cpb.WriteContentResponse
    ]:
        first = list(first)
        release = self.release

        def requests() -> Iterator[cpb.WriteContentRequest]:
            yield from first
            release.wait(120)

        # as lamina's own client (lamina.owners), which later resumes the ingests
        call = self.stub.Write(requests(), metadata=CALL_METADATA)
        self.calls.append(call)
        return call  # type: ignore[no-any-return]

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()


def fails_with(call: Iterator[cpb.WriteContentResponse],
                timeout: float = DEADLINE) -> grpc.RpcError:
    """The error that ends a response stream (which must end within ``timeout``)."""
    result: list[BaseException] = []

    def drain() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as err:
            result.append(err)

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    t.join(timeout)
    assert result, f"the stream did not fail within {timeout}s"
    err = result[0]
    assert isinstance(err, grpc.RpcError) and isinstance(err, grpc.Call)
    return err
