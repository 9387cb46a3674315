"""Mounting deep overlay stacks: lamina's ``mount_all`` vs util-linux ``mount(8)``.

A chain of 500 committed layers is built in lamina's overlay snapshotter;
an active snapshot on top of 1, 128 and 500 of them is mounted. lamina
mounts in-process (classic mount(2), or fsopen/fsconfig when the options
exceed a page); the peer runs ``mount -t overlay`` with the same options.
With absolute paths the option string of deep stacks exceeds a page and
mount(8) fails, so the timed peer uses lowerdirs relative to its working
directory (the usual workaround); the absolute attempt is reported.
The peer's time includes spawning mount(8).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.common import Ctx, Row, Skip, paired, unmount_quietly

NAME = "mounts"
DEPTHS = (1, 128, 500)


def _mount8(opts: str, target: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["mount", "-t", "overlay", "overlay", str(target), "-o", opts],
                          cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, check=False)


def run(ctx: Ctx) -> list[Row]:
    if os.geteuid() != 0:
        raise Skip("mounting needs root")
    try:
        from lamina.mounts.mount import mount_all, unmount_all
        from lamina.snapshots.overlay import OverlaySnapshotter
    except ImportError as exc:
        raise Skip(f"lamina overlay snapshotter missing: {exc}") from exc

    reps = ctx.pick(15, 5)
    rows: list[Row] = []
    with ctx.tempdir("mounts-") as d:
        sn = OverlaySnapshotter(d / "lamina")
        target = d / "mnt"
        target.mkdir()
        try:
            ctx.log(f"  building a chain of {max(DEPTHS)} layers ...")
            parent = ""
            for i in range(max(DEPTHS)):
                sn.prepare(f"build-{i}", parent)
                (sn.layer_dir(f"build-{i}") / f"f{i}").write_text(str(i))
                sn.commit(f"layer-{i}", f"build-{i}")
                parent = f"layer-{i}"
            snap_dirs = d / "lamina" / "snapshots"
            for depth in DEPTHS:
                mounts = sn.prepare(f"top-{depth}", f"layer-{depth - 1}")
                if len(mounts) != 1 or mounts[0].type != "overlay":
                    raise RuntimeError(f"unexpected mounts for depth {depth}: {mounts}")
                opts = ",".join(mounts[0].options)
                rel = opts.replace(str(snap_dirs) + "/", "")
                probe = target / f"f{depth - 1}"

                absolute = _mount8(opts, target)
                if absolute.returncode == 0:
                    unmount_all(target)
                    abs_note = f"mount(8) absolute ok ({len(opts)} B options)"
                    use_rel = False
                else:
                    err = absolute.stderr.decode(errors="replace").strip().splitlines()
                    why = err[0].split(": ")[-1].strip() if err else absolute.returncode
                    abs_note = (f"mount(8) with absolute paths FAILS ({len(opts):,} B options "
                                f"> one page: {why}); peer "
                                f"timed with relative lowerdirs ({len(rel):,} B, "
                                "cwd=snapshots dir)")
                    use_rel = True

                def lam(i: int, mounts: list = mounts, probe: Path = probe) -> float:  # type: ignore[type-arg]
                    t0 = time.perf_counter()
                    mount_all(mounts, target)
                    dt = time.perf_counter() - t0
                    try:
                        if not probe.exists():
                            raise RuntimeError(f"lamina mount misses {probe.name}")
                    finally:
                        unmount_all(target)
                    return dt

                def peer(i: int, opts: str = rel if use_rel else opts,
                         cwd: Path | None = snap_dirs if use_rel else None,
                         probe: Path = probe) -> float:
                    t0 = time.perf_counter()
                    proc = _mount8(opts, target, cwd)
                    dt = time.perf_counter() - t0
                    if proc.returncode != 0:
                        raise RuntimeError(f"mount(8) failed: {proc.stderr.decode().strip()}")
                    try:
                        if not probe.exists():
                            raise RuntimeError(f"mount(8) mount misses {probe.name}")
                    finally:
                        unmount_quietly(target)
                    return dt

                lam(0)
                peer(0)
                p = paired(lam, peer, reps)
                rows.append(p.row(f"mount {depth} layer{'s' if depth > 1 else ''}", "s",
                                  "mount(8) incl. process spawn", note=abs_note))
                sn.remove(f"top-{depth}")
        finally:
            unmount_quietly(target)
            sn.close()
    return rows

