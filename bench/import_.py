"""Image import with unpack: ``lamina image import`` vs ``ctr image import``.

Both import the same multi-layer debootstrap image (see :mod:`bench.images`)
from an OCI layout tar and unpack it into overlay snapshots. Every run gets
a fresh root: a fresh private containerd (started before the clock starts)
for the peer, a fresh ``--root`` for lamina. Wall time of the command is
measured; ``sync`` runs before each run so one run's writeback does not bill
the next. Caches are warm for every run alike: the image tar is read once
before the first round, and no run drops the page cache.

lamina runs in several variants, all in the same rounds, the order rotated
each round:

- ``default``: as shipped, each layer synced (syncfs) before its snapshot is
  committed, SQLite ``synchronous=FULL``;
- ``--no-sync``: the per-layer syncfs skipped;
- ``--no-sync`` with SQLite ``synchronous=NORMAL`` (patched in for the run):
  what ``FULL`` costs on top;
- with ``--before-commit REV``: the lamina of that commit.

Each ratio is the median of the per-round ratios of two of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    Ctx,
    Row,
    Skip,
    cleanup_tree,
    lamina_has_command,
    lamina_variant,
    pair,
    rotated,
    time_cmd,
)
from bench.images import debian_image
from bench.peer import containerd, ctr_snapshot_count, require_containerd

NAME = "import"

_COUNT = ("import sys\n"
          "from lamina.metadata.root import Root\n"
          "r = Root(sys.argv[1])\n"
          "print(sum(1 for _ in r.snapshotter('overlay').walk()))\n"
          "r.close()\n")


def lamina_snapshot_count(root: Path, env: dict[str, str]) -> int:
    """Snapshots in ``root``, counted by the lamina that made it (``env``)."""
    proc = subprocess.run([sys.executable, "-c", _COUNT, str(root)], env=env,
                          capture_output=True, text=True, check=True, timeout=120)
    return int(proc.stdout.strip())


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    if not lamina_has_command("image", "import"):
        raise Skip("`lamina image import` is not implemented yet")
    img = debian_image(ctx.cache)
    reps = ctx.pick(7, 1)
    checked: dict[str, int] = {}

    def lamina(name: str, src: Path | None = None, *, normal: bool = False,
               flags: tuple[str, ...] = ()) -> Callable[[int], float]:
        cmd, env = lamina_variant(src, normal=normal)

        def one(i: int) -> float:
            root = Path(tempfile.mkdtemp(prefix="lamina-root-", dir=ctx.work))
            try:
                os.sync()
                dt = time_cmd([*cmd, "--root", str(root), "image", "import", *flags,
                               str(img.tar)], env=env)
                if name not in checked:
                    checked[name] = lamina_snapshot_count(root, env)
                return dt
            finally:
                cleanup_tree(root)

        return one

    def peer(i: int) -> float:
        with containerd(ctx.work) as c:
            os.sync()
            dt = time_cmd(c.ctr("image", "import", "--snapshotter", "overlayfs", str(img.tar)))
            if "containerd" not in checked:
                checked["containerd"] = ctr_snapshot_count(c, "overlayfs")
        return dt

    variants: dict[str, Callable[[int], float]] = {
        "default": lamina("default"),
        "no-sync": lamina("no-sync", flags=("--no-sync",)),
        "no-sync+normal": lamina("no-sync+normal", normal=True, flags=("--no-sync",)),
        "containerd": peer,
    }
    if ctx.before is not None:
        variants["before"] = lamina("before", ctx.before)
    with open(img.tar, "rb") as f:  # every run, the first included, finds the tar cached
        while f.read(1 << 20):
            pass
    s = rotated(variants, reps)
    wrong = {k: v for k, v in checked.items() if v != img.layers}
    if wrong or len(checked) != len(variants):
        raise RuntimeError(f"expected {img.layers} snapshots after import, got {checked}")

    size = img.tar.stat().st_size
    what = (f"{img.layers}-layer debian ({size / 2**20:.0f} MiB tar, "
            f"{img.unpacked_bytes / 2**20:.0f} MiB/{img.files:,} files)")
    ctr_name = "ctr image import --snapshotter overlayfs (private containerd 1.6)"
    note = (f"{reps} rounds of {len(variants)} (order rotated), fresh roots, ext4; "
            f"unpigz {'on' if shutil.which('unpigz') else 'off'} for containerd")
    rows = [
        pair(s, "default", "containerd").row(
            f"import+unpack {what}", "s", ctr_name, target="<= 1.0", limit=1.0, note=note),
        pair(s, "no-sync", "containerd").row(
            "import+unpack --no-sync", "s", ctr_name, note=note),
        pair(s, "default", "no-sync").row(
            "sync cost: default / --no-sync", "s", "lamina image import --no-sync",
            note="the per-layer syncfs before each snapshot commit"),
        pair(s, "no-sync", "no-sync+normal").row(
            "synchronous=FULL cost: FULL / NORMAL (both --no-sync)", "s",
            "lamina --no-sync with SQLite synchronous=NORMAL patched in"),
    ]
    if ctx.before is not None:
        before = f"lamina {ctx.before_rev} (before)"
        rows += [
            pair(s, "default", "before").row(
                f"import+unpack, this tree / {ctx.before_rev}", "s", before,
                note="sync + FULL + tree manifests + everything else since"),
            pair(s, "no-sync+normal", "before").row(
                f"import+unpack --no-sync NORMAL / {ctx.before_rev}", "s", before,
                note="without sync and FULL: tree manifests + everything else since"),
            pair(s, "before", "containerd").row(
                f"import+unpack {ctx.before_rev}", "s", ctr_name),
        ]
    return rows
