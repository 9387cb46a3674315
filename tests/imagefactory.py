"""Build OCI / docker-save test images locally (never pulls from a registry).

Typical use in a test::

    from imagefactory import (
        debootstrap_layer, rich_layers, build_oci_layout, RICH_EXPECTED,
    )

    base = debootstrap_layer(cache_dir)              # cached, ~1 min the first time
    layers = [base, *rich_layers(tmp_path / "blobs")]
    ref = build_oci_layout(tmp_path / "oci", layers)
    ...unpack ref with lamina into `rootfs`...
    RICH_EXPECTED.verify(rootfs)

Layers are stored as blob files (named by digest) in a work directory the
caller chooses; `Layer` records digest, diff_id, size and media type.
Tar streams are PAX, numeric owners only (empty uname/gname), xattrs as
``SCHILY.xattr.*`` records with raw byte values, directories walked in sorted
order, so builds are reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import platform
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

Compression = Literal["none", "gzip", "zstd"]
EntryKind = Literal[
    "file", "dir", "symlink", "hardlink", "char", "block", "fifo", "whiteout", "opaque"
]

MT_OCI_LAYOUT_VERSION = "1.0.0"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER: dict[Compression, str] = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"

#: Fixed timestamp used for generated entries (2024-01-02T03:04:05Z).
DEFAULT_MTIME = 1704164645
CREATED = "2024-01-02T03:04:05Z"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEBIAN_SUITE = "bookworm"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

_COPY_CHUNK = 1 << 20


# --------------------------------------------------------------------------- host


def host_arch() -> str:
    """The OCI architecture name of this machine (amd64, arm64, ...)."""
    m = platform.machine().lower()
    return {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(m, m)


def debian_mirror(suite: str = DEBIAN_SUITE) -> str:
    """The Debian mirror this machine's apt uses for ``suite``.

    Reads deb822 ``/etc/apt/sources.list.d/*.sources`` and one-line
    ``sources.list`` / ``*.list`` files. ``LAMINA_DEBIAN_MIRROR`` overrides.
    """
    override = os.environ.get("LAMINA_DEBIAN_MIRROR")
    if override:
        return override.rstrip("/")
    d = Path("/etc/apt/sources.list.d")
    for src in sorted(d.glob("*.sources")) if d.is_dir() else ():
        for stanza in re.split(r"\n\s*\n", src.read_text(errors="replace")):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.lstrip().startswith("#") or ":" not in line:
                    continue
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
            if (
                "deb" in fields.get("types", "").split()
                and suite in fields.get("suites", "").split()
                and fields.get("enabled", "yes").lower() != "no"
                and fields.get("uris")
            ):
                return fields["uris"].split()[0].rstrip("/")
    lists = [Path("/etc/apt/sources.list")]
    if d.is_dir():
        lists += sorted(d.glob("*.list"))
    for lst in lists:
        if not lst.is_file():
            continue
        for line in lst.read_text(errors="replace").splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1].rstrip("/")
    raise RuntimeError(f"no '{suite}' mirror in the apt sources; set LAMINA_DEBIAN_MIRROR")


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One tar member of a layer (paths are relative, without leading '/')."""

    path: str
    kind: EntryKind
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    target: str = ""  # symlink target, or hardlink target path (relative to root)
    devmajor: int = 0
    devminor: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", _clean(self.path))
        if self.kind == "hardlink":
            object.__setattr__(self, "target", _clean(self.target))
        object.__setattr__(self, "xattrs", dict(self.xattrs))

    @property
    def tar_name(self) -> str:
        """The member name in the tar (whiteouts/opaques become .wh. names)."""
        if self.kind == "whiteout":
            parent, base = _split(self.path)
            return _join(parent, WHITEOUT_PREFIX + base)
        if self.kind == "opaque":
            return _join(self.path, OPAQUE_MARKER)
        return self.path


def File(
    path: str,
    data: bytes | str = b"",
    mode: int = 0o644,
    *,
    uid: int = 0,
    gid: int = 0,
    mtime: int = DEFAULT_MTIME,
    xattrs: Mapping[str, bytes] | None = None,
) -> Entry:
    if isinstance(data, str):
        data = data.encode()
    return Entry(path, "file", data, mode, uid, gid, mtime, xattrs or {})


def Dir(
    path: str,
    mode: int = 0o755,
    *,
    uid: int = 0,
    gid: int = 0,
    mtime: int = DEFAULT_MTIME,
    xattrs: Mapping[str, bytes] | None = None,
) -> Entry:
    return Entry(path, "dir", b"", mode, uid, gid, mtime, xattrs or {})


def Symlink(
    path: str, target: str, *, uid: int = 0, gid: int = 0, mtime: int = DEFAULT_MTIME
) -> Entry:
    return Entry(path, "symlink", b"", 0o777, uid, gid, mtime, {}, target)


def Hardlink(path: str, target: str, mode: int = 0o644, *, uid: int = 0, gid: int = 0,
             mtime: int = DEFAULT_MTIME) -> Entry:
    """A hard link to ``target`` (a path in this or a lower layer).

    Give it the target inode's metadata, as real tar writers do: appliers
    (containerd's among them) apply a link header's owner, mode and times
    to the shared inode.
    """
    return Entry(path, "hardlink", mode=mode, uid=uid, gid=gid, mtime=mtime, target=target)


def CharDev(
    path: str, major: int, minor: int, mode: int = 0o666, *, uid: int = 0, gid: int = 0
) -> Entry:
    return Entry(path, "char", b"", mode, uid, gid, DEFAULT_MTIME, {}, "", major, minor)


def BlockDev(
    path: str, major: int, minor: int, mode: int = 0o660, *, uid: int = 0, gid: int = 0
) -> Entry:
    return Entry(path, "block", b"", mode, uid, gid, DEFAULT_MTIME, {}, "", major, minor)


def Fifo(path: str, mode: int = 0o644, *, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, "fifo", b"", mode, uid, gid)


def Whiteout(path: str) -> Entry:
    """Delete ``path`` (file or whole tree) from lower layers: ``dir/.wh.name``."""
    return Entry(path, "whiteout", mode=0o600)


def Opaque(dirpath: str) -> Entry:
    """Hide everything lower layers have under ``dirpath``: ``dir/.wh..wh..opq``."""
    return Entry(dirpath, "opaque", mode=0o600)


def _clean(p: str) -> str:
    p = p.strip()
    while p.startswith("./"):
        p = p[2:]
    p = p.strip("/")
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"'..' not allowed in entry path {p!r}")
    return "/".join(parts)


def _split(p: str) -> tuple[str, str]:
    parent, _, base = p.rpartition("/")
    return parent, base


def _join(parent: str, base: str) -> str:
    return f"{parent}/{base}" if parent else base


def vfs_cap_v2(permitted: int, *, effective: bool = True, inheritable: int = 0) -> bytes:
    """Encode a ``security.capability`` value (struct vfs_cap_data, revision 2)."""
    magic = 0x02000000 | (0x000001 if effective else 0)
    return struct.pack(
        "<IIIII",
        magic,
        permitted & 0xFFFFFFFF,
        inheritable & 0xFFFFFFFF,
        (permitted >> 32) & 0xFFFFFFFF,
        (inheritable >> 32) & 0xFFFFFFFF,
    )


CAP_NET_BIND_SERVICE = 10
CAP_NET_RAW = 13


# --------------------------------------------------------------------------- tar writing


class _TarInfo(tarfile.TarInfo):
    """TarInfo whose PAX records carry raw bytes without ``hdrcharset=BINARY``.

    That is how GNU tar and Go's archive/tar write SCHILY.xattr values.
    Values are ``str`` holding the bytes via ``surrogateescape``.
    """

    @classmethod
    def _create_pax_generic_header(
        cls, pax_headers: Mapping[str, str], type: bytes, encoding: str
    ) -> bytes:
        records = b""
        for keyword, value in pax_headers.items():
            kw = keyword.encode("utf-8")
            val = value.encode("utf-8", "surrogateescape")
            n = len(kw) + len(val) + 3
            p = 0
            while True:
                total = n + len(str(p))
                if total == p:
                    break
                p = total
            records += str(p).encode() + b" " + kw + b"=" + val + b"\n"
        info = {
            "name": "././@PaxHeader",
            "type": type,
            "size": len(records),
            "magic": tarfile.POSIX_MAGIC,
        }
        hdr: bytes = cls._create_header(info, tarfile.USTAR_FORMAT, "ascii", "replace")  # type: ignore[attr-defined]
        payload: bytes = cls._create_payload(records)  # type: ignore[attr-defined]
        return hdr + payload


def _xattr_pax(xattrs: Mapping[str, bytes]) -> dict[str, str]:
    return {
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in sorted(xattrs.items())
    }


def _tarinfo_for(e: Entry) -> _TarInfo:
    ti = _TarInfo(e.tar_name)
    ti.mode = e.mode & 0o7777
    ti.uid, ti.gid = e.uid, e.gid
    ti.uname = ti.gname = ""
    ti.mtime = e.mtime
    ti.pax_headers = _xattr_pax(e.xattrs)
    if e.kind in ("file", "whiteout", "opaque"):
        ti.type = tarfile.REGTYPE
        ti.size = len(e.data)
    elif e.kind == "dir":
        ti.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        ti.type = tarfile.SYMTYPE
        ti.linkname = e.target
    elif e.kind == "hardlink":
        ti.type = tarfile.LNKTYPE
        ti.linkname = e.target
    elif e.kind in ("char", "block"):
        ti.type = tarfile.CHRTYPE if e.kind == "char" else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = e.devmajor, e.devminor
    elif e.kind == "fifo":
        ti.type = tarfile.FIFOTYPE
    else:  # pragma: no cover
        raise ValueError(e.kind)
    return ti


def write_entries_tar(out: IO[bytes], entries: Iterable[Entry]) -> None:
    """Write ``entries`` (in the given order) as an uncompressed PAX tar."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = _tarinfo_for(e)
            tf.addfile(ti, io.BytesIO(e.data) if ti.type == tarfile.REGTYPE else None)


_SKIP_XATTR_PREFIXES = ("trusted.overlay.", "security.selinux")


def _read_xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for n in sorted(names):
        if n.startswith(_SKIP_XATTR_PREFIXES):
            continue
        with contextlib.suppress(OSError):
            out[n] = os.getxattr(path, n, follow_symlinks=False)
    return out


def _walk_sorted(root: Path) -> Iterator[tuple[str, str]]:
    """Yield (relative path, absolute path) depth-first in sorted order, parents first
    (the order of Go's filepath.Walk, used by docker/containerd)."""

    def walk(rel: str, absdir: str) -> Iterator[tuple[str, str]]:
        with os.scandir(absdir) as it:
            names = sorted(d.name for d in it)
        for name in names:
            r = _join(rel, name)
            a = os.path.join(absdir, name)
            yield r, a
            if stat.S_ISDIR(os.lstat(a).st_mode):
                yield from walk(r, a)

    return walk("", str(root))


def write_dir_tar(out: IO[bytes], src: Path, *, xattrs: bool = True) -> None:
    """Tar the tree ``src`` (not including ``src`` itself) as a layer.

    Sorted, PAX, numeric owners, hardlinks detected by inode, xattrs kept
    (except overlay/selinux ones), sockets skipped. Whiteout files
    (``.wh.*``) already in the tree are copied as-is.
    """
    seen: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for rel, path in _walk_sorted(src):
            st = os.lstat(path)
            ti = _TarInfo(rel)
            ti.mode = stat.S_IMODE(st.st_mode)
            ti.uid, ti.gid = st.st_uid, st.st_gid
            ti.uname = ti.gname = ""
            ti.mtime = int(st.st_mtime)
            if xattrs:
                ti.pax_headers = _xattr_pax(_read_xattrs(path))
            fm = st.st_mode
            if stat.S_ISREG(fm):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = seen[key]
                    tf.addfile(ti)
                    continue
                if st.st_nlink > 1:
                    seen[key] = rel
                ti.type = tarfile.REGTYPE
                ti.size = st.st_size
                with open(path, "rb") as f:
                    tf.addfile(ti, f)
                continue
            if stat.S_ISDIR(fm):
                ti.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(fm):
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.readlink(path)
            elif stat.S_ISCHR(fm) or stat.S_ISBLK(fm):
                ti.type = tarfile.CHRTYPE if stat.S_ISCHR(fm) else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif stat.S_ISFIFO(fm):
                ti.type = tarfile.FIFOTYPE
            else:  # sockets, doors...
                continue
            tf.addfile(ti)


# --------------------------------------------------------------------------- layers


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.h.update(mv)
        self.f.write(mv)
        self.n += len(mv)
        return len(mv)


@dataclass(frozen=True)
class Layer:
    """A layer blob on disk plus its descriptor data."""

    blob: Path
    digest: str  # sha256:... of the blob (compressed)
    diff_id: str  # sha256:... of the uncompressed tar
    size: int  # blob size
    compression: Compression
    media_type: str
    entries: tuple[Entry, ...] | None = None  # when built from entries
    comment: str = ""

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def read_blob(self) -> bytes:
        return self.blob.read_bytes()

    @contextlib.contextmanager
    def open_tar_stream(self) -> Iterator[IO[bytes]]:
        """The uncompressed tar as a readable stream."""
        with open(self.blob, "rb") as raw:
            if self.compression == "none":
                yield raw
            elif self.compression == "gzip":
                import gzip

                with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                    yield gz  # type: ignore[misc]
            else:
                import zstandard

                with zstandard.ZstdDecompressor().stream_reader(raw) as zr:
                    yield zr

    def tar_bytes(self) -> bytes:
        with self.open_tar_stream() as s:
            return s.read()

    def members(self) -> list[tarfile.TarInfo]:
        with self.open_tar_stream() as s, tarfile.open(fileobj=s, mode="r|") as tf:
            return list(tf)

    def to_json(self) -> dict[str, Any]:
        return {
            "blob": self.blob.name,
            "digest": self.digest,
            "diff_id": self.diff_id,
            "size": self.size,
            "compression": self.compression,
            "media_type": self.media_type,
            "comment": self.comment,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], blob_dir: Path) -> Layer:
        return cls(
            blob=blob_dir / d["blob"],
            digest=d["digest"],
            diff_id=d["diff_id"],
            size=d["size"],
            compression=d["compression"],
            media_type=d["media_type"],
            comment=d.get("comment", ""),
        )


def _compress(src: IO[bytes], dst: IO[bytes], compression: Compression) -> None:
    if compression == "none":
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
    elif compression == "gzip":
        try:
            from isal import igzip

            gz: Any = igzip.IGzipFile(fileobj=dst, mode="wb", compresslevel=2, mtime=0)  # type: ignore[no-untyped-call]
        except ImportError:  # pragma: no cover
            import gzip

            gz = gzip.GzipFile(fileobj=dst, mode="wb", compresslevel=6, mtime=0)
        with gz:
            shutil.copyfileobj(src, gz, _COPY_CHUNK)
    elif compression == "zstd":
        import zstandard

        zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
    else:
        raise ValueError(f"unknown compression {compression!r}")


def _make_layer(
    workdir: Path,
    write_tar: Any,
    compression: Compression,
    entries: tuple[Entry, ...] | None,
    comment: str,
) -> Layer:
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir) as tmp:
        hw = _HashingWriter(tmp)
        write_tar(hw)
        diff_id = "sha256:" + hw.h.hexdigest()
        tmp.seek(0)
        fd, tmpname = tempfile.mkstemp(dir=workdir, prefix=".blob-")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb") as out:
                bw = _HashingWriter(out)
                _compress(tmp, bw, compression)  # type: ignore[arg-type]
            digest = "sha256:" + bw.h.hexdigest()
            blob = workdir / digest.split(":", 1)[1]
            os.replace(tmpname, blob)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmpname)
            raise
    return Layer(
        blob=blob,
        digest=digest,
        diff_id=diff_id,
        size=bw.n,
        compression=compression,
        media_type=MT_OCI_LAYER[compression],
        entries=entries,
        comment=comment,
    )


def layer_from_entries(
    entries: Sequence[Entry],
    workdir: Path,
    *,
    compression: Compression = "gzip",
    comment: str = "",
) -> Layer:
    """A layer whose tar holds exactly ``entries``, in that order."""
    ents = tuple(entries)
    return _make_layer(
        workdir, lambda out: write_entries_tar(out, ents), compression, ents, comment
    )


def layer_from_raw(
    write_tar: Callable[[IO[bytes]], None], workdir: Path, *,
    compression: Compression = "gzip",
) -> Layer:
    """A layer from a function that writes raw tar bytes: for hostile layers that
    the Entry model refuses to describe (``..`` paths and the like)."""
    return _make_layer(workdir, write_tar, compression, None, "raw")


def layer_from_dir(
    src: Path,
    workdir: Path,
    *,
    compression: Compression = "gzip",
    xattrs: bool = True,
    comment: str = "",
) -> Layer:
    """A layer from the directory tree ``src`` (see `write_dir_tar`)."""
    return _make_layer(
        workdir,
        lambda out: write_dir_tar(out, Path(src), xattrs=xattrs),
        compression,
        None,
        comment or f"from {src}",
    )


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageConfig:
    cmd: list[str] | None = field(default_factory=lambda: ["/bin/sh"])
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH_ENV])
    working_dir: str = "/"
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    architecture: str = field(default_factory=host_arch)
    os: str = "linux"

    def to_json(self, layers: Sequence[Layer]) -> dict[str, Any]:
        cfg: dict[str, Any] = {"Env": list(self.env), "WorkingDir": self.working_dir}
        if self.cmd is not None:
            cfg["Cmd"] = list(self.cmd)
        if self.entrypoint is not None:
            cfg["Entrypoint"] = list(self.entrypoint)
        if self.user:
            cfg["User"] = self.user
        if self.labels:
            cfg["Labels"] = dict(self.labels)
        return {
            "created": CREATED,
            "architecture": self.architecture,
            "os": self.os,
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [lyr.diff_id for lyr in layers]},
            "history": [
                {"created": CREATED, "created_by": lyr.comment or f"lamina test layer {i}"}
                for i, lyr in enumerate(layers)
            ],
        }


@dataclass(frozen=True)
class ImageRef:
    """What `build_oci_layout` wrote."""

    layout: Path
    ref_name: str
    index_digest: str  # digest of index.json's bytes (not a blob)
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layers: tuple[Layer, ...]
    config: dict[str, Any]

    @property
    def diff_ids(self) -> list[str]:
        return [lyr.diff_id for lyr in self.layers]

    @property
    def oci_ref(self) -> str:
        """For skopeo: ``oci:<dir>:<ref>``."""
        return f"oci:{self.layout}:{self.ref_name}"

    def blob_path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        return self.layout / "blobs" / algo / hexd


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put_blob(layout: Path, data: bytes) -> str:
    d = _sha256(data)
    p = layout / "blobs" / "sha256" / d.split(":", 1)[1]
    if not p.exists():
        p.write_bytes(data)
    return d


def _copy_blob(layout: Path, layer: Layer) -> None:
    p = layout / "blobs" / "sha256" / layer.digest.split(":", 1)[1]
    if not p.exists():
        tmp = p.with_name(p.name + ".tmp")
        shutil.copyfile(layer.blob, tmp)
        os.replace(tmp, p)


def build_oci_layout(
    dest: Path,
    layers: Sequence[Layer],
    *,
    config: ImageConfig | None = None,
    ref_name: str = "test:latest",
    annotations: Mapping[str, str] | None = None,
) -> ImageRef:
    """Write (or add a tag to) an OCI image layout directory at ``dest``.

    An existing layout is extended: its index gets one more manifest (an old
    entry with the same ref name is replaced).
    """
    config = config or ImageConfig()
    dest = Path(dest)
    (dest / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": MT_OCI_LAYOUT_VERSION}))
    for lyr in layers:
        _copy_blob(dest, lyr)
    cfg = config.to_json(layers)
    cfg_bytes = _canonical_json(cfg)
    cfg_digest = _put_blob(dest, cfg_bytes)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": cfg_digest, "size": len(cfg_bytes)},
        "layers": [lyr.descriptor() for lyr in layers],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    man_bytes = _canonical_json(manifest)
    man_digest = _put_blob(dest, man_bytes)

    index_path = dest / "index.json"
    manifests: list[dict[str, Any]] = []
    if index_path.exists():
        old = json.loads(index_path.read_text())
        manifests = [
            m
            for m in old.get("manifests", [])
            if m.get("annotations", {}).get(ANNOTATION_REF_NAME) != ref_name
        ]
    manifests.append(
        {
            "mediaType": MT_OCI_MANIFEST,
            "digest": man_digest,
            "size": len(man_bytes),
            "annotations": {ANNOTATION_REF_NAME: ref_name},
            "platform": {"architecture": config.architecture, "os": config.os},
        }
    )
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests}
    index_bytes = json.dumps(index, indent=2).encode()
    index_path.write_bytes(index_bytes)
    return ImageRef(
        layout=dest,
        ref_name=ref_name,
        index_digest=_sha256(index_bytes),
        manifest_digest=man_digest,
        manifest_size=len(man_bytes),
        config_digest=cfg_digest,
        layers=tuple(layers),
        config=cfg,
    )


def as_tar(layout_dir: Path, tar_path: Path) -> Path:
    """Pack an OCI layout directory into a tarball (``ctr import`` style)."""
    layout_dir = Path(layout_dir)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tar_path, "wb") as out:
        _write_tree_simple(out, layout_dir)
    return tar_path


def _write_tree_simple(out: IO[bytes], root: Path) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for rel, path in _walk_sorted(root):
            st = os.lstat(path)
            ti = _TarInfo(rel)
            ti.mtime = DEFAULT_MTIME
            ti.uname = ti.gname = ""
            if stat.S_ISDIR(st.st_mode):
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            elif stat.S_ISREG(st.st_mode):
                ti.type, ti.mode, ti.size = tarfile.REGTYPE, 0o644, st.st_size
                with open(path, "rb") as f:
                    tf.addfile(ti, f)


@dataclass(frozen=True)
class DockerArchive:
    path: Path
    repo_tag: str
    config_digest: str
    diff_ids: tuple[str, ...]


def build_docker_save(
    dest_tar: Path,
    layers: Sequence[Layer],
    repo_tag: str = "test:latest",
    *,
    config: ImageConfig | None = None,
) -> DockerArchive:
    """Write a classic ``docker save`` tarball.

    Layout: ``manifest.json``, ``<config hex>.json``, ``<layer id>/{VERSION,json,layer.tar}``
    (layer.tar uncompressed), ``repositories``.
    """
    config = config or ImageConfig()
    cfg = config.to_json(layers)
    cfg_bytes = _canonical_json(cfg)
    cfg_digest = _sha256(cfg_bytes)
    cfg_name = cfg_digest.split(":", 1)[1] + ".json"
    repo, _, tag = repo_tag.rpartition(":")
    if not repo or "/" in tag:
        repo, tag = repo_tag, "latest"

    dest_tar = Path(dest_tar)
    dest_tar.parent.mkdir(parents=True, exist_ok=True)
    layer_ids: list[str] = []
    parent = ""
    for lyr in layers:
        lid = hashlib.sha256(f"{parent} {lyr.diff_id}".encode()).hexdigest()
        layer_ids.append(lid)
        parent = lid
    manifest = [
        {
            "Config": cfg_name,
            "RepoTags": [f"{repo}:{tag}"],
            "Layers": [f"{lid}/layer.tar" for lid in layer_ids],
        }
    ]
    repositories = {repo: {tag: layer_ids[-1]}} if layer_ids else {}

    def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        ti = _TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, DEFAULT_MTIME
        ti.uname = ti.gname = ""
        tf.addfile(ti, io.BytesIO(data))

    with (
        open(dest_tar, "wb") as out,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf,
    ):
        for i, (lid, lyr) in enumerate(zip(layer_ids, layers, strict=True)):
            d = _TarInfo(lid)
            d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, DEFAULT_MTIME
            tf.addfile(d)
            add_bytes(tf, f"{lid}/VERSION", b"1.0")
            v1: dict[str, Any] = {"id": lid, "created": CREATED, "os": config.os}
            if i:
                v1["parent"] = layer_ids[i - 1]
            add_bytes(tf, f"{lid}/json", _canonical_json(v1))
            with tempfile.TemporaryFile(dir=dest_tar.parent) as tmp:
                with lyr.open_tar_stream() as s:
                    shutil.copyfileobj(s, tmp, _COPY_CHUNK)
                ti = _TarInfo(f"{lid}/layer.tar")
                ti.size, ti.mode, ti.mtime = tmp.tell(), 0o644, DEFAULT_MTIME
                ti.uname = ti.gname = ""
                tmp.seek(0)
                tf.addfile(ti, tmp)
        add_bytes(tf, cfg_name, cfg_bytes)
        add_bytes(tf, "manifest.json", json.dumps(manifest).encode())
        add_bytes(tf, "repositories", json.dumps(repositories).encode())
    return DockerArchive(
        path=dest_tar,
        repo_tag=f"{repo}:{tag}",
        config_digest=cfg_digest,
        diff_ids=tuple(lyr.diff_id for lyr in layers),
    )


# --------------------------------------------------------------------------- caching


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _unmount_under(root: Path) -> None:
    """Lazily unmount every mount at or below ``root`` (deepest first)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prefix = os.path.realpath(root)
    mps: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                mps.append(mp)
    for mp in sorted(mps, key=lambda p: p.count("/"), reverse=True):
        libc.umount2(mp.encode(), 2)  # MNT_DETACH


def debootstrap_rootfs(
    cache_dir: Path, *, suite: str = DEBIAN_SUITE, variant: str = "minbase"
) -> Path:
    """A Debian ``suite`` rootfs built by debootstrap, cached in ``cache_dir``.

    Built once per machine (an fcntl lock serialises concurrent callers); the
    returned directory is shared: treat it as READ-ONLY (copy it or build a
    layer from it). Needs root and network access to the apt mirror.
    """
    base = Path(cache_dir) / f"debootstrap-{suite}-{variant}-{host_arch()}"
    rootfs = base / "rootfs"
    done = base / "complete"
    if done.exists():
        return rootfs
    with _locked(Path(cache_dir) / f".{base.name}.lock"):
        if done.exists():
            return rootfs
        if shutil.which("debootstrap") is None:
            raise RuntimeError("debootstrap is not installed")
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix="build-"))
        tmp.chmod(0o755)
        cmd = [
            "debootstrap",
            f"--variant={variant}",
            f"--arch={host_arch()}",
        ]
        if os.path.exists(DEBIAN_KEYRING):
            cmd.append(f"--keyring={DEBIAN_KEYRING}")
        cmd += [suite, str(tmp), debian_mirror()]
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                log = tmp / "debootstrap" / "debootstrap.log"
                detail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
                raise RuntimeError(
                    f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{detail}"
                )
        except BaseException:
            _unmount_under(tmp)
            shutil.rmtree(base, ignore_errors=True)
            raise
        _unmount_under(tmp)
        # apt caches are not part of an image
        for p in (tmp / "var/cache/apt/archives").glob("*.deb"):
            p.unlink()
        for sub in ("var/lib/apt/lists",):
            for p in (tmp / sub).glob("*"):
                if p.is_file():
                    p.unlink()
        os.rename(tmp, rootfs)
        done.write_text(json.dumps({"suite": suite, "variant": variant, "cmd": cmd}))
        return rootfs


def debootstrap_layer(cache_dir: Path, *, compression: Compression = "gzip") -> Layer:
    """The `debootstrap_rootfs` tree as one layer, cached (blob + json) in ``cache_dir``."""
    rootfs = debootstrap_rootfs(cache_dir)
    blobs = Path(cache_dir) / "layers"
    meta = blobs / f"{rootfs.parent.name}.{compression}.json"
    with _locked(Path(cache_dir) / ".layers.lock"):
        if meta.exists():
            lyr = Layer.from_json(json.loads(meta.read_text()), blobs)
            if lyr.blob.exists() and lyr.blob.stat().st_size == lyr.size:
                return lyr
        lyr = layer_from_dir(
            rootfs, blobs, compression=compression, comment=f"debootstrap {rootfs.parent.name}"
        )
        meta.write_text(json.dumps(lyr.to_json()))
        return lyr


# --------------------------------------------------------------------------- minimal rootfs

MINIMAL_BINARIES = ("sh", "echo", "cat", "sleep", "ls", "touch", "mkdir", "rm", "true", "env")


def _ldd_deps(binary: str) -> list[str]:
    proc = subprocess.run(
        ["ldd", binary], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:  # static binaries: "not a dynamic executable"
        return []
    out: list[str] = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(0x", line) or re.match(r"(/\S+) \(0x", line)
        if m:
            out.append(m.group(1))
    return out


def minimal_rootfs(dest: Path, binaries: Sequence[str] = MINIMAL_BINARIES) -> Path:
    """A tiny runnable rootfs: host ``binaries`` (looked up in PATH) + their libs.

    Binaries land in ``/bin``; shared libraries at the paths ldd reports
    (the dynamic loader included); ``/proc /sys /dev /tmp /etc`` exist, with a
    small ``/etc/passwd`` and ``/etc/group``. Good for fast runc tests.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "root", "run"):
        (dest / d).mkdir(exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    libs: set[str] = set()
    for name in binaries:
        src = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if src is None:
            raise FileNotFoundError(f"host binary {name!r} not found")
        shutil.copy2(os.path.realpath(src), dest / "bin" / name)
        libs.update(_ldd_deps(src))
    for lib in sorted(libs):
        target = dest / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(lib), target)
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    return dest


def minimal_layer(workdir: Path, *, compression: Compression = "gzip") -> Layer:
    """`minimal_rootfs` as a single layer."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir) as td:
        root = minimal_rootfs(Path(td) / "rootfs")
        return layer_from_dir(root, workdir, compression=compression, comment="minimal")


# --------------------------------------------------------------------------- expectations


@dataclass
class ExpectedTree:
    """The state a stack of entry layers should produce (paths they touch).

    ``entries``: path -> final Entry (hardlinks resolved to their target's
    data, see ``links``); ``removed``: paths that must not exist.
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    links: dict[str, str] = field(default_factory=dict)  # hardlink path -> target path

    def verify(self, root: Path, *, check_mtime: bool = True) -> None:
        """Assert that the tree at ``root`` matches; raises AssertionError listing all diffs."""
        errors: list[str] = []
        root = Path(root)
        for rel, e in sorted(self.entries.items()):
            errors.extend(_check_entry(root, rel, e, check_mtime))
        for rel in sorted(self.removed):
            if os.path.lexists(root / rel):
                errors.append(f"{rel}: should have been removed")
        for rel, tgt in sorted(self.links.items()):
            with contextlib.suppress(FileNotFoundError):
                a, b = os.lstat(root / rel), os.lstat(root / tgt)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    errors.append(f"{rel}: not a hardlink of {tgt}")
        if errors:
            raise AssertionError("tree mismatch:\n  " + "\n  ".join(errors))


_KIND_TEST = {
    "file": stat.S_ISREG,
    "dir": stat.S_ISDIR,
    "symlink": stat.S_ISLNK,
    "char": stat.S_ISCHR,
    "block": stat.S_ISBLK,
    "fifo": stat.S_ISFIFO,
}


def _check_entry(root: Path, rel: str, e: Entry, check_mtime: bool) -> list[str]:
    p = root / rel
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return [f"{rel}: missing"]
    errs: list[str] = []
    if not _KIND_TEST[e.kind](st.st_mode):
        return [f"{rel}: expected {e.kind}, found mode {oct(st.st_mode)}"]
    if e.kind != "symlink" and stat.S_IMODE(st.st_mode) != e.mode & 0o7777:
        errs.append(f"{rel}: mode {oct(stat.S_IMODE(st.st_mode))} != {oct(e.mode & 0o7777)}")
    if (st.st_uid, st.st_gid) != (e.uid, e.gid):
        errs.append(f"{rel}: owner {st.st_uid}:{st.st_gid} != {e.uid}:{e.gid}")
    if e.kind == "file" and p.read_bytes() != e.data:
        errs.append(f"{rel}: content differs ({st.st_size} bytes vs {len(e.data)})")
    if e.kind == "symlink" and os.readlink(p) != e.target:
        errs.append(f"{rel}: symlink -> {os.readlink(p)!r} != {e.target!r}")
    if e.kind in ("char", "block") and (os.major(st.st_rdev), os.minor(st.st_rdev)) != (
        e.devmajor,
        e.devminor,
    ):
        errs.append(f"{rel}: device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    if check_mtime and e.kind != "dir" and int(st.st_mtime) != e.mtime:
        errs.append(f"{rel}: mtime {int(st.st_mtime)} != {e.mtime}")
    if e.kind != "symlink":
        errs.extend(_check_xattrs(p, rel, e.xattrs))
    return errs


def _check_xattrs(p: Path, rel: str, want: Mapping[str, bytes]) -> list[str]:
    """Expected xattrs must match; no extra user.* / trusted.* ones allowed."""
    errs: list[str] = []
    for k, v in want.items():
        try:
            got = os.getxattr(p, k, follow_symlinks=False)
        except OSError as exc:
            errs.append(f"{rel}: xattr {k} missing ({exc.strerror})")
            continue
        if got != v:
            errs.append(f"{rel}: xattr {k} = {got!r} != {v!r}")
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        names = []
    extra = sorted(
        n
        for n in names
        if n.startswith(("user.", "trusted."))
        and not n.startswith("trusted.overlay.")
        and n not in want
    )
    if extra:
        errs.append(f"{rel}: unexpected xattrs {extra}")
    return errs


def expected_tree(layers: Sequence[Sequence[Entry]]) -> ExpectedTree:
    """Model the OCI apply semantics for entry layers (lowest first)."""
    t = ExpectedTree()

    def drop(path: str, *, include_self: bool) -> None:
        def hit(k: str) -> bool:
            return k.startswith(path + "/") or (include_self and k == path)

        for k in [k for k in t.entries if hit(k)]:
            del t.entries[k]
            t.removed.add(k)
        for k in [k for k in t.links if hit(k)]:
            del t.links[k]

    for layer in layers:
        # whiteouts and opaque markers apply to what lower layers produced
        for e in layer:
            if e.kind == "whiteout":
                drop(e.path, include_self=True)
                t.removed.add(e.path)
            elif e.kind == "opaque":
                drop(e.path, include_self=False)
        for e in layer:
            if e.kind in ("whiteout", "opaque"):
                continue
            old = t.entries.get(e.path)
            if old is not None and not (old.kind == "dir" and e.kind == "dir"):
                drop(e.path, include_self=True)
            # the new path and its ancestors exist again
            t.removed = {r for r in t.removed if r != e.path and not e.path.startswith(r + "/")}
            if e.kind == "hardlink":
                tgt = t.entries.get(e.target)
                if tgt is None:
                    raise ValueError(f"hardlink {e.path} -> unknown {e.target}")
                t.entries[e.path] = dataclasses.replace(tgt, path=e.path)
                t.links[e.path] = t.links.get(e.target, e.target)
            else:
                t.entries[e.path] = e
    return t


# --------------------------------------------------------------------------- rich image


def _pseudo_random(n: int, seed: bytes = b"lamina") -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:n])


LONG_NAME = "lamina/long/" + "d" * 60 + "/" + "f" * 120 + ".txt"


def rich_entries() -> list[list[Entry]]:
    """The entry lists of the `rich_layers` image (lowest first).

    Everything lives under ``/lamina`` except ``etc/issue.net`` (a base file,
    whited out) and ``etc/lamina-release``.
    """
    caps = vfs_cap_v2((1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_RAW))
    l1 = [
        Dir("lamina"),
        File("lamina/file.txt", "hello lamina\n", uid=1000, gid=1000),
        File("lamina/exec.sh", "#!/bin/sh\necho ok\n", 0o755),
        File("lamina/empty", b""),
        File("lamina/big.bin", _pseudo_random(1 << 20), 0o640, uid=33, gid=33),
        File(
            "lamina/xattr.txt",
            "x\n",
            xattrs={"user.lamina.a": b"alpha", "trusted.lamina": b"\x00\x01binary\xff"},
        ),
        File(
            "lamina/cap-bin", "not really a binary\n", 0o755, xattrs={"security.capability": caps}
        ),
        File("lamina/suid", "suid\n", 0o4755),
        File("lamina/sgid", "sgid\n", 0o2755, gid=50),
        Dir("lamina/sticky", 0o1777),
        Dir("lamina/sgid-dir", 0o2775, gid=50, xattrs={"user.dir": b"d"}),
        File("lamina/ro", "read only\n", 0o400, uid=65534, gid=65534),
        File("lamina/odd name ünï☃.txt", "unicode\n"),
        Dir("lamina/long"),
        Dir("lamina/long/" + "d" * 60),
        File(LONG_NAME, "long path\n"),
        Symlink("lamina/link-rel", "file.txt"),
        Symlink("lamina/link-abs", "/lamina/file.txt"),
        Symlink("lamina/link-dangling", "does/not/exist"),
        Symlink("lamina/link-dir", "sticky", uid=1000, gid=1000),
        Dir("lamina/hl"),
        File("lamina/hl/a", "hardlinked\n", 0o644, uid=7, gid=7),
        Hardlink("lamina/hl/b", "lamina/hl/a", uid=7, gid=7),
        Hardlink("lamina/hl/c", "lamina/hl/a", uid=7, gid=7),
        File("lamina/hl/g2", "group two\n"),
        Dir("lamina/other"),
        Hardlink("lamina/other/g2-link", "lamina/hl/g2"),
        Dir("lamina/dev"),
        CharDev("lamina/dev/null-like", 1, 3),
        BlockDev("lamina/dev/loop-like", 7, 200),
        Fifo("lamina/dev/fifo", 0o620),
        Dir("lamina/opaque-me"),
        File("lamina/opaque-me/a", "a\n"),
        File("lamina/opaque-me/b", "b\n"),
        Dir("lamina/opaque-me/sub"),
        File("lamina/opaque-me/sub/c", "c\n"),
        Dir("lamina/gone-dir"),
        File("lamina/gone-dir/x", "x\n"),
        Dir("lamina/gone-dir/y"),
        File("lamina/gone-dir/y/z", "z\n"),
        File("lamina/gone-file", "bye\n"),
        File("lamina/f2d", "file that becomes a dir\n"),
        Dir("lamina/d2f"),
        File("lamina/d2f/child", "child of a dir that becomes a file\n"),
        Dir("lamina/d2f/sub"),
        File("lamina/replace-me", "version 1\n"),
        Symlink("lamina/link-replaced", "file.txt"),
        Dir("etc"),
        File("etc/lamina-release", "lamina test image 1\n"),
    ]
    l2 = [
        Dir("etc"),
        Whiteout("etc/issue.net"),
        File("etc/lamina-release", "lamina test image 2\n"),
        Dir("lamina"),
        Whiteout("lamina/gone-file"),
        Whiteout("lamina/gone-dir"),
        Dir("lamina/opaque-me", 0o750),
        Opaque("lamina/opaque-me"),
        File("lamina/opaque-me/new", "only this survives\n"),
        Dir("lamina/f2d", 0o711),
        File("lamina/f2d/inside", "now a dir\n"),
        File("lamina/d2f", "now a file\n", 0o600),
        File("lamina/replace-me", "version 2, longer than before\n", 0o600, uid=1, gid=2),
        File("lamina/link-replaced", "symlink became a file\n"),
        Hardlink("lamina/hl-lower", "lamina/file.txt", uid=1000, gid=1000),
    ]
    l3 = [
        Dir("lamina", 0o755),
        Dir("lamina/gone-dir", 0o700),
        File("lamina/gone-dir/new", "recreated after whiteout\n"),
        File(
            "lamina/xattr.txt",
            "x v2\n",
            xattrs={"user.lamina.a": b"alpha-2", "user.lamina.b": b"beta"},
        ),
        Symlink("lamina/f2d/inside-link", "inside"),
    ]
    return [l1, l2, l3]


def rich_layers(workdir: Path, *, compression: Compression = "gzip") -> list[Layer]:
    """The rich test layers (to go on top of `debootstrap_layer`).

    Exercises every tar entry kind, xattrs (user, trusted, security.capability),
    setuid/setgid/sticky, hardlink groups (and a link to a lower layer's file),
    file and directory whiteouts, an opaque directory, file->dir and dir->file
    type changes, a replaced file and re-creation after a whiteout. See
    `RICH_EXPECTED` for the resulting state.
    """
    return [
        layer_from_entries(ents, workdir, compression=compression, comment=f"rich layer {i + 1}")
        for i, ents in enumerate(rich_entries())
    ]


#: What the rich layers must produce (on any base): `RICH_EXPECTED.verify(rootfs)`.
RICH_EXPECTED = expected_tree(rich_entries())
