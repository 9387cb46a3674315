"""Containers on the erofs snapshotter (issue 18) against lamina's overlay snapshotter.

The 4-layer debootstrap image of :mod:`bench.images`, imported (untimed) into
one root per snapshotter on the same fresh filesystem, then, in rotated
rounds (the order of the snapshotters changes every round):

* **first start**: ``lamina run --rm IMAGE /bin/true`` (a new container, so a
  new rw snapshot, each time), cold: ``sync`` and
  ``echo 3 > /proc/sys/vm/drop_caches`` (root) before each run. Also, as after
  a reboot, erofs with its layer mounts detached first (the run mounts them
  again), and erofs on loop devices (the kernel-feature path bookworm's 6.1
  needs: the snapshotter's ``backing="loop"``, forced for that root's import
  and runs by a wrapper, as the tests force it).
* **read all files cold**: the image mounted with ``lamina image mount``
  (untimed), caches dropped, then a fresh Python process reads every regular
  file of the mounted tree to the end (1 MiB reads, symlinks not followed).
  Both sides must read the same count of files and bytes; the reader's CPU
  time is noted. On tmpfs "cold" differs: drop_caches cannot drop tmpfs's
  pages, so overlay's files stay in memory while erofs's own page cache of
  each layer is dropped and read again from its image.
* **image rm + GC**: the image removed and collected, with the root re-imported
  (untimed) before each sample. Two ways:

  - the CLI as a user types it: ``lamina image rm REF`` then ``lamina gc``, two
    processes, timed together (Python start-up is in both, twice), and their
    CPU time (user+sys, ``RUSAGE_CHILDREN``);
  - lamina's own work, in one process: the stores opened and the snapshots
    listed first (untimed), then :func:`lamina.metadata.deletes.delete_image`
    with ``sync=True`` (the image record deleted, then
    :func:`lamina.metadata.gc.collect`, as ``image rm --sync`` and ``ctr image
    rm --sync`` call it). Wall and CPU (``time.process_time``) time.

  Both sides do all their work before returning: the CLI's roots remove
  snapshot directories inline (only ``lamina serve`` leaves ``rm-``
  directories to a background reaper), and each sample checks that the
  snapshots directory is empty afterwards — overlay's times include deleting
  every unpacked file, erofs's unmounting each layer and deleting its image.
  The content blobs (the same layers, plus overlay's tree manifests) are
  deleted on both sides.

On a journaled ext4 (a loop-mounted file, ``mkfs.ext4`` defaults) and on a
tmpfs, each with its own roots. Targets (issue 18): first start and the cold
read within 1.2x of overlay; image rm + GC <= 0.1x overlay's.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.common import (
    Ctx,
    Row,
    Skip,
    ensure_tools,
    lamina_cli,
    pair,
    rotated,
    run_cmd,
    scratch_filesystem,
    time_cmd,
    unmount_under,
)
from bench.images import debian_image

NAME = "erofs-containers"

#: the lamina CLI with the erofs snapshotter's layers mounted on loop devices
_LOOP_CLI = (
    "import functools, sys\n"
    "import lamina.snapshots.erofs as e\n"
    "e.ErofsSnapshotter.__init__ = functools.partialmethod(e.ErofsSnapshotter.__init__,"
    " backing='loop')\n"
    "from lamina.cli import main\n"
    "sys.exit(main())\n"
)

_READ_ALL = """\
import json, os, sys, time
buf = bytearray(1 << 20)
files = size = 0
t0, c0 = time.perf_counter(), time.process_time()
stack = [sys.argv[1]]
while stack:
    with os.scandir(stack.pop()) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif e.is_file(follow_symlinks=False):
                fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW)
                try:
                    while n := os.readv(fd, [buf]):
                        size += n
                finally:
                    os.close(fd)
                files += 1
print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                  "files": files, "bytes": size}))
"""

_REMOVE = """\
import json, os, sys, time
from lamina.metadata import gc
from lamina.metadata.deletes import delete_image
from lamina.metadata.root import Root

# the snapshots' share: the sweep (rows, unmounts) and the deferred directory deletion;
# where a thread deletes the directories while the blobs go (_deleting_meanwhile), the
# wait for what is left of it after the blobs
spent = []
sweep, deferred = gc._sweep_snapshots, gc._deferred_removal
meanwhile = getattr(gc, "_deleting_meanwhile", None)

def timed_sweep(*a, **k):
    t = time.perf_counter()
    try:
        return sweep(*a, **k)
    finally:
        spent.append(time.perf_counter() - t)

class TimedExit:
    def __init__(self, cm):
        self.cm = cm
    def __enter__(self):
        return self.cm.__enter__()
    def __exit__(self, *exc):
        t = time.perf_counter()
        try:
            return self.cm.__exit__(*exc)
        finally:
            spent.append(time.perf_counter() - t)

