"""The diff service: layers from snapshots, and layers onto mounts.

:func:`create_diff` writes the changes of a snapshot relative to its parent
(or to any other committed snapshot) as an OCI layer into the content store,
labelled ``containerd.io/uncompressed`` with its DiffID. On overlay, when the
comparison is against the snapshot's own parent, only the upperdir is walked,
so the cost follows the size of the change rather than of the image; any
other case mounts both trees read-only and compares them.

:func:`apply_diff` streams a layer blob from the content store onto mounts, and
:func:`apply_stream` any layer stream (``lamina diff apply`` of a file).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from lamina.archive.apply import AppliedLayer, apply_layer
from lamina.archive.changes import write_diff, write_overlay_diff
from lamina.archive.compression import media_type as layer_media_type
from lamina.archive.limits import DEFAULT_MAX_LAYER_SIZE
from lamina.errors import AlreadyExists, InvalidArgument, NotFound
from lamina.labels import UNCOMPRESSED
from lamina.mounts.mount import Mount, temp_mount
from lamina.oci.types import Descriptor
from lamina.snapshots import Capability, Kind, LocalDirectories, Snapshotter

if TYPE_CHECKING:
    from lamina.content import ContentStore

__all__ = ["DiffOutcome", "apply_diff", "apply_stream", "create_diff"]

_COMPRESSION = {"gzip": "gzip", "zstd": "zstd", "none": "none", "": "gzip"}


@dataclass(frozen=True)
class DiffOutcome:
    descriptor: Descriptor
    diff_id: str


class _WriterFile:
    """Adapts a content Writer to the file-like ``write`` the archive writer expects."""

    def __init__(self, writer: object) -> None:
        self._w = writer

    def write(self, data: bytes) -> int:
        self._w.write(bytes(data))  # type: ignore[attr-defined]
        return len(data)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _readonly(sn: Snapshotter, parent: str,
              tmpmounts: str | os.PathLike[str] | None) -> Iterator[str | None]:
    if not parent:
        yield None
        return
    key = f"diff-view-{time.time_ns()}-{secrets.token_hex(4)}"
    mounts = sn.view(key, parent)
    try:
        with temp_mount(mounts, base=tmpmounts) as target:
            yield target
    finally:
        sn.remove(key)


def create_diff(
    sn: Snapshotter,
    content: ContentStore,
    key: str,
    parent: str | None = None,
    *,
    compression: str = "gzip",
    tmpmounts: str | os.PathLike[str] | None = None,
    labels: dict[str, str] | None = None,
) -> DiffOutcome:
    """Write the layer that turns ``parent`` (default: ``key``'s parent) into ``key``."""
    if compression not in _COMPRESSION:
        raise InvalidArgument(f"unknown compression {compression!r} (gzip, zstd, none)")
    comp = _COMPRESSION[compression]
    info = sn.stat(key)
    base = info.parent if parent is None else parent
    ref = f"diff-{time.time_ns()}-{secrets.token_hex(4)}"
    writer = content.writer(ref)
    try:
        out = _WriterFile(writer)
        own_parent = base == info.parent
        if (own_parent and isinstance(sn, LocalDirectories)
                and Capability.OVERLAY in sn.capabilities):
            result = write_overlay_diff(str(sn.layer_dir(key)), out,
                                        compression=comp)
        else:
            view_key = f"diff-upper-{time.time_ns()}-{secrets.token_hex(4)}"
            if info.kind is Kind.COMMITTED:
                upper_mounts = sn.view(view_key, key)
            else:
                upper_mounts, view_key = sn.mounts(key), ""
            try:
                with (_readonly(sn, base, tmpmounts) as lower,
                      temp_mount(_ro(upper_mounts), base=tmpmounts) as upper):
                    result = write_diff(lower, upper, out, compression=comp)
            finally:
                if view_key:
                    sn.remove(view_key)
        all_labels = {**(labels or {}), UNCOMPRESSED: result.diff_id}
        with contextlib.suppress(AlreadyExists):
            writer.commit(result.size, result.digest, labels=all_labels)
    except BaseException:
        writer.close()
        with contextlib.suppress(NotFound):
            content.abort(ref)
        raise
    writer.close()
    desc = Descriptor(layer_media_type(comp), result.digest, result.size)
    return DiffOutcome(descriptor=desc, diff_id=result.diff_id)


def _ro(mounts: Sequence[Mount]) -> list[Mount]:
    """The same mounts, read-only (diffing must not change what it reads)."""
    out = []
    for m in mounts:
        opts = tuple(o for o in m.options if o not in ("rw", "ro"))
        if m.type == "overlay":
            opts = tuple(o for o in opts if not o.startswith(("upperdir=", "workdir=")))
            upper = next((o[9:] for o in m.options if o.startswith("upperdir=")), None)
            if upper:
                opts = tuple(f"lowerdir={upper}:{o[9:]}" if o.startswith("lowerdir=") else o
                             for o in opts)
        out.append(Mount(m.type, m.source, m.target, (*opts, "ro")))
    return out


def apply_stream(
    layer: IO[bytes],
    mounts: Sequence[Mount],
    *,
    diff_id: str | None = None,
    tmpmounts: str | os.PathLike[str] | None = None,
    max_layer_size: int = DEFAULT_MAX_LAYER_SIZE,
) -> AppliedLayer:
    """Apply the layer read from ``layer`` (a tar stream, plain, gzip or zstd) onto
    ``mounts``; verifies ``diff_id``.

    ResourceExhausted if it expands beyond ``max_layer_size`` bytes or the
    filesystem runs short (see :func:`lamina.archive.apply.apply_layer`)."""
    with temp_mount(mounts, base=tmpmounts) as target:
        return apply_layer(layer, target, expected_diff_id=diff_id, max_size=max_layer_size)


def apply_diff(
    content: ContentStore,
    desc: Descriptor,
    mounts: Sequence[Mount],
    *,
    diff_id: str | None = None,
    tmpmounts: str | os.PathLike[str] | None = None,
    max_layer_size: int = DEFAULT_MAX_LAYER_SIZE,
) -> AppliedLayer:
    """Apply layer ``desc`` from the content store onto ``mounts`` (see
    :func:`apply_stream`)."""
    with content.reader(desc.digest) as r:
        return apply_stream(r, mounts, diff_id=diff_id, tmpmounts=tmpmounts,
                            max_layer_size=max_layer_size)
