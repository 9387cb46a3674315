"""Clients for a ``lamina serve`` (or any containerd-compatible) socket.

:class:`RemoteSnapshotter` implements :class:`lamina.snapshots.Snapshotter`
and :class:`RemoteContentStore` implements :class:`lamina.content.ContentStore`
over gRPC: the same calls, the same return values, the same error classes as
the local stores (statuses are mapped back by :mod:`lamina.api.errors`).

Every call says it comes from lamina's own client (``lamina-owner: lamina``
metadata, :mod:`lamina.api.owner`), so the server treats it as the CLI's:
what it creates is the CLI's, and containerd's objects are seen read-only.
"""

from __future__ import annotations

import contextlib
import errno
import io
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

import grpc
from google.protobuf import field_mask_pb2

from lamina.api import CHANNEL_OPTIONS, grpc_target
from lamina.api.content import READ_CHUNK
from lamina.api.convert import (
    content_info_from_pb,
    info_from_pb,
    info_to_pb,
    mounts_from_pb,
    status_from_pb,
)
from lamina.api.errors import from_rpc_error, rpc_errors
from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.gen.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
from lamina.api.gen.lamina.services.introspection.v1 import introspection_pb2 as ipb
from lamina.api.gen.lamina.services.introspection.v1 import introspection_pb2_grpc as ipb_grpc
from lamina.api.owner import CALL_METADATA
from lamina.api.streams import IDLE_CLOSED
from lamina.content import Info as ContentInfo
from lamina.content import Status as ContentStatus
from lamina.errors import FailedPrecondition, Internal, NotImplementedErr, Unavailable
from lamina.mounts.mount import Mount
from lamina.snapshots import Capability, Info, Usage
from lamina.util.closing import Closing
from lamina.util.deadlines import Deadlines

__all__ = [
    "RemoteContentStore", "RemoteSnapshotter", "RemoteStore", "RemoteWriter", "connect",
    "with_update_mask",
]

T = TypeVar("T")
M = TypeVar("M")


def connect(address: str) -> grpc.Channel:
    """A channel to the unix socket ``address`` (connects lazily)."""
    return grpc.insecure_channel(grpc_target(address), options=CHANNEL_OPTIONS)


def wait_answering(channel: grpc.Channel, address: str, timeout: float) -> None:
    """Return once ``channel`` is connected, or has failed to connect (its calls then
    fail at once, Unavailable); Unavailable when it still has no answer after
    ``timeout`` seconds: something accepts connections on ``address`` but does not
    speak (a stopped server, one whose backlog nobody takes), and every call would
    wait for it."""
    settled = threading.Event()
    done = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN)

    def seen(state: grpc.ChannelConnectivity) -> None:
        if state in done:
            settled.set()

    channel.subscribe(seen, try_to_connect=True)
    try:
        if not settled.wait(timeout):
            raise Unavailable(f"{address}: connected, but the server did not answer "
                              f"within {timeout:g}s")
    finally:
        channel.unsubscribe(seen)


if TYPE_CHECKING:  # generic only in the type stubs
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.StreamStreamClientInterceptor[Any, Any]
else:
    _UnaryUnary = grpc.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.UnaryStreamClientInterceptor
    _StreamUnary = grpc.StreamUnaryClientInterceptor
    _StreamStream = grpc.StreamStreamClientInterceptor