gc._sweep_snapshots = timed_sweep
gc._deferred_removal = lambda *a: TimedExit(deferred(*a))
if meanwhile is not None:
    gc._deleting_meanwhile = lambda *a: TimedExit(meanwhile(*a))
root = Root(sys.argv[1])
for store in (root.images, root.content, root.containers, root.leases):
    store()
sum(1 for _ in root.snapshotter(sys.argv[2]).walk())
os.sync()
c0, t0 = time.process_time(), time.perf_counter()
delete_image(root, sys.argv[3], sync=True)
t1, c1 = time.perf_counter(), time.process_time()
root.close()
print(json.dumps({"wall": t1 - t0, "cpu": c1 - c0, "snapshots": sum(spent)}))
"""


def _cold() -> None:
    """Nothing of the image in the page cache (dirty pages written first)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class _Side:
    """One snapshotter's root on the scratch filesystem."""

    def __init__(self, base: Path, name: str, snapshotter: str, image: str,
                 tar: Path) -> None:
        self.name, self.snapshotter, self.image, self.tar = name, snapshotter, image, tar
        self.root = base / f"lamina-{name}"
        self.cli = ([sys.executable, "-c", _LOOP_CLI] if name == "erofs-loop"
                    else lamina_cli())
        self.lam = [*self.cli, "--root", str(self.root), "--snapshotter", snapshotter]

    def import_image(self) -> None:
        run_cmd([*self.lam, "image", "import", str(self.tar)])

    def snapshot_dirs(self) -> list[str]:
        d = self.root / "snapshots" / self.snapshotter / "snapshots"
        return sorted(os.listdir(d)) if d.is_dir() else []

    def layer_mounts(self) -> None:
        """Detach the layer mounts, as a reboot does (erofs mounts them on demand)."""
        unmount_under(self.root / "snapshots" / self.snapshotter / "snapshots")

    def start(self, *, reboot: bool = False) -> float:
        if reboot:
            self.layer_mounts()
        _cold()
        return time_cmd([*self.lam, "run", "--rm", self.image, "/bin/true"])

    def read_all(self, target: Path, seen: dict[str, tuple[int, int]],
                 cpu: list[float]) -> float:
        run_cmd([*self.lam, "image", "mount", self.image, str(target)])
        try:
            _cold()
            out = subprocess.run([sys.executable, "-c", _READ_ALL, str(target)],
                                 capture_output=True, text=True, check=True, timeout=600)
        finally:
            run_cmd([*self.lam, "image", "unmount", str(target)])
        r = json.loads(out.stdout)
        seen[self.name] = (r["files"], r["bytes"])
        cpu.append(float(r["cpu"]))
        return float(r["seconds"])

    def _removed(self) -> None:
        left = self.snapshot_dirs()
        if left:
            raise RuntimeError(f"{self.name}: {left} left in the snapshots directory "
                               "after image rm + gc")

    def remove_cli(self, cpu: list[float]) -> float:
        self.import_image()
        os.sync()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        dt = time_cmd([*self.lam, "image", "rm", self.image])
        dt += time_cmd([*self.lam, "gc"])
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        self._removed()
        return dt

    def remove_in_process(self, parts: dict[str, list[float]]) -> float:
        self.import_image()
        out = subprocess.run([sys.executable, "-c", _REMOVE, str(self.root), self.snapshotter,
                              self.image], capture_output=True, text=True, check=True,
                             timeout=600)
        self._removed()
        r = json.loads(out.stdout)
        parts.setdefault("cpu", []).append(float(r["cpu"]))
        parts.setdefault("snapshots", []).append(float(r["snapshots"]))
        return float(r["wall"])


