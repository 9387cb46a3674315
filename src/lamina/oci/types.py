"""OCI (and docker) image model: media types, descriptors, manifests, indexes, configs.

Parsing is strict where it matters for safety (digests, sizes, media types of
what we follow) and lenient elsewhere (unknown fields and annotations pass).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import InvalidArgument
from lamina.util import jsondoc

__all__ = [
    "CONFIG_TYPES",
    "INDEX_TYPES",
    "LAYER_TYPES",
    "MANIFEST_TYPES",
    "Descriptor",
    "ImageConfig",
    "Index",
    "Manifest",
    "MediaType",
    "host_platform",
    "parse_json",
]


class MediaType:
    OCI_INDEX = "application/vnd.oci.image.index.v1+json"
    OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
    OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
    OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
    OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
    OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
    OCI_LAYOUT = "application/vnd.oci.layout.header.v1+json"
    DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
    DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
    DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
    DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
    DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    CHECKPOINT_CRIU = "application/vnd.lamina.checkpoint.criu.tar"
    CHECKPOINT_BINDS = "application/vnd.lamina.checkpoint.binds.tar"
    CHECKPOINT_CONFIG = "application/vnd.lamina.checkpoint.config.v1+json"
    CHECKPOINT_RW = "application/vnd.lamina.checkpoint.rw.tar+gzip"


INDEX_TYPES = frozenset({MediaType.OCI_INDEX, MediaType.DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({MediaType.OCI_MANIFEST, MediaType.DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({MediaType.OCI_CONFIG, MediaType.DOCKER_CONFIG})
LAYER_TYPES = frozenset({
    MediaType.OCI_LAYER, MediaType.OCI_LAYER_GZIP, MediaType.OCI_LAYER_ZSTD,
    MediaType.DOCKER_LAYER, MediaType.DOCKER_LAYER_GZIP, MediaType.DOCKER_FOREIGN_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
})

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise InvalidArgument(f"{what}: invalid digest {value!r}")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    """``value`` as a JSON object (absent = empty); InvalidArgument for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: expected a JSON object")
    return value


def _strings(value: Any, what: str) -> dict[str, str]:
    obj = _object(value, what)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in obj.items()):
        raise InvalidArgument(f"{what}: keys and values must be strings")
    return obj


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as a JSON object, nesting bounded (see :mod:`lamina.util.jsondoc`)."""
    return jsondoc.loads_object(data, what)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, obj: Any, what: str = "descriptor") -> Descriptor:
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{what}: expected an object")
        size = obj.get("size")
        if not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"{what}: invalid size {size!r}")
        return cls(
            media_type=str(obj.get("mediaType", "")),
            digest=_digest(obj.get("digest"), what),
            size=size,
            annotations=_strings(obj.get("annotations"), f"{what} annotations"),
            platform=_object(obj.get("platform"), f"{what} platform") or None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type, "digest": self.digest, "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]
    media_type: str = MediaType.OCI_MANIFEST

    @classmethod
    def parse(cls, data: bytes, media_type: str = "") -> Manifest:
        obj = parse_json(data, "manifest")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise InvalidArgument("manifest: layers must be a list")
        return cls(
            config=Descriptor.from_json(obj.get("config"), "manifest config"),
            layers=tuple(Descriptor.from_json(d, f"manifest layer {i}")
                         for i, d in enumerate(layers)),
            media_type=str(obj.get("mediaType") or media_type or MediaType.OCI_MANIFEST),
        )


@dataclass(frozen=True)
class Index:
    manifests: tuple[Descriptor, ...]
    media_type: str = MediaType.OCI_INDEX
    annotations: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes) -> Index:
        obj = parse_json(data, "index")
        manifests = obj.get("manifests")
        if not isinstance(manifests, list):
            raise InvalidArgument("index: manifests must be a list")
        return cls(
            manifests=tuple(Descriptor.from_json(d, f"index entry {i}")
                            for i, d in enumerate(manifests)),
            media_type=str(obj.get("mediaType") or MediaType.OCI_INDEX),
            annotations=_strings(obj.get("annotations"), "index annotations"),
        )


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config lamina uses; ``raw`` keeps the whole document."""

    diff_ids: tuple[str, ...]
    config: Mapping[str, Any]
    raw: Mapping[str, Any]

    @classmethod
    def parse(cls, data: bytes) -> ImageConfig:
        obj = parse_json(data, "image config")
        rootfs = _object(obj.get("rootfs"), "image config: rootfs")
        diff_ids = rootfs.get("diff_ids")
        if not isinstance(diff_ids, list):
            raise InvalidArgument("image config: rootfs.diff_ids must be a list")
        return cls(
            diff_ids=tuple(_digest(d, f"diff_id {i}") for i, d in enumerate(diff_ids)),
            config=_object(obj.get("config"), "image config: config"),
            raw=obj,
        )


def host_platform() -> dict[str, str]:
    machine = os.uname().machine.lower()  # platform.machine(), without its import
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    return {"os": "linux", "architecture": arch}
