"""A lamina root is owner-only: another local user reads nothing out of it.

After an import (both snapshotters, a mount, an unfinished ingest), uid 65534,
in a real process, can list neither the root nor the blobs, and read neither a
blob nor a database; every file under the root has no group or other bits,
except the one justified exception (a snapshot's ``fs`` tree is the image's own,
with the image's modes). A root an earlier lamina made (0711, 0755 directories,
0644 databases and files, 0444 blobs) is tightened when lamina opens it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import require_root_user, require_tools
from imagefactory import File, build_oci_layout, layer_from_entries

from lamina.cli import main
from lamina.metadata.recover import RecoveredRoot as Root

REF = "test/private:1"
SECRET = b"only root may read this\n"
NOBODY = 65534


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("private-image")
    layer = layer_from_entries([File("etc/secret", SECRET, 0o600)], base / "blobs",
                               compression="none")
    build_oci_layout(base / "oci", [layer], ref_name=REF)
    return base / "oci"


def lamina(root: Path, *args: str, snapshotter: str = "overlay") -> None:
    rc = main(["--root", str(root), "--snapshotter", snapshotter, *args])
    assert rc == 0, f"lamina {' '.join(args)}: exit {rc}"


@pytest.fixture
def root(tmp_root: Path, layout: Path) -> Path:
    """A root with the image imported and unpacked on both snapshotters, mounted
    and unmounted once, and one unfinished ingest."""
    require_root_user()
    os.chmod(tmp_root, 0o755)  # so that only the lamina root's own modes protect it
    r = tmp_root / "root"
    lamina(r, "image", "import", str(layout))
    lamina(r, "image", "unpack", REF, snapshotter="native")
    (tmp_root / "mnt").mkdir()
    lamina(r, "image", "mount", REF, str(tmp_root / "mnt"))
    lamina(r, "image", "unmount", str(tmp_root / "mnt"))
    store = Root(r)
    try:
        w = store.content().writer("unfinished", total=100)
        w.write(b"partial")
        w.close()
    finally:
        store.close()
    return r


# --------------------------------------------------------------------------- modes


def image_tree(rel: Path) -> bool:
    """Inside a snapshot's ``fs`` directory: the image's own tree and modes."""
    parts = rel.parts
    return len(parts) > 5 and parts[0] == "snapshots" and parts[2] == "snapshots" \
        and parts[4] == "fs"


def loose_entries(root: Path) -> list[str]:
    """Every entry under ``root`` (the root included) with a group or other bit."""
    bad = []
    stack = [root]
    while stack:
        p = stack.pop()
        st = p.lstat()
        rel = p.relative_to(root)
        mode = stat.S_IMODE(st.st_mode)
        parts = rel.parts
        is_fs_top = len(parts) == 5 and parts[0] == "snapshots" and parts[4] == "fs"
        if mode & 0o077 and not stat.S_ISLNK(st.st_mode) and not is_fs_top:
            bad.append(f"{oct(mode)} {rel}")
        if stat.S_ISDIR(st.st_mode) and not os.path.ismount(p):
            stack.extend(c for c in p.iterdir() if not image_tree(c.relative_to(root)))
    return sorted(bad)


def assert_private(root: Path) -> None:
    assert loose_entries(root) == []
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    blobs = list((root / "content" / "blobs" / "sha256").iterdir())
    assert blobs and {stat.S_IMODE(b.stat().st_mode) for b in blobs} == {0o400}
    dbs = [root / "metadata.db", root / "content" / "metadata.db",
           root / "snapshots" / "overlay" / "metadata.db",
           root / "snapshots" / "native" / "metadata.db"]
    for db in dbs:
        for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            if f.exists():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    for d in (root / "content", root / "content" / "blobs", root / "snapshots",
              root / "snapshots" / "overlay", root / "tmpmounts", root / "locks"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    ingests = list((root / "content" / "ingest").iterdir())
    assert ingests, "the unfinished ingest is gone"
    for f in ingests[0].iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_fresh_root_is_owner_only(root: Path) -> None:
    assert_private(root)
    # the justified exception is really there: the image's own modes
    fs_tops = list(root.glob("snapshots/*/snapshots/*/fs"))
    assert len(fs_tops) == 2
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o755 for p in fs_tops)


# --------------------------------------------------------------------------- as nobody

_PROBE = r"""
import json, os, sqlite3, sys
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as exc:
        out[name] = type(exc).__name__
    except sqlite3.Error as exc:
        out[name] = "sqlite3." + type(exc).__name__
