"""Conversions between lamina's values and containerd's protobuf messages.

Snapshot infos, kinds and mounts (``containerd.services.snapshots.v1``,
``containerd.types``), content infos and ingest statuses
(``containerd.services.content.v1``), image records and descriptors
(``containerd.services.images.v1``, ``containerd.types.Descriptor``),
timestamps, and the batching of the items a List call streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from lamina import content
from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.gen.containerd.services.images.v1 import images_pb2 as impb
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.types import descriptor_pb2, mount_pb2
from lamina.errors import InvalidArgument
from lamina.metadata.images import Image
from lamina.mounts.mount import Mount
from lamina.oci.types import Descriptor
from lamina.snapshots import Info, Kind

__all__ = [
    "LIST_BATCH",
    "batched",
    "content_info_from_pb",
    "content_info_to_pb",
    "descriptor_from_pb",
    "descriptor_to_pb",
    "image_from_pb",
    "image_to_pb",
    "info_from_pb",
    "info_to_pb",
    "kind_from_pb",
    "kind_to_pb",
    "mounts_from_pb",
    "mounts_to_pb",
    "set_timestamp",
    "status_from_pb",
    "status_to_pb",
    "timestamp_from_pb",
    "with_times",
]

T = TypeVar("T")
M = TypeVar("M", bound=Message)

LIST_BATCH = 100
"""Items per List response message."""

_KIND_TO_PB: dict[Kind, spb.Kind] = {
    Kind.VIEW: spb.VIEW,
    Kind.ACTIVE: spb.ACTIVE,
    Kind.COMMITTED: spb.COMMITTED,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


def batched(items: Iterable[T], size: int = LIST_BATCH) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), taken as they come."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def kind_to_pb(kind: Kind) -> spb.Kind:
    return _KIND_TO_PB[kind]


def kind_from_pb(kind: spb.Kind) -> Kind:
    try:
        return _KIND_FROM_PB[kind]
    except KeyError:
        raise InvalidArgument(f"unknown snapshot kind {kind}") from None


def set_timestamp(ts: Timestamp, dt: datetime | None) -> None:
    """Fill ``ts`` from ``dt`` (naive means UTC); leave it unset for None."""
    if dt is None:
        return
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ts.FromDatetime(dt)


def with_times(msg: M, **times: datetime | None) -> M:
    """``msg`` with each timestamp field named in ``times`` set (see :func:`set_timestamp`)."""
    for name, dt in times.items():
        set_timestamp(getattr(msg, name), dt)
    return msg


def timestamp_from_pb(ts: Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


def mounts_to_pb(mounts: Iterable[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


def mounts_from_pb(mounts: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [
        Mount(type=m.type, source=m.source, target=m.target, options=tuple(m.options))
        for m in mounts
    ]


def info_to_pb(info: Info) -> spb.Info:
    msg = spb.Info(
        name=info.name,
        parent=info.parent,
        kind=kind_to_pb(info.kind),
        labels=dict(info.labels),
    )
    return with_times(msg, created_at=info.created, updated_at=info.updated)


def info_from_pb(msg: spb.Info) -> Info:
    return Info(
        kind=kind_from_pb(msg.kind),
        name=msg.name,
        parent=msg.parent,
        labels=dict(msg.labels),
        created=timestamp_from_pb(msg.created_at, msg.HasField("created_at")),
        updated=timestamp_from_pb(msg.updated_at, msg.HasField("updated_at")),
    )


# -- content ------------------------------------------------------------------


def content_info_to_pb(info: content.Info) -> cpb.Info:
    msg = cpb.Info(digest=info.digest, size=info.size, labels=dict(info.labels))
    return with_times(msg, created_at=info.created, updated_at=info.updated)


def content_info_from_pb(msg: cpb.Info) -> content.Info:
    # content times are always set (an unset one reads as the epoch, as in containerd)
    return content.Info(
        digest=msg.digest,
        size=msg.size,
        created=msg.created_at.ToDatetime(tzinfo=UTC),
        updated=msg.updated_at.ToDatetime(tzinfo=UTC),
        labels=dict(msg.labels),
    )


def status_to_pb(st: content.Status) -> cpb.Status:
    msg = cpb.Status(ref=st.ref, offset=st.offset, total=st.total, expected=st.expected)
    return with_times(msg, started_at=st.started_at, updated_at=st.updated_at)


def status_from_pb(msg: cpb.Status) -> content.Status:
    return content.Status(
        ref=msg.ref,
        offset=msg.offset,
        total=msg.total,
        expected=msg.expected,
        started_at=msg.started_at.ToDatetime(tzinfo=UTC),
        updated_at=msg.updated_at.ToDatetime(tzinfo=UTC),
    )


# -- images -------------------------------------------------------------------


def descriptor_to_pb(desc: Descriptor) -> descriptor_pb2.Descriptor:
    platform = json.dumps(dict(desc.platform), sort_keys=True) if desc.platform else ""
    return descriptor_pb2.Descriptor(media_type=desc.media_type, digest=desc.digest,
                                     size=desc.size, annotations=dict(desc.annotations),
                                     lamina_platform_json=platform)


def descriptor_from_pb(msg: descriptor_pb2.Descriptor) -> Descriptor:
    """The descriptor ``msg``; its platform from lamina's own field (InvalidArgument
    when that is not a JSON object)."""
    platform = None
    if msg.lamina_platform_json:
        try:
            platform = json.loads(msg.lamina_platform_json)
        except ValueError:
            platform = None
        if not isinstance(platform, dict):
            raise InvalidArgument("descriptor platform: expected a JSON object")
    return Descriptor(media_type=msg.media_type, digest=msg.digest, size=msg.size,
                      annotations=dict(msg.annotations), platform=platform or None)


def image_to_pb(image: Image) -> impb.Image:
    msg = impb.Image(name=image.name, labels=dict(image.labels),
                     target=descriptor_to_pb(image.target))
    return with_times(msg, created_at=image.created, updated_at=image.updated)


def image_from_pb(msg: impb.Image) -> Image:
    return Image(
        name=msg.name,
        target=descriptor_from_pb(msg.target),
        labels=dict(msg.labels),
        created=timestamp_from_pb(msg.created_at, msg.HasField("created_at")),
        updated=timestamp_from_pb(msg.updated_at, msg.HasField("updated_at")),
    )
