"""Container records: id, image, snapshotter, snapshot key, runtime spec, labels."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from lamina.errors import AlreadyExists, InvalidArgument
from lamina.labels import validate_labels
from lamina.metadata.records import RecordStore, record_schema, time_from_ns
from lamina.util import crash

__all__ = ["Container", "ContainerStore"]

_SCHEMA = record_schema(
    "containers", "id", "image TEXT", "snapshotter TEXT", "snapshot_key TEXT", "spec TEXT"
)


@dataclass(frozen=True)
class Container:
    id: str
    image: str
    snapshotter: str
    snapshot_key: str
    spec: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None

    def snapshot_keys(self) -> list[str]:
        """Snapshots this container holds on to (for garbage collection)."""
        return [self.snapshot_key]


class ContainerStore(RecordStore[Container]):
    """Container records of one root (in its metadata database)."""

    SCHEMA, TABLE, KEY, NOUN = _SCHEMA, "containers", "id", "container"

    def _from_row(self, row: tuple[Any, ...]) -> Container:
        cid, image, sn, key, spec, labels, created, updated = row
        return Container(cid, image, sn, key, json.loads(spec), json.loads(labels),
                         time_from_ns(created), time_from_ns(updated))

    def create(self, container: Container) -> Container:
        if not container.id or "/" in container.id or container.id in (".", ".."):
            raise InvalidArgument(f"invalid container id {container.id!r}")
        labels = validate_labels(container.labels)
        now = time.time_ns()
        with self._db.write() as c:
            if self._exists(c, container.id):
                raise AlreadyExists(f"container {container.id!r} already exists")
            c.execute("INSERT INTO containers VALUES (?,?,?,?,?,?,?,?)", (
                container.id, container.image, container.snapshotter, container.snapshot_key,
                json.dumps(container.spec), json.dumps(labels), now, now))
        crash.point("container.create.committed")
        return self.get(container.id)

    def update(self, container: Container) -> Container:
        labels = validate_labels(container.labels)
        with self._db.write() as c:
            cur = c.execute(
                "UPDATE containers SET image=?, snapshot_key=?, spec=?, labels=?, updated_ns=?"
                " WHERE id=?",
                (container.image, container.snapshot_key, json.dumps(container.spec),
                 json.dumps(labels), time.time_ns(), container.id))
            if cur.rowcount == 0:
                raise self._missing(container.id)
        crash.point("container.update.committed")
        return self.get(container.id)

    def set_labels(self, cid: str, labels: Mapping[str, str]) -> Container:
        current = self.get(cid)
        merged = {**current.labels, **labels}
        return self.update(replace(current, labels={k: v for k, v in merged.items() if v}))

    def delete(self, key: str) -> None:
        super().delete(key)
        crash.point("container.delete.committed")
