"""Unpack an image's layers into committed snapshots named by their ChainIDs.

For each layer, bottom up: if a snapshot named by the layer's ChainID exists
it is reused; otherwise the layer is applied into a new active snapshot on
the previous ChainID, its DiffID verified, and the snapshot committed under
the ChainID. A per-ChainID lock (a flock under the root) makes concurrent
unpacks — threads or processes — extract each layer once; the others wait
and reuse it. A layer that fails (bad DiffID, hostile tar) leaves no
snapshot: its active snapshot or staging directory is removed.

Limits: each layer may expand to ``max_layer_size`` uncompressed bytes
(ResourceExhausted beyond, naming the layer). Before extracting,
the sizes the layers announce (see
:func:`lamina.archive.compression.size_hint`) are compared with the free
space of the snapshotter's filesystem, so an unpack that cannot fit fails
with ResourceExhausted before writing anything (with ``open_layer``, as a
pull unpacking while it downloads, only the layers already in the content
store announce anything: the others are bounded as they arrive); while extracting, every
apply stops at the filesystem's reserve (:mod:`lamina.archive.limits`).

On a snapshotter with :class:`~lamina.snapshots.LayerStreams` (erofs), each
layer is handed to it as a stream and written as its snapshot's own layer
with nothing extracted, all layers at once, committed in order (a layer
that needs its lowers is applied on a mounted snapshot instead).

On overlay, layers are extracted in parallel straight into staging upper
directories (a layer's upperdir does not need its parents to be filled) and
committed in order as soon as their parent is; at most :data:`RUN_AHEAD` of
them wait for their parent at a time.

A snapshot the unpack finds already there is relied on from then on (as the
parent of the next layer, or as the image's top). With a ``hold`` callback
(recording it as a resource of the caller's lease) it is held *before* it is
looked up, so a concurrent garbage collection either keeps it or has removed
it already, and then the layer is extracted again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

from lamina.archive import limits
from lamina.archive.compression import size_hint, too_large
from lamina.archive.members import NeedsLowerLayers
from lamina.archive.whiteout import drop_needless_whiteouts
from lamina.content import set_labels, write_blob
from lamina.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from lamina.fs.files import locked, sync_filesystem
from lamina.labels import GC_REF_SNAPSHOT, LAYER_MTREE, SNAPSHOT_REF, UNCOMPRESSED
from lamina.mounts.mount import temp_mount
from lamina.mounts.overlay import overlay_xattr_prefix
from lamina.oci.identity import chain_ids
from lamina.oci.types import Descriptor, ImageConfig, Manifest
from lamina.snapshots import (
    Capability,
    LayerDigests,
    LayerStreams,
    LocalDirectories,
    Snapshotter,
    Staging,
)
from lamina.util import crash
from lamina.util.progress import Progress
from lamina.util.rawio import RawReader

# Extracting a layer into a directory (archive.apply) and its tree manifest
# (archive.mtree) are imported where they run: an erofs unpack writes images
# from the streams, and run or exec only check what is unpacked (startup).
if TYPE_CHECKING:
    from lamina.archive.apply import AppliedLayer
    from lamina.content import ContentStore
    from lamina.metadata.root import Root

__all__ = ["UnpackResult", "Unpacker", "unpacker_for"]

#: Layers a staged unpack extracts ahead of the one it commits next: each holds
#: its lock (a descriptor) and a staging directory until committed, so an image
#: of 1,500 layers stays within a 1,024-descriptor limit.
RUN_AHEAD = 16

_T = TypeVar("_T")


@dataclass(frozen=True)
class UnpackResult:
    chain_id: str
    extracted: int
    reused: int


class _Counting(RawReader):
    """A reader that reports how far a layer has been read."""

    def __init__(self, raw: IO[bytes], progress: Progress, item: str, total: int) -> None:
        super().__init__()
        self._raw, self._progress, self._item, self._total = raw, progress, item, total
        self._done = 0
        self._next = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._done += len(data)
        if self._done >= self._next or not data:
            self._progress.event("unpack", self._item, done=self._done, total=self._total)
            self._next = self._done + (4 << 20)
        return data

    def close(self) -> None:
        self._raw.close()
        super().close()


class Unpacker:
    """Unpacks manifests from a content store into one snapshotter."""

    def __init__(
        self,
        content: ContentStore,
        snapshotter: Snapshotter,
        *,
        snapshotter_name: str,
        locks_dir: str | os.PathLike[str],
        tmpmounts: str | os.PathLike[str] | None = None,
        progress: Progress | None = None,
        parallel: int = 0,
        hold: Callable[[str], None] | None = None,
        max_layer_size: int = limits.DEFAULT_MAX_LAYER_SIZE,
        open_layer: Callable[[Descriptor], IO[bytes]] | None = None,
        sync: bool = True,
        record_mtree: bool = True,
    ) -> None:
        """``open_layer(desc)`` opens a layer's compressed bytes (default: read the
        committed blob); a pull passes one that reads a layer while it downloads.
        ``sync``: make each layer's files durable (syncfs) before its snapshot is
        committed. ``record_mtree``: record each layer's tree manifest for
        ``lamina check --deep`` (both need a :class:`LocalDirectories` snapshotter)."""
        self.content = content
        self.max_layer_size = max_layer_size
        self.sn = snapshotter
        self.name = snapshotter_name
        self.locks = Path(locks_dir)
        self.tmpmounts = tmpmounts
        self.progress = progress or Progress()
        self.parallel = parallel or min(4, os.cpu_count() or 1)
        self.hold = hold
        self.open_layer = open_layer
        self.sync = sync
        self.record_mtree = record_mtree

    # -- helpers -----------------------------------------------------------
    def _exists(self, name: str) -> bool:
        """Whether snapshot ``name`` exists, holding it first (see the module docs)."""
        if self.hold is not None:
            self.hold(name)
        try:
            self.sn.stat(name)
        except NotFound:
            return False
        return True

    @contextlib.contextmanager
    def _lock(self, chain: str) -> Iterator[None]:
        with locked(self.locks / f"unpack-{chain.replace(':', '-')}", transient=True):
            yield

    def _reader(self, manifest: Manifest, i: int) -> IO[bytes]:
        desc = manifest.layers[i]
        raw = self.open_layer(desc) if self.open_layer else self.content.reader(desc.digest)
        return _Counting(raw, self.progress, desc.digest, desc.size)  # type: ignore[return-value]

    @contextlib.contextmanager
    def _layer(self, manifest: Manifest, i: int) -> Iterator[IO[bytes]]:
        """Layer ``i``'s stream; past ``max_layer_size`` the error names the layer."""
        reader = self._reader(manifest, i)
        try:
            yield reader
        except ResourceExhausted as exc:
            if exc.message != too_large(self.max_layer_size).message:
                raise
            raise too_large(self.max_layer_size, f"layer {manifest.layers[i].digest}") from None
        finally:
            reader.close()

    def _apply(self, manifest: Manifest, config: ImageConfig, i: int, target: str | Path,
               *, overlay: bool = False) -> AppliedLayer:
        """Apply layer ``i`` onto ``target``, bounded by ``max_layer_size``."""
        from lamina.archive.apply import apply_layer  # see the imports (startup)

        with self._layer(manifest, i) as reader:
            return apply_layer(reader, target, overlay=overlay, expected_diff_id=config.diff_ids[i],
                        max_size=self.max_layer_size)

    def _check_space(self, manifest: Manifest, todo: list[int]) -> None:
        """ResourceExhausted now if the layers to extract cannot fit (see the module docs)."""
        if not isinstance(self.sn, LocalDirectories):
            return  # a remote snapshotter: its own applies are bounded
        need, counted = 0, 0
        for i in todo:
            desc = manifest.layers[i]
            try:
                head = self.content.read_at(desc.digest, 0, 18)
                tail = self.content.read_at(desc.digest, max(0, desc.size - 4), 4)
            except NotFound:
                if self.open_layer is None:
                    raise
                continue  # still downloading: only the apply's own bounds hold for it
            need += min(size_hint(head, tail, desc.size), self.max_layer_size)
            counted += 1
        if counted:
            limits.check_fits(self.sn.root, need, f"unpack: {counted} layer(s)")

    @staticmethod
    def _key(chain: str) -> str:
        return f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain}"

    def _commit(self, key: str, chain: str) -> None:
        labels = {SNAPSHOT_REF: chain}
        # a layer file with a recorded digest: its commit makes it durable, and
        # check --deep verifies that digest (no tree manifest, no syncfs)
        if isinstance(self.sn, LocalDirectories) and not isinstance(self.sn, LayerDigests):
            layer = self.sn.layer_dir(key)
            if self.record_mtree:
                labels[LAYER_MTREE] = self._store_mtree(layer, chain)
            if self.sync:
                # the metadata commit below is durable; the files it describes must
                # be on disk first, or a power cut leaves a committed empty layer
                sync_filesystem(layer)
        # AlreadyExists: committed by someone else meanwhile; theirs is the same stack.
        crash.point("unpack.before-commit")
        with contextlib.suppress(AlreadyExists):
            self.sn.commit(chain, key, labels=labels)
        crash.point("unpack.committed")

    def _store_mtree(self, layer: Path, chain: str) -> str:
        """Record ``layer``'s tree manifest in the content store; its digest.

        Written while the unpack's lease protects new content; from the commit
        on, the snapshot's label (a ``gc.ref.content`` one) keeps it."""
        from lamina.archive import mtree  # see the imports (startup)

        with tempfile.SpooledTemporaryFile(max_size=8 << 20) as spool:
            mtree.encode(mtree.record(layer), spool)
            size = spool.tell()
            spool.seek(0)
            h = hashlib.sha256()
            while chunk := spool.read(1 << 20):
                h.update(chunk)
            digest = f"sha256:{h.hexdigest()}"
            spool.seek(0)
            with contextlib.suppress(AlreadyExists):  # the same tree was recorded before
                write_blob(self.content, f"mtree-{chain}-{secrets.token_hex(4)}", spool,
                           total=size, expected=digest)
            return digest

    # -- the work ----------------------------------------------------------
    def unpack(self, manifest: Manifest, config: ImageConfig) -> UnpackResult:
        """Make the snapshot chain of ``manifest``; returns the top ChainID."""
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidArgument(
                f"image has {len(manifest.layers)} layers but {len(config.diff_ids)} diff ids"
            )
        chains = chain_ids(config.diff_ids)
        if not chains:
            raise InvalidArgument("image has no layers")
        self._check_depth(len(chains))
        start = len(chains)
        while start > 0 and not self._exists(chains[start - 1]):
            start -= 1
        todo = list(range(start, len(chains)))
        fast = (isinstance(self.sn, Staging) and isinstance(self.sn, LocalDirectories)
                and Capability.OVERLAY in self.sn.capabilities)
        way = (self._streamed if isinstance(self.sn, LayerStreams)
               else self._staged if fast else self._mounted)
        if todo:
            self._check_space(manifest, todo)
            extracted = way(manifest, config, chains, todo)
        else:
            extracted = 0
        for i in todo:  # each was labelled once committed: this writes nothing
            self._label_layer(manifest, config, i)
        crash.point("unpack.layers-labelled")
        self._label_config(manifest, chains[-1])
        return UnpackResult(chain_id=chains[-1], extracted=extracted,
                            reused=len(chains) - extracted)

    def _check_depth(self, layers: int) -> None:
        """Refuse, before any work, an image a container could not stack."""
        from lamina.snapshots.directory import DirectorySnapshotter

        limit = self.sn.MAX_DEPTH if isinstance(self.sn, DirectorySnapshotter) else None
        if limit is not None and layers > limit:
            raise ResourceExhausted(
                f"image has {layers} layers: a container on it would stack more than "
                f"{limit}, the snapshotter's limit")

    def _label_layer(self, manifest: Manifest, config: ImageConfig, i: int) -> None:
        set_labels(self.content, manifest.layers[i].digest,
                   {UNCOMPRESSED: config.diff_ids[i]})

    def _label_config(self, manifest: Manifest, top: str) -> None:
        set_labels(self.content, manifest.config.digest, {GC_REF_SNAPSHOT + self.name: top})

    def _extract_mounted(self, manifest: Manifest, config: ImageConfig, chains: list[str],
                         i: int) -> None:
        """Prepare on the parent, mount, apply, commit (caller holds the layer's lock)."""
        chain, parent = chains[i], chains[i - 1] if i else ""
        key = self._key(chain)
        mounts = self.sn.prepare(key, parent, labels={SNAPSHOT_REF: chain})
        try:
            with temp_mount(mounts, base=self.tmpmounts) as target:
                self._apply(manifest, config, i, target)
                crash.point("unpack.applied")
            self._commit(key, chain)
        finally:
            with contextlib.suppress(NotFound):
                self.sn.remove(key)
            crash.point("unpack.removed")

    def _mounted(
        self, manifest: Manifest, config: ImageConfig, chains: list[str], todo: list[int]
    ) -> int:
        """Any snapshotter: one layer after another, each on a mounted snapshot."""
        extracted = 0
        for i in todo:
            with self._lock(chains[i]):
                if self._exists(chains[i]):
                    continue
                self._extract_mounted(manifest, config, chains, i)
                extracted += 1
            self._label_layer(manifest, config, i)
            self.progress.event("unpack", manifest.layers[i].digest, status="done")
        return extracted

    def _settle(self, staged: Path, applied: AppliedLayer, parent: str) -> None:
        """Finish a staged upperdir against its now committed parent: the root
        keeps the parent's owner, mode and xattrs unless the layer set them, and
        whiteouts hiding nothing go (see :mod:`lamina.archive.whiteout`)."""
        assert isinstance(self.sn, LocalDirectories)
        if parent and not applied.root_listed:
            top = self.sn.layer_dir(parent)
            st = os.stat(top)
            os.chown(staged, st.st_uid, st.st_gid)
            os.chmod(staged, stat.S_IMODE(st.st_mode))
            for key in os.listxattr(top):
                if not key.startswith(overlay_xattr_prefix()):
                    os.setxattr(staged, key, os.getxattr(top, key))
        if not applied.whiteouts:
            return
        if not parent:
            drop_needless_whiteouts(staged, None, list(applied.whiteouts))
            return
        key = f"settle-{time.time_ns()}-{secrets.token_hex(4)} {parent}"
        mounts = self.sn.view(key, parent)
        try:
            with temp_mount(mounts, base=self.tmpmounts) as lower:
                drop_needless_whiteouts(staged, lower, list(applied.whiteouts))
        finally:
            with contextlib.suppress(NotFound):
                self.sn.remove(key)

    def _in_order(
        self,
        manifest: Manifest,
        config: ImageConfig,
        chains: list[str],
        todo: list[int],
        stacks: dict[int, contextlib.ExitStack],
        work: Callable[[int], _T],
        finish: Callable[[int, _T], bool],
        *,
        retry: object,
        after: Callable[[int], None] | None = None,
        stop: Callable[[], None] | None = None,
    ) -> int:
        """Run ``work`` for the layers of ``todo`` on the pool, at most
        ``max(parallel, RUN_AHEAD)`` layers past the one being finished, and
        ``finish`` their results in order (True: it unpacked the layer); a result
        that is ``retry`` (the layer needs its lowers) is applied again on a
        mounted snapshot, its parent committed by then; each
        layer's stack closes once it is finished, then ``after`` is told. When
        the unpack ends, however it ends, ``stop`` runs before the workers are
        waited for. The number of layers unpacked."""
        unpacked = 0
        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="unpack")
        futures: dict[int, Future[_T]] = {}
        ahead = max(self.parallel, RUN_AHEAD)
        try:
            for pos, i in enumerate(todo):
                for j in todo[len(futures):pos + ahead]:
                    futures[j] = pool.submit(work, j)
                result = futures[i].result()
                try:
                    if result is retry:
                        self._extract_mounted(manifest, config, chains, i)
                        unpacked += 1
                    else:
                        unpacked += finish(i, result)
                    # labelled now, while the workers write the layers above it: the
                    # transaction (an fsync) is off the unpack's critical path
                    self._label_layer(manifest, config, i)
                    self.progress.event("unpack", manifest.layers[i].digest, status="done")
                finally:
                    stacks.pop(i).close()
                if after is not None:
                    after(i)
        finally:
            if stop is not None:
                stop()
            for fut in futures.values():
                fut.cancel()
            pool.shutdown(wait=True)
            for stack in stacks.values():
                stack.close()
        return unpacked

    def _claim(self, stacks: dict[int, contextlib.ExitStack], i: int,
               chain: str) -> contextlib.ExitStack | None:
        """Take layer ``i``'s ChainID lock on a stack of its own (kept in
        ``stacks``, closed when the unpack ends); None when another unpack
        committed the layer first."""
        stack = contextlib.ExitStack()
        stacks[i] = stack
        stack.enter_context(self._lock(chain))
        return None if self._exists(chain) else stack

    def _staged(
        self, manifest: Manifest, config: ImageConfig, chains: list[str], todo: list[int]
    ) -> int:
        """Overlay: fill upperdirs in parallel, commit in order.

        The staged apply sees only the layer itself, not its parents. When the
        layer depends on them (a hard link to a lower file, a parent directory
        it does not list, an opaque root), it raises NeedsLowerLayers and that
        layer is redone on a real overlay mount once its parent is committed.
        Any other error (hostile tar, DiffID mismatch) fails the unpack at
        once. Once the parent is committed, the upperdir is settled against it
        (root metadata, whiteouts hiding nothing: :meth:`_settle`).
        """
        assert isinstance(self.sn, Staging)
        sn = self.sn
        stacks: dict[int, contextlib.ExitStack] = {}
        applied: dict[int, AppliedLayer] = {}
        retry = object()

        def extract(i: int) -> Path | object | None:
            stack = self._claim(stacks, i, chains[i])
            if stack is None:
                return None
            staging = sn.staging()
            staged = staging.__enter__()
            try:
                applied[i] = self._apply(manifest, config, i, staged, overlay=True)
                crash.point("unpack.applied")
            except NeedsLowerLayers:
                staging.__exit__(None, None, None)
                return retry
            except BaseException:
                staging.__exit__(None, None, None)
                raise
            stack.push(staging)
            return staged

        def finish(i: int, staged: Path | object | None) -> bool:
            if not isinstance(staged, Path):
                return False  # another unpack committed it
            key = self._key(chains[i])
            parent = chains[i - 1] if i else ""
            self._settle(staged, applied.pop(i), parent)
            crash.point("unpack.before-prepare")
            sn.prepare_staged(key, parent, staged, labels={SNAPSHOT_REF: chains[i]})
            crash.point("unpack.prepared")
            try:
                self._commit(key, chains[i])
            finally:
                with contextlib.suppress(NotFound):
                    sn.remove(key)
                crash.point("unpack.removed")
            return True

        return self._in_order(manifest, config, chains, todo, stacks, extract, finish,
                              retry=retry)

    def _streamed(
        self, manifest: Manifest, config: ImageConfig, chains: list[str], todo: list[int]
    ) -> int:
        """Layer streams (erofs): every layer written as its snapshot's own layer
        straight from its stream, in parallel (each waits, once read, for its
        parent's commit to settle against it), committed in order. A layer that
        needs its lowers is applied on a mounted snapshot once its parent is
        committed; any other error fails the unpack at once."""
        assert isinstance(self.sn, LayerStreams)
        streams = self.sn
        stacks: dict[int, contextlib.ExitStack] = {}
        committed = {i: threading.Event() for i in todo}
        roots = {i: _Handoff() for i in todo}  # each layer's root, for the layer above
        stopped = threading.Event()
        retry = object()

        def parent_committed(i: int) -> Callable[[], None]:
            def wait() -> None:
                if i - 1 in committed:
                    committed[i - 1].wait()
                if stopped.is_set():
                    raise InvalidArgument("unpack stopped: a layer below failed")
            return wait

        def parent_root(i: int) -> Callable[[], object | None] | None:
            if i - 1 not in roots:
                return None  # the parent was there before: its mount tells
            def take() -> object | None:
                value = roots[i - 1].take()
                if stopped.is_set():
                    raise InvalidArgument("unpack stopped: a layer below failed")
                return value
            return take

        def write(i: int) -> str | object | None:
            try:
                stack = self._claim(stacks, i, chains[i])
                if stack is None:
                    return None
                key = self._key(chains[i])
                with self._layer(manifest, i) as reader:
                    try:
                        streams.prepare_stream(
                            key, chains[i - 1] if i else "", reader,
                            expected_diff_id=config.diff_ids[i],
                            max_size=self.max_layer_size, labels={SNAPSHOT_REF: chains[i]},
                            wait=parent_committed(i), parent_root=parent_root(i),
                            on_root=roots[i].give)
                    except NeedsLowerLayers:
                        return retry
            finally:
                roots[i].give(None)  # not given (another unpack's, applied on a mount, failed)
            crash.point("unpack.applied")
            return key

        def finish(i: int, got: str | object | None) -> bool:
            if not isinstance(got, str):
                return False  # another unpack committed it
            try:
                self._commit(got, chains[i])
            finally:
                with contextlib.suppress(NotFound):
                    self.sn.remove(got)
                crash.point("unpack.removed")
            return True

        def stop() -> None:
            stopped.set()
            for event in committed.values():
                event.set()
            for handoff in roots.values():
                handoff.give(None)

        return self._in_order(manifest, config, chains, todo, stacks, write, finish,
                              retry=retry,
                              after=lambda i: committed[i].set(), stop=stop)


