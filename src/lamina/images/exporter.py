"""Export images as an OCI image layout tar (what skopeo, umoci and ctr read)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING

from lamina.images.graph import walk_descriptors
from lamina.metadata.images import Image
from lamina.oci.types import Descriptor, MediaType
from lamina.util.progress import Progress

if TYPE_CHECKING:
    from lamina.content import ContentStore

__all__ = ["export_images"]


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    tar.addfile(info, io.BytesIO(data))


def export_images(
    images: Sequence[Image],
    out: str | os.PathLike[str] | IO[bytes],
    *,
    content: ContentStore,
    progress: Progress | None = None,
) -> None:
    """Write ``images`` and every blob they reach as one OCI layout tar."""
    progress = progress or Progress()
    now = time.time()
    manifests = []
    blobs: dict[str, Descriptor] = {}
    for image in images:
        annotations = {**image.target.annotations,
                       "io.containerd.image.name": image.name,
                       "org.opencontainers.image.ref.name": image.name}
        manifests.append(Descriptor(image.target.media_type, image.target.digest,
                                    image.target.size, annotations,
                                    image.target.platform).to_json())
        for desc in walk_descriptors(content, image.target):
            blobs.setdefault(desc.digest, desc)
    index = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": manifests}
    owned = isinstance(out, (str, os.PathLike))
    fileobj: IO[bytes] = (
        open(out, "wb") if isinstance(out, (str, os.PathLike)) else out  # noqa: SIM115
    )
    try:
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout",
                       json.dumps({"imageLayoutVersion": "1.0.0"}).encode(), now)
            for digest, desc in sorted(blobs.items()):
                info = tarfile.TarInfo(f"blobs/sha256/{digest.split(':', 1)[1]}")
                info.size = content.info(digest).size
                info.mtime, info.mode = int(now), 0o444
                with content.reader(digest) as r:
                    tar.addfile(info, r)
                progress.event("export", desc.digest, done=info.size, total=info.size)
            _add_bytes(tar, "index.json", json.dumps(index).encode(), now)
    finally:
        if owned:
            fileobj.close()
