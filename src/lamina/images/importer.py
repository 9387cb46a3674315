"""Import images from an OCI image layout (directory or tar) or a ``docker save`` tar.

Blobs are streamed into the content store, each verified against its digest
on commit. Documents (index.json, manifest.json) are small and read whole.
An uncompressed archive in a file (or a layout directory) is read in two
passes: the documents and small blobs, then the large ones (layers) in the
order the caller's ``ready`` asks, so an unpack can start on the first layer
while the others are stored (:mod:`lamina.images.early_unpack`); every blob the
archive names is leased in one transaction first. Other archives are read
as one stream.
Images are registered under ``io.containerd.image.name`` or
``org.opencontainers.image.ref.name`` as the archive spells them; docker tags
are normalised as containerd does (``busybox`` →
``docker.io/library/busybox:latest``; a tag that is no reference is
InvalidArgument). Any spelling finds the image later (:mod:`lamina.images.names`).
Blobs get containerd's GC reference labels (``containerd.io/gc.ref.content.*``,
:func:`lamina.images.graph.label_references`) so everything an image needs
is reachable from it. Documents are bounded as every walk's are
(:data:`lamina.oci.limits.MAX_DOCUMENT`).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import secrets
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

from lamina.errors import (
    AlreadyExists,
    InvalidArgument,
    LaminaError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from lamina.images.graph import label_references, put_document, walk_descriptors
from lamina.metadata.images import Image, ImageStore
from lamina.metadata.leases import LeasedContent
from lamina.oci.limits import MAX_DOCUMENT
from lamina.oci.reference import normalize_name
from lamina.oci.types import (
    Descriptor,
    Index,
    MediaType,
    parse_json,
)
from lamina.util import crash
from lamina.util.progress import Progress

if TYPE_CHECKING:
    from lamina.content import ContentStore

__all__ = ["Arrivals", "import_images"]

_CHUNK = 1 << 20
_DOCUMENTS = {"index.json", "oci-layout", "manifest.json", "repositories"}
#: Blobs at most this large (every document among them) are stored before the
#: others, so the layers can be stored in the order an unpack reads them.
SMALL_BLOB = MAX_DOCUMENT
#: Members of an archive (files of a layout directory's blobs/sha256) at most: the
#: importer keeps a record of each, and a layout holds a few per image layer.
MAX_ARCHIVE_MEMBERS = 1 << 16
_T = TypeVar("_T")


@dataclass
class _Found:
    """What a walk over an archive found: documents and blob descriptors by path."""

    documents: dict[str, bytes] = field(default_factory=dict)
    blobs: dict[str, tuple[str, int]] = field(default_factory=dict)  # path -> (digest, size)
    links: dict[str, str] = field(default_factory=dict)  # symlink path -> target path


def _ingest(content: ContentStore, stream: IO[bytes], *, size: int, expected: str | None,
            progress: Progress, item: str, arrivals: Arrivals | None = None) -> str:
    """Stream one blob into the content store; returns its digest. ``arrivals`` is
    told how far the ingest of a blob named by its digest has got."""
    if expected is not None:
        try:
            content.info(expected)
            return expected  # already have it; the caller skips the bytes
        except NotFound:
            pass
    ref = f"import-{secrets.token_hex(8)}"
    try:
        writer = content.writer(ref, total=size, expected=expected or "")
    except AlreadyExists:  # committed since ``info`` (another import of it)
        if expected is None:
            raise
        return expected
    told = arrivals if expected is not None else None
    try:
        done = 0
        while chunk := stream.read(_CHUNK):
            writer.write(chunk)
            done += len(chunk)
            if told is not None and expected is not None:
                told.writing(expected, ref, size, done)
            progress.event("import", item, done=done, total=size)
        digest = expected or writer.digest()
        with contextlib.suppress(AlreadyExists):
            writer.commit(size, digest)
        return digest
    except BaseException:
        if told is not None and expected is not None:
            told.dropped(expected)
        writer.close()
        # best effort: the ingest may be gone already (committed, or never made
        # whole), and what failed is what the caller must hear
        with contextlib.suppress(LaminaError, OSError):
            content.abort(ref)
        raise
    finally:
        writer.close()


def _blob_path_digest(path: str) -> str | None:
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256" and len(parts[2]) == 64:
        return f"sha256:{parts[2]}"
    return None


class Arrivals:
    """The blobs an import has stored so far, and those it is storing, for work
    that reads them as they arrive (an unpack started before the whole archive
    is read)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._stored: set[str] = set()
        self._writing: dict[str, tuple[str, int, int]] = {}  # digest -> (ref, total, written)
        self._ended = False

    def writing(self, digest: str, ref: str, total: int, written: int) -> None:
        """Ingest ``ref`` of blob ``digest`` holds ``written`` of its ``total`` bytes."""
        with self._cond:
            self._writing[digest] = (ref, total, written)
            self._cond.notify_all()

    def dropped(self, digest: str) -> None:
        """The ingest of ``digest`` failed: it will not be stored (by this import)."""
        with self._cond:
            self._writing.pop(digest, None)
            self._cond.notify_all()

    def stored(self, digest: str) -> None:
        with self._cond:
            self._stored.add(digest)
            self._writing.pop(digest, None)
            self._cond.notify_all()

    def end(self) -> None:
        """No more blobs will come (the archive is read, or the import failed)."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait(self, digest: str, past: int | None = None) -> tuple[str, int, int] | None:
        """Until blob ``digest`` is stored (None) or, when ``past`` is given, its
        ingest holds more than ``past`` bytes (its ref, total and bytes written);
        Unavailable when the import ended without storing it."""
        with self._cond:
            while digest not in self._stored:
                got = self._writing.get(digest)
                if past is not None and got is not None and got[2] > past:
                    return got
                if self._ended:
                    raise Unavailable(f"{digest}: the import ended without storing it")
                self._cond.wait()
            return None


#: Called once an archive's documents are stored, before its large blobs; returns
#: the digests of the blobs it wants first, in that order.
Early = Callable[["_Found"], Sequence[str]]


def _scan_tar(source: IO[bytes], content: ContentStore, progress: Progress,
              arrivals: Arrivals, early: Early | None) -> _Found:
    try:
        if source.seekable():
            # an uncompressed archive on a file is read in two passes: its
            # documents and small blobs, then the rest in the order ``early`` asks
            start = source.tell()
            try:
                tar = tarfile.open(fileobj=source, mode="r:")  # noqa: SIM115 - with below
            except tarfile.ReadError:  # compressed, or not a tar: read it as a stream
                source.seek(start)
            else:
                with tar:
                    return _scan_twice(tar, content, progress, arrivals, early)
        with tarfile.open(fileobj=source, mode="r|*", bufsize=_CHUNK) as tar:
            found = _Found()
            for member in _bounded(tar):
                _take(tar, member, found, content, progress, arrivals)
            return found
    except (tarfile.TarError, EOFError) as exc:  # a damaged archive is the caller's error
        raise InvalidArgument(f"not a readable image archive: {exc}") from exc


def _scan_twice(tar: tarfile.TarFile, content: ContentStore, progress: Progress,
                arrivals: Arrivals, early: Early | None) -> _Found:
    found = _Found()
    large: list[tarfile.TarInfo] = []
    members = list(_bounded(tar))  # the headers: every blob is named before one is stored
    _hold(content, (_blob_path_digest(_member_path(m)) for m in members if m.isfile()))
    for member in members:
        if member.isfile() and member.size > SMALL_BLOB:
            large.append(member)
        else:
            _take(tar, member, found, content, progress, arrivals)
    named = [(_blob_path_digest(_member_path(m)), m) for m in large]
    for member in _wanted_first(named, early(found) if early else ()):
        _take(tar, member, found, content, progress, arrivals)
    return found


def _bounded(items: Iterable[_T]) -> Iterator[_T]:
    """``items`` (an archive's members, a directory's files), ResourceExhausted past
    :data:`MAX_ARCHIVE_MEMBERS` of them."""
    for n, item in enumerate(items, 1):
        if n > MAX_ARCHIVE_MEMBERS:
            raise ResourceExhausted(f"the archive has more than {MAX_ARCHIVE_MEMBERS} "
                                    f"members, the limit for an image archive")
        yield item


def _wanted_first(items: Sequence[tuple[str | None, _T]], wanted: Sequence[str]) -> list[_T]:
    """The items (each with its blob digest, if it names one): those whose digest
    ``wanted`` names in that order, then the others as they came."""
    rank: dict[str, int] = {}
    for n, digest in enumerate(wanted):
        rank.setdefault(digest, n)
    ordered = sorted(items, key=lambda item: rank.get(item[0] or "", len(rank)))
    return [item for _, item in ordered]


def _hold(content: ContentStore, digests: Iterable[str | None]) -> None:
    """Lease the blobs an archive names in one transaction (when ``content`` is
    leased), rather than one as each is stored."""
    if isinstance(content, LeasedContent):
        content.hold(d for d in digests if d is not None)


def _member_path(member: tarfile.TarInfo) -> str:
    return posixpath.normpath(member.name.lstrip("./") or ".")


def _take(tar: tarfile.TarFile, member: tarfile.TarInfo, found: _Found, content: ContentStore,
          progress: Progress, arrivals: Arrivals) -> None:
    """Record or store one member of the archive."""
    path = _member_path(member)
    if member.issym() or member.islnk():
        target = member.linkname
        if member.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        found.links[path] = target
        return
    if not member.isfile():
        return
    f = tar.extractfile(member)
    assert f is not None
    if path in _DOCUMENTS:
        if member.size > MAX_DOCUMENT:
            raise InvalidArgument(f"{path}: {member.size} bytes is too large")
        found.documents[path] = f.read()
        return
    expected = _blob_path_digest(path)
    digest = _ingest(content, f, size=member.size, expected=expected,
                     progress=progress, item=path, arrivals=arrivals)
    found.blobs[path] = (digest, member.size)
    arrivals.stored(digest)
    crash.point("import.blob-stored")


def _scan_dir(root: Path, content: ContentStore, progress: Progress, arrivals: Arrivals,
              early: Early | None) -> _Found:
    found = _Found()
    for name in _DOCUMENTS:
        p = root / name
        if p.is_file():
            if p.stat().st_size > MAX_DOCUMENT:
                raise InvalidArgument(f"{p}: too large")
            found.documents[name] = p.read_bytes()
    blobs = root / "blobs" / "sha256"
    if not blobs.is_dir():
        return found
    large: list[tuple[str | None, Path]] = []
    names = sorted(_bounded(blobs.iterdir()))
    _hold(content, (_blob_path_digest(f"blobs/sha256/{p.name}") for p in names))
    for p in names:
        expected = _blob_path_digest(f"blobs/sha256/{p.name}")
        if expected is None or not p.is_file():
            continue
        if p.stat().st_size > SMALL_BLOB:
            large.append((expected, p))  # after the documents (see _scan_tar)
        else:
            _take_file(p, found, content, progress, arrivals)
    for p in _wanted_first(large, early(found) if early else ()):
        _take_file(p, found, content, progress, arrivals)
    return found


def _take_file(p: Path, found: _Found, content: ContentStore, progress: Progress,
               arrivals: Arrivals) -> None:
    rel = f"blobs/sha256/{p.name}"
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        digest = _ingest(content, f, size=size, expected=_blob_path_digest(rel),
                         progress=progress, item=rel, arrivals=arrivals)
    found.blobs[rel] = (digest, size)
    arrivals.stored(digest)
    crash.point("import.blob-stored")


def _oci_images(found: _Found, content: ContentStore, index_name: str | None) -> list[Image]:
    index_bytes = found.documents["index.json"]
    index = Index.parse(index_bytes)
    images: list[Image] = []
    for desc in index.manifests:
        try:
            content.info(desc.digest)
        except NotFound:
            raise InvalidArgument(f"index.json names {desc.digest}, which the archive lacks") \
                from None
        name = desc.annotations.get("io.containerd.image.name") or desc.annotations.get(
            "org.opencontainers.image.ref.name", "")
        if name:
            images.append(Image(name=name, target=desc))
    if index_name:
        digest = put_document(content, index_bytes)
        target = Descriptor(MediaType.OCI_INDEX, digest, len(index_bytes))
        images.append(Image(name=index_name, target=target))
    return images


def _docker_images(found: _Found, content: ContentStore) -> list[Image]:
    entries = json.loads(found.documents["manifest.json"])
    if not isinstance(entries, list):
        raise InvalidArgument("manifest.json: expected a list")

    def blob(path: str) -> tuple[str, int]:
        path = posixpath.normpath(path)
        for _ in range(8):
            if path in found.blobs:
                return found.blobs[path]
            if path not in found.links:
                break
            path = found.links[path]
        raise InvalidArgument(f"manifest.json names {path!r}, which the archive lacks")

    images: list[Image] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidArgument("manifest.json: entries must be objects")
        cfg_digest, cfg_size = blob(str(entry.get("Config", "")))
        layers = []
        for p in entry.get("Layers") or []:
            digest, size = blob(str(p))
            with content.reader(digest) as r:
                magic = r.read(4)
            media = MediaType.DOCKER_LAYER_GZIP if magic[:2] == b"\x1f\x8b" else (
                MediaType.OCI_LAYER_ZSTD if magic == b"\x28\xb5\x2f\xfd" else
                MediaType.DOCKER_LAYER)
            layers.append({"mediaType": media, "digest": digest, "size": size})
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MediaType.DOCKER_MANIFEST,
            "config": {"mediaType": MediaType.DOCKER_CONFIG, "digest": cfg_digest,
                       "size": cfg_size},
            "layers": layers,
        }
        data = json.dumps(manifest, indent=3).encode()
        digest = put_document(content, data)
        target = Descriptor(MediaType.DOCKER_MANIFEST, digest, len(data))
        tags = entry.get("RepoTags") or [f"import-{cfg_digest.split(':')[1][:12]}:latest"]
        images.extend(Image(name=normalize_name(str(t)), target=target) for t in tags)
    return images


def _require_complete(content: ContentStore, image: Image) -> None:
    """InvalidArgument unless the archive held every blob ``image`` reaches: an
    image recorded with a blob missing would leave the root inconsistent."""
    try:
        for desc in walk_descriptors(content, image.target):
            content.info(desc.digest)
    except NotFound as exc:
        raise InvalidArgument(f"{image.name}: the archive lacks a blob the image "
                              f"references ({exc.message})") from None


def _scan(source: str | os.PathLike[str] | IO[bytes], content: ContentStore,
          progress: Progress, arrivals: Arrivals, early: Early) -> _Found:
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return _scan_dir(Path(source), content, progress, arrivals, early)
    if isinstance(source, (str, os.PathLike)):
        try:
            f = open(source, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFound(f"{source}: no such file") from None
        with f:
            return _scan_tar(f, content, progress, arrivals, early)
    return _scan_tar(source, content, progress, arrivals, early)


def import_images(
    source: str | os.PathLike[str] | IO[bytes],
    *,
    content: ContentStore,
    images: ImageStore,
    index_name: str | None = None,
    progress: Progress | None = None,
    arrivals: Arrivals | None = None,
    ready: Callable[[list[Image]], Sequence[str]] | None = None,
) -> list[Image]:
    """Import every image in ``source``; returns the images created or moved.

    ``arrivals`` is told of every blob as it is stored, and ends when the
    archive is read (or the import fails). ``ready``, when the archive is an
    OCI layout, is called with the images it names as soon as its documents
    are stored, before its large blobs (layers); it returns the digests of the
    blobs it wants stored first, in that order, and must not raise."""
    progress = progress or Progress()
    arrivals = arrivals or Arrivals()

    def early(found: _Found) -> Sequence[str]:
        if ready is None or "index.json" not in found.documents:
            return ()
        try:
            made = _oci_images(found, content, index_name)
        except LaminaError:
            return ()  # reported once the whole archive is read
        return ready(made)

    try:
        found = _scan(source, content, progress, arrivals, early)
    finally:
        arrivals.end()
    crash.point("import.scanned")
    if "index.json" in found.documents:
        if "oci-layout" in found.documents:
            layout = parse_json(found.documents["oci-layout"], "oci-layout")
            if not str(layout.get("imageLayoutVersion", "")).startswith("1."):
                raise InvalidArgument("oci-layout: unsupported imageLayoutVersion")
        made = _oci_images(found, content, index_name)
    elif "manifest.json" in found.documents:
        made = _docker_images(found, content)
    else:
        raise InvalidArgument("not an OCI image layout or docker archive: no index.json "
                              "or manifest.json")
    if not made:
        raise InvalidArgument("the archive names no image (no ref.name annotation); "
                              "use --index-name")
    for image in made:
        _require_complete(content, image)
    out = []
    for image in made:
        label_references(content, image.target)
        crash.point("import.labelled")
        out.append(images.put(image))
        crash.point("import.image-put")
    return out

