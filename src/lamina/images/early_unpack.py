"""Unpack an import's images while the archive is still being read.

An OCI layout's documents (index, manifests, configs) are small; the importer
stores them first (:func:`lamina.images.importer.import_images`'s ``ready``),
and from them this picks each image's manifest for the host and starts
unpacking it in a thread of its own, while the importer goes on storing the
layers in the order the unpack reads them. Each layer is read once its blob
is committed (verified and durable), from the content store, as a plain
unpack would read it: the snapshots are the same, only sooner. An unpack
failure is raised once the import has finished, as it was when the unpack
came after it; when the import itself fails, that error is the one raised.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import IO

from lamina.content import ContentStore
from lamina.errors import LaminaError, Unavailable
from lamina.images.graph import manifest_for
from lamina.images.importer import Arrivals
from lamina.metadata.images import Image
from lamina.oci.types import Descriptor, ImageConfig, Manifest

__all__ = ["EarlyUnpack", "Unpack"]

#: Unpacks one manifest, reading each layer through the given opener.
Unpack = Callable[[Manifest, ImageConfig, Callable[[Descriptor], IO[bytes]]], object]


class EarlyUnpack:
    """The unpack of an import's images that starts with its documents (module docs)."""

    def __init__(self, content: ContentStore, unpack: Unpack) -> None:
        self.content = content
        self.arrivals = Arrivals()
        self._unpack = unpack
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._names: set[str] = set()  # images whose unpack was started here

    def ready(self, images: list[Image]) -> Sequence[str]:
        """Start unpacking ``images`` (their documents are stored); the layers to
        store first, in the order the unpack reads them."""
        todo: dict[str, tuple[Manifest, ImageConfig]] = {}
        for image in images:
            try:
                desc, manifest, config = manifest_for(self.content, image.target)
            except LaminaError:
                continue  # the plain unpack after the import says why, if it matters
            todo.setdefault(desc.digest, (manifest, config))
            self._names.add(image.name)
        if not todo:
            return ()
        self._thread = threading.Thread(target=self._run, args=(list(todo.values()),),
                                        name="early-unpack", daemon=True)
        self._thread.start()
        return [layer.digest for manifest, _ in todo.values() for layer in manifest.layers]

    def _open(self, desc: Descriptor) -> IO[bytes]:
        # a layer the archive lacks may be stored from before (else NotFound)
        with contextlib.suppress(Unavailable):
            self.arrivals.wait(desc.digest)
        return self.content.reader(desc.digest)

    def _run(self, todo: list[tuple[Manifest, ImageConfig]]) -> None:
        try:
            for manifest, config in todo:
                self._unpack(manifest, config, self._open)
        except BaseException as exc:  # handed to the importing thread
            self._error = exc

    def finish(self) -> set[str]:
        """Wait for the unpack; the names of the images it unpacked (its error, if any)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._names

    def abandon(self) -> None:
        """The import failed: wait for the unpack to stop, dropping its error."""
        self.arrivals.end()
        if self._thread is not None:
            self._thread.join()
