"""Opening a root is a plain open; recovery (format migration, the restart repair) is
its own step, metadata.recover.RecoveredRoot, which every lamina command takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import require_root_user

from lamina.errors import FailedPrecondition
from lamina.metadata.formats import FORMAT, FORMAT_FILE
from lamina.metadata.recover import BOOT_ID_FILE, RecoveredRoot
from lamina.metadata.root import Root


def test_a_plain_open_refuses_an_older_format_and_recovery_migrates_it(
        tmp_path: Path) -> None:
    r = tmp_path / "r"
    Root(r).close()
    (r / FORMAT_FILE).write_text(json.dumps({"format": FORMAT - 1}))
    with pytest.raises(FailedPrecondition, match="older than this lamina's"):
        Root(r)
    assert json.loads((r / FORMAT_FILE).read_text()) == {"format": FORMAT - 1}
    recovered = RecoveredRoot(r)
    assert recovered.format_found == FORMAT - 1
    recovered.close()
    plain = Root(r)
    assert plain.format_found == FORMAT
    plain.close()


def test_a_plain_open_repairs_nothing_after_a_restart(tmp_path: Path) -> None:
    require_root_user()
    r = tmp_path / "r"
    RecoveredRoot(r).close()
    orphan = r / "snapshots" / "overlay" / "snapshots" / "new-deadbeef"
    (orphan / "fs").mkdir(parents=True)
    (r / BOOT_ID_FILE).write_text("an-earlier-boot\n")
    root = Root(r)
    root.snapshotter("overlay")
    root.close()
    assert orphan.exists()
    assert (r / BOOT_ID_FILE).read_text() == "an-earlier-boot\n"
    recovered = RecoveredRoot(r)
    recovered.close()
    assert recovered.recovered is not None and recovered.recovered.repaired
    assert not orphan.exists()
