"""Opening a new root's snapshotter: its probes (overlayfs and EROFS mountable under
it) are cheap (no sync of the filesystem, no fsync), run once per root and fail in
one line; a pull opens it before any download."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

import lamina.mounts.erofs as mounts_erofs
import lamina.snapshots.erofs as snap_erofs
import lamina.snapshots.overlay as overlay
from lamina.errors import Unavailable
from lamina.mounts.mount import Mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


def _count_syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in ("fsync", "fdatasync", "sync"):
        real = getattr(os, name)

        def counted(*args: object, _real: object = real, _name: str = name) -> object:
            calls.append(_name)
            return _real(*args)  # type: ignore[operator]

        monkeypatch.setattr(os, name, counted)
    return calls


def test_overlay_probe_is_volatile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmounting a writable overlay syncs its whole upper filesystem unless it is
    volatile: the probe's is, so it does not wait for other writers' data."""
    seen: list[tuple[str, ...]] = []
    real = overlay.mount_all

    def recording(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
        seen.append(tuple(mounts[0].options))
        real(mounts, target)

    monkeypatch.setattr(overlay, "mount_all", recording)
    overlay.check_overlay_support(tmp_path / "r")
    assert len(seen) == 1 and "volatile" in seen[0], seen
    assert list((tmp_path / "r").iterdir()) == []


def test_overlay_probe_on_a_kernel_without_volatile(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel before 5.10 refuses ``volatile``: the probe mounts without it; where
    that fails too, the error is one line with the reason."""
    real = overlay.mount_all
    seen: list[tuple[str, ...]] = []

    def old_kernel(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
        seen.append(tuple(mounts[0].options))
        if "volatile" in mounts[0].options:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(mounts, target)

    monkeypatch.setattr(overlay, "mount_all", old_kernel)
    overlay.check_overlay_support(tmp_path / "r")
    assert [("volatile" in o) for o in seen] == [True, False]

    def no_overlay(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(overlay, "mount_all", no_overlay)
    with pytest.raises(Unavailable) as err:
        overlay.check_overlay_support(tmp_path / "r")
    assert "overlayfs cannot be mounted under" in str(err.value)
    assert "\n" not in str(err.value)


def test_erofs_probe_syncs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe image needs no durability (nothing records it): no fsync of it or
    of its directory, which would wait for every other writer's data on ext4."""
    root = tmp_path / "r"
    root.mkdir()
    calls = _count_syncs(monkeypatch)
    snap_erofs.check_erofs_support(root)
    snap_erofs.check_erofs_support(root, backing="loop")
    assert calls == []
    assert list(root.iterdir()) == []


def test_erofs_probe_error_is_one_line_where_the_kernel_has_no_erofs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_erofs(source: str, target: str) -> None:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(mounts_erofs, "_mount", no_erofs)
    root = tmp_path / "r"
    root.mkdir()
    with pytest.raises(Unavailable) as err:
        snap_erofs.check_erofs_support(root)
    assert str(err.value).startswith("this kernel has no EROFS")
    assert "\n" not in str(err.value)
    assert list(root.iterdir()) == []
    with pytest.raises(Unavailable, match="this kernel has no EROFS"):
        snap_erofs.ErofsSnapshotter(tmp_path / "r2")


def test_probes_run_once_per_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Their result is kept in a marker file: a second open of the root probes nothing."""
    runs: list[str] = []
    for mod, name in ((overlay, "check_overlay_support"), (snap_erofs, "check_erofs_support")):
        real = getattr(mod, name)

        def counted(*args: object, _real: object = real, _name: str = name,
                    **kwargs: object) -> None:
            runs.append(_name)
            _real(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(mod, name, counted)
    for _ in range(2):
        snap_erofs.ErofsSnapshotter(tmp_path / "r").close()
    assert runs == ["check_overlay_support", "check_erofs_support"]


def test_a_pull_opens_the_snapshotter_before_any_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a new root opening the snapshotter syncs its database: done while layers
    download, that sync waits for their data too. The pull gets it opened."""
    import lamina.images.pull as pull_mod
    from lamina.images.service import ImageService
    from lamina.metadata.root import Root

    handed: list[object] = []

    def fake_pull(registry: object, reference: str, **kwargs: object) -> None:
        handed.append(kwargs["snapshots"])

    monkeypatch.setattr(pull_mod, "pull", fake_pull)
    root = Root(tmp_path / "r")
    try:
        service = ImageService(root, snapshotter="native")
        service.pull(object(), "example.com/a:1")  # type: ignore[arg-type]
        assert handed[0] is root.snapshotter("native")
        service.pull(object(), "example.com/a:1", unpack=False)  # type: ignore[arg-type]
    finally:
        root.close()
    fresh = Root(tmp_path / "r2")
    try:
        ImageService(fresh, snapshotter="native").pull(
            object(), "example.com/a:1", unpack=False)  # type: ignore[arg-type]
        assert handed[-1] is None and not (tmp_path / "r2" / "snapshots" / "native").exists()
    finally:
        fresh.close()


def _probe_at_once(root: str, barrier: object, out: object) -> None:
    try:
        barrier.wait(30)  # type: ignore[attr-defined]
        snap_erofs.check_erofs_support(Path(root))
        out.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:  # reported to the test, not swallowed
        out.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]


def test_processes_probing_one_fresh_root_together_all_succeed(tmp_path: Path) -> None:
    """CLIs started together on a new root each probe EROFS before the marker
    exists: the probe was one fixed directory, which they took from one another
    (File exists, No such file or directory, a failed mount)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    failures: list[str] = []
    for i in range(10):
        root = tmp_path / f"r{i}"
        root.mkdir()
        barrier = ctx.Barrier(4)
        out = ctx.Queue()
        procs = [ctx.Process(target=_probe_at_once, args=(str(root), barrier, out))
                 for _ in range(4)]
        for p in procs:
            p.start()
        failures += [r for r in (out.get(timeout=60) for _ in procs) if r != "ok"]
        for p in procs:
            p.join()
        assert list(root.iterdir()) == []
    assert not failures, failures
