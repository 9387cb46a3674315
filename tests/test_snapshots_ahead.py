"""Snapshot directories made ahead (lamina.snapshots.ahead): a prepare that one
serves flushes only its row; other processes' check and cleanup leave the stock
alone while its maker lives; a kill at any step leaves nothing a recovery does not
repair, and no directory behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_root_user
from test_killpoints import KEEP, TALLY, Op, _sweep, snapshot_setup

import lamina.util.db
from lamina.metadata.root import SNAPSHOTTERS, Root
from lamina.mounts.mount import temp_mount
from lamina.snapshots.directory import DirectorySnapshotter
from lamina.snapshots.overlay import OverlaySnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _entries(sn: DirectorySnapshotter) -> list[str]:
    return sorted(os.listdir(sn.root / "snapshots"), key=lambda e: (len(e), e))


def _dir_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The directories write transactions fsync before their commit, as they go."""
    synced: list[str] = []
    real = lamina.util.db.fsync_dir

    def spy(path: str | os.PathLike[str]) -> None:
        synced.append(os.fspath(path))
        real(path)

    monkeypatch.setattr(lamina.util.db, "fsync_dir", spy)
    return synced


@pytest.mark.parametrize("kind", ["overlay", "native"])
def test_a_prepare_adopts_a_directory_made_ahead_and_flushes_only_its_row(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sn = SNAPSHOTTERS[kind](tmp_path)
    assert isinstance(sn, DirectorySnapshotter)
    try:
        assert sn.fill_ahead(2) == 2
        made = _entries(sn)
        assert made == ["1", "2"] and sn.check() == []
        synced = _dir_fsyncs(monkeypatch)
        with temp_mount(sn.prepare("a", "")) as t:
            Path(t, "f").write_text("x")
        assert sn.snapshot("a").id in made
        assert synced == []  # the directory was durable before the row
        sn.commit("A", "a")
        sn.prepare("b", "A" if kind == "overlay" else "")  # the last one ahead
        assert sn.snapshot("b").id in made and synced == []
        sn.prepare("c", "")  # none left: the plain path, its rename synced
        assert sn.snapshot("c").id == "3" and synced == [str(tmp_path / "snapshots")]
        assert _entries(sn) == ["1", "2", "3"] and sn.check() == []
    finally:
        sn.close()


def test_a_parent_whose_root_differs_gets_a_directory_of_its_own(tmp_path: Path) -> None:
    """A new layer's root takes the top parent's owner, mode and xattrs: one made
    ahead has a new directory's, and serves only a parent whose root has those."""
    sn = OverlaySnapshotter(tmp_path)
    try:
        sn.prepare("p", "")
        os.chmod(sn.fs_dir(sn.snapshot("p").id), 0o700)
        os.setxattr(sn.fs_dir(sn.snapshot("p").id), "user.kept", b"1")
        sn.commit("P", "p")
        sn.fill_ahead(1)
        (ahead,) = set(_entries(sn)) - {sn.snapshot("P").id}
        sn.prepare("c", "P")
        child = sn.fs_dir(sn.snapshot("c").id)
        assert sn.snapshot("c").id != ahead
        assert (os.stat(child).st_mode & 0o777, os.getxattr(child, "user.kept")) == (0o700, b"1")
        sn.prepare("d", "")
        assert sn.snapshot("d").id == ahead  # still in stock, taken by the next fit
    finally:
        sn.close()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from lamina.metadata.root import Root
    root = Root(sys.argv[1], ahead=4)
    sn = root.snapshotter("overlay")
    sn.fill_ahead(3)
    print("ready", flush=True)
    sys.stdin.readline()
    root.close()
    """
)


def test_other_processes_leave_a_live_stock_alone_and_repair_a_dead_ones(
        tmp_path: Path) -> None:
    """``lamina check`` and ``check --repair`` (cleanup) in another process beside a
    server's stock: in progress, not leftovers; gone when the server closes; left
    by a SIGKILLed server, orphans the repair removes. Their ids are never given."""
    require_root_user()
    root = tmp_path / "root"
    dirs = root / "snapshots" / "overlay" / "snapshots"

    def lamina(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *argv],
                              capture_output=True, text=True, check=False)

    for ending in ("close", "kill"):
        holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "ready\n"
        stock = sorted(os.listdir(dirs))
        assert len(stock) == 3
        for argv in (["check"], ["check", "--repair"], ["check"]):
            run = lamina(*argv)
            assert run.returncode == 0, run.stdout + run.stderr
        assert sorted(os.listdir(dirs)) == stock
        r = Root(root)
        try:
            r.snapshotter("overlay").prepare(f"x-{ending}", "")
            sid = r.snapshotter("overlay").snapshot(f"x-{ending}").id  # type: ignore[attr-defined]
            assert int(sid) > max(int(s) for s in stock)
            r.snapshotter("overlay").remove(f"x-{ending}")
        finally:
            r.close()
        if ending == "close":
            holder.stdin.write("\n")
            holder.stdin.close()
            assert holder.wait(60) == 0
            assert os.listdir(dirs) == []
        else:
            holder.send_signal(signal.SIGKILL)
            holder.wait(60)
            check = lamina("check")
            assert check.returncode == 5 and "unknown to the metadata" in check.stdout
            assert lamina("check", "--repair").returncode == 0
            assert os.listdir(dirs) == []
            assert lamina("check").returncode == 0


# --------------------------------------------------------------------------- kill points

# The stock is filled by the client itself here (a server's thread would make the
# crash points' order depend on timing), then the prepare takes one when it fits:
# with a parent on overlay, without one on both.
AHEAD_SCENARIOS = {
    "prepare-ahead": "sn.fill_ahead(2); sn.prepare('child', 'base', labels={'l': '1', **R})",
    "prepare-ahead-no-parent": "sn.fill_ahead(2); sn.prepare('child', '', labels=R)",
}

_CHILD = textwrap.dedent(
    """
    import sys
    from lamina.metadata.root import Root
    root = Root(sys.argv[2], ahead=2)
    sn = root.snapshotter(sys.argv[1])
    exec(sys.argv[3], {"sn": sn, "R": {"containerd.io/gc.root": "killpoint"}})
    root.close()
    """
)


@contextlib.contextmanager
def _opened(root: Path, kind: str) -> Iterator[DirectorySnapshotter]:
    """Snapshotter ``kind`` of the root at ``root``, as a command opens it."""
    r = Root(root)
    try:
        sn = r.snapshotter(kind)
        assert isinstance(sn, DirectorySnapshotter)
        yield sn
    finally:
        r.close()


@pytest.mark.parametrize("kind", ["overlay", "native"])
@pytest.mark.parametrize("scenario", sorted(AHEAD_SCENARIOS))
def test_kill_prepare_ahead(kind: str, scenario: str, tmp_root: Path) -> None:
    """A kill at every step of making directories ahead and of a prepare adopting
    one: the recovery (check --repair, the call again) leaves ``lamina check``
    consistent, the sweep's checker finds no directory the metadata does not know,
    and the snapshot is there with its labels."""
    code = AHEAD_SCENARIOS[scenario]

    def resume(root: Path) -> None:
        with _opened(root, kind) as sn:
            if "child" not in {i.name for i in sn.walk()}:
                exec(code, {"sn": sn, "R": KEEP})

    def verify(root: Path) -> None:
        with _opened(root, kind) as sn:
            assert {i.name for i in sn.walk()} == {"base", "child"}
            assert (sn.fs_dir(sn.snapshot("base").id) / "kept").read_text() == "base content"
            assert sn.stat("child").labels.items() >= KEEP.items()
            ids = {sn.snapshot(i.name).id for i in sn.walk()}
            assert set(_entries(sn)) == ids  # nothing made ahead is left

    op = Op(f"snapshot-{scenario}-{kind}", snapshot_setup(kind, ""),
            [sys.executable, "-c", _CHILD, kind, "{root}", code], verify, resume=resume)
    _sweep(op, tmp_root)
    killed = {k.point for k in TALLY.kills if k.op == op.name}
    adopts = kind == "overlay" or scenario.endswith("no-parent")
    assert killed >= {"ahead.reserved", "ahead.made", "ahead.durable",
                      *(["create.ahead-row"] if adopts else [])}, killed


def test_a_server_opening_the_root_removes_a_killed_ones_stock(tmp_path: Path) -> None:
    """``lamina serve`` SIGKILLed and started again: the new server's snapshotter
    removes the stock the killed one left before it keeps its own, so ``lamina
    check`` is clean without a repair."""
    root = tmp_path / "root"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline() == "ready\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait(60)
    dirs = root / "snapshots" / "overlay" / "snapshots"
    assert len(os.listdir(dirs)) == 3
    r = Root(root, ahead=4)
    try:
        assert r.snapshotter("overlay").check() == []  # type: ignore[attr-defined]
        assert os.listdir(dirs) == []
    finally:
        r.close()
