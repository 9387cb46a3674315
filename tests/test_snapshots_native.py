"""The snapshot conformance suite against NativeSnapshotter (copies, bind mounts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.snapshots import testsuite
from lamina.snapshots.native import NativeSnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.mark.parametrize("case", testsuite.params())
def test_native(case: testsuite.Case, tmp_path: Path) -> None:
    testsuite.run(case, NativeSnapshotter, tmp_path)


def test_a_copy_that_does_not_fit_is_resource_exhausted(tmp_path: Path) -> None:
    """A child's copy of a parent on a disk too small for it is ResourceExhausted in
    one line (cp's first complaint), not Internal: lamina is fine, the disk is full;
    the child is not made."""
    from conftest import small_tmpfs

    from lamina.errors import ResourceExhausted

    with small_tmpfs(tmp_path / "small", "24m") as mnt:
        sn = NativeSnapshotter(mnt / "sn")
        try:
            sn.prepare("p-active", None)
            fs = Path(sn.mounts("p-active")[0].source)
            for i in range(4):  # several files: cp complains of each
                (fs / f"f{i}").write_bytes(os.urandom(4 << 20))
            sn.commit("parent", "p-active")
            with pytest.raises(ResourceExhausted) as err:
                sn.prepare("child", "parent")
            msg = str(err.value)
            assert "No space left on device" in msg and "\n" not in msg, msg
            assert [i.name for i in sn.walk()] == ["parent"]
        finally:
            sn.close()
