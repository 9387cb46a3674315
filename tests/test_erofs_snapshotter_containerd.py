"""containerd 1.6 on the erofs snapshotter through ``lamina --snapshotter erofs serve``:
``ctr image import`` (containerd applies each layer on a mounted active snapshot,
whose commit becomes an EROFS image), ``ctr run`` on an overlay of the shared
layer mounts, ``ctr image rm --sync``: the layers' images and mounts go."""

from __future__ import annotations

import time
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user, require_tools
from containerd_peer import lamina_serve, private_containerd, short_dir

from lamina.mounts.mountinfo import read_mountinfo

pytestmark = [pytest.mark.slow]

REF = "docker.io/lamina/small:erofs"


def _erofs_mounts(root: Path) -> list[str]:
    return [m.mount_point for m in read_mountinfo()
            if m.fstype == "erofs" and m.mount_point.startswith(str(root))]


def test_containerd_imports_runs_and_removes_on_erofs(tmp_root: Path) -> None:
    require_root_user()
    require_tools("containerd", "ctr", "runc")
    w = tmp_root / "img"
    w.mkdir()
    extra = f.layer_from_entries([f.Dir("etc/lamina"), f.File("etc/lamina/a", b"a2\n"),
                                  f.File("etc/lamina/b", b"b2\n")], w)
    top = f.layer_from_entries([f.File("etc/lamina/a", b"a3\n"), f.Whiteout("etc/lamina/b")], w)
    f.build_oci_layout(w / "layout", [f.minimal_layer(w), extra, top], ref_name=REF,
                       config=f.ImageConfig(cmd=["/bin/sh", "-c", "cat /etc/lamina/*"]))
    tar = f.as_tar(w / "layout", w / "image.tar")
    root = tmp_root / "lamina-root"
    base, _ = short_dir(tmp_root / "c")
    with lamina_serve(root, base / "lamina.sock", options=("--snapshotter", "erofs")), \
            private_containerd(base / "ctrd", proxy_snapshotter=str(base / "lamina.sock")) as c:
        c.ctr("images", "import", "--snapshotter", "lamina", str(tar))
        images = sorted((root / "snapshots/erofs/snapshots").glob("*/layer.erofs"))
        assert len(images) == 3, images
        out = c.ctr("run", "--rm", "--snapshotter", "lamina", REF, "e1").stdout
        assert out == "a3\n"
        assert len(_erofs_mounts(root)) == 3, "each layer mounted once"
        c.ctr("images", "rm", "--sync", REF)
        deadline = time.monotonic() + 60
        while list((root / "snapshots/erofs/snapshots").glob("*/layer.erofs")):
            assert time.monotonic() < deadline, "containerd's GC left erofs layers"
            time.sleep(0.2)
        assert _erofs_mounts(root) == []
