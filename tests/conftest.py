"""Shared pytest fixtures for lamina.

Keep this small: feature-specific fixtures belong in the test files that use them.

- ``require_root`` (fixture) / ``require_tools(*names)`` / ``require_root_user()``:
  skip only when a privilege or a tool is really absent, saying which.
- ``tmp_root``: a fresh lamina root directory on a real disk (not tmpfs); anything
  still mounted under it is lazily unmounted at teardown.
- ``cache_dir`` (session): persistent cache, ``/var/cache/lamina-test`` or
  ``$LAMINA_TEST_CACHE``; used by ``imagefactory`` for the debootstrap base.
- ``debian_rootfs`` / ``debian_layer`` (session): the cached debootstrap base.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------- skips


def require_tools(*names: str) -> None:
    """Skip the calling test unless every executable in ``names`` is in PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"required tool(s) not installed: {', '.join(missing)}")


def require_root_user() -> None:
    """Skip the calling test unless running as root (uid 0)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root (running as uid {os.geteuid()})")


@pytest.fixture
def require_root() -> None:
    """Fixture form of `require_root_user`."""
    require_root_user()


# --------------------------------------------------------------------------- mounts


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(root: Path | str) -> list[str]:
    """Mount points at or below ``root`` (from /proc/self/mountinfo), deepest first."""
    prefix = os.path.realpath(root)
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape_mountinfo(line.split()[4])
            if mp == prefix or mp.startswith(prefix.rstrip("/") + "/"):
                found.append(mp)
    # deepest first; for stacked mounts on one point, the later (upper) one first
    order = {mp: i for i, mp in enumerate(found)}
    return sorted(set(found), key=lambda p: (p.count("/"), order[p]), reverse=True)


def unmount_all_under(root: Path | str) -> list[str]:
    """Lazily unmount everything at or below ``root``; returns what was mounted."""
    seen: list[str] = []
    for _ in range(10):  # stacked mounts need several rounds
        mps = mounts_under(root)
        if not mps:
            break
        for mp in mps:
            seen.append(mp)
            _libc.umount2(os.fsencode(mp), MNT_DETACH)
    return seen


def _fs_type(path: Path) -> str:
    """Filesystem type of the mount that holds ``path``."""
    real = os.path.realpath(path)
    best, fstype = "", "?"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mp = _unescape_mountinfo(parts[4])
            sep = parts.index("-")
            if (real == mp or real.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
                best, fstype = mp, parts[sep + 1]
    return fstype


# --------------------------------------------------------------------------- dirs


_GUARD_ROOT: Path | None = None


def _pytest_tmp() -> Path:
    import getpass

    return Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"


def _prune_deep(base: Path, depth: int = 64) -> None:
    """Remove every directory tree more than ``depth`` levels below ``base``.

    Tests build trees thousands of levels deep (hostile layers, deep-tree
    removal); pytest removes its old temporary directories with a recursive
    rmtree, which dies on them (RecursionError). lamina's own removal is
    iterative and works relative to directory descriptors."""
    from lamina.fsutil import remove_tree

    stack = [(base, 0)]
    while stack:
        d, level = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if level + 1 >= depth:
                    remove_tree(e.path)
                else:
                    stack.append((Path(e.path), level + 1))


def pytest_configure(config: pytest.Config) -> None:
    """Tests never touch the machine's own root (/var/lib/lamina): a ``lamina``
    run that forgot ``--root`` lands in a throw-away directory, and the session
    fails if anything did. Trees too deep for pytest's own cleanup, left by
    earlier sessions, are pruned first."""
    global _GUARD_ROOT
    del config
    # other sessions' directories (garbage-*, and numbered ones pytest will delete)
    # but never the newest few, which a concurrent session may be using
    old = sorted((p for p in _pytest_tmp().glob("pytest-*") if p.name[7:].isdigit()),
                 key=lambda p: int(p.name[7:]))[:-4]
    for d in [*_pytest_tmp().glob("garbage-*"), *old]:
        _prune_deep(d)
    _GUARD_ROOT = Path(tempfile.mkdtemp(prefix="lamina-default-root-", dir="/var/tmp"))
    os.environ["LAMINA_ROOT"] = str(_GUARD_ROOT)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    del exitstatus
    if _READABLE_SRC is not None:
        shutil.rmtree(_READABLE_SRC, ignore_errors=True)
    factory = getattr(session.config, "_tmp_path_factory", None)
    basetemp = getattr(factory, "_basetemp", None)
    if basetemp is not None:
        _prune_deep(Path(basetemp))
    if _GUARD_ROOT is None or not _GUARD_ROOT.exists():
        return
    used = sorted(p.name for p in _GUARD_ROOT.iterdir())
    unmount_all_under(_GUARD_ROOT)
    shutil.rmtree(_GUARD_ROOT, ignore_errors=True)
    if used:
        print(f"\na test used the default root ($LAMINA_ROOT) without --root: {used}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_READABLE_SRC: Path | None = None


def readable_source() -> Path:
    """A copy of lamina's ``src`` that every user can read, for tests that run
    lamina as another user (uid 65534, a rootless user): the checkout itself may
    sit where only root reaches it (``/root/lamina`` on a fresh machine, whose
    home is 0700). Made once per session; put it on such a child's PYTHONPATH."""
    global _READABLE_SRC
    if _READABLE_SRC is None:
        base = Path(tempfile.mkdtemp(prefix="lamina-test-src-", dir="/var/tmp"))
        os.chmod(base, 0o755)
        shutil.copytree(Path(__file__).resolve().parent.parent / "src" / "lamina",
                        base / "lamina", ignore=shutil.ignore_patterns("__pycache__"))
        for d, dirs, files in os.walk(base):
            for name in dirs:
                os.chmod(os.path.join(d, name), 0o755)
            for name in files:
                os.chmod(os.path.join(d, name), 0o644)
        _READABLE_SRC = base
    return _READABLE_SRC


