"""The multi-layer test image shared by the import and grpc benchmarks.

A debootstrap ``--variant=minbase`` bookworm rootfs (built once with
``tests/imagefactory.py``, mirror from this machine's apt config) is split
into three gzip layers of about equal size (contiguous in path order, each
with the directories its files need), plus a fourth small layer that
changes a file and deletes another (a whiteout). Packed as an OCI layout
tar whose index names the image for containerd (``io.containerd.image.name``)
and OCI (``org.opencontainers.image.ref.name``). Cached in the bench cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.common import Skip, ensure_tools, imagefactory, run_cmd

IMAGE_NAME = "docker.io/lamina/bench-debian:bookworm"
_VERSION = "v1"
_SPLIT = 3


@dataclass(frozen=True)
class BenchImage:
    tar: Path
    name: str
    layers: int
    unpacked_bytes: int
    files: int


def debian_image(cache: Path) -> BenchImage:
    """The cached image (built on first use: debootstrap takes a minute or two)."""
    f = imagefactory()
    out = cache / f"bench-image-{_VERSION}"
    meta = out / "image.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        return BenchImage(tar=out / "image.tar", name=m["name"], layers=m["layers"],
                          unpacked_bytes=m["unpacked_bytes"], files=m["files"])
    if os.geteuid() != 0:
        raise Skip("building the debootstrap image needs root")
    ensure_tools({"debootstrap": "debootstrap"})
    try:
        rootfs: Path = f.debootstrap_rootfs(cache)  # type: ignore[attr-defined]
    except RuntimeError as exc:
        raise Skip(f"cannot build the debootstrap rootfs: {exc}") from exc
    shutil.rmtree(out, ignore_errors=True)
    work = out / "work"
    work.mkdir(parents=True)

    files: list[tuple[str, int]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            files.append((os.path.relpath(p, rootfs), st.st_size))
            total += st.st_size
    files.sort()
    buckets: list[set[str]] = [set() for _ in range(_SPLIT)]
    acc = 0
    for rel, size in files:
        buckets[min(_SPLIT - 1, acc * _SPLIT // max(total, 1))].add(rel)
        acc += size

    layers = []
    for i, keep in enumerate(buckets):
        part = work / f"part{i}"
        run_cmd(["cp", "-a", "--link", str(rootfs), str(part)])  # hard-linked clone
        for rel, _ in files:
            if rel not in keep:
                os.unlink(part / rel)
        if i > 0:  # later layers carry only the directories their files need
            subprocess.run(["find", str(part), "-mindepth", "1", "-depth", "-type", "d",
                            "-empty", "-delete"], check=True)
        layers.append(f.layer_from_dir(part, work / "blobs",  # type: ignore[attr-defined]
                                       comment=f"debootstrap part {i + 1}/{_SPLIT}"))
        shutil.rmtree(part)
    victim = next(rel for rel, _ in files if rel.startswith("usr/share/doc/"))
    d, _, base = victim.rpartition("/")
    layers.append(f.layer_from_entries(  # type: ignore[attr-defined]
        [
            f.Dir("etc"),  # type: ignore[attr-defined]
            f.File("etc/motd", b"lamina benchmark image\n"),  # type: ignore[attr-defined]
            f.Whiteout(f"{d}/{base}"),  # type: ignore[attr-defined]
        ],
        work / "blobs", comment="config tweaks"))
    layout = work / "layout"
    f.build_oci_layout(layout, layers, ref_name=IMAGE_NAME)  # type: ignore[attr-defined]
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    for m in index["manifests"]:
        m.setdefault("annotations", {})["io.containerd.image.name"] = IMAGE_NAME
    index_path.write_text(json.dumps(index, indent=2))
    f.as_tar(layout, out / "image.tar")  # type: ignore[attr-defined]
    shutil.rmtree(work)
    meta.write_text(json.dumps({"name": IMAGE_NAME, "layers": len(layers),
                                "unpacked_bytes": total, "files": len(files)}))
    return debian_image(cache)