class _Identify(_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream):
    """Adds :data:`~lamina.api.owner.CALL_METADATA` to every call."""

    @staticmethod
    def _details(details: Any) -> Any:
        metadata = [*(details.metadata or ()), *CALL_METADATA]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _identified(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` with lamina's client identity on every call."""
    return grpc.intercept_channel(channel, _Identify())


def with_update_mask(request: M, fieldpaths: tuple[str, ...]) -> M:
    """``request`` with an update mask of ``fieldpaths``; none (all labels) when empty."""
    if fieldpaths:
        request.update_mask.CopyFrom(  # type: ignore[attr-defined]
            field_mask_pb2.FieldMask(paths=list(fieldpaths))
        )
    return request


class RemoteStore(Closing):
    """What every remote store holds: the channel (theirs to close unless it was
    given), lamina's identity on its calls, the timeout of each call, and how its
    errors say what failed."""

    #: The kind of thing the calls work on, which the errors name ("content"; "": none).
    _noun = ""

    def __init__(
        self, address: str, *, timeout: float | None, channel: grpc.Channel | None,
        connect_timeout: float | None = None,
    ) -> None:
        self.address = address
        self._timeout = timeout
        self._owns_channel = channel is None
        self._channel: grpc.Channel | None = channel if channel is not None else connect(address)
        self._calls = _identified(self._channel)
        if connect_timeout is not None:
            try:
                wait_answering(self._channel, address, connect_timeout)
            except BaseException:
                self.close()
                raise

    @property
    def _place(self) -> str:
        """Where the calls go, as the errors name it."""
        return self.address

    def _what(self, op: str, name: str = "") -> str:
        """What failed, when call ``op`` (on ``name``) fails: an error's first words."""
        noun = f"{self._noun} " if self._noun else ""
        target = f" {name!r}" if name else ""
        return f"{noun}{op}{target} on {self._place}"

    def _listed(
        self, call: Any, request: Any, convert: Callable[[Any], T], what: str
    ) -> Iterator[T]:
        """The ``info`` items of a List stream, converted, as they arrive."""
        with rpc_errors(what):
            stream = call(request, timeout=self._timeout)
            try:
                for resp in stream:
                    for info in resp.info:
                        yield convert(info)
            finally:
                stream.cancel()  # the caller stopped early: end the call

    def close(self) -> None:
        """Close the channel (if this store opened it); calling it twice is fine."""
        if self._channel is not None and self._owns_channel:
            self._channel.close()
        self._channel = None



class RemoteSnapshotter(RemoteStore):
    """The snapshotter ``snapshotter`` of the server on ``address``.

    ``timeout`` (seconds) bounds each call; None waits as long as the call takes.
    The channel connects on first use; a server that is not there raises
    Unavailable.
    """

    def __init__(
        self,
        address: str,
        snapshotter: str,
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        super().__init__(address, timeout=timeout, channel=channel,
                         connect_timeout=connect_timeout)
        self.snapshotter = snapshotter
        self._stub = spb_grpc.SnapshotsStub(self._calls)  # type: ignore[no-untyped-call]
        self._introspection = ipb_grpc.IntrospectionStub(  # type: ignore[no-untyped-call]
            self._calls
        )
        self._caps: frozenset[Capability] | None = None
        self._lock = threading.Lock()

    @property
    def _place(self) -> str:
        return f"{self.snapshotter}@{self.address}"

    @property
    def capabilities(self) -> frozenset[Capability]:
        """Asked of the server once; empty for a server without lamina's introspection."""
        with self._lock:
            if self._caps is None:
                try:
                    with rpc_errors(self._what("capabilities")):
                        resp = self._introspection.Capabilities(
                            ipb.CapabilitiesRequest(snapshotter=self.snapshotter),
                            timeout=self._timeout,
                        )
                except NotImplementedErr:
                    self._caps = frozenset()
                else:
                    known = {c.value for c in Capability}
                    self._caps = frozenset(Capability(c) for c in resp.capabilities if c in known)
            return self._caps

    def stat(self, key: str) -> Info:
        with rpc_errors(self._what("stat", key)):
            resp = self._stub.Stat(
                spb.StatSnapshotRequest(snapshotter=self.snapshotter, key=key),
                timeout=self._timeout,
            )
        return info_from_pb(resp.info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        req = with_update_mask(
            spb.UpdateSnapshotRequest(snapshotter=self.snapshotter, info=info_to_pb(info)),
            fieldpaths,
        )
        with rpc_errors(self._what("update", info.name)):
            resp = self._stub.Update(req, timeout=self._timeout)
        return info_from_pb(resp.info)

    def usage(self, key: str) -> Usage:
        with rpc_errors(self._what("usage", key)):
            resp = self._stub.Usage(
                spb.UsageRequest(snapshotter=self.snapshotter, key=key), timeout=self._timeout
            )
        return Usage(size=resp.size, inodes=resp.inodes)

    def mounts(self, key: str) -> list[Mount]:
        req = spb.MountsRequest(key=key)
        return self._mounts(self._stub.Mounts, req, self._what("mounts", key))

    def prepare(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = spb.PrepareSnapshotRequest(key=key, parent=parent, labels=dict(labels or {}))
        return self._mounts(self._stub.Prepare, req, self._what("prepare", key))

    def view(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        req = spb.ViewSnapshotRequest(key=key, parent=parent, labels=dict(labels or {}))
        return self._mounts(self._stub.View, req, self._what("view", key))

    def _mounts(self, call: Any, req: Any, what: str) -> list[Mount]:
        """Send ``req`` (Mounts, Prepare or View) for this snapshotter; the mounts it answers."""
        req.snapshotter = self.snapshotter
        with rpc_errors(what):
            resp = call(req, timeout=self._timeout)
        return mounts_from_pb(resp.mounts)

    def commit(self, name: str, key: str, *, labels: Mapping[str, str] | None = None) -> None:
        req = spb.CommitSnapshotRequest(
            snapshotter=self.snapshotter, name=name, key=key, labels=dict(labels or {})
        )
        with rpc_errors(self._what("commit", key)):
            self._stub.Commit(req, timeout=self._timeout)

    def remove(self, key: str) -> None:
        with rpc_errors(self._what("remove", key)):
            self._stub.Remove(
                spb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=key),
                timeout=self._timeout,
            )

    def walk(self, *filters: str) -> Iterator[Info]:
        req = spb.ListSnapshotsRequest(snapshotter=self.snapshotter, filters=list(filters))
        return self._listed(self._stub.List, req, info_from_pb, self._what("walk"))

    def cleanup(self) -> None:
        with rpc_errors(self._what("cleanup")):
            self._stub.Cleanup(
                spb.CleanupRequest(snapshotter=self.snapshotter), timeout=self._timeout
            )

    def __repr__(self) -> str:
        return f"RemoteSnapshotter({self.address!r}, {self.snapshotter!r})"


# -- content ----------------------------------------------------------------------


class RemoteContentStore(RemoteStore):
    """The content store of the server on ``address`` (see :mod:`lamina.content`).

    A :class:`RemoteWriter` holds one Write stream, and with it the ingest's
    lock on the server, from :meth:`writer` until it is closed or committed.
    """

    _noun = "content"

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        connect_timeout: float | None = None,
    ) -> None:
        super().__init__(address, timeout=timeout, channel=channel,
                         connect_timeout=connect_timeout)
        self._stub = cpb_grpc.ContentStub(self._calls)  # type: ignore[no-untyped-call]
        self._writers: set[RemoteWriter] = set()
        self._lock = threading.Lock()

    def info(self, digest: str) -> ContentInfo:
        with rpc_errors(self._what("info", digest)):
            resp = self._stub.Info(cpb.InfoRequest(digest=digest), timeout=self._timeout)
        return content_info_from_pb(resp.info)

    def update(self, info: ContentInfo, *fieldpaths: str) -> ContentInfo:
        req = with_update_mask(
            cpb.UpdateRequest(info=cpb.Info(digest=info.digest, labels=dict(info.labels))),
            fieldpaths,
        )
        with rpc_errors(self._what("update", info.digest)):
            resp = self._stub.Update(req, timeout=self._timeout)
        return content_info_from_pb(resp.info)

    def walk(self, *filters: str) -> Iterator[ContentInfo]:
        req = cpb.ListContentRequest(filters=list(filters))
        return self._listed(self._stub.List, req, content_info_from_pb, self._what("walk"))

    def delete(self, digest: str) -> None:
        with rpc_errors(self._what("delete", digest)):
            self._stub.Delete(cpb.DeleteContentRequest(digest=digest), timeout=self._timeout)

    def reader(self, digest: str) -> BinaryIO:
        size = self.info(digest).size
        raw = _RemoteBlob(self, digest, size)
        return cast(BinaryIO, io.BufferedReader(raw, buffer_size=READ_CHUNK))

    def read_at(self, digest: str, offset: int, size: int) -> bytes:
        if size <= 0:  # 0 means "to the end" on the wire
            self.info(digest)  # still NotFound / InvalidArgument for a bad digest
            return b""
        req = cpb.ReadContentRequest(digest=digest, offset=max(offset, 0), size=size)
        parts: list[bytes] = []
        with rpc_errors(self._what("read", digest)):
            for resp in self._stub.Read(req, timeout=self._timeout):
                parts.append(resp.data)
        return b"".join(parts)

    def writer(self, ref: str, *, total: int = 0, expected: str = "") -> RemoteWriter:
        w = RemoteWriter(self, ref, total, expected)
        with self._lock:
            self._writers.add(w)
        return w

    def _forget(self, w: RemoteWriter) -> None:
        with self._lock:
            self._writers.discard(w)

    def status(self, ref: str) -> ContentStatus:
        with rpc_errors(self._what("status", ref)):
            resp = self._stub.Status(cpb.StatusRequest(ref=ref), timeout=self._timeout)
        return status_from_pb(resp.status)

    def list_statuses(self, *filters: str) -> list[ContentStatus]:
        with rpc_errors(self._what("list statuses")):
            resp = self._stub.ListStatuses(
                cpb.ListStatusesRequest(filters=list(filters)), timeout=self._timeout
            )
        return sorted((status_from_pb(s) for s in resp.statuses), key=lambda s: s.ref)

    def abort(self, ref: str) -> None:
        with rpc_errors(self._what("abort", ref)):
            self._stub.Abort(cpb.AbortRequest(ref=ref), timeout=self._timeout)

    def close(self) -> None:
        """Close open writers (keeping their ingests) and the channel; idempotent."""
        with self._lock:
            writers = list(self._writers)
        for w in writers:
            w.close()
        super().close()

    def __repr__(self) -> str:
        return f"RemoteContentStore({self.address!r})"


_END = object()

#: each answer on a Write stream comes within the client's call timeout, or the
#: stream is cancelled (a stream has no deadline of its own: a blob takes as
#: long as it takes, one message does not)
_DEADLINES = Deadlines(name="lamina-api-deadlines")


class RemoteWriter:
    """An ingest over one Write stream (see :class:`lamina.content.Writer`).

    Opening sends a STAT for the ref, so a locked ref (Unavailable) or a blob
    the server has (AlreadyExists) fails here, and a resumed ingest reports
    its offset. When a call fails the stream ends, as the server's does; the
    next call opens a new one, resuming the ingest. A stream the server closed
    because the writer was idle longer than its timeout is resumed at once.
    """

    def __init__(self, store: RemoteContentStore, ref: str, total: int, expected: str) -> None:
        self._store = store
        self.ref = ref
        self._total = total
        self._expected = expected
        self._offset = 0
        self._digest = ""
        self._queue: queue.SimpleQueue[object] | None = None
        self._responses: Iterator[cpb.WriteContentResponse] | None = None
        self._state = "open"  # open, committed, closed
        # One call at a time: the store closing on another thread waits for a
        # write in flight instead of ending its stream under it.
        self._mutex = threading.RLock()
        self._open()

    # -- the stream ----------------------------------------------------------
    def _open(self) -> None:
        q: queue.SimpleQueue[object] = queue.SimpleQueue()

        def requests() -> Iterator[cpb.WriteContentRequest]:
            while True:
                item = q.get()
                if item is _END:
                    return
                yield cast(cpb.WriteContentRequest, item)

        stub = self._store._stub
        self._queue = q
        self._responses = stub.Write(requests())
        try:
            self._send(
                cpb.WriteContentRequest(
                    action=cpb.STAT, ref=self.ref, total=self._total, expected=self._expected
                )
            )
        except BaseException:
            self._queue = self._responses = None
            raise

    def _ensure_open(self) -> None:
        if self._queue is None or self._responses is None:
            self._open()  # resume after a failed call

    def _send(self, req: cpb.WriteContentRequest) -> cpb.WriteContentResponse:
        for resume in (True, False):
            self._ensure_open()
            assert self._queue is not None and self._responses is not None
            self._queue.put(req)
            timeout = self._store._timeout
            responses = self._responses
            token = (None if timeout is None
                     else _DEADLINES.arm(responses.cancel,  # type: ignore[attr-defined]
                                         timeout))
            try:
                resp = next(responses)
                break
            except StopIteration:
                self._end_stream()
                raise Internal(f"write stream for {self.ref!r} ended early") from None
            except grpc.RpcError as err:
                self._end_stream()
                what = self._store._what("write", self.ref)
                if token is not None and _DEADLINES.disarm(token):
                    raise Unavailable(f"{what}: no answer within {timeout:g}s") from None
                if resume and _closed_idle(err):
                    continue  # it never saw ``req``: send it again on a new stream
                raise from_rpc_error(err, what) from None
            except BaseException:
                self._end_stream()
                raise
            finally:
                if token is not None:
                    _DEADLINES.disarm(token)
        self._offset = resp.offset
        if resp.total:
            self._total = resp.total
        self._digest = resp.digest
        return resp

    def _end_stream(self) -> None:
        """Half-close and wait for the server to finish (it then releases the ref)."""
        q, responses = self._queue, self._responses
        self._queue = self._responses = None
        if q is None or responses is None:
            return
        q.put(_END)
        with contextlib.suppress(grpc.RpcError):
            for _ in responses:
                pass

    def _check_open(self) -> None:
        if self._state != "open":
            raise FailedPrecondition(f"writer for {self.ref!r} is {self._state}")

    # -- Writer ----------------------------------------------------------------
    @property
    def offset(self) -> int:
        return self._offset

    def write(self, data: bytes) -> int:
        with self._mutex:
            self._check_open()
            self._ensure_open()
            self._send(
                cpb.WriteContentRequest(
                    action=cpb.WRITE, ref=self.ref, offset=self._offset, data=bytes(data)
                )
            )
        return len(data)

    def digest(self) -> str:
        with self._mutex:
            if self._queue is None and self._state == "open":
                self._send(cpb.WriteContentRequest(action=cpb.STAT, ref=self.ref))
            return self._digest

    def status(self) -> ContentStatus:
        return self._store.status(self.ref)

    def commit(self, size: int, expected: str, *, labels: Mapping[str, str] | None = None) -> None:
        with self._mutex:
            self._check_open()
            self._send(
                cpb.WriteContentRequest(
                    action=cpb.COMMIT,
                    ref=self.ref,
                    offset=self._offset,
                    total=size,
                    expected=expected,
                    labels=dict(labels or {}),
                )
            )
            self._state = "committed"
            self._end_stream()
        self._store._forget(self)

    def truncate(self, size: int) -> None:
        with self._mutex:
            self._check_open()
            self._send(cpb.WriteContentRequest(action=cpb.WRITE, ref=self.ref, offset=size))

    def close(self) -> None:
        with self._mutex:
            if self._state == "open":
                self._state = "closed"
            self._end_stream()
        self._store._forget(self)

    def __repr__(self) -> str:
        return f"RemoteWriter({self.ref!r}, offset={self._offset})"


def _closed_idle(err: grpc.RpcError) -> bool:
    """Whether the server closed a stream for the client's idleness (lamina.api.streams)."""
    return (
        isinstance(err, grpc.Call)
        and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        and IDLE_CLOSED in (err.details() or "")
    )


class _RemoteBlob(io.RawIOBase):
    """A seekable read-only raw file over Read calls."""

    def __init__(self, store: RemoteContentStore, digest: str, size: int) -> None:
        self._store, self._digest, self._size = store, digest, size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos, READ_CHUNK)
        if want <= 0:
            return 0
        data = self._store.read_at(self._digest, self._pos, want)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)
