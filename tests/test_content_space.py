"""The content store never fills its filesystem: an ingest stops at the reserve
(:func:`lamina.archive.limits.space_reserve`) with one line, whoever writes it
(import, pull, containerd through ``lamina serve``), and leaves no ingest behind
for the import that wrote it. Before, only a pull kept the reserve: an import ran
the disk to zero and failed with ``lamina: OSError: No space left on device``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import imagefactory as f
import pytest
from conftest import small_tmpfs

from lamina.content.digest import sha256_digest
from lamina.errors import ResourceExhausted
from lamina.metadata.root import Root

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")

@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs (the reserve: 1 MiB), unmounted afterwards."""
    with small_tmpfs(tmp_path / "small", "32m") as mnt:
        yield mnt


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_a_write_stops_at_the_reserve(small: Path) -> None:
    data = os.urandom(40 << 20)
    digest = sha256_digest(data)
    root = Root(small / "root")
    try:
        store = root.content()
        w = store.writer("big", total=len(data), expected=digest)
        with pytest.raises(ResourceExhausted) as err:
            for at in range(0, len(data), 1 << 20):
                w.write(data[at:at + (1 << 20)])
        w.close()
        msg = str(err.value)
        assert msg.startswith(f"store blob {digest}: "), msg
        assert "bytes left on the filesystem of" in msg and "(lamina keeps 1048576 free)" in msg
        assert "\n" not in msg
        assert _free(small) > 512 << 10  # the reserve is left to everyone else
        store.abort("big")
    finally:
        root.close()


def test_an_import_stops_at_the_reserve_and_leaves_nothing(small: Path,
                                                          tmp_path: Path) -> None:
    layer = f.layer_from_entries([f.Dir("d"), f.File("d/big", os.urandom(40 << 20))],
                                 tmp_path / "l")
    f.build_oci_layout(tmp_path / "layout", [layer], ref_name="big:1")
    tar = f.as_tar(tmp_path / "layout", tmp_path / "image.tar")
    root = small / "root"
    lamina = [sys.executable, "-m", "lamina", "--root", str(root), "--snapshotter", "native"]
    # not unpacked: the unpack would race the import for the same disk
    proc = subprocess.run([*lamina, "image", "import", "--no-unpack", str(tar)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 9, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lamina: ResourceExhausted: store blob {layer.digest}"), last
    assert "left on the filesystem of" in last
    assert _free(small) > 512 << 10
    check = subprocess.run([*lamina, "check"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert os.listdir(root / "content" / "ingest") == []