class _Handoff:
    """What one streamed layer hands the layer above it, once: the first value
    given is the one taken (None: nothing to hand, the parent's commit tells)."""

    def __init__(self) -> None:
        self._given = threading.Event()
        self._value: object | None = None
        self._lock = threading.Lock()

    def give(self, value: object | None) -> None:
        with self._lock:
            if not self._given.is_set():
                self._value = value
                self._given.set()

    def take(self) -> object | None:
        self._given.wait()
        return self._value


def unpacker_for(root: Root, content: ContentStore, *, snapshotter: str, lease: str,
                 snapshots: Snapshotter | None = None, progress: Progress | None = None,
                 parallel: int = 0, open_layer: Callable[[Descriptor], IO[bytes]] | None = None,
                 max_layer_size: int = limits.DEFAULT_MAX_LAYER_SIZE,
                 sync: bool = True) -> Unpacker:
    """The unpacker of ``root``'s snapshotter ``snapshotter`` (``snapshots``, when the
    caller has it open already) reading ``content``, every snapshot it relies on held
    by lease ``lease``: the one way the image operations (unpack, pull) build one."""
    leases = root.leases()
    return Unpacker(
        content, snapshots if snapshots is not None else root.snapshotter(snapshotter),
        snapshotter_name=snapshotter, locks_dir=root.path / "locks",
        tmpmounts=root.tmpmounts, progress=progress, parallel=parallel,
        hold=functools.partial(leases.add_resource, lease, f"snapshot:{snapshotter}"),
        open_layer=open_layer, max_layer_size=max_layer_size, sync=sync,
    )
