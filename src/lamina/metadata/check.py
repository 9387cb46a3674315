"""Consistency check (and repair) of a whole lamina root.

What :func:`check` looks at:

* **content** — every committed blob is re-hashed
  (:meth:`lamina.content.Checker.check`): a blob whose bytes no longer match its
  digest is *corrupt*, a row whose file is gone is *missing*; files in the
  blob directory that no row names are *orphans*; a row no owner holds a
  reference to is *unheld* (:mod:`lamina.owners`);
* **snapshots** — every snapshotter's metadata against its directories
  (snapshotters that implement :class:`~lamina.snapshots.Checker`);
* **layers** (``deep``) — every committed layer snapshot that recorded a tree
  manifest when it was unpacked (:mod:`lamina.archive.mtree`) is walked and
  compared with it: a file of a lower layer that was changed, added, removed
  or rotted on disk is found (snapshotters with
  :class:`~lamina.snapshots.LocalDirectories`);
* **images** — every image's target, and every blob reached from it through
  ``containerd.io/gc.ref.content*`` labels, is present;
* **containers** — every container's snapshots exist in its snapshotter.

Blobs and snapshots of both owners (the CLI's and containerd's, on a root
``lamina serve`` shares) are checked; checking takes no reference.

With ``repair``: corrupt blobs are deleted, the content store's crash
cleanup runs (orphan files are re-adopted when they hash right, removed
otherwise, restored rows held by the CLI; rows without a file are dropped;
unheld rows are given the CLI's reference), every snapshotter's
cleanup runs (directories the metadata does not know go), and snapshot rows
whose directory is missing are removed, by their owner's scope, when nothing
is stacked on them. What
cannot be repaired here — an image whose content is gone, a container whose
snapshot is gone — is reported, and the images left broken are listed (they
need importing again). The check then runs again and
:attr:`CheckReport.remaining` says what is still wrong.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from lamina.archive import mtree
from lamina.content import Checker as ContentChecker
from lamina.errors import FailedPrecondition, LaminaError, NotFound
from lamina.fs.files import locked
from lamina.labels import LAYER_MTREE
from lamina.metadata.gc import label_edges
from lamina.metadata.root import Root
from lamina.mounts.mount import cleanup_temp_mounts
from lamina.owners import OWNERS, Scoped
from lamina.problems import Problem, ProblemType
from lamina.snapshots import (
    Checker,
    Kind,
    LayerDigests,
    LocalDirectories,
    Snapshotter,
)

__all__ = ["CheckReport", "check"]


#: How many differences of one layer are spelled out (the rest are counted).
_SHOWN_DIFFERENCES = 5


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    remaining: list[Problem] = field(default_factory=list)
    repair: bool = False

    @property
    def ok(self) -> bool:
        """Consistent: nothing found, or (after a repair) nothing left."""
        return not (self.remaining if self.repair else self.problems)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "repair": self.repair,
            "problems": [p.to_json() for p in self.problems],
            "repaired": list(self.repaired),
            "broken_images": list(self.broken_images),
            "remaining": [p.to_json() for p in self.remaining],
        }


def _content_checker(root: Root) -> ContentChecker:
    store = root.content()
    if not isinstance(store, ContentChecker):  # pragma: no cover - roots' stores check
        raise FailedPrecondition("check needs a content store that can check itself")
    return store


def _check_content(store: ContentChecker, *, rehash: bool) -> list[Problem]:
    return store.check(rehash=rehash)


def _check_snapshots(root: Root) -> list[Problem]:
    problems: list[Problem] = []
    for name in root.snapshotter_names():
        sn = root.snapshotter(name)
        if isinstance(sn, Checker):
            problems += [replace(p, subject=f"{name}: {p.subject}") for p in sn.check()]
    return problems


def _check_layers(root: Root) -> list[Problem]:
    """Committed layers against the tree manifests recorded when they were unpacked."""
    problems: list[Problem] = []
    content = root.content()
    for name in root.snapshotter_names():
        sn = root.snapshotter(name)
        if not isinstance(sn, LocalDirectories):
            continue
        for info in sn.walk():
            digest = info.labels.get(LAYER_MTREE)
            digests = isinstance(sn, LayerDigests)  # an image file: its recorded sha256
            if info.kind is not Kind.COMMITTED or not (digest or digests):
                continue
            subject = f"{name}/{info.name}"
            try:
                if isinstance(sn, LayerDigests):
                    problem = sn.verify_layer(info.name)
                else:
                    problem = _compare_layer(sn, info.name, content.reader(digest or ""))
            except NotFound:
                problem = f"its tree manifest {digest} is missing from the content store"
            except LaminaError as exc:
                problem = exc.message
            if problem:
                problems.append(Problem(ProblemType.LAYER_CHANGED, subject,
                                        f"layer {subject}: {problem}"))
    return problems


def _compare_layer(sn: Snapshotter, key: str, recorded: Any) -> str:
    """What differs between layer ``key``'s files and its recorded manifest ("" if nothing)."""
    assert isinstance(sn, LocalDirectories)
    with recorded:
        found = mtree.compare(mtree.decode(recorded), mtree.record(sn.layer_dir(key)))
        shown = [str(d) for d in itertools.islice(found, _SHOWN_DIFFERENCES)]
        more = sum(1 for _ in found)
    if not shown:
        return ""
    tail = f" (and {more} more)" if more else ""
    return "changed since it was unpacked: " + "; ".join(shown) + tail


