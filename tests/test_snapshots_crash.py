"""SIGKILL a snapshotter at every crash point of prepare, commit and remove.

Each scenario runs in a child process with ``LAMINA_CRASH_AFTER=N`` for
N = 1, 2, ... until the child completes without being killed. After every
kill the root is reopened: ``cleanup`` must leave metadata and disk in
agreement, and the interrupted operation must then succeed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lamina.metadata.root import SNAPSHOTTERS
from lamina.mounts.mount import temp_mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

# Each scenario: setup (run normally), then the operation that gets killed.
SCENARIOS = {
    "prepare": ("", "sn.prepare('child', 'base', labels={'l': '1'})"),
    "view": ("", "sn.view('v', 'base')"),
    "commit": ("sn.prepare('child', 'base')", "sn.commit('done', 'child')"),
    "remove-active": ("sn.prepare('child', 'base')", "sn.remove('child')"),
    "remove-committed": (
        "sn.prepare('child', 'base'); sn.commit('done', 'child')",
        "sn.remove('done')",
    ),
}

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lamina.metadata.root import SNAPSHOTTERS
    sn = SNAPSHOTTERS[sys.argv[1]](Path(sys.argv[2]))
    exec(sys.argv[3])
    sn.close()
    """
)


def _open(kind: str, root: Path):  # type: ignore[no-untyped-def]
    return SNAPSHOTTERS[kind](root)


def _run(kind: str, root: Path, code: str, crash_after: int = 0) -> int:
    env = dict(os.environ)
    env.pop("LAMINA_CRASH_AT", None)
    env["LAMINA_CRASH_AFTER"] = str(crash_after)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(root), code],
        env=env, capture_output=True, text=True, check=False,
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({proc.returncode}): {proc.stderr}")
    return proc.returncode


def _base(kind: str, root: Path) -> None:
    sn = _open(kind, root)
    with temp_mount(sn.prepare("b", "")) as t:
        Path(t, "kept").write_text("base content")
    sn.commit("base", "b")
    sn.close()


@pytest.mark.parametrize("kind", ["overlay", "native"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kill_at_every_point(kind: str, scenario: str, tmp_path: Path) -> None:
    setup, op = SCENARIOS[scenario]
    killed_at = 0
    for n in range(1, 50):
        root = tmp_path / f"root-{n}"
        _base(kind, root)
        if setup:
            assert _run(kind, root, setup) == 0
        rc = _run(kind, root, op, crash_after=n)
        sn = _open(kind, root)
        try:
            sn.cleanup()
            assert sn.check() == [], f"inconsistent after kill at point {n}"
            assert Path(sn.fs_dir(sn.snapshot("base").id), "kept").read_text() == "base content"
            if rc == 0:
                break
            killed_at += 1
            # The interrupted operation either happened whole or not at all; finish it.
            done = {i.name for i in sn.walk()}
            if scenario in ("prepare", "view") and ("child" in done or "v" in done):
                continue
            if scenario == "commit" and "done" in done:
                assert "child" not in done
                continue
            if scenario.startswith("remove") and not ({"child", "done"} & done):
                continue
        finally:
            sn.close()
        assert _run(kind, root, op) == 0, f"operation failed after kill at point {n}"
        sn = _open(kind, root)
        try:
            assert sn.check() == []
        finally:
            sn.close()
    else:
        pytest.fail("operation never completed")
    assert killed_at >= 2, "the operation passed fewer crash points than expected"


@pytest.mark.parametrize("kind", ["overlay", "native"])
def test_cleanup_removes_orphans(kind: str, tmp_path: Path) -> None:
    sn = _open(kind, tmp_path)
    sn.prepare("a", "")
    dirs = tmp_path / "snapshots"
    (dirs / "999" / "fs").mkdir(parents=True)
    (dirs / "new-abandoned").mkdir()
    (dirs / "rm-7").mkdir()
    problems = sn.check()
    assert len(problems) == 3
    sn.cleanup()
    assert sn.check() == []
    assert sorted(os.listdir(dirs)) == [sn.snapshot("a").id]
    sn.close()


@pytest.mark.parametrize("kind", ["overlay", "native"])
def test_cleanup_never_takes_a_new_directory_before_its_maker_locks_it(
        kind: str, tmp_path: Path) -> None:
    """A ``new-`` directory exists, unlocked, between ``mkdtemp`` and its flock. A
    cleanup in another process or thread (containerd's Cleanup through serve, a CLI
    gc) that scanned in that gap took it from under a concurrent prepare
    (FileNotFoundError in the 8-process test). The maker holds the settle lock shared
    over the gap, so the cleanup waits and then sees the directory locked."""
    import fcntl
    import tempfile
    import threading

    sn = _open(kind, tmp_path)
    dirs = tmp_path / "snapshots"
    cleaner = threading.Thread(target=sn.cleanup, daemon=True)
    with sn._new_dirs_settled(scan=False):  # as _new_dir does, frozen in the gap
        new = Path(tempfile.mkdtemp(prefix="new-", dir=dirs))
        cleaner.start()
        cleaner.join(2)  # room for a cleanup that does not wait to take it
        fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        cleaner.join(60)
        assert not cleaner.is_alive()
        assert new.is_dir(), "cleanup took a directory its maker was about to lock"
        assert sn.check() == []
    finally:
        os.close(fd)
    sn.cleanup()
    assert not new.exists()  # unlocked for good now: an orphan
    sn.close()
