"""Unpack an import's images while the archive is still being read.

An OCI layout's documents (index, manifests, configs) are small; the importer
stores them first (:func:`lamina.images.importer.import_images`'s ``ready``),
and from them this picks each image's manifest for the host and starts
unpacking it in a thread of its own, while the importer goes on storing the
layers in the order the unpack reads them. Each layer is read as its ingest
grows and ends only once its blob is committed (verified and durable), as a
pull reads a download: the snapshots are the same, only sooner. An unpack
failure is raised once the import has finished, as it was when the unpack
came after it; when the import itself fails, that error is the one raised.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import IO, BinaryIO

from lamina.content import ContentStore, Local
from lamina.errors import LaminaError, NotFound, Unavailable
from lamina.images.graph import manifest_for
from lamina.images.importer import Arrivals
from lamina.metadata.images import Image
from lamina.oci.types import Descriptor, ImageConfig, Manifest
from lamina.util.rawio import RawReader

__all__ = ["EarlyUnpack", "Unpack"]

_CHUNK = 1 << 20

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
            got = self.arrivals.wait(desc.digest, -1)  # stored, or being stored
            if got is not None:
                ref, total, _ = got
                if isinstance(self.content, Local):
                    with contextlib.suppress(NotFound):  # else committed just now
                        return _Growing(self.arrivals, desc.digest,  # type: ignore[return-value]
                                        total, self.content.follow(ref))
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


class _Growing(RawReader):
    """A blob read while the import stores it, from its ingest's data file (whose
    descriptor stays valid when the commit renames it): a read waits for bytes
    written past it, and the end comes only once the blob is committed, verified
    and durable. So what the unpack applies is the stored content, and a layer's
    snapshot is never committed before its blob; a blob that fails to store
    fails the read when the import ends."""

    def __init__(self, arrivals: Arrivals, digest: str, total: int, following: BinaryIO) -> None:
        super().__init__()
        self._arrivals, self._digest, self._total = arrivals, digest, total
        self._f: BinaryIO | None = following
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        assert self._f is not None
        n = n if n is not None and n >= 0 else _CHUNK
        while True:
            if self._pos < self._total:
                data = self._f.read(min(n, self._total - self._pos))
                if data:
                    self._pos += len(data)
                    return data
            if self._arrivals.wait(self._digest, self._pos) is None and \
                    self._pos >= self._total:
                return b""

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        super().close()
