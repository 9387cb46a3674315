"""The image store: image name → target descriptor, with labels and times."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from lamina.errors import AlreadyExists, InvalidArgument, NotFound
from lamina.labels import update_labels, validate_labels
from lamina.oci.types import Descriptor
from lamina.util.db import Database

__all__ = ["Image", "ImageStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
)
"""


@dataclass(frozen=True)
class Image:
    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None


def _row_to_image(row: tuple[str, str, str, int, int]) -> Image:
    name, target, labels, created, updated = row
    return Image(
        name=name,
        target=Descriptor.from_json(json.loads(target)),
        labels=json.loads(labels),
        created=datetime.fromtimestamp(created / 1e9, tz=UTC),
        updated=datetime.fromtimestamp(updated / 1e9, tz=UTC),
    )


class ImageStore:
    """Images of one root, in the root's metadata database."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._db = Database(path, _SCHEMA)

    def get(self, name: str) -> Image:
        with self._db.read() as c:
            row = c.execute("SELECT * FROM images WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"image {name!r} does not exist")
        return _row_to_image(row)

    def list(self) -> list[Image]:
        with self._db.read() as c:
            rows = c.execute("SELECT * FROM images ORDER BY name").fetchall()
        return [_row_to_image(r) for r in rows]

    def __iter__(self) -> Iterator[Image]:
        return iter(self.list())

    def create(self, image: Image) -> Image:
        return self._put(image, create=True)

    def put(self, image: Image) -> Image:
        """Create or replace (the target moves; created time is kept)."""
        return self._put(image, create=False)

    def _put(self, image: Image, *, create: bool) -> Image:
        if not image.name:
            raise InvalidArgument("image name must not be empty")
        labels = validate_labels(image.labels)
        now = time.time_ns()
        target = json.dumps(image.target.to_json(), sort_keys=True)
        with self._db.write() as c:
            exists = c.execute("SELECT 1 FROM images WHERE name=?", (image.name,)).fetchone()
            if exists and create:
                raise AlreadyExists(f"image {image.name!r} already exists")
            if exists:
                c.execute(
                    "UPDATE images SET target=?, labels=?, updated_ns=? WHERE name=?",
                    (target, json.dumps(labels), now, image.name),
                )
            else:
                c.execute(
                    "INSERT INTO images VALUES (?,?,?,?,?)",
                    (image.name, target, json.dumps(labels), now, now),
                )
        return self.get(image.name)

    def update_labels(self, name: str, labels: Mapping[str, str]) -> Image:
        image = self.get(name)
        merged = update_labels(image.labels, labels, [f"labels.{k}" for k in labels],
                               what=f"image {name!r}")
        return self.put(replace(image, labels=merged))

    def delete(self, name: str) -> None:
        with self._db.write() as c:
            cur = c.execute("DELETE FROM images WHERE name=?", (name,))
            if cur.rowcount == 0:
                raise NotFound(f"image {name!r} does not exist")

    def close(self) -> None:
        self._db.close()
