"""Kill points on the erofs snapshotter: the snapshot calls and an image import are
killed at every crash point in turn, recovered as a user does (``check --repair``,
the call or command again) and checked: nothing committed is lost, no half image
is mounted, ``lamina check`` finds the root consistent (see test_killpoints.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import consistency
import pytest
from conftest import require_root_user
from test_killpoints import (
    _SNAP_CHILD,
    LAMINA,
    SNAPSHOT_AFTER,
    SNAPSHOT_SCENARIOS,
    Images,
    Op,
    _new_root,
    _sweep,
    _verify_image,
    images,
    snapshot_setup,
)

from lamina.metadata.root import Root
from lamina.mounts.erofs import unmount_image
from lamina.mounts.mountinfo import read_mountinfo
from lamina.snapshots.erofs import ErofsSnapshotter

pytestmark = [pytest.mark.slow]
__all__ = ["images"]  # the fixture, shared with test_killpoints
KEEP = {"containerd.io/gc.root": "killpoint"}  # what keeps a snapshot from `lamina gc`


_LAYER_MOUNT = re.compile(r"^still mounted: .*/snapshots/erofs/snapshots/[0-9]+/fs$")


@pytest.fixture(autouse=True)
def _layer_mounts_are_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer mount is the snapshotter's state, not a leftover of the killed process
    (``lamina check`` itself mounts a layer it looks into)."""
    found = consistency.problems

    def problems(root: Path, **kw: Any) -> list[str]:
        return [p for p in found(root, **kw) if not _LAYER_MOUNT.match(p)]

    monkeypatch.setattr(consistency, "problems", problems)


def _reboot(root: Path) -> None:
    """Layer mounts are meant to stay (the consistency check takes anything mounted
    for a leftover): take them off, as a reboot does; they come back on demand."""
    for m in sorted(read_mountinfo(), key=lambda m: -len(m.mount_point)):
        if m.fstype == "erofs" and m.mount_point.startswith(f"{root}/"):
            unmount_image(m.mount_point)


def test_kill_erofs_image_import(images: Images, tmp_root: Path) -> None:
    require_root_user()
    command = ["--snapshotter", "erofs", "image", "import", str(images.tar)]

    def again(root: Path) -> None:
        argv = [a.replace("{root}", str(root)) for a in [*LAMINA, *command]]
        subprocess.run(argv, check=True, capture_output=True)
        _reboot(root)

    def verify(root: Path) -> None:
        _verify_image(root, "erofs", images)
        _reboot(root)

    op = Op("import-oci-erofs", _new_root, [*LAMINA, *command], verify, resume=again)
    _sweep(op, tmp_root)


@pytest.mark.parametrize("scenario", sorted(SNAPSHOT_SCENARIOS))
def test_kill_erofs_snapshot_op(scenario: str, tmp_root: Path) -> None:
    require_root_user()
    setup_code, code = SNAPSHOT_SCENARIOS[scenario]

    setup = snapshot_setup("erofs", setup_code)

    def resume(root: Path) -> None:
        r = Root(root)
        try:
            sn = r.snapshotter("erofs")
            if {i.name for i in sn.walk()} != SNAPSHOT_AFTER[scenario]:
                exec(code, {"sn": sn, "R": KEEP})
        finally:
            r.close()
        _reboot(root)

    def verify(root: Path) -> None:
        r = Root(root)
        try:
            sn = r.snapshotter("erofs")
            assert isinstance(sn, ErofsSnapshotter)
            assert {i.name for i in sn.walk()} == SNAPSHOT_AFTER[scenario]
            assert (sn.layer_dir("base") / "kept").read_text() == "base content"
            assert sn.verify_layer("base") == ""
            if "done" in SNAPSHOT_AFTER[scenario]:
                assert sn.verify_layer("done") == ""
        finally:
            r.close()
            _reboot(root)

    op = Op(f"snapshot-{scenario}-erofs", setup,
            [sys.executable, "-c", _SNAP_CHILD, "erofs", "{root}", code], verify, resume=resume)
    _sweep(op, tmp_root)
