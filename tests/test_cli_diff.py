"""``lamina snapshot diff`` and ``lamina diff apply`` through the CLI, on both snapshotters."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import treesum
from conftest import require_root_user

from lamina.cli import main
from lamina.metadata.root import Root
from lamina.mounts.mount import temp_mount


@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_diff_then_apply_reproduces_the_change(snapshotter: str, tmp_root: Path,
                                               capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    require_root_user()
    base = ["--root", str(tmp_root / "r"), "--snapshotter", snapshotter]
    root = Root(tmp_root / "r")
    sn = root.snapshotter(snapshotter)
    with temp_mount(sn.prepare("a", "")) as t:
        Path(t, "keep").write_text("k")
        Path(t, "gone").write_text("g")
        Path(t, "dir").mkdir()
        Path(t, "dir", "old").write_text("o")
    sn.commit("A", "a")
    with temp_mount(sn.prepare("b", "A")) as t:
        Path(t, "gone").unlink()
        Path(t, "dir", "new").write_text("n")
        Path(t, "keep").chmod(0o600)
        want = treesum.summarize(t)
    capsysbinary.readouterr()
    assert main([*base, "snapshot", "diff", "b"]) == 0
    layer = tmp_root / "layer.tgz"
    layer.write_bytes(capsysbinary.readouterr().out)
    with tarfile.open(layer) as tar:
        names = set(tar.getnames())
    assert ".wh.gone" in names and "dir/new" in names and "dir/old" not in names
    assert list(root.content().walk()) == []  # not kept without --keep
    sn.prepare("c", "A")
    assert main([*base, "diff", "apply", str(layer), "c"]) == 0
    with temp_mount(sn.mounts("c")) as t:
        assert treesum.diff(want, treesum.summarize(t)) == []
    root.close()
