"""containerd's Snapshots service, and lamina's Introspection, over lamina snapshotters.

Snapshotter names: a request's ``snapshotter`` field picks a lamina
snapshotter by name (``overlay``, ``native``). Any other name, including the
empty one and the proxy plugin name containerd sends (``lamina`` in the
snippet ``lamina config containerd`` prints), means the server's default
snapshotter. Keys are opaque: containerd sends ``<namespace>/<id>/<key>``.

Owners (:mod:`lamina.owners`, :mod:`lamina.api.owner`): a call from
containerd sees and changes containerd's snapshots only, and what it creates
is containerd's; a call from lamina's own client (``lamina --address``) works
as the CLI does locally.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf import empty_pb2

from lamina.api.convert import batched, info_to_pb, mounts_to_pb
from lamina.api.errors import servicer_method
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
from lamina.api.gen.lamina.services.introspection.v1 import introspection_pb2 as ipb
from lamina.api.gen.lamina.services.introspection.v1 import introspection_pb2_grpc as ipb_grpc
from lamina.api.owner import for_caller
from lamina.errors import NotImplementedErr
from lamina.metadata.root import SNAPSHOTTERS, Root
from lamina.snapshots import Info

if TYPE_CHECKING:
    from lamina.snapshots import Snapshotter

__all__ = ["IntrospectionService", "Resolver", "SnapshotsService", "root_resolver"]

Resolver = Callable[[str], "Snapshotter"]
"""Maps a request's ``snapshotter`` field to the snapshotter that serves it."""


def root_resolver(root: Root, default: str = "overlay") -> Resolver:
    """Names in SNAPSHOTTERS map to themselves, any other name to ``default``."""
    lock = threading.Lock()
    opened: dict[str, Snapshotter] = {}  # what each name resolved to: every call asks

    def resolve(name: str) -> Snapshotter:
        if name not in SNAPSHOTTERS:
            name = default
        sn = opened.get(name)
        if sn is None:
            with lock:  # Root opens each snapshotter once; do not race the first open
                sn = opened[name] = root.snapshotter(name)
        return sn

    return resolve


class SnapshotsService(spb_grpc.SnapshotsServicer):
    """``containerd.services.snapshots.v1.Snapshots`` over lamina snapshotters."""

    def __init__(self, resolve: Resolver) -> None:
        self._resolve = resolve

    def _sn(self, name: str, context: grpc.ServicerContext) -> Snapshotter:
        """The snapshotter ``name`` in the caller's scope (see the module docs)."""
        return for_caller(self._resolve(name), context)

    @servicer_method
    def Prepare(
        self, request: spb.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> spb.PrepareSnapshotResponse:
        sn = self._sn(request.snapshotter, context)
        mounts = sn.prepare(request.key, request.parent, labels=dict(request.labels))
        return spb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    @servicer_method
    def View(
        self, request: spb.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> spb.ViewSnapshotResponse:
        sn = self._sn(request.snapshotter, context)
        mounts = sn.view(request.key, request.parent, labels=dict(request.labels))
        return spb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    @servicer_method
    def Mounts(
        self, request: spb.MountsRequest, context: grpc.ServicerContext
    ) -> spb.MountsResponse:
        mounts = self._sn(request.snapshotter, context).mounts(request.key)
        return spb.MountsResponse(mounts=mounts_to_pb(mounts))

    @servicer_method
    def Commit(
        self, request: spb.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        sn = self._sn(request.snapshotter, context)
        if request.parent:
            # containerd 2.x may ask to commit onto a given parent (rebase). lamina
            # cannot rebase; the parent is accepted when it is the snapshot's own.
            current = sn.stat(request.key).parent
            if request.parent != current:
                raise NotImplementedErr(
                    f"commit {request.key!r} onto parent {request.parent!r}: rebasing is "
                    f"not supported (its parent is {current!r})"
                )
        sn.commit(request.name, request.key, labels=dict(request.labels))
        return empty_pb2.Empty()

    @servicer_method
    def Remove(
        self, request: spb.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._sn(request.snapshotter, context).remove(request.key)
        return empty_pb2.Empty()

    @servicer_method
    def Stat(
        self, request: spb.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> spb.StatSnapshotResponse:
        info = self._sn(request.snapshotter, context).stat(request.key)
        return spb.StatSnapshotResponse(info=info_to_pb(info))

    @servicer_method
    def Update(
        self, request: spb.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> spb.UpdateSnapshotResponse:
        sn = self._sn(request.snapshotter, context)
        current = sn.stat(request.info.name)
        wanted = Info(
            kind=current.kind,
            name=request.info.name,
            parent=current.parent,
            labels=dict(request.info.labels),
        )
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = sn.update(wanted, *paths)
        return spb.UpdateSnapshotResponse(info=info_to_pb(info))

    @servicer_method
    def List(
        self, request: spb.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[spb.ListSnapshotsResponse]:
        infos = self._sn(request.snapshotter, context).walk(*request.filters)
        for batch in batched(info_to_pb(info) for info in infos):
            yield spb.ListSnapshotsResponse(info=batch)

    @servicer_method
    def Usage(self, request: spb.UsageRequest, context: grpc.ServicerContext) -> spb.UsageResponse:
        usage = self._sn(request.snapshotter, context).usage(request.key)
        return spb.UsageResponse(size=usage.size, inodes=usage.inodes)

    @servicer_method
    def Cleanup(
        self, request: spb.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self._sn(request.snapshotter, context).cleanup()
        return empty_pb2.Empty()


class IntrospectionService(ipb_grpc.IntrospectionServicer):
    """lamina's own service: capabilities of a served snapshotter."""

    def __init__(self, resolve: Resolver) -> None:
        self._resolve = resolve

    @servicer_method
    def Capabilities(
        self, request: ipb.CapabilitiesRequest, context: grpc.ServicerContext
    ) -> ipb.CapabilitiesResponse:
        caps = self._resolve(request.snapshotter).capabilities
        return ipb.CapabilitiesResponse(capabilities=sorted(c.value for c in caps))
