"""The native snapshotter: every snapshot is a full copy of its parent's tree.

Works on any filesystem. A new snapshot's ``fs`` starts as a copy of the
parent (GNU ``cp`` keeps modes, owners, xattrs, hard links, devices, fifos,
symlinks and times, and reflinks where the filesystem can); mounts are bind
mounts, read-only for views.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from lamina.archive.limits import check_fits
from lamina.errors import FailedPrecondition, Internal, ResourceExhausted, reasons_of
from lamina.fs.files import filesystem_type
from lamina.mounts.mount import Mount
from lamina.snapshots import Capability, Kind
from lamina.snapshots.directory import DirectorySnapshotter
from lamina.snapshots.storage import Snapshot

__all__ = ["NativeSnapshotter", "copy_tree"]

#: statfs magics of filesystems whose copies share blocks (btrfs, xfs)
_REFLINKS = frozenset({0x9123683E, 0x58465342})


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the contents of ``src`` into existing ``dst``, keeping every attribute."""
    proc = subprocess.run(
        [
            "cp", "--archive", "--no-target-directory", "--reflink=auto",
            "--preserve=mode,ownership,timestamps,links,xattr",
            str(src), str(dst),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},  # its complaints as reasons_of has them
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["cp failed"]
        first = lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")
        if any(text in proc.stderr for text in reasons_of(ResourceExhausted)):
            # cp says so per file: the copy needs what is not there, lamina is fine
            raise ResourceExhausted(f"copying {src} to {dst}: {first}")
        raise Internal(f"copying {src} to {dst} failed: {first}")


class NativeSnapshotter(DirectorySnapshotter):
    """Snapshots as full copies with bind mounts (see module docs)."""

    CAPABILITIES = frozenset(
        {Capability.HARDLINKS, Capability.LINKED_COPY_UP, Capability.DEEP_CHAINS}
    )

    def _fill(self, new_dir: Path, kind: Kind, parent_ids: Sequence[str]) -> None:
        fs = new_dir / "fs"
        if fs.exists():
            # A staged layer holds only changes; a native snapshot must be whole.
            raise FailedPrecondition("the native snapshotter cannot adopt a staged layer")
        fs.mkdir(mode=0o755)
        if parent_ids:
            self._room_for_copy(parent_ids[0], fs)
            copy_tree(self.fs_dir(parent_ids[0]), fs)

    def _room_for_copy(self, parent: str, dst: Path) -> None:
        """ResourceExhausted now, with the disk's reserve kept, unless the parent's
        files (their size recorded at commit) fit beside it: the copy would run
        the filesystem to zero before failing. Where copies share blocks
        (``cp --reflink``: btrfs, xfs) they take next to nothing: not asked."""
        with self.meta.read(self._scope) as tx:
            key, usage = tx.recorded(parent)
        if usage is None or filesystem_type(dst) in _REFLINKS:
            return
        check_fits(dst, usage.size, f"the files of parent snapshot {key!r}")

    def _mounts(self, snap: Snapshot) -> list[Mount]:
        mode = "ro" if snap.kind is Kind.VIEW else "rw"
        return [Mount("bind", str(self.fs_dir(snap.id)), options=(mode, "rbind"))]
