"""Image import with unpack: ``lamina image import`` vs ``ctr image import``.

Both import the same multi-layer debootstrap image (see :mod:`bench.images`)
from an OCI layout tar and unpack it into overlay snapshots. Every run gets
a fresh root: a fresh private containerd (started before the clock starts)
for the peer, a fresh ``--root`` for lamina. Wall time of the command is
measured; ``sync`` runs between runs so one run's writeback does not bill
the next. The ratio is the median of per-pair lamina/containerd ratios.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bench.common import (
    Ctx,
    Row,
    Skip,
    cleanup_tree,
    lamina_cli,
    lamina_has_command,
    paired,
    time_cmd,
)
from bench.images import debian_image
from bench.peer import containerd, ctr_snapshot_count, require_containerd

NAME = "import"


def lamina_snapshot_count(root: Path) -> int:
    from lamina.root import Root

    r = Root(root)
    try:
        return sum(1 for _ in r.snapshotter("overlay").walk())
    finally:
        r.close()


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    if not lamina_has_command("image", "import"):
        raise Skip("`lamina image import` is not implemented yet")
    img = debian_image(ctx.cache)
    reps = ctx.pick(5, 1)
    checked: dict[str, int] = {}

    def lam(i: int) -> float:
        root = Path(tempfile.mkdtemp(prefix="lamina-root-", dir=ctx.work))
        try:
            os.sync()
            dt = time_cmd([*lamina_cli(), "--root", str(root), "image", "import", str(img.tar)])
            if "lamina" not in checked:
                checked["lamina"] = lamina_snapshot_count(root)
            return dt
        finally:
            cleanup_tree(root)

    def peer(i: int) -> float:
        with containerd(ctx.work) as c:
            os.sync()
            dt = time_cmd(c.ctr("image", "import", "--snapshotter", "overlayfs", str(img.tar)))
            if "containerd" not in checked:
                checked["containerd"] = ctr_snapshot_count(c, "overlayfs")
        return dt

    p = paired(lam, peer, reps)
    if checked.get("lamina") != img.layers or checked.get("containerd") != img.layers:
        raise RuntimeError(f"expected {img.layers} snapshots after import, got {checked}")
    size = img.tar.stat().st_size
    return [p.row(
        f"import+unpack {img.layers}-layer debian ({size / 2**20:.0f} MiB tar, "
        f"{img.unpacked_bytes / 2**20:.0f} MiB/{img.files:,} files)",
        "s", "ctr image import --snapshotter overlayfs (private containerd 1.6)",
        target="<= 1.0", limit=1.0,
        note=f"{reps} pairs, fresh roots; unpigz {'on' if shutil.which('unpigz') else 'off'}"
             " for containerd")]
