"""Image operations on one lamina root: import, export, pull, push, tag, unpack,
mount, remove.

This is the library face the CLI (and containers) use; each operation is a
few calls into the content store, the image store and a snapshotter, or, for
pull and push, the protocol layer below (:mod:`lamina.remotes`): a resolver,
fetches and uploads. Every walk over an image's descriptors is
:mod:`lamina.images.graph`'s, and every unpack is built by
:func:`lamina.images.unpack.unpacker_for`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING

from lamina.archive.limits import DEFAULT_MAX_LAYER_SIZE
from lamina.content.digest import sha256
from lamina.errors import NotFound
from lamina.images import names
from lamina.images.catalog import Catalog
from lamina.labels import GC_REF_SNAPSHOT
from lamina.metadata.images import Image
from lamina.metadata.root import Root
from lamina.snapshots import Snapshotter
from lamina.util.progress import Progress

if TYPE_CHECKING:
    from lamina.images.pull import PullResult
    from lamina.images.push import PushResult
    from lamina.images.unpack import UnpackResult
    from lamina.metadata.leases import LeasedContent
    from lamina.oci.types import Descriptor, ImageConfig, Manifest
    from lamina.remotes.registry import Registry

__all__ = ["ImageService"]


class ImageService:
    """Images of ``root``, unpacked into the snapshotter named ``snapshotter``."""

    def __init__(
        self,
        root: Root,
        *,
        snapshotter: str = "overlay",
        snapshots: Snapshotter | None = None,
        progress: Progress | None = None,
        max_layer_size: int = DEFAULT_MAX_LAYER_SIZE,
        sync: bool = True,
    ) -> None:
        """``max_layer_size``: the uncompressed bytes one layer may expand to
        when it is unpacked (ResourceExhausted beyond). ``sync``: each unpacked
        layer is made durable before its snapshot is committed (see
        :class:`~lamina.images.unpack.Unpacker`)."""
        self.root = root
        self.max_layer_size = max_layer_size
        self.sync = sync
        self.snapshotter_name = snapshotter
        self._snapshots = snapshots
        self.progress = progress or Progress()
        self.images = root.images()
        self.content = root.content()

    @property
    def snapshots(self) -> Snapshotter:
        if self._snapshots is None:
            self._snapshots = self.root.snapshotter(self.snapshotter_name)
        return self._snapshots

    def close(self) -> None:
        """Nothing to release: the stores belong to the root."""

    def get(self, name: str) -> Image:
        return self.images.get(name)

    @property
    def catalog(self) -> Catalog:
        """This root's images as ``image ls`` and ``image inspect`` read them (the
        same reading as a server's, through ``--address``)."""
        return Catalog(self.images, content=lambda: self.content,
                       snapshots=lambda: self.snapshots)

    @contextlib.contextmanager
    def _leased(self, purpose: str) -> Iterator[LeasedContent]:
        """Hold a lease for the block, so a concurrent ``gc`` keeps what it writes
        (and, through the yielded store, the stored blobs it reuses)."""
        from lamina.metadata.leases import LeasedContent

        leases = self.root.leases()
        with leases.held(purpose=purpose) as lease:
            yield LeasedContent(self.content, leases, lease.id)

    def resolve(self, name: str) -> tuple[Manifest, ImageConfig]:
        """The host platform's manifest and config of image ``name``."""
        # each operation imports its own stack: listing and removing images
        # import none of them (start-up time of every image command)
        from lamina.images.graph import manifest_for

        _, manifest, config = manifest_for(self.content, self.images.get(name).target)
        return manifest, config

    def import_(
        self,
        source: str | os.PathLike[str] | IO[bytes],
        *,
        unpack: bool = True,
        index_name: str | None = None,
    ) -> list[Image]:
        from lamina.images.importer import import_images

        with self._leased("import") as content:
            if not unpack:
                return import_images(source, content=content, images=self.images,
                                     index_name=index_name, progress=self.progress)
            from lamina.images.early_unpack import EarlyUnpack

            early = EarlyUnpack(self.content, self._unpack)
            try:
                imported = import_images(source, content=content, images=self.images,
                                         index_name=index_name, progress=self.progress,
                                         arrivals=early.arrivals, ready=early.ready)
            except BaseException:
                early.abandon()
                raise
            unpacked = early.finish()
            for image in imported:
                if image.name in unpacked:
                    continue
                with contextlib.suppress(NotFound):  # e.g. an index with no host manifest
                    self.unpack(image.name)
        return imported

    def unpack(self, name: str) -> UnpackResult:
        manifest, config = self.resolve(name)
        return self._unpack(manifest, config)

    def _unpack(self, manifest: Manifest, config: ImageConfig,
                open_layer: Callable[[Descriptor], IO[bytes]] | None = None) -> UnpackResult:
        from lamina.images.unpack import unpacker_for

        leases = self.root.leases()
        with leases.held(purpose="unpack") as lease:
            unpacker = unpacker_for(
                self.root, self.content, snapshotter=self.snapshotter_name,
                snapshots=self.snapshots, lease=lease.id, progress=self.progress,
                max_layer_size=self.max_layer_size, sync=self.sync, open_layer=open_layer)
            return unpacker.unpack(manifest, config)

    def chain_id(self, name: str) -> str:
        """The ChainID of image ``name``'s top layer (unpacking it if needed)."""
        return self.unpack(name).chain_id

    @staticmethod
    def _mount_key(target: str | os.PathLike[str]) -> str:
        real = os.path.realpath(target)
        return f"mount-{sha256(real.encode()).hexdigest()[:16]} {real}"

    def mount(self, name: str, target: str | os.PathLike[str], *, rw: bool = False,
              allow_suid: bool = False, allow_dev: bool = False) -> None:
        """Mount image ``name`` on ``target``: read-only unless ``rw``, ``nosuid``
        unless ``allow_suid``, ``nodev`` unless ``allow_dev``."""
        from lamina.mounts.mount import mount_all

        top = self.chain_id(name)
        os.makedirs(target, exist_ok=True)
        key = self._mount_key(target)
        # Like ctr: a lease referencing the snapshot keeps GC off it until unmount.
        leases = self.root.leases()
        leases.create(key.split()[0], expire=None, labels={
            f"{GC_REF_SNAPSHOT}{self.snapshotter_name}": key})
        try:
            mounts = (self.snapshots.prepare if rw else self.snapshots.view)(key, top)
            try:
                mount_all(mounts, target, allow_suid=allow_suid, allow_dev=allow_dev)
            except BaseException:
                self.snapshots.remove(key)
                raise
        except BaseException:
            leases.delete(key.split()[0])
            raise

    def unmount(self, target: str | os.PathLike[str], *, keep_snapshot: bool = False) -> None:
        from lamina.mounts.mount import unmount_all

        unmount_all(target)
        key = self._mount_key(target)
        if not keep_snapshot:
            with contextlib.suppress(NotFound):
                self.snapshots.remove(key)
            with contextlib.suppress(NotFound):
                self.root.leases().delete(key.split()[0])

    def export(self, names: Sequence[str], out: str | os.PathLike[str] | IO[bytes]) -> None:
        from lamina.images.exporter import export_images

        export_images([self.images.get(n) for n in names], out, content=self.content,
                      progress=self.progress)

    def pull(self, registry: Registry, reference: str, *, platforms: Sequence[str] = (),
             all_platforms: bool = False, unpack: bool = True,
             concurrency: int = 3) -> PullResult:
        """Pull ``reference`` from ``registry``, unpacking it while it downloads
        (see :mod:`lamina.images.pull`)."""
        from lamina.images.pull import pull  # the protocol stack, for the commands that use it

        # Opened before any blob is written: on a new root opening it syncs a new
        # database, and a sync while layers stream to the disk waits for their data
        # too (ext4 data=ordered): tens of ms on the way to the first layer.
        snapshots = self.snapshots if unpack else self._snapshots
        return pull(registry, reference, root=self.root, snapshotter=self.snapshotter_name,
                    snapshots=snapshots, platforms=platforms,
                    all_platforms=all_platforms, unpack=unpack, concurrency=concurrency,
                    progress=self.progress, max_layer_size=self.max_layer_size,
                    sync=self.sync)

    def push(self, registry: Registry, local: str, remote: str | None = None, *,
             concurrency: int = 3, chunk_size: int = 0, referrers: bool = True) -> PushResult:
        """Push image ``local`` to ``remote`` (default: its own name) on ``registry``
        (see :mod:`lamina.images.push`)."""
        from lamina.images.push import push  # the protocol stack, for the commands that use it

        return push(registry, local, remote, root=self.root, progress=self.progress,
                    concurrency=concurrency, chunk_size=chunk_size, referrers=referrers)

    def tag(self, source: str, target: str) -> Image:
        """Name image ``source`` also as ``target`` (kept as given); returns the new image."""
        return names.tag(self.root, source, target)

    def remove(self, name: str) -> None:
        self.images.delete(name)
