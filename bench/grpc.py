"""lamina over gRPC: containerd using lamina as a proxy snapshotter, and raw RPC speed.

* ``ctr image import --snapshotter lamina`` on a private containerd whose
  proxy plugin ``lamina`` points at ``lamina serve`` (fresh lamina root), vs
  ``ctr image import --snapshotter overlayfs`` on a fresh private containerd.
  Same image as the import benchmark; daemons start before the clock does.
  Target: median ratio <= 1.3.
* Prepare+Commit+Remove cycles per second over the lamina socket with
  ``lamina.api.client.RemoteSnapshotter`` vs containerd's overlayfs over its
  own socket (same client code, plus the namespace and lease headers).
  Target: lamina >= 300 cycles/s.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench.common import Ctx, Row, Skip, paired, time_cmd
from bench.images import debian_image
from bench.peer import (
    close_channel,
    containerd,
    ctr_snapshot_count,
    lamina_server,
    remote_snapshotter,
    require_containerd,
)

NAME = "grpc"
MIN_CYCLES = 300.0


def _cycles(sn: Any, prefix: str, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        sn.prepare(f"{prefix}-a{i}", "")
        sn.commit(f"{prefix}-c{i}", f"{prefix}-a{i}")
        sn.remove(f"{prefix}-c{i}")
    return n / (time.perf_counter() - t0)


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    try:
        import lamina.api.client
        import lamina.api.server  # noqa: F401
    except ImportError as exc:
        raise Skip(f"lamina's gRPC server/client is missing ({exc})") from exc
    img = debian_image(ctx.cache)
    rows: list[Row] = []
    how: list[str] = []

    # -- RPC cycles -------------------------------------------------------
    rounds = ctx.pick(5, 3)
    per_round = ctx.pick(200, 60)
    with lamina_server(ctx.work) as ls, containerd(ctx.work) as ctd:
        how.append(ls.how)
        lam = remote_snapshotter(ls.address, "overlay")
        peer = ctd.snapshotter("overlayfs")
        try:
            _cycles(lam, "warm", 5)
            _cycles(peer, "warm", 5)
            p = paired(lambda i: _cycles(lam, f"r{i}", per_round),
                       lambda i: _cycles(peer, f"r{i}", per_round), rounds)
        finally:
            close_channel(lam)
            close_channel(peer)
    row = p.row("prepare+commit+remove over the socket", "cycles/s (higher=better)",
                "containerd overlayfs via its gRPC socket",
                target=f"lamina >= {MIN_CYCLES:.0f}/s",
                note=f"{rounds}x{per_round} cycles; RemoteSnapshotter on {ls.how}")
    row.ok = row.lamina is not None and row.lamina >= MIN_CYCLES
    rows.append(row)

    # -- import through the proxy plugin ------------------------------------
    reps = ctx.pick(4, 1)
    checked: dict[str, int] = {}

    def lam_import(i: int) -> float:
        with lamina_server(ctx.work) as srv, containerd(ctx.work, proxy=srv.address) as c:
            os.sync()
            dt = time_cmd(c.ctr("image", "import", "--snapshotter", "lamina", str(img.tar)))
            if "lamina" not in checked:
                checked["lamina"] = ctr_snapshot_count(c, "lamina")
        return dt

    def peer_import(i: int) -> float:
        with containerd(ctx.work) as c:
            os.sync()
            dt = time_cmd(c.ctr("image", "import", "--snapshotter", "overlayfs", str(img.tar)))
            if "overlayfs" not in checked:
                checked["overlayfs"] = ctr_snapshot_count(c, "overlayfs")
        return dt

    p = paired(lam_import, peer_import, reps)
    if set(checked.values()) != {img.layers}:
        raise RuntimeError(f"expected {img.layers} snapshots after import, got {checked}")
    rows.append(p.row(f"ctr image import, {img.layers}-layer debian", "s",
                      "containerd built-in overlayfs", target="<= 1.3", limit=1.3,
                      note=f"{reps} pairs, fresh daemons and roots; lamina as proxy "
                           "snapshotter `lamina`"))
    return rows
