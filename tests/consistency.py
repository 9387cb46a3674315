"""Is a lamina root consistent? A checker (and crash recovery) shared by tests.

:func:`recover` does what a restart after a crash must do: unmount what a
killed process left mounted under the root, run content cleanup and every
snapshotter's cleanup (and, if asked, a garbage collection). It reports what
it had to repair, so tests can count the orphans a crash left.

:func:`problems` lists every way the root is inconsistent (empty when it is
consistent):

* nothing is mounted under the root and ``tmpmounts/`` is empty;
* every snapshotter's ``check()`` is empty (metadata and directories agree, no
  ``new-``/``rm-`` leftovers), every snapshot has its ``fs`` directory and its
  parent exists;
* the content store's rows and ``blobs/`` files agree one to one, every blob
  hashes to its digest and size, no temporary files remain, and ingests are
  either gone (``allow_ingests=False``) or well formed and resumable;
* every image resolves: its manifest, config and layers are all present, every
  blob its GC labels reference exists, and the snapshot its config names (the
  unpacked top ChainID) exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from lamina.content.local import BlobCorrupt, LocalContentStore
from lamina.errors import LaminaError, NotFound
from lamina.labels import GC_REF_CONTENT, GC_REF_SNAPSHOT
from lamina.metadata.root import SNAPSHOTTERS, Root
from lamina.mounts.mount import cleanup_temp_mounts
from lamina.snapshots.directory import DirectorySnapshotter

__all__ = ["Repairs", "mounts_under", "problems", "recover", "snapshotters_of",
           "unmount_under"]

_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_TMP_PREFIXES = (".tmp-", ".del-")


@dataclass
class Repairs:
    """What :func:`recover` found left behind by a crash (each a list of descriptions)."""

    mounts: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    collected: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.mounts) + len(self.snapshots) + len(self.content) + len(self.collected)

    def kinds(self) -> dict[str, int]:
        """How many of each kind of leftover (the first word of each description)."""
        out: dict[str, int] = {}
        for item in self.mounts + self.snapshots + self.content + self.collected:
            kind = item.split(" ", 1)[0]
            out[kind] = out.get(kind, 0) + 1
        return out

    def merge(self, other: Repairs) -> None:
        self.mounts += other.mounts
        self.snapshots += other.snapshots
        self.content += other.content
        self.collected += other.collected


def mounts_under(path: Path | str) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def unmount_under(path: Path | str) -> list[str]:
    """Lazily unmount everything at or below ``path``; returns what was mounted."""
    seen: list[str] = []
    for _ in range(10):  # stacked mounts take several rounds
        mps = mounts_under(path)
        if not mps:
            break
        for mp in mps:
            seen.append(mp)
            _libc.umount2(os.fsencode(mp), _MNT_DETACH)
    return seen


def snapshotters_of(root: Path) -> list[str]:
    base = root / "snapshots"
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.name in SNAPSHOTTERS)


@contextlib.contextmanager
def _opened(root: Path) -> Iterator[Root]:
    r = Root(root)
    try:
        yield r
    finally:
        r.close()


def recover(root: Path, *, drop_ingests: bool = True, gc: bool = False,
            expire_leases: bool = False) -> Repairs:
    """Repair what a crash left, as a restart would; returns what was found.

    ``drop_ingests`` also removes resumable ingests (no one will resume them);
    ``gc`` runs a collection after the cleanups, after deleting every lease
    first if ``expire_leases`` (as if the leases a killed process held had
    expired: what they protected becomes collectable).
    """
    rep = Repairs()
    # lamina's own recovery of a killed process's temporary mounts (what gc and
    # check --repair run); then anything else still mounted is a finding too
    rep.mounts += [f"temp mount {t}" for t in cleanup_temp_mounts(root / "tmpmounts")]
    rep.mounts += [f"mount {mp}" for mp in unmount_under(root)]
    with _opened(root) as r:
        if (root / "content").is_dir():
            store = r.content()
            assert isinstance(store, LocalContentStore)
            report = store.cleanup(ingest_max_age=timedelta(0) if drop_ingests else None)
            rep.content += [f"temp-file {p}" for p in report.removed_temp]
            rep.content += [f"ingest {p}" for p in report.removed_ingests]
            rep.content += [f"blob-without-row(restored) {d}" for d in report.restored_rows]
            rep.content += [f"row-without-blob(removed) {d}" for d in report.removed_rows]
            rep.content += [f"bad-blob-file(removed) {p}" for p in report.removed_blobs]
        for name in snapshotters_of(root):
            sn = r.snapshotter(name)
            assert isinstance(sn, DirectorySnapshotter)
            rep.snapshots += [f"snapshot-dir {name}: {p}" for p in sn.check()]
            sn.cleanup()
        if expire_leases and r.metadata_path.exists():
            from lamina.metadata.leases import LeaseManager

            leases = LeaseManager(r.metadata_path)
            try:
                for lease in leases.list():
                    leases.delete(lease.id)
                    rep.collected.append(f"lease {lease.id}")
            finally:
                leases.close()
        if gc:
            from lamina.metadata.gc import collect

            report_gc = collect(r)
            rep.collected += [f"gc-blob {d}" for d, _ in report_gc.content]
            rep.collected += [f"gc-snapshot {n}/{k}" for n, k, _ in report_gc.snapshots]
    return rep


def problems(root: Path, *, allow_ingests: bool = False, resolve_images: bool = True
             ) -> list[str]:
    """Every inconsistency of the root at ``root`` (empty when consistent).

    ``resolve_images=False`` accepts images whose documents are malformed (as an
    import of a hostile archive may register them) as long as nothing they
    reference is missing.
    """
    out: list[str] = [f"still mounted: {mp}" for mp in mounts_under(root)]
    tmpmounts = root / "tmpmounts"
    if tmpmounts.is_dir():
        out += [f"leftover temp mount dir {tmpmounts / e}" for e in os.listdir(tmpmounts)]
    with _opened(root) as r:
        for name in snapshotters_of(root):
            out += _snapshot_problems(name, r)
        if (root / "content").is_dir():
            store = r.content()
            assert isinstance(store, LocalContentStore)
            out += _content_problems(store, allow_ingests=allow_ingests)
            if r.metadata_path.exists():
                out += _image_problems(r, store, resolve=resolve_images)
    return out


def _snapshot_problems(name: str, r: Root) -> list[str]:
    sn = r.snapshotter(name)
    assert isinstance(sn, DirectorySnapshotter)
    out = [f"{name}: {p}" for p in sn.check()]
    infos = {i.name: i for i in sn.walk()}
    for key, info in infos.items():
        if info.parent and info.parent not in infos:
            out.append(f"{name}: snapshot {key!r} has a missing parent {info.parent!r}")
        try:
            fs = sn.fs_dir(sn.snapshot(key).id)
        except NotFound:
            out.append(f"{name}: snapshot {key!r} listed but not found")
            continue
        if not fs.is_dir():
            out.append(f"{name}: {info.kind.value} snapshot {key!r} has no directory {fs}")
    return out


def _content_problems(store: LocalContentStore, *, allow_ingests: bool) -> list[str]:
    out: list[str] = []
    rows = {i.digest: i for i in store.walk()}
    files = set(os.listdir(store.blobs_dir))
    for digest in sorted(rows):
        hexd = digest.split(":", 1)[1]
        if hexd not in files:
            out.append(f"content: row {digest} has no blob file")
            continue
        try:
            store.verify(digest)
        except BlobCorrupt as exc:
            out.append(f"content: {exc.message}")
        if os.stat(store.blobs_dir / hexd).st_mode & 0o222:
            out.append(f"content: committed blob {digest} is writable")
    out += [f"content: blob file {n} has no row" for n in sorted(files)
            if f"sha256:{n}" not in rows]
    for directory in (store.path, store.blobs_dir, store.ingest_dir):
        out += [f"content: temporary {directory / e}" for e in os.listdir(directory)
                if e.startswith(_TMP_PREFIXES)]
    for entry in sorted(os.listdir(store.ingest_dir)):
        ingest = store.ingest_dir / entry
        if entry.startswith(_TMP_PREFIXES):
            continue
        if not allow_ingests:
            out.append(f"content: orphan ingest {ingest}")
            continue
        ref_file, data = ingest / "ref", ingest / "data"
        if not ref_file.is_file() or not data.is_file():
            out.append(f"content: malformed ingest {ingest} (ref or data missing)")
            continue
        try:
            st = store.status(ref_file.read_text())
        except LaminaError as exc:
            out.append(f"content: ingest {ingest} has no readable status: {exc}")
            continue
        if st.offset != data.stat().st_size:
            out.append(f"content: ingest {ingest}: offset {st.offset} != data size")
        if st.total and st.offset > st.total:
            out.append(f"content: ingest {ingest}: {st.offset} bytes, more than total {st.total}")
        out += [f"content: temporary {ingest / e}" for e in os.listdir(ingest)
                if e.startswith(_TMP_PREFIXES)]
    return out


def _image_problems(r: Root, store: LocalContentStore, *, resolve: bool) -> list[str]:
    from lamina.images.graph import manifest_for
    from lamina.metadata.images import ImageStore

    out: list[str] = []
    images = ImageStore(r.metadata_path)
    try:
        listed = images.list()
    finally:
        images.close()
    blobs = {i.digest: i for i in store.walk()}
    for image in listed:
        try:
            _, manifest, _ = manifest_for(store, image.target)
        except NotFound as exc:
            out.append(f"image {image.name}: does not resolve: {exc}")
        except Exception as exc:  # malformed documents (any error, if lamina has a bug)
            if resolve:
                out.append(f"image {image.name}: does not resolve: "
                           f"{type(exc).__name__}: {exc}")
        else:
            for desc in [manifest.config, *manifest.layers]:
                if desc.digest not in blobs:
                    out.append(f"image {image.name}: blob {desc.digest} is missing")
        # everything reachable by GC labels from the target must exist
        stack, seen = [image.target.digest], set()
        while stack:
            d = stack.pop()
            if d in seen:
                continue
            seen.add(d)
            info = blobs.get(d)
            if info is None:
                out.append(f"image {image.name}: referenced blob {d} is missing")
                continue
            for k, v in info.labels.items():
                if k == GC_REF_CONTENT or k.startswith(GC_REF_CONTENT + "."):
                    stack.append(v)
                elif k.startswith(GC_REF_SNAPSHOT):
                    sname = k[len(GC_REF_SNAPSHOT):].split("/", 1)[0]
                    if sname not in SNAPSHOTTERS:
                        continue
                    try:
                        if sname not in snapshotters_of(r.path):
                            raise NotFound(sname)
                        r.snapshotter(sname).stat(v)
                    except NotFound:
                        out.append(f"image {image.name}: {d} names snapshot "
                                   f"{sname}/{v}, which is missing")
    return out
