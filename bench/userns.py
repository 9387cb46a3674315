"""First start of a user-namespaced container: ID-mapped layers vs a chowned copy.

``lamina run --userns HOSTID:SIZE`` on the multi-layer debootstrap image
(:mod:`bench.images`), imported once. Every sample starts a *new* container
(a fresh rw snapshot, so nothing is reused) running ``true``: lamina's
default mounts the image's lowerdirs through one ID-mapped clone; the peer is
the fallback for kernels that cannot (``LAMINA_IDMAP=copy``), which copies the
merged layers with shifted owners first — what containerd did before 2.0 with
its recursive chown. Wall time of the whole ``lamina run`` command; the
ratio is the median of per-pair idmapped/copy ratios, alternating who goes
first.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import Ctx, Row, Skip, cleanup_tree, lamina_cli, paired, run_cmd, time_cmd
from bench.images import debian_image

NAME = "userns"
HOST, SIZE = 600000, 65536


def run(ctx: Ctx) -> list[Row]:
    if os.geteuid() != 0:
        raise Skip("needs root (runc with a user namespace, ID-mapped mounts)")
    from lamina.mounts.idmap import idmap_supported

    img = debian_image(ctx.cache)
    # runc mounts a user-namespaced container's rootfs from inside the namespace:
    # the directories above the lamina root must let it through
    os.chmod(ctx.work, 0o711)
    root = ctx.work / "userns-root"
    lam = [*lamina_cli(), "--root", str(root)]
    run_cmd([*lam, "image", "import", str(img.tar)])
    if not idmap_supported(root):
        raise Skip("this kernel cannot ID-map mounts of the bench filesystem")
    reps = ctx.pick(5, 2)
    env_copy = {**os.environ, "LAMINA_IDMAP": "copy"}
    env_map = {k: v for k, v in os.environ.items() if k != "LAMINA_IDMAP"}

    def start(cid: str, env: dict[str, str]) -> float:
        os.sync()
        dt = time_cmd([*lam, "run", "--userns", f"{HOST}:{SIZE}", "--name", cid, img.name, "true"],
                      env=env)
        run_cmd([*lam, "container", "rm", "--force", cid])
        return dt

    def mapped(i: int) -> float:
        return start(f"mapped{i}", env_map)

    def copied(i: int) -> float:
        return start(f"copied{i}", env_copy)

    try:
        p = paired(mapped, copied, reps)
    finally:
        cleanup_tree(root)
    return [p.row(
        f"first start of a --userns container, {img.layers}-layer debian "
        f"({img.unpacked_bytes / 2**20:.0f} MiB/{img.files:,} files)",
        "s", "chowned copy of the layers (LAMINA_IDMAP=copy, the fallback)",
        target="< 1.0", limit=1.0,
        note=f"{reps} pairs; each a new container running `true`; "
             "includes Python and runc start-up")]


def _main() -> None:  # pragma: no cover - manual use
    import sys
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir="/var/tmp"))
    try:
        for row in run(Ctx(quick="--quick" in sys.argv, work=work)):
            print(row.to_json())
    finally:
        cleanup_tree(work)


if __name__ == "__main__":  # pragma: no cover
    _main()
