"""Root formats (an older root migrates, a newer one is refused) and recovery of a
root that a machine restart interrupted (see lamina.metadata.formats)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from conftest import require_root_user

from lamina.images.service import ImageService
from lamina.metadata.formats import FORMAT, FORMAT_FILE
from lamina.metadata.recover import BOOT_ID_FILE
from lamina.metadata.recover import RecoveredRoot as Root

FIXTURE = Path(__file__).parent / "fixtures" / "root-format1.tar.gz"


def _lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_new_root_is_stamped(tmp_path: Path) -> None:
    root = Root(tmp_path / "r")
    root.close()
    assert json.loads((tmp_path / "r" / FORMAT_FILE).read_text()) == {"format": FORMAT}
    assert root.format_found == FORMAT
    assert (tmp_path / "r" / BOOT_ID_FILE).read_text().strip() == \
        Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert _mode(tmp_path / "r" / FORMAT_FILE) == 0o600


def test_a_root_made_in_a_directory_of_other_things_is_new(tmp_path: Path) -> None:
    """Only lamina 0.1's own entries make a format-1 root: a root made inside a
    directory that holds other things is new, and a plain open (no recovery)
    takes it."""
    from lamina.metadata.root import Root as PlainRoot

    d = tmp_path / "r"
    (d / "a").mkdir(parents=True)
    (d / "a" / "f").write_text("not lamina's")
    os.symlink("a", d / "link")
    root = PlainRoot(d)
    root.close()
    assert json.loads((d / FORMAT_FILE).read_text()) == {"format": FORMAT}
    assert (d / "a" / "f").read_text() == "not lamina's"


def test_a_newer_root_is_refused(tmp_path: Path) -> None:
    r = tmp_path / "r"
    Root(r).close()
    (r / FORMAT_FILE).write_text(json.dumps({"format": FORMAT + 1}))
    done = _lamina(r, "image", "ls")
    assert done.returncode == 5, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"has format {FORMAT + 1}, newer than this lamina understands" in done.stderr
    (r / FORMAT_FILE).write_text("garbage")
    done = _lamina(r, "image", "ls")
    assert done.returncode == 5 and "unreadable root format" in done.stderr


def test_a_format_1_root_made_by_lamina_0_1_is_migrated(tmp_path: Path) -> None:
    require_root_user()
    r = tmp_path / "old"
    r.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xpzf", str(FIXTURE), "-C", str(r)], check=True)
    assert not (r / FORMAT_FILE).exists()
    assert _mode(r) == 0o711 and _mode(r / "metadata.db") == 0o644

    done = _lamina(r, "image", "ls", "--names")
    assert done.returncode == 0, done.stderr
    assert "fixture:1" in done.stdout
    assert json.loads((r / FORMAT_FILE).read_text()) == {"format": FORMAT}
    assert _mode(r) == 0o700 and _mode(r / "metadata.db") == 0o600
    assert _mode(r / "content") == 0o700
    for blob in (r / "content" / "blobs" / "sha256").iterdir():
        assert _mode(blob) == 0o400
    # what 0.1 stored is all there: both snapshotters' layers, the active snapshot
    root = Root(r)
    try:
        assert root.format_found == FORMAT  # the migration happened above, once
        for sn in ("overlay", "native"):
            svc = ImageService(root, snapshotter=sn)
            target = tmp_path / f"mnt-{sn}"
            svc.mount("fixture:1", target)
            try:
                assert (target / "etc" / "motd").read_text() == "made by lamina 0.1\n"
                assert (target / "etc" / "secret").read_text() == "only root reads me\n"
                assert (target / "bin" / "tool").stat().st_mode & 0o777 == 0o755
            finally:
                svc.unmount(target)
        active = root.snapshotter("overlay").stat("work-1")
        assert active.kind.value == "active"
    finally:
        root.close()
    done = _lamina(r, "check")
    assert done.returncode == 0 and "consistent" in done.stdout, done.stdout + done.stderr


def test_a_root_opened_after_a_restart_is_repaired(tmp_path: Path) -> None:
    require_root_user()
    r = tmp_path / "r"
    root = Root(r)
    sn = root.snapshotter("overlay")
    sn.prepare("kept", "")
    root.content()
    root.close()
    # what a power cut can leave: directories the metadata never recorded, an
    # ingest, a temporary file in the blob directory
    orphan = r / "snapshots" / "overlay" / "snapshots" / "new-deadbeef"
    (orphan / "fs").mkdir(parents=True)
    (orphan / "fs" / "half-written").write_bytes(b"x" * 100)
    stray = r / "content" / "blobs" / "sha256" / ".tmp-crash"
    stray.write_bytes(b"partial")
    (r / BOOT_ID_FILE).write_text("an-earlier-boot\n")

    done = _lamina(r, "snapshot", "ls")
    assert done.returncode == 0, done.stderr
    assert "kept" in done.stdout
    assert "was last used before the machine restarted; repaired 2 leftover(s)" in done.stderr
    assert not orphan.exists() and not stray.exists()
    assert (r / BOOT_ID_FILE).read_text().strip() != "an-earlier-boot"
    # once per boot: the next command says nothing
    again = _lamina(r, "snapshot", "ls")
    assert again.returncode == 0 and again.stderr == ""


def test_without_a_restart_nothing_is_repaired_behind_the_users_back(tmp_path: Path) -> None:
    require_root_user()
    r = tmp_path / "r"
    Root(r).close()
    orphan = r / "snapshots" / "overlay" / "snapshots" / "99"
    (orphan / "fs").mkdir(parents=True)
    root = Root(r)
    assert root.recovered is None
    root.close()
    assert orphan.exists()  # left for cleanup / check --repair, as before