def _tmp_base() -> Path:
    base = Path(os.environ.get("LAMINA_TEST_TMP", "/var/tmp/lamina-test"))
    base.mkdir(parents=True, exist_ok=True)
    return base


@pytest.fixture
def tmp_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh, empty lamina root dir on a real disk (``$LAMINA_TEST_TMP`` or
    /var/tmp/lamina-test). At teardown everything mounted below it is lazily
    unmounted (deepest first) and the directory removed; set
    ``LAMINA_KEEP_TMP=1`` to keep it for debugging.
    """
    base = _tmp_base()
    fstype = _fs_type(base)
    if fstype in ("tmpfs", "ramfs"):
        pytest.skip(f"{base} is on {fstype}; set LAMINA_TEST_TMP to a disk-backed directory")
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name)[:60]
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    try:
        yield root
    finally:
        left = unmount_all_under(root)
        if left:
            print(f"\ntmp_root: unmounted leftovers: {left}")
        if not os.environ.get("LAMINA_KEEP_TMP"):
            from lamina.fsutil import remove_tree

            with contextlib.suppress(OSError):
                remove_tree(root)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Persistent cache shared by test runs (``$LAMINA_TEST_CACHE``,
    default /var/cache/lamina-test)."""
    d = Path(os.environ.get("LAMINA_TEST_CACHE", "/var/cache/lamina-test"))
    try:
        d.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        pytest.skip(f"cannot create cache dir {d}; set LAMINA_TEST_CACHE")
    return d


@pytest.fixture(scope="session")
def debian_rootfs(cache_dir: Path) -> Path:
    """The cached debootstrap bookworm minbase tree (READ-ONLY, shared)."""
    require_root_user()
    require_tools("debootstrap")
    return imagefactory.debootstrap_rootfs(cache_dir)


@pytest.fixture(scope="session")
def debian_layer(cache_dir: Path, debian_rootfs: Path) -> imagefactory.Layer:
    """`debian_rootfs` as a cached gzip layer blob."""
    return imagefactory.debootstrap_layer(cache_dir)
