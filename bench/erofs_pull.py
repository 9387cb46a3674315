"""Pull+unpack onto the erofs snapshotter (issue 18) against containerd and the floor.

The 4-layer debootstrap image of :mod:`bench.images`, pushed once (skopeo) to
Debian's docker-registry on loopback, pulled with unpack four ways, each into
a fresh root, in rotated rounds:

* ``lamina --snapshotter erofs image pull``: each layer written as one EROFS
  image while it downloads, all layers at once, committed in order;
* ``lamina image pull`` (overlay, as shipped);
* ``ctr image pull --plain-http --snapshotter overlayfs`` (a private
  containerd 1.6, started before the clock starts);
* the floor: a fresh Python process that only fetches the manifest and
  downloads every layer at once (one connection each), gunzips it (ISA-L, as
  lamina does) and hashes both the compressed and the uncompressed bytes
  (sha256, the digest and the DiffID), writing nothing. No pull can do less.

On two filesystems, in separate rounds: a journaled ext4 (a loop-mounted file)
and a tmpfs (the registry's storage stays where it is: it is read from the
page cache). Targets (issue 18): erofs <= 0.35x ``ctr image pull`` and within
1.5x of the floor measured in the same rounds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

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
from bench.peer import containerd, require_containerd
from bench.registry import local_registry, oci_layout, skopeo_push

NAME = "erofs-pull"

#: the floor: download, gunzip and hash every layer of ``host/repo:tag``, all at once
_FLOOR = """\
import hashlib, http.client, json, sys, threading
from isal import isal_zlib
host, repo, tag = sys.argv[1:4]
MEDIA = ", ".join(["application/vnd.oci.image.manifest.v1+json",
                   "application/vnd.oci.image.index.v1+json",
                   "application/vnd.docker.distribution.manifest.v2+json",
                   "application/vnd.docker.distribution.manifest.list.v2+json"])

def get(conn, path):
    conn.request("GET", path, headers={"Accept": MEDIA})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"GET {path}: {r.status}")
    return r

conn = http.client.HTTPConnection(host)
doc = json.loads(get(conn, f"/v2/{repo}/manifests/{tag}").read())
if "manifests" in doc:
    pick = next(m for m in doc["manifests"]
                if m.get("platform", {}).get("architecture", "amd64") == "amd64")
    doc = json.loads(get(conn, f"/v2/{repo}/manifests/{pick['digest']}").read())
errors = []

def layer(desc):
    try:
        r = get(http.client.HTTPConnection(host), f"/v2/{repo}/blobs/{desc['digest']}")
        packed, plain = hashlib.sha256(), hashlib.sha256()
        d = isal_zlib.decompressobj(wbits=31)
        buf = bytearray(1 << 20)
        while n := r.readinto(buf):
            data = memoryview(buf)[:n]
            packed.update(data)
            while data:
                plain.update(d.decompress(data))
                data = d.unused_data
                if data:
                    d = isal_zlib.decompressobj(wbits=31)
        plain.update(d.flush())
        if "sha256:" + packed.hexdigest() != desc["digest"]:
            errors.append(f"{desc['digest']}: digest mismatch")
    except BaseException as exc:
        errors.append(f"{desc['digest']}: {exc}")

threads = [threading.Thread(target=layer, args=(d,)) for d in doc["layers"]]
for t in threads:
    t.start()
for t in threads:
    t.join()
if errors:
    raise SystemExit("; ".join(errors))
"""


def _rounds(ctx: Ctx, kind: str, host: str, repo: str, tag: str,
            reps: int) -> dict[str, list[float]]:
    ref = f"{host}/{repo}:{tag}"
    with scratch_filesystem(ctx, kind) as base:

        def lamina(snapshotter: str) -> Callable[[int], float]:
            return lamina_round(base, snapshotter, ["image", "pull", ref])

        def peer(i: int) -> float:
            with containerd(base) as c:
                os.sync()
                return time_cmd(c.ctr("image", "pull", "--plain-http", "--snapshotter",
                                      "overlayfs", ref))

        def floor(i: int) -> float:
            os.sync()
            return time_cmd([sys.executable, "-c", _FLOOR, host, repo, tag])

        return rotated({"erofs": lamina("erofs"), "overlay": lamina("overlay"),
                        "containerd": peer, "floor": floor}, reps)


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    ensure_tools({"docker-registry": "docker-registry", "skopeo": "skopeo",
                  "mkfs.ext4": "e2fsprogs"})
    img = debian_image(ctx.cache)
    layout = oci_layout(img.tar, ctx.cache / "bench-image-layout")
    reps = ctx.pick(5, 2)
    repo, tag = "bench/debian", "1"
    rows: list[Row] = []
    with ctx.tempdir("erofs-pull-") as work, local_registry(work / "reg") as host:
        skopeo_push(layout, img.name, f"{host}/{repo}:{tag}")
        time_cmd([sys.executable, "-c", _FLOOR, host, repo, tag])  # registry warm
        for kind in ("ext4", "tmpfs"):
            s = _rounds(ctx, kind, host, repo, tag, reps)
            what = (f"pull+unpack {img.layers}-layer debian ({img.files:,} files) from a "
                    f"loopback registry onto "
                    f"{'a journaled ext4 (loop file)' if kind == 'ext4' else 'tmpfs'}")
            note = f"{reps} rounds (order rotated), fresh roots"
            ctr = "ctr image pull --plain-http --snapshotter overlayfs (private containerd 1.6)"
            rows.append(pair(s, "erofs", "containerd").row(
                f"{what}: erofs", "s", ctr, target="<= 0.35", limit=0.35, note=note))
            rows.append(pair(s, "erofs", "floor").row(
                f"{what}: erofs", "s", "floor: download + gunzip + sha256 (digest and "
                "DiffID) of every layer at once, nothing written (fresh python process)",
                target="<= 1.5", limit=1.5, note=note))
            rows.append(pair(s, "overlay", "containerd").row(
                f"{what}: overlay", "s", ctr, note=note))
            rows.append(pair(s, "floor", "containerd").row(
                f"{what}: the floor", "s", ctr, note="how much of ctr's time is the floor"))
    return rows