def _image_problems(root: Root, lost: set[str]) -> dict[str, list[Problem]]:
    """Per image name, the content it needs but the store lacks (``lost``: blobs
    recorded whose bytes are gone)."""
    listed = root.images().list(skip_damaged=True)  # reported by _check_records
    present = {info.digest: info for info in root.content().walk()}
    out: dict[str, list[Problem]] = {}
    for image in listed:
        missing: list[str] = []
        seen: set[str] = set()
        stack = [image.target.digest]
        while stack:
            digest = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            info = present.get(digest)
            if info is None or digest in lost:
                missing.append(digest)
                continue
            stack.extend(ident for kind, ident in label_edges(info.labels)
                         if kind == "content")
        if missing:
            out[image.name] = [
                Problem(ProblemType.IMAGE, image.name,
                        f"image {image.name}: "
                        f"{'target' if d == image.target.digest else 'referenced content'} "
                        f"{d} is missing from the content store")
                for d in sorted(missing)
            ]
    return out


def _check_records(root: Root) -> list[Problem]:
    damaged = [*root.images().damaged(), *root.containers().damaged(),
               *root.leases().damaged()]
    return [Problem(ProblemType.RECORD_DAMAGED, key, message) for key, message in damaged]


def _check_containers(root: Root) -> list[Problem]:
    containers = root.containers().list(skip_damaged=True)  # see _check_records
    problems: list[Problem] = []
    for c in containers:
        for key in c.snapshot_keys():
            try:
                root.snapshotter(c.snapshotter).stat(key)
            except NotFound:
                problems.append(Problem(
                    ProblemType.CONTAINER, c.id,
                    f"container {c.id}: snapshot {c.snapshotter}/{key} does not exist"))
            except LaminaError as exc:
                problems.append(Problem(ProblemType.CONTAINER, c.id,
                                        f"container {c.id}: {exc.message}"))
    return problems


def _scan(root: Root, *, deep: bool,
          rehash: bool) -> tuple[list[Problem], dict[str, list[Problem]]]:
    store = _content_checker(root)
    problems = _check_content(store, rehash=rehash)
    lost = {p.subject for p in problems if p.kind is ProblemType.CONTENT_MISSING}
    problems += _check_records(root)
    problems += _check_snapshots(root)
    if deep:
        problems += _check_layers(root)
    images = _image_problems(root, lost)
    for name in sorted(images):
        problems += images[name]
    problems += _check_containers(root)
    return problems, images


def _repair_snapshot_rows(sn: Snapshotter, name: str) -> list[str]:
    """Remove rows whose directory is missing, leaf first, when nothing is stacked on them."""
    if not isinstance(sn, LocalDirectories):
        return []
    repaired: list[str] = []
    infos = {i.name: i for i in sn.walk()}
    missing = set()
    for key in infos:
        with contextlib.suppress(NotFound):
            if not sn.layer_dir(key).is_dir():
                missing.add(key)
    children: dict[str, int] = {k: 0 for k in infos}
    for info in infos.values():
        if info.parent in children:
            children[info.parent] += 1
    ready = sorted(k for k in missing if children[k] == 0)
    while ready:
        key = ready.pop()
        try:
            sn.remove(key)
        except (NotFound, FailedPrecondition):
            continue
        repaired.append(f"removed snapshot {name}/{key}: its directory was missing")
        parent = infos[key].parent
        if parent in missing:
            children[parent] -= 1
            if children[parent] == 0:
                ready.append(parent)
    return repaired


def check(root: Root, *, repair: bool = False, deep: bool = False,
          rehash: bool = True) -> CheckReport:
    """Check ``root``; with ``repair``, fix what can be fixed and check again.

    ``deep`` also compares committed layers with the tree manifests recorded
    when they were unpacked (reads every file of every such layer). A changed
    layer is reported, not repaired: the images using it need importing again
    once it is removed. Without ``rehash`` blobs are only checked to exist
    (what recovery after a restart does: see :mod:`lamina.metadata.recover`)."""
    report = CheckReport(repair=repair)
    problems, _ = _scan(root, deep=deep, rehash=rehash)
    report.problems = problems
    if not repair:
        return report
    # Under the gc lock: a collection must not sweep while rows and files move.
    with locked(root.path / "locks" / "gc"):
        store = _content_checker(root)
        for p in problems:
            if p.kind is ProblemType.CONTENT_CORRUPT:
                with contextlib.suppress(NotFound):
                    root.content().delete(p.subject)
                    report.repaired.append(f"deleted corrupt blob {p.subject}")
        report.repaired += [f"unmounted stale temporary mount {t}"
                            for t in cleanup_temp_mounts(root.tmpmounts)]
        cleaned = store.cleanup()
        report.repaired += [f"restored metadata of blob {d}" for d in cleaned.restored_rows]
        report.repaired += [f"dropped metadata of missing blob {d}"
                            for d in cleaned.removed_rows]
        report.repaired += [f"removed unusable blob file {p}" for p in cleaned.removed_blobs]
        report.repaired += [f"removed temporary file {p}" for p in cleaned.removed_temp]
        report.repaired += [f"gave the CLI a reference to unheld blob {d}"
                            for d in cleaned.given_to_cli]
        for name in root.snapshotter_names():
            sn = root.snapshotter(name)
            orphans = ([p for p in sn.check() if p.repairable]
                       if isinstance(sn, Checker) else [])
            sn.cleanup()
            report.repaired += [f"snapshotter {name}: removed {p.subject}" for p in orphans]
            scopes = ([sn.scoped(owner) for owner in OWNERS] if isinstance(sn, Scoped)
                      else [sn])
            for scoped in scopes:
                report.repaired += _repair_snapshot_rows(scoped, name)
    remaining, images_after = _scan(root, deep=deep, rehash=rehash)
    report.remaining = remaining
    report.broken_images = sorted(images_after)
    return report