root, blob, fs_file = sys.argv[1:4]
attempt("list root", lambda: os.listdir(root))
attempt("list blobs", lambda: os.listdir(os.path.join(root, "content/blobs/sha256")))
attempt("read blob", lambda: open(blob, "rb").read())
for db in ("metadata.db", "content/metadata.db", "snapshots/overlay/metadata.db"):
    p = os.path.join(root, db)
    attempt("read " + db, lambda: open(p, "rb").read(1))
    attempt("query " + db, lambda: sqlite3.connect("file:" + p + "?mode=ro", uri=True)
            .execute("SELECT name FROM sqlite_master").fetchall())
attempt("read image file", lambda: open(fs_file, "rb").read())
print(json.dumps(out))
"""


def as_nobody(root: Path) -> dict[str, str]:
    """What uid 65534 (a separate process) manages to do in ``root``."""
    require_tools("setpriv")
    layer_blob = max((root / "content" / "blobs" / "sha256").iterdir(),
                     key=lambda p: p.stat().st_size)
    assert SECRET in layer_blob.read_bytes()  # an uncompressed layer: the secret is in it
    fs_file = next(root.glob("snapshots/overlay/snapshots/*/fs/etc/secret"))
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "/usr/bin/python3", "-I", "-c", _PROBE, str(root), str(layer_blob), str(fs_file)],
        capture_output=True, text=True, check=True, timeout=60, cwd="/",
    )
    result: dict[str, str] = json.loads(proc.stdout)
    return result


def test_nobody_reads_nothing(root: Path) -> None:
    seen = as_nobody(root)
    assert seen and all(v != "ok" for v in seen.values()), seen


def test_store_is_closed_even_below_an_open_root(root: Path) -> None:
    """Not only the root: with the root opened to 0711 (as before), the stores
    below it still keep uid 65534 out."""
    os.chmod(root, 0o711)
    try:
        seen = as_nobody(root)
    finally:
        os.chmod(root, 0o700)
    assert seen.pop("list root") == "PermissionError"
    assert all(v != "ok" for v in seen.values()), seen


# --------------------------------------------------------------------------- old roots


def loosen_like_an_old_lamina(root: Path) -> None:
    """The modes lamina gave a root before: 0711 root, 0755 directories, 0644
    files, 0444 blobs (snapshot directories themselves were already 0700); and
    no format file or boot id, which it did not write (see lamina.metadata.formats)."""
    (root / "format").unlink()
    (root / "boot-id").unlink()
    os.chmod(root, 0o711)
    stack = [root]
    while stack:
        d = stack.pop()
        for c in d.iterdir():
            rel = c.relative_to(root)
            if len(rel.parts) >= 3 and rel.parts[0] == "snapshots" and rel.parts[2] == "snapshots":
                continue  # snapshots/<name>/snapshots/<id>/...: 0700 then and now
            if c.is_symlink():
                continue
            if c.is_dir():
                os.chmod(c, 0o755)
                stack.append(c)
            elif rel.parts[:3] == ("content", "blobs", "sha256"):
                os.chmod(c, 0o444)
            else:
                os.chmod(c, 0o644)


def test_old_root_is_tightened_on_open(root: Path) -> None:
    loosen_like_an_old_lamina(root)
    assert len(loose_entries(root)) > 10
    before = as_nobody(root)  # what the issue reported
    assert before["list blobs"] == before["read blob"] == before["read metadata.db"] == "ok"
    # opening the root alone closes it
    Root(root).close()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    after = as_nobody(root)
    assert all(v != "ok" for v in after.values()), after
    # each store tightens the rest when it opens
    lamina(root, "image", "unpack", REF)
    lamina(root, "snapshot", "ls", snapshotter="native")
    assert_private(root)
