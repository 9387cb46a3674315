"""Conversions between lamina's values and containerd's protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.types import mount_pb2
from lamina.errors import InvalidArgument
from lamina.mounts.mount import Mount
from lamina.snapshots import Info, Kind

__all__ = [
    "info_from_pb",
    "info_to_pb",
    "kind_from_pb",
    "kind_to_pb",
    "mounts_from_pb",
    "mounts_to_pb",
    "set_timestamp",
    "timestamp_from_pb",
]

_KIND_TO_PB: dict[Kind, spb.Kind] = {
    Kind.VIEW: spb.VIEW,
    Kind.ACTIVE: spb.ACTIVE,
    Kind.COMMITTED: spb.COMMITTED,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}


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
    set_timestamp(msg.created_at, info.created)
    set_timestamp(msg.updated_at, info.updated)
    return msg


def info_from_pb(msg: spb.Info) -> Info:
    return Info(
        kind=kind_from_pb(msg.kind),
        name=msg.name,
        parent=msg.parent,
        labels=dict(msg.labels),
        created=timestamp_from_pb(msg.created_at, msg.HasField("created_at")),
        updated=timestamp_from_pb(msg.updated_at, msg.HasField("updated_at")),
    )
