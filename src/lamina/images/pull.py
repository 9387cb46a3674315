"""Pull an image: resolve, fetch documents, stream blobs, unpack while they arrive.

1. The reference is resolved to a descriptor (:mod:`.resolver`).
2. Manifests and indexes are fetched and stored, walking indexes down to the
   manifests of the wanted platforms (``platforms``; the host's by default;
   every one with ``all_platforms``). An index's children are chosen *before*
   any is fetched (:mod:`lamina.oci.platforms`: one per wanted platform).
   Children of an index that are not manifests (a checkpoint's blobs) are
   always fetched. The walk is :func:`lamina.images.graph.walk`: each
   descriptor is visited once, however often indexes repeat it, and its work
   is bounded before anything is fetched, by the bounds every walk has
   (:mod:`lamina.oci.limits`: depth, descriptors, document bytes). A single
   manifest pulled for named platforms must be for one of them (its config
   says): one for another platform is NotFound, nothing fetched past its config.
3. The blobs still missing must fit: their announced sizes (less what
   resumable ingests hold) are compared with the free space of the content
   store's filesystem, keeping :func:`lamina.archive.limits.space_reserve`
   free (ResourceExhausted before any byte is fetched). Then every config
   and layer is downloaded, ``concurrency`` at a time, through the content
   store's resumable ingests (:mod:`lamina.images.fetch`, reading the
   verified streams of :mod:`lamina.remotes.fetcher`); each download stops at
   the same reserve (the store's writer keeps it, and turns an ENOSPC/EDQUOT
   into the same error), with ResourceExhausted, and its ingest is deleted —
   resuming it would only fill the same disk. (Network failures keep theirs,
   to be resumed.) A store that is not local
   (:class:`~lamina.content.Local`) is not checked for space.
4. Meanwhile the manifest to unpack (the first of the wanted platforms) is
   unpacked (:func:`lamina.images.unpack.unpacker_for`), each layer read from
   its ingest as it grows: decompression and extraction follow the download
   instead of waiting for it, and a layer's snapshot is committed only once
   its blob is verified and its DiffID checked.
5. The blobs get containerd's labels (``containerd.io/gc.ref.content.*`` from
   :func:`lamina.images.graph.gc_labels`, and
   ``containerd.io/distribution.source.<registry>=<repository>``) and the
   image is registered under the normalised reference.

Everything happens under one lease, so a concurrent garbage collection keeps
what the pull wrote; a pull that fails leaves only resumable ingests (and
the lease's expiry then lets GC take any committed blob no image claims).
Descriptors open at once are bounded whatever the number of layers: ``concurrency``
downloads, and the unpack's own bound (:data:`lamina.images.unpack.RUN_AHEAD`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import IO

from lamina.archive import limits
from lamina.archive.limits import DEFAULT_MAX_LAYER_SIZE
from lamina.content import ContentStore, Local, set_labels
from lamina.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from lamina.images import graph
from lamina.images.fetch import LOCK_WAIT, TailReader, Transfer, fetch_blob, ingest_ref
from lamina.images.unpack import Unpacker, UnpackResult, unpacker_for
from lamina.labels import DISTRIBUTION_SOURCE
from lamina.metadata.images import Image
from lamina.metadata.leases import LeasedContent
from lamina.metadata.root import Root
from lamina.oci.limits import MAX_DOCUMENT
from lamina.oci.platforms import matches, parse_platform, require_config_platform
from lamina.oci.reference import Reference, parse_reference
from lamina.oci.types import (
    CONFIG_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    ImageConfig,
    Manifest,
    host_platform,
)
from lamina.remotes.fetcher import Cancelled, Fetcher
from lamina.remotes.registry import Registry
from lamina.remotes.resolver import fetch_document, resolve
from lamina.remotes.session import Session
from lamina.snapshots import Snapshotter
from lamina.util.progress import Progress

__all__ = ["PullResult", "pull", "with_source"]


def with_source(labels: Mapping[str, str], ref: Reference) -> dict[str, str]:
    """The distribution source label that names ``ref``'s repository too (containerd's
    ``distribution.source.<registry>``: repositories comma-separated), or nothing
    when ``labels`` name it already."""
    key = DISTRIBUTION_SOURCE + ref.domain
    repos = [r for r in labels.get(key, "").split(",") if r]
    return {} if ref.path in repos else {key: ",".join([*repos, ref.path])}


@dataclass
class PullResult:
    image: Image
    unpacked: UnpackResult | None = None
    fetched: int = 0  # blobs downloaded after the documents (manifests, indexes, configs)
    present: int = 0  # blobs and configs stored before this pull
    manifests: list[Descriptor] = field(default_factory=list)


@dataclass
class _Plan:
    """What the walk over the documents found."""

    documents: dict[str, Descriptor] = field(default_factory=dict)
    children: dict[str, list[Descriptor]] = field(default_factory=dict)  # gc refs
    manifests: list[tuple[Descriptor, Manifest]] = field(default_factory=list)
    blobs: dict[str, Descriptor] = field(default_factory=dict)


class _Puller:
    def __init__(self, session: Session, ref: Reference, content: ContentStore,
                 store: ContentStore, progress: Progress, *, platforms: list[dict[str, str]],
                 all_platforms: bool, concurrency: int) -> None:
        self.session = session
        self.fetcher = Fetcher(session)
        self.ref = ref
        self.content = content
        self.local = store if isinstance(store, Local) else None
        self.progress = progress
        self.platforms = platforms
        self.all_platforms = all_platforms
        self.concurrency = max(1, concurrency)
        self.plan = _Plan()
        self.cancel = threading.Event()
        self.transfers: dict[str, Transfer] = {}
        self.fetched_documents: set[str] = set()  # stored by this pull
        # the content store's directory, when local
        self.space_where = str(self.local.path) if self.local is not None else None

    # -- documents -------------------------------------------------------
    def document(self, desc: Descriptor, prefetched: bytes | None) -> bytes:
        """A manifest, index or config: from the store, else fetched and stored."""
        if desc.size > MAX_DOCUMENT:
            raise InvalidArgument(f"{self.ref}: {desc.digest}: a document of {desc.size} "
                                  f"bytes is larger than the {MAX_DOCUMENT} allowed")
        with contextlib.suppress(NotFound, InvalidArgument):  # absent, or not those bytes
            return graph.read_document(self.content, desc)
        data = prefetched if prefetched is not None else fetch_document(self.session, desc)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                graph.put_document(self.content, data)
                self.fetched_documents.add(desc.digest)
                return data
            except Unavailable:  # another pull is storing it: wait for that one
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                with contextlib.suppress(NotFound):
                    self.content.info(desc.digest)
                    return data

    def walk(self, root: Descriptor, prefetched: bytes | None) -> None:
        """Fetch the documents below ``root``, each once, within the bounds (module docs)."""
        if root.media_type not in graph.DOCUMENT_TYPES:
            raise InvalidArgument(f"{self.ref}: cannot pull a {root.media_type!r} "
                                  "(not a manifest or an index)")

        def handler(desc: Descriptor) -> Sequence[Descriptor]:
            if desc.media_type not in graph.DOCUMENT_TYPES:
                return []  # a blob: fetched after the walk
            data = self.document(desc, prefetched if desc is root else None)
            self.plan.documents[desc.digest] = desc
            found = graph.select(desc, graph.children(desc, data),
                                 None if self.all_platforms else self.platforms,
                                 where=str(self.ref))
            self.plan.children[desc.digest] = found
            if desc.media_type in MANIFEST_TYPES:
                self.plan.manifests.append((desc, Manifest.parse(data, desc.media_type)))
            else:  # an index's other blobs (a checkpoint's)
                for c in found:
                    if c.media_type not in graph.DOCUMENT_TYPES:
                        self.plan.blobs.setdefault(c.digest, c)
            return found

        graph.walk(root, handler, where=str(self.ref))

    # -- blobs -----------------------------------------------------------
    def start_downloads(self, pool: ThreadPoolExecutor,
                        order: Sequence[Descriptor]) -> list[Future[bool]]:
        futures = []
        for desc in order:
            if desc.digest in self.transfers:
                continue
            t = self.transfers[desc.digest] = Transfer(desc)
            self.progress.waiting("fetch", desc.digest, total=desc.size)
            futures.append(pool.submit(self._fetch, desc, t))
        return futures

    def _fetch(self, desc: Descriptor, t: Transfer) -> bool:
        """One blob; one that stopped at the disk's reserve leaves no ingest behind
        (it would only be resumed into the same full disk)."""
        try:
            # committed with its source label: label() then finds it there and
            # writes nothing (a metadata transaction, fsynced, per blob saved)
            return fetch_blob(self.fetcher, desc, self.content, progress=self.progress,
                              transfer=t, cancel=self.cancel,
                              labels=with_source({}, self.ref))
        except ResourceExhausted:  # the store's writer stopped at the reserve
            with contextlib.suppress(NotFound, Unavailable):
                self.content.abort(ingest_ref(desc.digest))
            raise

    def check_space(self, order: Sequence[Descriptor]) -> None:
        """ResourceExhausted before fetching when the blobs ``order`` still needs (their
        announced sizes, less what resumable ingests hold) cannot fit the content
        store's filesystem above its reserve."""
        if self.space_where is None or self.local is None:
            return
        need, missing = 0, 0
        for desc in {d.digest: d for d in order}.values():
            with contextlib.suppress(NotFound):
                self.local.info(desc.digest)
                continue
            held = 0
            with contextlib.suppress(NotFound):
                held = min(self.local.status(ingest_ref(desc.digest)).offset, desc.size)
            need += desc.size - held
            missing += 1
        limits.check_fits(self.space_where, need, f"{self.ref}: {missing} blob(s) to fetch")

    def open_layer(self, desc: Descriptor) -> IO[bytes]:
        t = self.transfers.get(desc.digest)
        if t is None or self.local is None:
            return self.content.reader(desc.digest)
        while not t.opened and not t.done:
            t.wait(0)
        if t.error is not None:
            raise t.error
        if not t.opened or t.done:
            return self.content.reader(desc.digest)
        try:
            following = self.local.follow(ingest_ref(desc.digest))
        except NotFound:  # committed (and renamed away) just now
            return self.content.reader(desc.digest)
        return TailReader(t, self.cancel, following)  # type: ignore[return-value]

    # -- labels ----------------------------------------------------------
    def label(self) -> None:
        everything = {**self.plan.documents, **self.plan.blobs}
        for _, manifest in self.plan.manifests:
            everything[manifest.config.digest] = manifest.config
            everything.update((layer.digest, layer) for layer in manifest.layers)
        for digest, desc in everything.items():
            info = self.content.info(digest)
            labels = with_source(info.labels, self.ref)
            if digest in self.plan.documents:
                labels.update(graph.gc_labels(desc, self.plan.children[digest]))
            set_labels(self.content, digest, labels, info=info)


