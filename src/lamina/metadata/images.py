"""The image store: image name → target descriptor, with labels and times.

A name is stored as it was given, and found by any spelling of the same
reference (:func:`lamina.oci.reference.spellings`): ``demo:1`` and
``docker.io/library/demo:1`` are one image. Writing an image whose name is
stored under another spelling updates that record, so a name never has two.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from lamina.errors import AlreadyExists, Damaged, InvalidArgument
from lamina.labels import update_labels, validate_labels
from lamina.metadata.records import RecordStore, record_schema, time_from_ns
from lamina.oci.reference import spellings
from lamina.oci.types import Descriptor

__all__ = ["Image", "ImageRecords", "ImageStore"]

_SCHEMA = record_schema("images", "name", "target TEXT")


@dataclass(frozen=True)
class Image:
    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(default_factory=dict)
    created: datetime | None = None
    updated: datetime | None = None


class ImageRecords(Protocol):
    """What every image store offers, a root's (:class:`ImageStore`) or a server's
    (:class:`lamina.api.images.RemoteImageStore`): records found by any spelling of
    their name. Deleting is not here: it may collect (:mod:`lamina.metadata.deletes`)."""

    def get(self, key: str) -> Image: ...

    def list(self) -> list[Image]:
        """Every record, sorted by name."""
        ...

    def readable(self) -> tuple[builtins.list[Image], builtins.list[Damaged]]:
        """The records that read, sorted by name, and the error of each damaged one
        (a listing shows the others, then tells of those)."""
        ...

    def create(self, image: Image) -> Image:
        """AlreadyExists when the name (any spelling of it) is taken."""
        ...

    def put(self, image: Image) -> Image:
        """Create or replace (the target moves; created time is kept)."""
        ...


class ImageStore(RecordStore[Image]):
    """Images of one root, in the root's metadata database."""

    SCHEMA, TABLE, KEY, NOUN = _SCHEMA, "images", "name", "image"

    def _from_row(self, row: tuple[Any, ...]) -> Image:
        name, target, labels, created, updated = row
        parsed = json.loads(labels)
        if not isinstance(parsed, dict):
            raise ValueError(f"its labels {labels[:60]!r} are not an object")
        return Image(
            name=name,
            target=Descriptor.from_json(json.loads(target)),
            labels=parsed,
            created=time_from_ns(created),
            updated=time_from_ns(updated),
        )

    def _spellings(self, key: str) -> list[str]:
        return spellings(key)

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
            stored = self._stored(c, image.name)
            if stored is not None and create:
                raise AlreadyExists(f"image {stored!r} already exists")
            if stored is not None:
                c.execute(
                    "UPDATE images SET target=?, labels=?, updated_ns=? WHERE name=?",
                    (target, json.dumps(labels), now, stored),
                )
            else:
                c.execute(
                    "INSERT INTO images VALUES (?,?,?,?,?)",
                    (image.name, target, json.dumps(labels), now, now),
                )
        return self.get(stored or image.name)

    def update_labels(self, name: str, labels: Mapping[str, str]) -> Image:
        image = self.get(name)
        merged = update_labels(image.labels, labels, [f"labels.{k}" for k in labels],
                               what=f"image {name!r}")
        return self.put(replace(image, labels=merged))
