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
            # the size recorded at commit says it fits (another writer fills the
            # disk meanwhile, say): cp runs out of space itself
            with sn.meta.write(sn._scope) as tx:
                tx._c.execute("UPDATE snapshots SET size=0 WHERE key='parent'")
            with pytest.raises(ResourceExhausted) as err:
                sn.prepare("child", "parent")
            msg = str(err.value)
            assert "No space left on device" in msg and "\n" not in msg, msg
            assert [i.name for i in sn.walk()] == ["parent"]
        finally:
            sn.close()


def test_a_copy_that_would_not_leave_the_reserve_is_refused_before_it_starts(
        tmp_path: Path) -> None:
    """The parent's size recorded at commit does not fit beside it with the disk's
    reserve kept: ResourceExhausted before a byte is copied (cp ran the disk to
    zero first)."""
    from conftest import small_tmpfs

    from lamina.archive.limits import space_reserve
    from lamina.errors import ResourceExhausted

    with small_tmpfs(tmp_path / "small", "24m") as mnt:
        sn = NativeSnapshotter(mnt / "sn")
        try:
            sn.prepare("p-active", None)
            fs = Path(sn.mounts("p-active")[0].source)
            (fs / "big").write_bytes(os.urandom(13 << 20))
            sn.commit("parent", "p-active")
            before = os.statvfs(mnt)
            with pytest.raises(ResourceExhausted,
                               match=r"^the files of parent snapshot 'parent' announce \d+ "
                                     r"bytes, \d+ bytes are free on the filesystem of "):
                sn.prepare("child", "parent")
            after = os.statvfs(mnt)
            assert after.f_bavail >= before.f_bavail - 4  # nothing was copied
            reserve = space_reserve(after.f_blocks * after.f_frsize)
            assert after.f_bavail * after.f_frsize > reserve
            assert [i.name for i in sn.walk()] == ["parent"]
            sn.prepare("small-child", "")  # a snapshot that fits is still made
        finally:
            sn.close()
