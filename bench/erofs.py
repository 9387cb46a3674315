"""Writing a layer as an EROFS image (``lamina.erofs.writer.write_image``).

* The debootstrap layer of the tests (one gzip layer of the whole minbase
  rootfs, built once and cached by ``tests/imagefactory.py``) written as one
  image onto a journaled ext4 (a loop-mounted file, fsynced as the writer
  does), against ``apply_layer`` extracting it onto tmpfs and onto that ext4
  (followed by ``syncfs``, as an unpack makes a snapshot durable); both read
  the same gzip blob, so gunzip and the DiffID hash are in both times.
* The writer's own cost: the plain tar (page cache) to an image on tmpfs,
  against ``mkfs.erofs`` (erofs-utils, uncompressed, ``--preserve-mtime``)
  making the image of the extracted tree, tmpfs to tmpfs. mkfs.erofs reads no
  tar and hashes nothing; lamina also parses and hashes the tar (the DiffID) and
  hashes the image as it writes it (the digest ``check --deep`` verifies).
* Rounds rotate the order.
* Peak RSS writing the 1 GiB layer of ``bench/rss.py`` (GNU time's %M of a
  fresh process, with the allocator's thresholds of the CLI,
  :mod:`lamina.util.allocator`). Target: <= 150 MiB.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import (
    Ctx,
    Row,
    Skip,
    cleanup_tree,
    ensure_tools,
    imagefactory,
    rotated,
    run_cmd,
)
from bench.rss import GNU_TIME, LIMIT_MIB, _measure
from bench.rss import layer as rss_layer

NAME = "erofs"

_WORKER = """\
import json, sys, time
from lamina.erofs.writer import write_image
from lamina.util.allocator import keep_freed_blocks
keep_freed_blocks()  # as the image, content and diff commands have it
t0 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    r = write_image(f, sys.argv[2])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status")
           if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - t0, "inodes": r.inodes,
                  "image": r.image_size, "hwm_kib": hwm}))
"""


def _debian_layer(cache: Path) -> Path:
    factory = imagefactory()
    if os.geteuid() != 0:
        raise Skip("building the debootstrap layer needs root")
    test_cache = Path(os.environ.get("LAMINA_TEST_CACHE", "/var/cache/lamina-test"))
    try:
        lyr = factory.debootstrap_layer(test_cache if test_cache.is_dir() else cache)
    except RuntimeError as exc:
        raise Skip(f"cannot build the debootstrap layer: {exc}") from exc
    return Path(lyr.blob)


def _mount(args: list[str]) -> None:
    run_cmd(["mount", *args])


def run(ctx: Ctx) -> list[Row]:
    try:
        from lamina.archive.apply import apply_layer
        from lamina.erofs.writer import write_image
        from lamina.fs.files import sync_filesystem
    except ImportError as exc:
        raise Skip(f"lamina.erofs is missing ({exc})") from exc
    ensure_tools({"mkfs.erofs": "erofs-utils", "mkfs.ext4": "e2fsprogs", GNU_TIME: "time"})
    blob = _debian_layer(ctx.cache)
    plain = ctx.work / "debian.tar"
    with gzip.open(blob, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tmpfs = ctx.work / "tmpfs"
    ext4 = ctx.work / "ext4"
    ext4_file = ctx.work / "ext4.img"
    for d in (tmpfs, ext4):
        d.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=3g", "tmpfs", str(tmpfs)])
    with open(ext4_file, "wb") as img:
        img.truncate(3 << 30)
    run_cmd(["mkfs.ext4", "-q", "-F", str(ext4_file)])
    _mount(["-o", "loop", str(ext4_file), str(ext4)])
    rows: list[Row] = []
    info: dict[str, float] = {}
    try:
        source = tmpfs / "source"
        source.mkdir()
        with open(blob, "rb") as f:
            apply_layer(f, source)

        def erofs_gz(i: int) -> float:
            out = ext4 / f"w{i}.erofs"
            t0 = _now()
            with open(blob, "rb") as f:
                r = write_image(f, out)
            dt = _now() - t0
            info.update(inodes=r.inodes, image=r.image_size, tar=r.size)
            out.unlink()
            return dt

        def erofs_plain(i: int) -> float:
            out = tmpfs / f"p{i}.erofs"
            t0 = _now()
            with open(plain, "rb") as f:
                write_image(f, out)
            dt = _now() - t0
            out.unlink()
            return dt

        def apply_on(where: Path, sync: bool) -> float:
            target = where / "applied"
            target.mkdir()
            t0 = _now()
            with open(blob, "rb") as f:
                apply_layer(f, target)
            if sync:
                sync_filesystem(target)
            dt = _now() - t0
            cleanup_tree(target)
            return dt

        def mkfs(i: int) -> float:
            out = tmpfs / f"m{i}.erofs"
            t0 = _now()
            run_cmd(["mkfs.erofs", "--quiet", "--preserve-mtime", str(out), str(source)])
            dt = _now() - t0
            info["mkfs_image"] = out.stat().st_size
            out.unlink()
            return dt

        n = ctx.pick(5, 2)
        samples = rotated({"erofs": erofs_gz, "erofs-plain": erofs_plain,
                           "tmpfs": lambda i: apply_on(tmpfs, False),
                           "ext4": lambda i: apply_on(ext4, True), "mkfs": mkfs}, n)
        med = {k: statistics.median(v) for k, v in samples.items()}
        what = (f"debootstrap layer ({info['tar'] / 1e6:.0f} MB tar, "
                f"{info['inodes']:.0f} inodes)")
        for peer, peer_name in (("tmpfs", "apply_layer onto tmpfs"),
                                ("ext4", "apply_layer onto the ext4 + syncfs")):
            rows.append(Row(f"{what}: gzip -> EROFS image on ext4 (loop, journaled), "
                            "fsynced", "s", med["erofs"],
                            peer=med[peer], peer_name=peer_name,
                            ratio=med["erofs"] / med[peer],
                            samples={"lamina": samples["erofs"], "peer": samples[peer]}))
        rows.append(Row("plain tar (page cache) -> image on tmpfs, fsynced: no disk I/O", "s",
                        med["erofs-plain"], peer=med["mkfs"],
                        peer_name="mkfs.erofs 1.5 from the tree on tmpfs to tmpfs",
                        ratio=med["erofs-plain"] / med["mkfs"],
                        note=f"image {info['image'] / 1e6:.1f} MB; mkfs.erofs's "
                             f"{info['mkfs_image'] / 1e6:.1f} MB",
                        samples={"lamina": samples["erofs-plain"], "peer": samples["mkfs"]}))
    finally:
        for d in (ext4, tmpfs):
            subprocess.run(["umount", str(d)], check=False)
        ext4_file.unlink(missing_ok=True)
        plain.unlink(missing_ok=True)

    big = rss_layer(ctx.cache)
    out = ctx.work / "rss.erofs"
    _, peak, stdout = _measure([sys.executable, "-c", _WORKER, str(big), str(out)], ctx.work)
    res = json.loads(stdout)
    out.unlink(missing_ok=True)
    rows.append(Row(f"peak RSS writing a {big.stat().st_size / 2**30:.2f} GiB gzip layer "
                    "as EROFS", "MiB", peak, target=f"<= {LIMIT_MIB:.0f} MiB",
                    ok=peak <= LIMIT_MIB,
                    note=f"{res['seconds']:.1f}s, {res['inodes']} inodes, VmHWM "
                         f"{res['hwm_kib'] / 1024:.0f} MiB",
                    samples={"lamina": [peak]}))
    return rows


def _now() -> float:
    import time
    return time.perf_counter()
