"""Pull an image: resolve, fetch documents, stream blobs, unpack while they arrive.

1. The reference is resolved to a descriptor (:mod:`.resolver`).
2. Manifests and indexes are fetched and stored, walking indexes down to the
   manifests of the wanted platforms (``platforms``; the host's by default;
   every one with ``all_platforms``). An index's children are chosen *before*
   any is fetched (:mod:`lamina.oci.platforms`: one per wanted platform).
   Children of an index that are not manifests (a checkpoint's blobs) are
   always fetched. The walk is over a graph: each descriptor is visited once,
   however often indexes repeat it. Its work is bounded before anything is
   fetched: indexes nest at most :data:`MAX_DEPTH` deep (InvalidArgument, no
   real image does), and one pull reaches at most :data:`MAX_DESCRIPTORS`
   descriptors (each manifest's layer entries all count) and
   :data:`MAX_DOCUMENT_BYTES` of manifests, indexes and configs
   (ResourceExhausted: a budget lamina sets, not a malformed document).
3. The blobs still missing must fit: their announced sizes (less what
   resumable ingests hold) are compared with the free space of the content
   store's filesystem, keeping :func:`lamina.archive.limits.space_reserve`
   free (ResourceExhausted before any byte is fetched). Then every config
   and layer is downloaded, ``concurrency`` at a time, through the content
   store's resumable ingests (:mod:`.fetcher`); each download stops at the
   same reserve (or an ENOSPC/EDQUOT), with ResourceExhausted, and its
   ingest is deleted — resuming it would only fill the same disk. (Network
   failures keep theirs, to be resumed.)
4. Meanwhile the manifest to unpack (the first of the wanted platforms) is
   unpacked by :class:`~lamina.images.unpack.Unpacker`, each layer read from
   its ingest as it grows: decompression and extraction follow the download
   instead of waiting for it, and a layer's snapshot is committed only once
   its blob is verified and its DiffID checked.
5. The blobs get containerd's labels (``containerd.io/gc.ref.content.*`` and
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
import errno
import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from lamina.archive import limits
from lamina.archive.limits import DEFAULT_MAX_LAYER_SIZE
from lamina.content import ContentStore
from lamina.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from lamina.images.importer import put_document
from lamina.images.unpack import Unpacker, UnpackResult
from lamina.labels import DISTRIBUTION_SOURCE, GC_REF_CONTENT
from lamina.metadata.images import Image
from lamina.metadata.leases import LeasedContent, LeaseManager
from lamina.metadata.root import Root
from lamina.oci.platforms import matches, select_children
from lamina.oci.types import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    host_platform,
)
from lamina.remotes.fetcher import (
    LOCK_WAIT,
    Cancelled,
    TailReader,
    Transfer,
    fetch_blob,
    ingest_ref,
)
from lamina.remotes.reference import Reference, parse_reference
from lamina.remotes.registry import Registry
from lamina.remotes.resolver import MAX_MANIFEST, fetch_document, resolve
from lamina.remotes.session import Session
from lamina.util.progress import Progress

__all__ = ["MAX_DEPTH", "MAX_DESCRIPTORS", "MAX_DOCUMENT_BYTES", "PullResult", "parse_platform",
           "pull"]

MAX_DEPTH = 8
#: Distinct descriptors (and manifest layer entries) one pull may reach.
MAX_DESCRIPTORS = 10_000
#: Bytes of manifests, indexes and configs one pull may fetch, in all.
MAX_DOCUMENT_BYTES = 64 << 20


def parse_platform(text: str) -> dict[str, str]:
    """``os/arch[/variant]`` (``linux/arm64/v8``) as an OCI platform object."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise InvalidArgument(f"invalid platform {text!r}: want os/arch[/variant]")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


@dataclass
class PullResult:
    image: Image
    unpacked: UnpackResult | None = None
    fetched: int = 0
    present: int = 0
    manifests: list[Descriptor] = field(default_factory=list)


@dataclass
class _Plan:
    """What the walk over the documents found."""

    documents: dict[str, Descriptor] = field(default_factory=dict)
    children: dict[str, list[Descriptor]] = field(default_factory=dict)  # gc refs
    manifests: list[tuple[Descriptor, Manifest]] = field(default_factory=list)
    blobs: dict[str, Descriptor] = field(default_factory=dict)