def _to_unpack(puller: _Puller) -> tuple[Descriptor, Manifest] | None:
    images = [(d, m) for d, m in puller.plan.manifests if m.config.media_type in CONFIG_TYPES]
    for want in puller.platforms:
        for d, m in images:
            if matches(d.platform, want):
                return d, m
    return images[0] if len(images) == 1 else None


def pull(registry: Registry, reference: str, *, root: Root, snapshotter: str = "overlay",
         snapshots: Snapshotter | None = None,
         platforms: Sequence[str] = (), all_platforms: bool = False, unpack: bool = True,
         concurrency: int = 3, progress: Progress | None = None,
         max_layer_size: int = DEFAULT_MAX_LAYER_SIZE, sync: bool = True) -> PullResult:
    """Pull ``reference`` into ``root`` (see the module docs); what
    :meth:`lamina.images.service.ImageService.pull` does.

    ``snapshots`` (default: ``root``'s snapshotter ``snapshotter``),
    ``max_layer_size`` and ``sync`` are the unpack's (see
    :func:`~lamina.images.unpack.unpacker_for`)."""
    progress = progress or Progress()
    ref = parse_reference(reference)
    wanted = [parse_platform(p) for p in platforms] or [host_platform()]
    session = registry.session(ref)
    progress.event("resolve", str(ref), status="resolving")
    resolved = resolve(session, ref)
    progress.event("resolve", str(ref), status=resolved.desc.digest)
    leases = root.leases()
    images = root.images()
    # as containerd's client leases: a day, so a long pull keeps what it has fetched
    with leases.held(purpose=f"pull {ref}", expire=timedelta(hours=24)) as lease:
        store = root.content()
        content = LeasedContent(store, leases, lease.id)
        puller = _Puller(session, ref, content, store, progress, platforms=wanted,
                         all_platforms=all_platforms, concurrency=concurrency)
        puller.walk(resolved.desc, resolved.data)
        for _, manifest in puller.plan.manifests:
            if manifest.config.media_type in CONFIG_TYPES:
                config = puller.document(manifest.config, None)
                if platforms and not all_platforms and \
                        resolved.desc.media_type in MANIFEST_TYPES:
                    require_config_platform(ImageConfig.parse(config).raw, wanted,
                                            where=str(ref))
        target = _to_unpack(puller) if unpack else None
        order = _order(puller, target)
        puller.check_space(order)
        content.hold(d.digest for d in order)  # one transaction, not one per blob

        def unpacker() -> Unpacker:
            return unpacker_for(root, content, snapshotter=snapshotter,
                                snapshots=snapshots, lease=lease.id, progress=progress,
                                parallel=max(puller.concurrency, 2),
                                open_layer=puller.open_layer,
                                max_layer_size=max_layer_size, sync=sync)

        unpacked, fetched, present = _transfer(puller, target, order, unpacker)
        puller.label()
        image = images.put(Image(name=str(ref), target=resolved.desc))
        return PullResult(image=image, unpacked=unpacked, fetched=fetched,
                          present=present,
                          manifests=[d for d, _ in puller.plan.manifests])


