"""Snapshotter options: asynchronous remove (with its reaper) and extra mount options."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import require_root_user

from lamina.metadata.root import SNAPSHOTTERS
from lamina.mounts.mount import temp_mount
from lamina.snapshots.overlay import OverlaySnapshotter


@pytest.mark.parametrize("kind", sorted(SNAPSHOTTERS))
def test_async_remove_reaps_in_background_and_on_close(kind: str, tmp_path: Path) -> None:
    require_root_user()
    sn = SNAPSHOTTERS[kind](tmp_path, async_remove=True)
    dirs = tmp_path / "snapshots"
    with temp_mount(sn.prepare("a", "")) as t:
        Path(t, "f").write_text("x")
    sid = sn.snapshot("a").id  # type: ignore[attr-defined]
    sn.remove("a")
    assert not (dirs / sid).exists()  # out of the id space at once
    deadline = time.monotonic() + 60  # generous: the reaper is a thread on a busy machine
    while os.listdir(dirs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(dirs) == []  # the reaper deleted it
    sn.prepare("b", "")
    sid = sn.snapshot("b").id  # type: ignore[attr-defined]
    sn.remove("b")
    sn.close()  # a final reap
    assert os.listdir(dirs) == []


def test_overlay_extra_mount_options(tmp_path: Path) -> None:
    require_root_user()
    sn = OverlaySnapshotter(tmp_path, mount_options=("volatile",))
    sn.prepare("a", "")
    sn.commit("A", "a")
    (mount,) = sn.prepare("b", "A")
    assert "volatile" in mount.options
    with temp_mount([mount]) as t:
        Path(t, "g").write_text("y")
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            line = next(x for x in f if f" {t} " in x)
        assert "volatile" in line.split(" - ", 1)[1]  # the kernel shows it as fsync=volatile
    sn.close()
