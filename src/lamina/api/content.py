"""The Content service (``containerd.services.content.v1.Content``) over a ContentStore.

Write is a bidirectional stream, one response per request, as containerd's
client expects: the first message names the ref (and usually ``total`` and
``expected``) and opens the ingest, holding its lock until the stream ends;
``STAT`` reports progress, ``WRITE`` writes ``data`` at ``offset`` (an offset
below the ingest's size truncates first: containerd resets a write by sending
offset 0), ``COMMIT`` writes any data and commits with ``total`` and
``expected`` and ends the stream. Every response carries offset, total, the
digest of the bytes so far and the times. An error ends the stream; the
ingest stays for a resume, as with a local writer.

Owners (:mod:`lamina.api.owner`): containerd's calls see the blobs and
ingests containerd holds; writing a blob the CLI holds adds containerd's
reference to the same file, deleting drops only containerd's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
from google.protobuf import empty_pb2

from lamina.api.convert import batched, content_info_to_pb, status_to_pb, with_times
from lamina.api.errors import servicer_method
from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.gen.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc
from lamina.api.owner import for_caller
from lamina.content import ContentStore, Info, Status, Writer
from lamina.errors import InvalidArgument
from lamina.metadata.root import Root

__all__ = ["READ_CHUNK", "ContentService", "add_content_service"]

READ_CHUNK = 1 << 20
"""Bytes per ReadContentResponse."""


def _write_response(action: cpb.WriteAction, st: Status, digest: str) -> cpb.WriteContentResponse:
    """The response to a write message: where the ingest ``st`` stands, ``digest`` so far."""
    resp = cpb.WriteContentResponse(action=action, offset=st.offset, total=st.total, digest=digest)
    return with_times(resp, started_at=st.started_at, updated_at=st.updated_at)


class ContentService(cpb_grpc.ContentServicer):
    """``containerd.services.content.v1.Content`` over a lamina ContentStore."""

    def __init__(self, store: Callable[[], ContentStore]) -> None:
        self._store = store

    def _for(self, context: grpc.ServicerContext) -> ContentStore:
        """The store in the caller's scope: containerd sees its own blobs only."""
        return for_caller(self._store(), context)

    @servicer_method
    def Info(self, request: cpb.InfoRequest, context: grpc.ServicerContext) -> cpb.InfoResponse:
        return cpb.InfoResponse(info=content_info_to_pb(self._for(context).info(request.digest)))

    @servicer_method
    def Update(
        self, request: cpb.UpdateRequest, context: grpc.ServicerContext
    ) -> cpb.UpdateResponse:
        store = self._for(context)
        current = store.info(request.info.digest)
        wanted = Info(
            digest=current.digest,
            size=current.size,
            created=current.created,
            updated=current.updated,
            labels=dict(request.info.labels),
        )
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        return cpb.UpdateResponse(info=content_info_to_pb(store.update(wanted, *paths)))

    @servicer_method
    def List(
        self, request: cpb.ListContentRequest, context: grpc.ServicerContext
    ) -> Iterator[cpb.ListContentResponse]:
        infos = self._for(context).walk(*request.filters)
        for batch in batched(content_info_to_pb(info) for info in infos):
            yield cpb.ListContentResponse(info=batch)

    @servicer_method
    def Delete(
        self, request: cpb.DeleteContentRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._for(context).delete(request.digest)
        return empty_pb2.Empty()

    @servicer_method
    def Read(
        self, request: cpb.ReadContentRequest, context: grpc.ServicerContext
    ) -> Iterator[cpb.ReadContentResponse]:
        store = self._for(context)
        size = store.info(request.digest).size
        offset = max(request.offset, 0)
        end = size if request.size <= 0 else min(size, offset + request.size)
        while offset < end:
            data = store.read_at(request.digest, offset, min(READ_CHUNK, end - offset))
            if not data:
                break
            yield cpb.ReadContentResponse(offset=offset, data=data)
            offset += len(data)

    @servicer_method
    def Status(
        self, request: cpb.StatusRequest, context: grpc.ServicerContext
    ) -> cpb.StatusResponse:
        return cpb.StatusResponse(status=status_to_pb(self._for(context).status(request.ref)))

    @servicer_method
    def ListStatuses(
        self, request: cpb.ListStatusesRequest, context: grpc.ServicerContext
    ) -> cpb.ListStatusesResponse:
        statuses = self._for(context).list_statuses(*request.filters)
        return cpb.ListStatusesResponse(statuses=[status_to_pb(s) for s in statuses])

    @servicer_method
    def Abort(self, request: cpb.AbortRequest, context: grpc.ServicerContext) -> empty_pb2.Empty:
        self._for(context).abort(request.ref)
        return empty_pb2.Empty()

    @servicer_method
    def Write(
        self, request_iterator: Iterator[cpb.WriteContentRequest], context: grpc.ServicerContext
    ) -> Iterator[cpb.WriteContentResponse]:
        w: Writer | None = None
        ref = ""
        try:
            for req in request_iterator:
                if w is None:
                    if not req.ref:
                        raise InvalidArgument("the first write message must name a ref")
                    ref = req.ref
                    w = self._for(context).writer(ref, total=req.total, expected=req.expected)
                elif req.ref and req.ref != ref:
                    raise InvalidArgument(f"write stream for ref {ref!r} got ref {req.ref!r}")
                if req.action == cpb.STAT:
                    yield _write_response(cpb.STAT, w.status(), w.digest())
                    continue
                if req.action not in (cpb.WRITE, cpb.COMMIT):
                    raise InvalidArgument(f"unknown write action {req.action}")
                if req.data or req.action == cpb.WRITE:
                    if req.offset != w.offset:
                        w.truncate(req.offset)  # below: reset; beyond: InvalidArgument
                    if req.data:
                        w.write(req.data)
                if req.action == cpb.WRITE:
                    yield _write_response(cpb.WRITE, w.status(), w.digest())
                    continue
                # what the ingest was: committing ends it
                resp = _write_response(cpb.COMMIT, w.status(), w.digest())
                w.commit(req.total, req.expected, labels=dict(req.labels))
                yield resp
                return
        finally:
            if w is not None:
                w.close()


def add_content_service(server: grpc.Server, root: Root) -> None:
    """Register the Content service for ``root``'s content store (opened on first use)."""
    import threading

    lock = threading.Lock()

    def store() -> ContentStore:
        with lock:
            return root.content()

    cpb_grpc.add_ContentServicer_to_server(  # type: ignore[no-untyped-call]
        ContentService(store), server
    )