class _GuardedTransfer(Transfer):
    """A download that stops at the free-space reserve of the content store's
    filesystem (``fd`` a directory on it), checked as its bytes arrive; a write
    that still meets ENOSPC/EDQUOT is the same one-line ResourceExhausted."""

    def __init__(self, desc: Descriptor, fd: int | None, where: str | None) -> None:
        super().__init__(desc)
        self._guard = None if fd is None or where is None else limits.SpaceGuard(
            fd, where, action=f"fetch blob {desc.digest}")

    def advance(self, offset: int) -> None:
        if self._guard is not None:
            self._guard.seen(offset)
        super().advance(offset)

    def translate(self, exc: BaseException) -> BaseException:
        """``exc`` as the pull reports it."""
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                and self._guard is not None:
            return self._guard.explain(exc, "its ingest", False)
        return exc

    def finish(self, error: BaseException | None = None) -> None:
        super().finish(None if error is None else self.translate(error))


class _Puller:
    def __init__(self, session: Session, ref: Reference, content: ContentStore,
                 store: ContentStore, progress: Progress, *, platforms: list[dict[str, str]],
                 all_platforms: bool, concurrency: int) -> None:
        self.session = session
        self.ref = ref
        self.content = content
        self.store = store
        self.progress = progress
        self.platforms = platforms
        self.all_platforms = all_platforms
        self.concurrency = max(1, concurrency)
        self.plan = _Plan()
        self.seen: set[str] = set()  # every descriptor the walk reached
        self.walked = 0  # what it charged to MAX_DESCRIPTORS
        self.document_bytes = 0
        self.cancel = threading.Event()
        self.transfers: dict[str, Transfer] = {}
        self.space_where: str | None = None  # the content store's directory, when local
        self.space_fd: int | None = None

    def __enter__(self) -> _Puller:
        from lamina.content.local import LocalContentStore

        if isinstance(self.store, LocalContentStore):
            self.space_where = str(self.store.path)
            self.space_fd = os.open(self.store.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.space_fd is not None:
            os.close(self.space_fd)
            self.space_fd = None

    # -- documents -------------------------------------------------------
    def document(self, desc: Descriptor, prefetched: bytes | None) -> bytes:
        """A manifest, index or config: from the store, else fetched and stored."""
        if desc.size > MAX_MANIFEST:
            raise InvalidArgument(f"{self.ref}: {desc.digest}: a document of {desc.size} "
                                  f"bytes is larger than the {MAX_MANIFEST} allowed")
        try:
            with self.content.reader(desc.digest) as r:
                data = r.read(desc.size + 1)
            if len(data) == desc.size and \
                    f"sha256:{hashlib.sha256(data).hexdigest()}" == desc.digest:
                return data
        except NotFound:
            pass
        data = prefetched if prefetched is not None else fetch_document(self.session, desc)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                put_document(self.content, data)
                return data
            except Unavailable:  # another pull is storing it: wait for that one
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                with contextlib.suppress(NotFound):
                    self.content.info(desc.digest)
                    return data

    def _spend(self, children: Sequence[Descriptor], *, every: bool = False) -> list[Descriptor]:
        """The ``children`` not reached before, each once, charged to the pull's budget
        (``every``: charge each entry, repeated or not: a manifest's layers are all
        unpacked)."""
        new: list[Descriptor] = []
        for c in children:
            if c.digest in self.seen:
                continue
            self.seen.add(c.digest)
            new.append(c)
            if c.media_type in MANIFEST_TYPES | INDEX_TYPES | CONFIG_TYPES:
                self.document_bytes += c.size
        self.walked += len(children) if every else len(new)
        if self.walked > MAX_DESCRIPTORS:
            raise ResourceExhausted(
                f"{self.ref}: the image reaches more than {MAX_DESCRIPTORS} descriptors "
                "(manifests, configs, layers); refused before fetching them")
        if self.document_bytes > MAX_DOCUMENT_BYTES:
            raise ResourceExhausted(
                f"{self.ref}: the image's manifests, indexes and configs add up to more "
                f"than {MAX_DOCUMENT_BYTES} bytes; refused before fetching them")
        return new

    def walk(self, root: Descriptor, prefetched: bytes | None) -> None:
        """Fetch the documents below ``root``, each once, within the bounds (module docs)."""
        self._spend([root])
        stack: list[tuple[Descriptor, int]] = [(root, 0)]
        while stack:
            desc, depth = stack.pop()
            if depth >= MAX_DEPTH:
                raise InvalidArgument(f"{self.ref}: indexes nest more than {MAX_DEPTH} deep")
            if desc.media_type not in MANIFEST_TYPES | INDEX_TYPES:
                raise InvalidArgument(f"{self.ref}: cannot pull a {desc.media_type!r} "
                                      "(not a manifest or an index)")
            data = self.document(desc, prefetched if desc is root else None)
            self.plan.documents[desc.digest] = desc
            if desc.media_type in MANIFEST_TYPES:
                manifest = Manifest.parse(data, desc.media_type)
                self.plan.manifests.append((desc, manifest))
                self.plan.children[desc.digest] = [manifest.config, *manifest.layers]
                self._spend([manifest.config, *manifest.layers], every=True)
                continue
            index = Index.parse(data)
            wanted = index.manifests if self.all_platforms else select_children(
                index.manifests, self.platforms, where=str(self.ref))
            # each child once, in the GC labels too (an index may repeat one)
            firsts: dict[str, Descriptor] = {}
            for c in wanted:
                firsts.setdefault(c.digest, c)
            unique = list(firsts.values())
            self.plan.children[desc.digest] = unique
            new = self._spend(unique)
            for child in new:
                if child.media_type not in MANIFEST_TYPES | INDEX_TYPES:
                    self.plan.blobs.setdefault(child.digest, child)
            # depth first, in the index's order
            stack.extend((c, depth + 1) for c in reversed(new)
                         if c.media_type in MANIFEST_TYPES | INDEX_TYPES)

    # -- blobs -----------------------------------------------------------
    def _data_path(self) -> Callable[[str], Path] | None:
        """Where an ingest's bytes are, when the store is the local one (documented layout)."""
        from lamina.content.local import LocalContentStore

        store = self.store
        if not isinstance(store, LocalContentStore):
            return None
        return lambda ref: store.ingest_dir / hashlib.sha256(ref.encode()).hexdigest() / "data"

    def start_downloads(self, pool: ThreadPoolExecutor,
                        order: Sequence[Descriptor]) -> list[Future[bool]]:
        data_path = self._data_path()
        futures = []
        for desc in order:
            if desc.digest in self.transfers:
                continue
            t = self.transfers[desc.digest] = _GuardedTransfer(desc, self.space_fd,
                                                               self.space_where)
            futures.append(pool.submit(self._fetch, desc, t, data_path))
        return futures

    def _fetch(self, desc: Descriptor, t: _GuardedTransfer,
               data_path: Callable[[str], Path] | None) -> bool:
        """One blob; one that stopped at the disk's reserve leaves no ingest behind
        (it would only be resumed into the same full disk)."""
        try:
            return fetch_blob(self.session, desc, self.content, progress=self.progress,
                              transfer=t, cancel=self.cancel, data_path=data_path)
        except BaseException as exc:
            error = t.translate(exc)
            if isinstance(error, ResourceExhausted):
                with contextlib.suppress(NotFound, Unavailable):
                    self.content.abort(ingest_ref(desc.digest))
            if error is exc:
                raise
            raise error from None

    def check_space(self, order: Sequence[Descriptor]) -> None:
        """ResourceExhausted before fetching when the blobs ``order`` still needs (their
        announced sizes, less what resumable ingests hold) cannot fit the content
        store's filesystem above its reserve."""
        if self.space_where is None:
            return
        need, missing = 0, 0
        for desc in {d.digest: d for d in order}.values():
            with contextlib.suppress(NotFound):
                self.store.info(desc.digest)
                continue
            held = 0
            with contextlib.suppress(NotFound):
                held = min(self.store.status(ingest_ref(desc.digest)).offset, desc.size)
            need += desc.size - held
            missing += 1
        limits.check_fits(self.space_where, need, f"{self.ref}: {missing} blob(s) to fetch")

    def open_layer(self, desc: Descriptor) -> IO[bytes]:
        t = self.transfers.get(desc.digest)
        if t is None:
            return self.content.reader(desc.digest)
        while t.data_path is None and not t.done:
            t.wait(0)
        if t.error is not None:
            raise t.error
        if t.data_path is None or t.done:
            return self.content.reader(desc.digest)
        try:
            return TailReader(t, self.cancel)  # type: ignore[return-value]
        except FileNotFoundError:  # committed (and renamed away) just now
            return self.content.reader(desc.digest)

    # -- labels ----------------------------------------------------------
    def label(self) -> None:
        source_key = DISTRIBUTION_SOURCE + self.ref.domain
        everything = {**self.plan.documents, **self.plan.blobs}
        for _, manifest in self.plan.manifests:
            everything[manifest.config.digest] = manifest.config
            everything.update((layer.digest, layer) for layer in manifest.layers)
        for digest in everything:
            info = self.content.info(digest)
            labels: dict[str, str] = {}
            repos = [r for r in info.labels.get(source_key, "").split(",") if r]
            if self.ref.path not in repos:
                labels[source_key] = ",".join([*repos, self.ref.path])
            children = self.plan.children.get(digest, [])
            if digest in self.plan.documents and self.plan.documents[digest].media_type \
                    in MANIFEST_TYPES and children:
                labels[f"{GC_REF_CONTENT}.config"] = children[0].digest
                labels.update({f"{GC_REF_CONTENT}.l.{i}": c.digest
                               for i, c in enumerate(children[1:])})
            elif children:
                labels.update({f"{GC_REF_CONTENT}.m.{i}": c.digest for i, c in enumerate(children)})
            labels = {k: v for k, v in labels.items() if info.labels.get(k) != v}
            if labels:
                self.content.update(replace(info, labels={**info.labels, **labels}),
                                    *(f"labels.{k}" for k in labels))


def _to_unpack(puller: _Puller) -> tuple[Descriptor, Manifest] | None:
    images = [(d, m) for d, m in puller.plan.manifests if m.config.media_type in CONFIG_TYPES]
    for want in puller.platforms:
        for d, m in images:
            if matches(d.platform, want):
                return d, m
    return images[0] if len(images) == 1 else None


def pull(registry: Registry, reference: str, *, root: Root, snapshotter: str = "overlay",
         platforms: Sequence[str] = (), all_platforms: bool = False, unpack: bool = True,
         concurrency: int = 3, progress: Progress | None = None,
         max_layer_size: int = DEFAULT_MAX_LAYER_SIZE, sync: bool = True) -> PullResult:
    """Pull ``reference`` into ``root`` (see the module docs).

    ``max_layer_size`` and ``sync`` are the unpack's (see
    :class:`~lamina.images.unpack.Unpacker`)."""
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
        with _Puller(session, ref, content, store, progress, platforms=wanted,
                     all_platforms=all_platforms, concurrency=concurrency) as puller:
            puller.walk(resolved.desc, resolved.data)
            for _, manifest in puller.plan.manifests:
                if manifest.config.media_type in CONFIG_TYPES:
                    puller.document(manifest.config, None)
            target = _to_unpack(puller) if unpack else None
            order = _order(puller, target)
            puller.check_space(order)
            unpack_options = {"max_layer_size": max_layer_size, "sync": sync}
            unpacked, fetched, present = _transfer(puller, root, snapshotter, target, order,
                                                   leases, lease.id, progress, unpack_options)
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


def _transfer(puller: _Puller, root: Root, snapshotter: str,
              target: tuple[Descriptor, Manifest] | None, order: Sequence[Descriptor],
              leases: LeaseManager, lease_id: str, progress: Progress,
              unpack_options: Mapping[str, Any]) -> tuple[UnpackResult | None, int, int]:
    """Download every blob; unpack ``target`` meanwhile: the unpack, blobs fetched, present."""
    pool = ThreadPoolExecutor(max_workers=puller.concurrency, thread_name_prefix="fetch")
    futures = puller.start_downloads(pool, order)
    unpacked: UnpackResult | None = None
    try:
        if target is not None:
            try:
                unpacked = _unpack(puller, root, snapshotter, target, leases, lease_id,
                                   progress, unpack_options)
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
    return unpacked, fetched, len(futures) - fetched


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


def _unpack(puller: _Puller, root: Root, snapshotter: str,
            target: tuple[Descriptor, Manifest], leases: LeaseManager, lease_id: str,
            progress: Progress, options: Mapping[str, Any]) -> UnpackResult:
    _, manifest = target
    with puller.content.reader(manifest.config.digest) as r:
        config = ImageConfig.parse(r.read())
    unpacker = Unpacker(
        puller.content, root.snapshotter(snapshotter), snapshotter_name=snapshotter,
        locks_dir=root.path / "locks", tmpmounts=root.tmpmounts, progress=progress,
        parallel=max(puller.concurrency, 2),
        hold=functools.partial(leases.add_resource, lease_id, f"snapshot:{snapshotter}"),
        open_layer=puller.open_layer, max_layer_size=options["max_layer_size"],
        sync=options["sync"],
    )
    return unpacker.unpack(manifest, config)