def _rounds(ctx: Ctx, kind: str, img_tar: Path, image: str,
            reps: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {}
    with scratch_filesystem(ctx, kind) as base:
        sides = {name: _Side(base, name, sn, image, img_tar) for name, sn in
                 (("erofs", "erofs"), ("overlay", "overlay"), ("erofs-loop", "erofs"))}
        for side in sides.values():
            side.import_image()
        erofs, overlay, loop = sides["erofs"], sides["overlay"], sides["erofs-loop"]

        def starter(side: _Side, *, reboot: bool = False) -> Callable[[int], float]:
            return lambda i: side.start(reboot=reboot)

        ctx.log(f"   {kind}: first start")
        out["start"] = rotated({"erofs": starter(erofs), "overlay": starter(overlay),
                                "erofs-reboot": starter(erofs, reboot=True),
                                "erofs-loop": starter(loop)}, reps)
        ctx.log(f"   {kind}: {json.dumps(out['start'])}")

        ctx.log(f"   {kind}: read all files")
        seen: dict[str, tuple[int, int]] = {}
        read_cpu: dict[str, list[float]] = {"erofs": [], "overlay": []}
        out["read"] = rotated({
            name: (lambda i, s=sides[name]: s.read_all(base / f"mnt-{s.name}", seen,
                                                       read_cpu[s.name]))
            for name in ("erofs", "overlay")}, reps)
        out["read-cpu"] = read_cpu
        if seen["erofs"] != seen["overlay"]:
            raise RuntimeError(f"erofs and overlay read different trees: {seen}")
        out["read-count"] = {k: [float(v[0]), float(v[1])] for k, v in seen.items()}
        ctx.log(f"   {kind}: {json.dumps(out['read'])} {seen}")

        ctx.log(f"   {kind}: image rm + gc")
        loop.layer_mounts()  # its root stays; only the two removal sides run now
        cli_cpu: dict[str, list[float]] = {"erofs": [], "overlay": []}
        out["rm-cli"] = rotated({name: (lambda i, s=sides[name]: s.remove_cli(cli_cpu[s.name]))
                                 for name in ("erofs", "overlay")}, reps)
        out["rm-cli-cpu"] = cli_cpu
        parts: dict[str, dict[str, list[float]]] = {"erofs": {}, "overlay": {}}
        out["rm"] = rotated({name: (lambda i, s=sides[name]: s.remove_in_process(parts[s.name]))
                             for name in ("erofs", "overlay")}, reps)
        for part in ("cpu", "snapshots"):
            out[f"rm-{part}"] = {k: v[part] for k, v in parts.items()}
        ctx.log(f"   {kind}: {json.dumps(out)}")
    return out


def _load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def run(ctx: Ctx) -> list[Row]:
    if os.geteuid() != 0:
        raise Skip("needs root (mounts, runc, drop_caches)")
    try:
        import lamina.snapshots.erofs  # noqa: F401
    except ImportError as exc:
        raise Skip(f"lamina has no erofs snapshotter ({exc})") from exc
    ensure_tools({"mkfs.ext4": "e2fsprogs", "runc": "runc"})
    img = debian_image(ctx.cache)
    reps = ctx.pick(5, 2)
    rows: list[Row] = []
    overlay = "lamina, overlay snapshotter"
    for kind in ("ext4", "tmpfs"):
        s = _rounds(ctx, kind, img.tar, img.name, reps)
        on = "a journaled ext4 (loop file)" if kind == "ext4" else "tmpfs"
        note = f"{reps} rounds (order rotated); {_load()} at the end"
        what = f"{img.layers}-layer debian ({img.files:,} files) on {on}"
        start = s["start"]
        rows.append(pair(start, "erofs", "overlay").row(
            f"first start, cold (run --rm /bin/true), {what}: erofs", "s", overlay,
            target="<= 1.2", limit=1.2, note=note))
        rows.append(pair(start, "erofs-reboot", "overlay").row(
            f"first start, cold, layer mounts detached first (as after a reboot), {what}: "
            "erofs", "s", overlay, target="<= 1.2", limit=1.2, note=note))
        rows.append(pair(start, "erofs-loop", "overlay").row(
            f"first start, cold, {what}: erofs on loop devices (backing=loop)", "s", overlay,
            note=note))
        files, size = s["read-count"]["erofs"]
        cpu = s["read-cpu"]
        rows.append(pair(s["read"], "erofs", "overlay").row(
            f"read every file cold ({files:,.0f} files, {size / 2**20:.0f} MiB) through "
            f"image mount, {what}: erofs", "s", overlay, target="<= 1.2", limit=1.2,
            note=note + f"; the reader's CPU (user+sys) "
                        f"{statistics.median(cpu['erofs']) * 1000:.0f} ms vs "
                        f"{statistics.median(cpu['overlay']) * 1000:.0f} ms"
                        + ("; tmpfs keeps overlay's files in memory through drop_caches, "
                           "erofs reads its image again" if kind == "tmpfs" else "")))
        cpu = s["rm-cli-cpu"]
        rows.append(pair(s["rm-cli"], "erofs", "overlay").row(
            f"image rm + gc, CLI (two processes), {what}: erofs", "s", overlay,
            target="<= 0.1", limit=0.1,
            note=note + "; Python start-up twice on both sides; CPU (user+sys) "
                        f"{statistics.median(cpu['erofs']) * 1000:.0f} ms vs "
                        f"{statistics.median(cpu['overlay']) * 1000:.0f} ms"))
        cpu = s["rm-cpu"]
        rows.append(pair(s["rm"], "erofs", "overlay").row(
            f"image rm + gc in one process (delete_image sync=True), {what}: erofs", "s",
            overlay, target="<= 0.1", limit=0.1,
            note=note + f"; CPU {statistics.median(cpu['erofs']) * 1000:.0f} ms vs "
                        f"{statistics.median(cpu['overlay']) * 1000:.0f} ms"))
        rows.append(pair(s["rm-snapshots"], "erofs", "overlay").row(
            f"the snapshots' share of it (GC sweep + directory deletion), {what}: erofs", "s",
            overlay, target="<= 0.1", limit=0.1,
            note=note + "; the rest (image record, mark, blobs) is the same work on both"))
    return rows
