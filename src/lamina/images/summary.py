"""What ``image ls`` and ``image inspect`` show of an image, as nerdctl shows it.

An image record names a target descriptor: an index or a manifest of a few
hundred bytes. What a person asks about is the image it stands for on this
host: its platform, its config and its size. :func:`summarize` finds that
image once — the host platform's manifest, else the first platform the index
lists whose manifest is stored (an image pulled for another platform) — and
measures it:

* the *unpacked* size, the disk use of the layers' snapshots (each layer's
  own, as ``lamina snapshot usage`` reports it), when every layer is unpacked
  in the snapshotter at hand;
* else the sum of the layer blobs' sizes (compressed, as downloaded).

A target that is no image (a lone artifact, an index whose manifests are not
stored) has neither platform nor size: it is listed still, with blanks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from lamina.errors import InvalidArgument, NotFound
from lamina.images.graph import any_manifest, read_document
from lamina.metadata.images import Image
from lamina.oci.identity import chain_ids
from lamina.oci.reference import split_name
from lamina.oci.types import (
    INDEX_TYPES,
    Descriptor,
    ImageConfig,
    Manifest,
    parse_json,
)

if TYPE_CHECKING:  # image ls on an empty root imports neither (bench/startup.py)
    from lamina.content import ContentStore
    from lamina.snapshots import Snapshotter

__all__ = ["ImageSummary", "docker_view", "native_view", "summarize",
           "summarize_all"]


@dataclass(frozen=True)
class ImageSummary:
    """Image ``image`` as this host sees it (module docs)."""

    image: Image
    manifest_desc: Descriptor | None = None
    manifest: Manifest | None = None
    config: ImageConfig | None = None
    size: int | None = None
    unpacked: bool = False  # ``size`` is the snapshots' disk use, not the blobs'

    @property
    def id(self) -> str:
        """The target's digest: nerdctl's image ID."""
        return self.image.target.digest

    @property
    def repository(self) -> str:
        return split_name(self.image.name)[0]

    @property
    def tag(self) -> str:
        return split_name(self.image.name)[1]

    @property
    def platform(self) -> str:
        """``os/arch[/variant]`` from the config; empty when unknown."""
        if self.config is None:
            return ""
        raw = self.config.raw
        parts = [raw.get("os"), raw.get("architecture"), raw.get("variant")]
        return "/".join(p for p in parts if isinstance(p, str) and p)


def _unpacked_size(snapshots: Snapshotter, config: ImageConfig) -> int | None:
    """The disk use of every layer's snapshot; None when one is not unpacked."""
    total = 0
    for chain in chain_ids(config.diff_ids):
        try:
            total += snapshots.usage(chain).size
        except NotFound:
            return None
    return total


def summarize(image: Image, *, content: ContentStore,
              snapshots: Snapshotter | None = None) -> ImageSummary:
    """``image`` resolved and measured (module docs); ``snapshots``: where its layers
    may be unpacked (None: the blobs' sizes)."""
    try:
        desc, manifest, config = any_manifest(content, image.target)
    except (NotFound, InvalidArgument):  # no image here: listed all the same
        return ImageSummary(image)
    size = _unpacked_size(snapshots, config) if snapshots is not None else None
    if size is not None:
        return ImageSummary(image, desc, manifest, config, size, unpacked=True)
    return ImageSummary(image, desc, manifest, config, sum(d.size for d in manifest.layers))


def summarize_all(images: Iterable[Image], *, content: ContentStore,
                  snapshots: Snapshotter | None = None) -> list[ImageSummary]:
    """:func:`summarize` for each of ``images``; names of one target are resolved once."""
    done: dict[str, ImageSummary] = {}
    out = []
    for image in images:
        known = done.get(image.target.digest)
        if known is None:
            known = done[image.target.digest] = summarize(image, content=content,
                                                           snapshots=snapshots)
        out.append(replace(known, image=image))
    return out


def docker_view(summary: ImageSummary) -> dict[str, Any]:
    """``nerdctl image inspect``'s object (docker's fields). ``Id`` is the target's
    digest, the IMAGE ID ``image ls`` shows."""
    raw: Mapping[str, Any] = summary.config.raw if summary.config else {}
    out: dict[str, Any] = {
        "Id": summary.id,
        "RepoTags": [summary.image.name] if summary.tag else [],
        "RepoDigests": [f"{summary.repository}@{summary.id}"],
        "Comment": raw.get("comment", ""),
        "Created": raw.get("created", ""),
        "Author": raw.get("author", ""),
        "Config": dict(summary.config.config) if summary.config else {},
        "Architecture": raw.get("architecture", ""),
        "Os": raw.get("os", ""),
        "Size": summary.size,
        "RootFS": {"Type": "layers",
                   "Layers": list(summary.config.diff_ids) if summary.config else []},
    }
    if raw.get("variant"):
        out["Variant"] = raw["variant"]
    return out


def native_view(summary: ImageSummary, *, content: ContentStore) -> dict[str, Any]:
    """lamina's own record of the image and the documents it resolved to: the index
    (when the target is one), the manifest and the config, as stored."""
    image = summary.image
    out: dict[str, Any] = {"Image": {
        "Name": image.name, "Target": image.target.to_json(), "Labels": dict(image.labels),
        "CreatedAt": image.created, "UpdatedAt": image.updated,
    }}
    if image.target.media_type in INDEX_TYPES:
        out["IndexDesc"] = image.target.to_json()
        out["Index"] = parse_json(read_document(content, image.target), "index")
    if summary.manifest_desc is not None and summary.manifest is not None:
        out["ManifestDesc"] = summary.manifest_desc.to_json()
        out["Manifest"] = parse_json(read_document(content, summary.manifest_desc), "manifest")
        out["ImageConfigDesc"] = summary.manifest.config.to_json()
        out["ImageConfig"] = dict(summary.config.raw) if summary.config else None
    return out
