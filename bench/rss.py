"""Peak memory while applying a 1 GiB layer with ``lamina.archive.apply.apply_layer``.

The layer is generated once, streaming (never held in memory), and cached:
three 256 MiB files of random data plus 32,768 files of 8 KiB, gzip (isal).
Each apply runs in a fresh subprocess onto an empty directory under GNU
``time`` (its %M, the kernel's ru_maxrss of that process), with the C
allocator's thresholds the image, content and diff commands set
(:mod:`lamina.util.allocator`). GNU ``tar
-xzf`` applying the same layer is measured alongside as a reference.
Target: lamina's peak RSS <= 150 MiB.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bench.common import Ctx, Row, Skip, cleanup_tree, ensure_tools, paired

NAME = "rss"
BIG_FILES = 3
BIG_SIZE = 256 << 20
SMALL_FILES = 32_768
SMALL_SIZE = 8 << 10
LIMIT_MIB = 150.0
GNU_TIME = "/usr/bin/time"

_WORKER = """\
import json, resource, sys, time
from lamina.archive.apply import apply_layer
from lamina.util.allocator import keep_freed_blocks
keep_freed_blocks()  # as the image, content and diff commands have it
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    r = apply_layer(f, sys.argv[2])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
           if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": r.size,
                  "import_kib": base, "hwm_kib": hwm}))
"""


class _RandomReader(io.RawIOBase):
    """``size`` bytes of random data, produced as read."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def layer(cache: Path) -> Path:
    """The cached 1 GiB gzip layer (built on first use)."""
    path = cache / "rss-layer-1g-v1.tar.gz"
    if path.exists():
        return path
    try:
        from isal import igzip
    except ImportError as exc:
        raise Skip(f"isal is needed to build the layer quickly ({exc})") from exc
    tmp = path.with_suffix(".tmp")
    small = os.urandom(SMALL_SIZE * 2)
    with open(tmp, "wb") as raw, igzip.IGzipFile(  # type: ignore[no-untyped-call]
                fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, size: int, data: io.RawIOBase | None = None,
                kind: bytes = tarfile.REGTYPE) -> None:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            ti.mtime = 1704164645
            ti.size = size
            tf.addfile(ti, data)

        add("big", 0, kind=tarfile.DIRTYPE)
        for i in range(BIG_FILES):
            add(f"big/blob{i}", BIG_SIZE, _RandomReader(BIG_SIZE))
        per_dir = 512
        for d in range(SMALL_FILES // per_dir):
            add(f"small{d:03d}", 0, kind=tarfile.DIRTYPE)
            for f in range(per_dir):
                off = (d * per_dir + f) % SMALL_SIZE
                add(f"small{d:03d}/f{f:04d}", SMALL_SIZE,
                    io.BytesIO(small[off:off + SMALL_SIZE]))  # type: ignore[arg-type]
    os.replace(tmp, path)
    return path


def _measure(cmd: list[str], out_dir: Path) -> tuple[float, float, bytes]:
    """Run ``cmd`` under GNU time; returns (wall seconds, peak RSS MiB, stdout).

    GNU time forks ``cmd`` from its own tiny process. Measuring a direct child
    of this (large) process would not do: the kernel carries the parent's
    high-water RSS over a (v)fork+exec into the child's ru_maxrss.
    """
    report = out_dir / "time.out"
    t0 = time.perf_counter()
    proc = subprocess.run([GNU_TIME, "-f", "%M", "-o", str(report), *cmd],
                          stdin=subprocess.DEVNULL, capture_output=True, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-1500:]}")
    kib = int(report.read_text().split()[-1])
    return dt, kib / 1024, proc.stdout


def run(ctx: Ctx) -> list[Row]:
    try:
        import lamina.archive.apply  # noqa: F401
    except ImportError as exc:
        raise Skip(f"lamina.archive.apply is missing ({exc})") from exc
    ensure_tools({GNU_TIME: "time"})
    ctx.log("  generating / reusing the 1 GiB layer ...")
    blob = layer(ctx.cache)
    reps = ctx.pick(2, 1)
    extra: dict[str, float] = {}
    lam_times: list[float] = []
    tar_times: list[float] = []

    def lam(i: int) -> float:
        target = ctx.work / f"rss-lamina-{i}"
        target.mkdir()
        try:
            os.sync()
            _, peak, out = _measure([sys.executable, "-c", _WORKER, str(blob), str(target)],
                                    ctx.work)
            info = json.loads(out)
            lam_times.append(info["seconds"])
            extra.update(bytes=info["bytes"], import_mib=info["import_kib"] / 1024,
                         hwm_mib=info["hwm_kib"] / 1024)
            return peak
        finally:
            cleanup_tree(target)

    def peer(i: int) -> float:
        target = ctx.work / f"rss-tar-{i}"
        target.mkdir()
        try:
            os.sync()
            dt, peak, _ = _measure(["tar", "-xzf", str(blob), "-C", str(target)], ctx.work)
            tar_times.append(dt)
            return peak
        finally:
            cleanup_tree(target)

    size = f"a {blob.stat().st_size / 2**30:.2f} GiB gzip layer"
    if ctx.quick:  # lamina only: GNU tar takes half a minute more
        peak = lam(0)
        row = Row(f"peak RSS applying {size} ({extra['bytes'] / 2**30:.2f} GiB tar)", "MiB",
                  peak, target=f"lamina <= {LIMIT_MIB:.0f} MiB", ok=peak <= LIMIT_MIB,
                  note=f"python+imports alone: {extra['import_mib']:.0f} MiB; "
                       f"VmHWM {extra['hwm_mib']:.0f} MiB; apply took {lam_times[0]:.1f}s; "
                       "--quick skips the tar reference",
                  samples={"lamina": [peak]})
        return [row]
    p = paired(lam, peer, reps)
    rss_row = p.row(f"peak RSS applying {size} ({extra['bytes'] / 2**30:.2f} GiB tar)", "MiB",
                    "GNU tar -xzf (reference)", target=f"lamina <= {LIMIT_MIB:.0f} MiB",
                    note=f"GNU time %M, worst run; python+imports alone: "
                         f"{extra['import_mib']:.0f} MiB")
    rss_row.lamina = max(p.lamina)
    rss_row.ok = rss_row.lamina <= LIMIT_MIB
    time_row = paired(lambda i: lam_times[i], lambda i: tar_times[i], reps).row(
        "apply time (same runs)", "s", "GNU tar -xzf (reference)",
        note="lamina: apply_layer alone, excluding interpreter start; tar: wall")
    return [rss_row, time_row]
