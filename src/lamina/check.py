"""Consistency check (and repair) of a whole lamina root.

What :func:`check` looks at:

* **content** — every committed blob is re-hashed
  (:meth:`LocalContentStore.verify`): a blob whose bytes no longer match its
  digest is *corrupt*, a row whose file is gone is *missing*; files in the
  blob directory that no row names are *orphans*;
* **snapshots** — every snapshotter's metadata against its directories
  (:meth:`DirectorySnapshotter.check`);
* **images** — every image's target, and every blob reached from it through
  ``containerd.io/gc.ref.content*`` labels, is present;
* **containers** — every container's snapshots exist in its snapshotter.

With ``repair``: corrupt blobs are deleted, the content store's crash
cleanup runs (orphan files are re-adopted when they hash right, removed
otherwise; rows without a file are dropped), every snapshotter's cleanup runs
(directories the metadata does not know go), and snapshot rows whose
directory is missing are removed when nothing is stacked on them. What
cannot be repaired here — an image whose content is gone, a container whose
snapshot is gone — is reported, and the images left broken are listed (they
need importing again). The check then runs again and
:attr:`CheckReport.remaining` says what is still wrong.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

from lamina.content.local import BlobCorrupt, LocalContentStore
from lamina.errors import FailedPrecondition, LaminaError, NotFound
from lamina.fsutil import locked
from lamina.gc import label_edges
from lamina.mount import cleanup_temp_mounts
from lamina.root import SNAPSHOTTERS, Root
from lamina.snapshots.base import DirectorySnapshotter

__all__ = ["CheckReport", "Problem", "check"]

_TMP_PREFIXES = (".tmp-", ".del-")


@dataclass(frozen=True)
class Problem:
    """One inconsistency. ``kind`` is one of ``content.corrupt``,
    ``content.missing``, ``content.orphan``, ``snapshot``, ``image``,
    ``container``."""

    kind: str
    subject: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "subject": self.subject, "message": self.message}


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


def _local_content(root: Root) -> LocalContentStore:
    store = root.content()
    if not isinstance(store, LocalContentStore):  # pragma: no cover - roots are local
        raise FailedPrecondition("check needs the local content store")
    return store


def _snapshotters(root: Root) -> list[str]:
    base = root.path / "snapshots"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and p.name in SNAPSHOTTERS)


def _check_content(store: LocalContentStore) -> list[Problem]:
    problems: list[Problem] = []
    rows = set()
    for info in store.walk():
        rows.add(info.digest)
        try:
            store.verify(info.digest)
        except BlobCorrupt as exc:
            problems.append(Problem("content.corrupt", info.digest, exc.message))
        except NotFound as exc:
            problems.append(Problem("content.missing", info.digest, exc.message))
    for name in sorted(os.listdir(store.blobs_dir)):
        if f"sha256:{name}" not in rows:
            what = ("temporary file left by a crash" if name.startswith(_TMP_PREFIXES)
                    else "blob file that no metadata row names")
            problems.append(Problem("content.orphan", str(store.blobs_dir / name), what))
    return problems


def _check_snapshots(root: Root) -> list[Problem]:
    problems: list[Problem] = []
    for name in _snapshotters(root):
        sn = root.snapshotter(name)
        if isinstance(sn, DirectorySnapshotter):
            problems += [Problem("snapshot", name, msg) for msg in sn.check()]
    return problems


def _image_problems(root: Root, store: LocalContentStore) -> dict[str, list[Problem]]:
    """Per image name, the content it needs but the store lacks."""
    from lamina.images.store import ImageStore

    images = ImageStore(root.metadata_path)
    try:
        listed = images.list()
    finally:
        images.close()
    present = {info.digest: info for info in store.walk()}
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
            if info is None or not store.blob_path(digest).is_file():
                missing.append(digest)
                continue
            stack.extend(ident for kind, ident in label_edges(info.labels)
                         if kind == "content")
        if missing:
            out[image.name] = [
                Problem("image", image.name,
                        f"image {image.name}: "
                        f"{'target' if d == image.target.digest else 'referenced content'} "
                        f"{d} is missing from the content store")
                for d in sorted(missing)
            ]
    return out


def _check_containers(root: Root) -> list[Problem]:
    try:
        from lamina.containers.store import ContainerStore
    except ModuleNotFoundError:  # pragma: no cover
        return []
    store = ContainerStore(root.metadata_path)
    try:
        containers = store.list()
    finally:
        store.close()
    problems: list[Problem] = []
    for c in containers:
        for key in c.snapshot_keys():
            try:
                root.snapshotter(c.snapshotter).stat(key)
            except NotFound:
                problems.append(Problem(
                    "container", c.id,
                    f"container {c.id}: snapshot {c.snapshotter}/{key} does not exist"))
            except LaminaError as exc:
                problems.append(Problem("container", c.id, f"container {c.id}: {exc.message}"))
    return problems


def _scan(root: Root) -> tuple[list[Problem], dict[str, list[Problem]]]:
    store = _local_content(root)
    problems = _check_content(store)
    problems += _check_snapshots(root)
    images = _image_problems(root, store)
    for name in sorted(images):
        problems += images[name]
    problems += _check_containers(root)
    return problems, images


def _repair_snapshot_rows(sn: DirectorySnapshotter, name: str) -> list[str]:
    """Remove rows whose directory is missing, leaf first, when nothing is stacked on them."""
    repaired: list[str] = []
    infos = {i.name: i for i in sn.walk()}
    missing = set()
    for key in infos:
        with contextlib.suppress(NotFound):
            if not sn.fs_dir(sn.snapshot(key).id).is_dir():
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


def check(root: Root, *, repair: bool = False) -> CheckReport:
    """Check ``root``; with ``repair``, fix what can be fixed and check again."""
    report = CheckReport(repair=repair)
    problems, _ = _scan(root)
    report.problems = problems
    if not repair:
        return report
    # Under the gc lock: a collection must not sweep while rows and files move.
    with locked(root.path / "locks" / "gc"):
        store = _local_content(root)
        for p in problems:
            if p.kind == "content.corrupt":
                with contextlib.suppress(NotFound):
                    store.delete(p.subject)
                    report.repaired.append(f"deleted corrupt blob {p.subject}")
        report.repaired += [f"unmounted stale temporary mount {t}"
                            for t in cleanup_temp_mounts(root.tmpmounts)]
        cleaned = store.cleanup()
        report.repaired += [f"restored metadata of blob {d}" for d in cleaned.restored_rows]
        report.repaired += [f"dropped metadata of missing blob {d}"
                            for d in cleaned.removed_rows]
        report.repaired += [f"removed unusable blob file {p}" for p in cleaned.removed_blobs]
        report.repaired += [f"removed temporary file {p}" for p in cleaned.removed_temp]
        for name in _snapshotters(root):
            sn = root.snapshotter(name)
            if not isinstance(sn, DirectorySnapshotter):
                continue
            orphans = [m for m in sn.check() if "unknown to the metadata" in m]
            sn.cleanup()
            report.repaired += [f"snapshotter {name}: removed {m.split(':', 1)[0]}"
                                for m in orphans]
            report.repaired += _repair_snapshot_rows(sn, name)
    remaining, images_after = _scan(root)
    report.remaining = remaining
    report.broken_images = sorted(images_after)
    return report