def _order(puller: _Puller, target: tuple[Descriptor, Manifest] | None) -> list[Descriptor]:
    """Every blob to download, the layers to unpack first."""
    order: list[Descriptor] = []
    if target is not None:
        order += target[1].layers
    for _, manifest in puller.plan.manifests:
        order += [manifest.config, *manifest.layers]
    order += puller.plan.blobs.values()
    return order


def _transfer(puller: _Puller, target: tuple[Descriptor, Manifest] | None,
              order: Sequence[Descriptor],
              unpacker: Callable[[], Unpacker]) -> tuple[UnpackResult | None, int, int]:
    """Download every blob; unpack ``target`` meanwhile: the unpack, blobs fetched, present."""
    pool = ThreadPoolExecutor(max_workers=puller.concurrency, thread_name_prefix="fetch")
    futures = puller.start_downloads(pool, order)
    unpacked: UnpackResult | None = None
    try:
        if target is not None:
            try:
                _, manifest = target
                with puller.content.reader(manifest.config.digest) as r:
                    config = ImageConfig.parse(r.read())
                unpacked = unpacker().unpack(manifest, config)
            except BaseException:
                puller.cancel.set()
                for f in futures:
                    f.cancel()
                _raise_download_error(futures, wait=True)  # the root cause, if a download
                raise
        _raise_download_error(futures, wait=True)
    except BaseException:
        puller.cancel.set()
        raise
    finally:
        pool.shutdown(wait=True)
    fetched = sum(1 for f in futures if f.result())
    # a config fetched with the documents was not there before, though its download found it
    documents = len(puller.fetched_documents & {d.digest for d in order})
    return unpacked, fetched, len(futures) - fetched - documents


def _raise_download_error(futures: Sequence[Future[bool]], *, wait: bool = False) -> None:
    """The first download's error (the root cause of an unpack failing, say); downloads
    that were only cancelled because of another failure are not one."""
    for f in futures:
        if f.cancelled() or (not wait and not f.done()):
            continue
        exc = f.exception()
        if exc is not None and not isinstance(exc, Cancelled):
            for g in futures:
                g.cancel()
            raise exc
