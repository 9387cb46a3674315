"""The erofs snapshotter: a committed layer is one EROFS image file.

``snapshots/<id>/`` holds, for a committed snapshot, ``layer.erofs`` (the
layer in overlayfs lower-layer form: whiteouts as 0/0 devices, opaque
directories marked), ``layer.sha256`` (the image's digest, recorded at
commit for ``lamina check --deep``: ``sha256:<hex> block0-last``, the sha256
of the image's bytes from byte 4096 on, then block 0, as
:mod:`lamina.erofs.digest` defines it so the writer hashes the image as it
writes it; a record of the plain form ``sha256:<hex>``, written before, is
the file's sha256 and still verified as such) and ``fs/``, where the image is mounted
read-only (``nosuid,nodev``), once, and shared by every snapshot above it.
Layer mounts are made on demand (whenever a snapshot's mounts are asked
for), so they come back by themselves after a reboot or a crash.

Active snapshots and views are overlays with those mounts as lowerdirs, as
on the overlay snapshotter (which this one extends): an active snapshot's
``fs/`` is its upper directory (``work/`` overlay's workdir), a view is an
overlay of lowerdirs only, its own empty ``fs/`` the bottom one (overlayfs
wants two). ``commit`` turns the upper directory into ``layer.erofs``
(:mod:`lamina.snapshots.erofs.convert`): written to a temporary file,
fsynced and renamed into place before the metadata commit; the upper tree is
emptied after it, and a mount point left non-empty by a crash in between is
emptied before the image is mounted on it.

:meth:`ErofsSnapshotter.prepare_stream` (the optional
:class:`~lamina.snapshots.LayerStreams` interface) writes a layer's image
straight from its tar stream, with no tree ever extracted: the active
snapshot it makes holds ``layer.erofs`` mounted on ``fs/`` as its top lower
layer, and an empty upper directory ``upper/``; committing it adopts the
image as it is.

``remove`` unmounts the layer and deletes the directory (one image file).
Mounts use a file-backed EROFS mount where the kernel has it, a loop device
otherwise (``backing``, see :mod:`lamina.mounts.erofs`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from lamina import rootless
from lamina.archive import limits
from lamina.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from lamina.fs.files import atomic_write, fsync_dir, locked, remove_tree
from lamina.fs.perms import FILE_MODE
from lamina.mounts.erofs import BACKINGS, is_mounted, mount_image, unmount_image
from lamina.mounts.mount import Mount, temp_mount
from lamina.problems import Problem, ProblemType
from lamina.snapshots import Kind, Usage
from lamina.snapshots.overlay import OverlaySnapshotter
from lamina.snapshots.storage import Snapshot
from lamina.util import crash

# The image writer, reader, converter and digest are imported by the methods that
# use them: GC, image rm and the container commands open this snapshotter only to
# mount or remove layers, and would pay ~12 ms of imports for them (startup).
if TYPE_CHECKING:
    from lamina.erofs.inode import RootMeta

__all__ = ["IMAGE", "ErofsSnapshotter", "check_erofs_support"]

IMAGE = "layer.erofs"
DIGEST = "layer.sha256"
_UPPER = "upper"  # a streamed active snapshot's upper directory
_CHECKED = ".erofs-supported"


def check_erofs_support(root: Path, *, backing: str = "auto") -> None:
    """Mount a tiny image under ``root``; Unavailable, in one line, where it fails."""
    if rootless.active():
        raise Unavailable("EROFS cannot be mounted in a user namespace "
                          "(rootless lamina keeps the overlay snapshotter)")
    import tempfile

    from lamina.erofs.image import write_metadata  # once per root (startup)
    from lamina.erofs.inode import new_dir

    # a name of its own: processes opening a fresh root together probe at once
    probe = Path(tempfile.mkdtemp(prefix="erofs-check-", dir=root))  # 0700
    try:
        # an empty image, never synced: nothing records it and it is deleted below
        # (a layer's writer would fsync it and its directory, slow while layers download)
        fd = os.open(probe / IMAGE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     FILE_MODE)
        try:
            write_metadata(fd, new_dir(0o755, 0, 0, None), data_end=1,
                           read_tail=lambda node, n: b"", uuid=bytes(16))
        finally:
            os.close(fd)
        (probe / "fs").mkdir()
        mount_image(probe / IMAGE, probe / "fs", backing=backing)
        unmount_image(probe / "fs")
    finally:
        remove_tree(probe)


class ErofsSnapshotter(OverlaySnapshotter):
    """Snapshots whose committed layers are EROFS images (see module docs)."""

    SHARED_REAP = True  # a removed layer is an unmount and an image file's unlink

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        async_remove: bool = False,
        mount_options: Sequence[str] = (),
        backing: str = "auto",
    ) -> None:
        if backing not in BACKINGS:
            raise ValueError(f"backing must be one of {', '.join(BACKINGS)}")
        if rootless.active():
            raise Unavailable("the erofs snapshotter cannot mount EROFS in a user namespace "
                              "(rootless lamina keeps the overlay snapshotter)")
        # Each layer is a filesystem of its own, whose inode numbers restart in every
        # image: xino makes overlay's inode numbers unique across them (else two
        # layers' files can share st_ino on one st_dev-less comparison).
        super().__init__(root, async_remove=async_remove,
                         mount_options=("xino=on", *mount_options))
        self.backing = backing
        if not (self.root / _CHECKED).exists():
            check_erofs_support(self.root, backing=backing)
            (self.root / _CHECKED).touch(mode=FILE_MODE)

    # -- layers ------------------------------------------------------------
    def image_path(self, key: str) -> Path:
        """The EROFS image of snapshot ``key`` (committed, or streamed active)."""
        return self._dirs / self.snapshot(key).id / IMAGE

    def _mount_layer(self, sid: str) -> Path:
        """The mounted layer of ``sid`` (mounted now if it is not: after a reboot)."""
        fs = self.fs_dir(sid)
        if is_mounted(fs):
            return fs
        image = fs.parent / IMAGE
        with locked(fs.parent / ".mount.lock"):  # one mount per layer across processes
            if is_mounted(fs):
                return fs
            if not image.is_file():
                raise NotFound(f"snapshot id {sid}: its layer image {image} is missing "
                               "(lamina check reports it)")
            if any(os.scandir(fs)):  # the upper tree of a commit cut short by a crash
                remove_tree(fs)
                fs.mkdir(mode=0o755)
            mount_image(image, fs, backing=self.backing)
        return fs

    def layer_dir(self, key: str) -> Path:
        """The snapshot's own files: the upper directory of an active snapshot, the
        mounted image of a committed one (:class:`LocalDirectories`)."""
        snap = self.snapshot(key)
        if snap.kind is Kind.COMMITTED or (self._dirs / snap.id / _UPPER).is_dir():
            return self._mount_layer(snap.id)
        return self.fs_dir(snap.id)

    # -- hooks ---------------------------------------------------------------
    def _fill(self, new_dir: Path, kind: Kind, parent_ids: Sequence[str]) -> None:
        if (new_dir / _UPPER).is_dir():
            return  # streamed: filled by prepare_stream
        if parent_ids:  # the root's attributes come from the top layer
            self._mount_layer(parent_ids[0])
        super()._fill(new_dir, kind, parent_ids)

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        own = self._dirs / snap.id
        lowers = [str(self._mount_layer(p)) for p in snap.parent_ids]
        if (own / _UPPER).is_dir():  # streamed: its image is the top lower layer
            lowers.insert(0, str(self._mount_layer(snap.id)))
            return [Mount("overlay", "overlay", options=(
                *self._extra, f"workdir={own / 'work'}", f"upperdir={own / _UPPER}",
                "lowerdir=" + ":".join(lowers)))]
        if snap.kind is Kind.VIEW and len(snap.parent_ids) == 1:
            # overlayfs mounts two lowerdirs or more: the view's own empty fs is the last
            # (not a bind of the layer: whiteouts and opaque marks must be honoured)
            lower = "lowerdir=" + ":".join([*lowers, str(own / "fs")])
            return [Mount("overlay", "overlay", options=(*self._extra, lower))]
        return super()._mounts(snap)

    # -- streamed layers (LayerStreams) ------------------------------------------
    @contextlib.contextmanager
    def _lower_tree(self, chain: Sequence[str], empty: Path) -> Iterator[str | None]:
        """The merged tree of layers ``chain`` (top first), mounted read-only."""
        if not chain:
            yield None
            return
        lowers = [str(self._mount_layer(p)) for p in chain]
        m = Mount("overlay", "overlay",
                  options=(*self._extra, "lowerdir=" + ":".join([*lowers, str(empty)])))
        with temp_mount([m], base=self.root / "tmpmounts") as target:
            yield target

    def prepare_stream(
        self,
        key: str,
        parent: str,
        stream: IO[bytes],
        *,
        expected_diff_id: str | None = None,
        max_size: int | None = limits.DEFAULT_MAX_LAYER_SIZE,
        labels: Mapping[str, str] | None = None,
        wait: Callable[[], None] | None = None,
        parent_root: Callable[[], object | None] | None = None,
        on_root: Callable[[object], None] | None = None,
    ) -> str:
        """Prepare active ``key`` on ``parent`` whose own layer is the layer read from
        ``stream``, written as an image with nothing extracted; returns its DiffID
        (:class:`~lamina.snapshots.LayerStreams`). The parent is needed only once
        the stream is read (the root's metadata, whiteouts hiding nothing are left
        out): ``wait`` is called then, before it is looked up. What ``parent_root``
        returns (the parent's :class:`~lamina.erofs.inode.RootMeta`, handed by its
        ``on_root``) stands for the parent's mounted root: the layer's metadata is
        then written while the parent is still being committed, and only a layer
        that must see its lowers' files (whiteouts, directories it implies) waits
        for the parent before it is written."""
        from lamina.erofs.inode import RootMeta
        from lamina.erofs.writer import write_image  # see the imports (startup)
        from lamina.snapshots.erofs.rootmeta import as_lower_root, root_meta

        with self.meta.read(self._scope) as tx:  # fail fast, before reading anything
            tx.check_new_key(key)
            if wait is None:
                tx.resolve_parent(parent, max_depth=self.MAX_DEPTH)
        chain: list[str] | None = None  # the parent's, once it is committed
        with self._new_dir() as new, contextlib.ExitStack() as lowers:
            fs = new / "fs"
            fs.mkdir(mode=0o755)

            def committed_parent() -> list[str]:
                """The parent's chain, waiting (once) for the parent's commit."""
                nonlocal chain
                if chain is None:
                    if wait is not None:
                        wait()
                    with self.meta.read(self._scope) as tx:
                        chain = list(tx.resolve_parent(parent, max_depth=self.MAX_DEPTH)[1])
                return chain

            def settle_root() -> RootMeta | None:
                given = parent_root() if parent_root is not None else None
                if isinstance(given, RootMeta):
                    return given
                below = committed_parent()
                return root_meta(self._mount_layer(below[0])) if below else None

            def settle_lower() -> str | None:
                return lowers.enter_context(self._lower_tree(committed_parent(), fs))

            def shown_root(meta: RootMeta) -> None:
                if on_root is not None:
                    on_root(as_lower_root(meta))

            written = write_image(stream, new / IMAGE, overlay=True,
                                  expected_diff_id=expected_diff_id, max_size=max_size,
                                  root=settle_root, drop_needless_whiteouts=True,
                                  lower=settle_lower, on_root=shown_root)
            lowers.close()
            committed_parent()  # the row below names the parent: it must be committed
            atomic_write(new / DIGEST, written.digest.encode() + b"\n", mode=FILE_MODE)
            crash.point("erofs.stream-written")
            (new / _UPPER).mkdir(mode=0o755)
            (new / "work").mkdir(mode=0o700)
            self._create(Kind.ACTIVE, key, parent, labels, staged=new)
        return written.diff_id

    # -- Snapshotter -------------------------------------------------------------
    def commit(self, name: str, key: str, *, labels: Mapping[str, str] | None = None) -> None:
        with self.meta.read(self._scope) as tx:
            snap = tx.snapshot(key)
            if snap.kind is not Kind.ACTIVE:
                raise FailedPrecondition(
                    f"snapshot {key!r} is a {snap.kind.value}, only active ones commit")
            tx.check_new_key(name)
        own = self._dirs / snap.id
        image = own / IMAGE
        streamed = (own / _UPPER).is_dir()
        if streamed:
            if any(os.scandir(own / _UPPER)):
                raise FailedPrecondition(
                    f"snapshot {key!r} was written from a layer stream and changed through "
                    "its mounts since: only its layer as written can be committed")
            from lamina.erofs.reader import ErofsImage  # see the imports (startup)

            with ErofsImage(image) as img:
                usage = Usage(size=os.stat(image).st_blocks * 512, inodes=img.inos)
        else:
            from lamina.snapshots.erofs.convert import image_from_upper  # (startup)

            usage = self._upper_usage(own / "fs")
            written = image_from_upper(own / "fs", image)
            crash.point("erofs.image-written")
            atomic_write(own / DIGEST, written.digest.encode() + b"\n", mode=FILE_MODE)
        crash.point("commit.measured")
        with self.meta.write(self._scope) as tx:
            tx.commit(name, key, usage, labels)
        crash.point("commit.committed")
        # the upper tree is in the image now; fs/ becomes the image's mount point
        if streamed:
            for d in (own / _UPPER, own / "work"):
                remove_tree(d)
        else:
            remove_tree(own / "work")
            remove_tree(own / "fs")
            (own / "fs").mkdir(mode=0o755)
        fsync_dir(own)

    def _upper_usage(self, upper: Path) -> Usage:
        from lamina.snapshots.usage import disk_usage

        return disk_usage(upper)

    def _delete(self, path: Path) -> None:
        # A removed snapshot's directory is renamed with its layer mounted (as an
        # orphan is): unmounted here, where a collection deletes it off its path
        # (a thread, while the blobs go), and where a cut-short removal is finished.
        unmount_image(path / "fs")
        # a committed layer is these few entries: deleted by name, with no tree walk
        try:
            for name in (IMAGE, DIGEST, ".mount.lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path / name)
            os.rmdir(path / "fs")
            os.rmdir(path)
        except OSError:  # an active snapshot's trees, or a crash's leftovers
            super()._delete(path)

    def cleanup(self) -> None:
        with self.meta.read(self._scope) as tx:
            known = tx.ids()
        for entry in os.listdir(self._dirs):  # orphans are renamed with their mounts on
            if entry not in known and not entry.startswith(("new-", "rm-")):
                unmount_image(self._dirs / entry / "fs")
        super().cleanup()

    def check(self) -> list[Problem]:
        problems = super().check()
        with self.meta.read(self._scope) as tx:
            infos = [(i.name, tx.snapshot(i.name).id) for i in tx.all_infos()
                     if i.kind is Kind.COMMITTED]
        problems += [
            Problem(ProblemType.SNAPSHOT_MISSING_DIRECTORY, f"snapshot id {sid}",
                    f"snapshot id {sid} ({name}): its layer image {self._dirs / sid / IMAGE} "
                    "is missing")
            for name, sid in infos if not (self._dirs / sid / IMAGE).is_file()
        ]
        return problems

    def verify_layer(self, key: str) -> str:
        """What is wrong with committed ``key``'s image ("" if it has the digest
        recorded at commit): for ``lamina check --deep``."""
        from lamina.erofs.digest import file_digest, parse_record  # see the imports (startup)

        sid = self.snapshot(key).id
        image = self._dirs / sid / IMAGE
        try:
            record = (self._dirs / sid / DIGEST).read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return f"no digest was recorded for {image}"
        try:
            recorded, block0_last = parse_record(record)
        except InvalidArgument as exc:
            return f"{exc.message} in {self._dirs / sid / DIGEST}"
        try:
            found = file_digest(image, block0_last=block0_last)
        except FileNotFoundError:
            return f"its image {image} is missing"
        if found != recorded:
            return f"its image {image} has {found}, recorded {recorded}"
        return ""


