"""Import+unpack onto the erofs snapshotter (issue 18) against containerd and overlay.

The 4-layer debootstrap image of :mod:`bench.images` (an OCI layout tar, read
once before the first round so every run finds it cached), imported with
unpack three ways, each on a fresh root:

* ``lamina --snapshotter erofs image import``: every layer written as one
  EROFS image straight from its gzip stream, fsynced, renamed, committed;
* ``lamina image import`` (overlay, as shipped: syncfs per layer);
* ``ctr image import --snapshotter overlayfs`` (a private containerd 1.6,
  started before the clock starts).

On two filesystems, in separate rounds: a journaled ext4 (a loop-mounted
file, ``mkfs.ext4`` defaults: ordered journal) and a tmpfs. ``sync`` runs
before each run. Rounds rotate the order. Targets (issue 18): erofs <= 0.3x
containerd's overlayfs and <= 0.5x lamina's overlay.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    Ctx,
    Row,
    ensure_tools,
    lamina_round,
    pair,
    rotated,
    scratch_filesystem,
    time_cmd,
)
from bench.images import debian_image
from bench.peer import containerd, ctr_snapshot_count, require_containerd

NAME = "erofs-import"

_COUNT = ("import sys\n"
          "from lamina.metadata.root import Root\n"
          "r = Root(sys.argv[1])\n"
          "print(sum(1 for _ in r.snapshotter(sys.argv[2]).walk()))\n"
          "r.close()\n")


def _count(root: Path, snapshotter: str) -> int:
    out = subprocess.run([sys.executable, "-c", _COUNT, str(root), snapshotter],
                         capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.strip())


def _rounds(ctx: Ctx, kind: str, tar: Path, reps: int) -> tuple[dict[str, list[float]],
                                                                  dict[str, int]]:
    """The three imports, ``reps`` rotated rounds on a fresh filesystem of ``kind``;
    their samples, and the snapshots each one made (checked once)."""
    checked: dict[str, int] = {}
    with scratch_filesystem(ctx, kind) as base:

        def lamina(snapshotter: str) -> Callable[[int], float]:
            return lamina_round(base, snapshotter, ["image", "import", str(tar)],
                                after=lambda root: checked.setdefault(
                                    snapshotter, _count(root, snapshotter)))

        def peer(i: int) -> float:
            with containerd(base) as c:
                os.sync()
                dt = time_cmd(c.ctr("image", "import", "--snapshotter", "overlayfs", str(tar)))
                checked.setdefault("containerd", ctr_snapshot_count(c, "overlayfs"))
            return dt

        samples = rotated({"erofs": lamina("erofs"), "overlay": lamina("overlay"),
                           "containerd": peer}, reps)
    return samples, checked


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    ensure_tools({"mkfs.ext4": "e2fsprogs"})
    img = debian_image(ctx.cache)
    with open(img.tar, "rb") as f:
        while f.read(1 << 20):
            pass
    reps = ctx.pick(5, 2)
    rows: list[Row] = []
    for kind in ("ext4", "tmpfs"):
        s, checked = _rounds(ctx, kind, img.tar, reps)
        wrong = {k: v for k, v in checked.items() if v != img.layers}
        if wrong:
            raise RuntimeError(f"expected {img.layers} snapshots after import, got {checked}")
        what = (f"import+unpack {img.layers}-layer debian ({img.files:,} files) "
                f"on {'a journaled ext4 (loop file)' if kind == 'ext4' else 'tmpfs'}")
        note = f"{reps} rounds (order rotated), fresh roots"
        ctr = "ctr image import --snapshotter overlayfs (private containerd 1.6)"
        rows.append(pair(s, "erofs", "containerd").row(
            f"{what}: erofs", "s", ctr, target="<= 0.3", limit=0.3, note=note))
        rows.append(pair(s, "erofs", "overlay").row(
            f"{what}: erofs", "s", "lamina image import (overlay)", target="<= 0.5",
            limit=0.5, note=note))
        rows.append(pair(s, "overlay", "containerd").row(
            f"{what}: overlay", "s", ctr, note=note))
    return rows
