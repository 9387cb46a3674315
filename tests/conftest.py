"""Shared pytest fixtures for lamina.

Keep this small: feature-specific fixtures belong in the test files that use them.

- ``require_root`` (fixture) / ``require_tools(*names)`` / ``require_root_user()``:
  skip only when a privilege or a tool is really absent, saying which.
- ``tmp_root``: a fresh lamina root directory on a real disk: when
  ``$LAMINA_TEST_TMP`` is on tmpfs, an ext4 image mounted for the session; anything
  still mounted under it is lazily unmounted at teardown.
- The skip policy: with ``CI`` set (or ``--no-skips``), a test that skips fails
  unless ``tests/skip_allowlist.txt`` names it, with the reason it cannot run in CI.
- ``cache_dir`` (session): persistent cache, ``/var/cache/lamina-test`` or
  ``$LAMINA_TEST_CACHE``; used by ``imagefactory`` for the debootstrap base.
- ``debian_rootfs`` / ``debian_layer`` (session): the cached debootstrap base.
"""

from __future__ import annotations

import contextlib
import ctypes
import fnmatch
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import imagefactory
import pytest

if TYPE_CHECKING:
    from lamina.metadata.root import Root

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------- skips


def require_tools(*names: str) -> None:
    """Skip the calling test unless every executable in ``names`` is in PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"required tool(s) not installed: {', '.join(missing)}")


def ended_within(seconds: float, call: Callable[[], object], what: str) -> BaseException | None:
    """Run ``call`` in a thread: what it raised, None when it returned. Still running
    after ``seconds`` fails the test (the hang such a test looks for); the thread,
    a daemon, is left where it blocks."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"{what}: still running after {seconds:g} s"
    return outcome[0]


def require_root_user() -> None:
    """Skip the calling test unless running as root (uid 0)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root (running as uid {os.geteuid()})")


@pytest.fixture
def require_root() -> None:
    """Fixture form of `require_root_user`."""
    require_root_user()


ALLOWLIST = Path(__file__).with_name("skip_allowlist.txt")  # --skip-allowlist overrides


@dataclass(frozen=True)
class Allowed:
    """One allowlist line: ``<node id glob> | <skip reason glob> | <why not in CI>``."""

    nodeid: str
    reason: str
    why: str

    def matches(self, nodeid: str, reason: str) -> bool:
        return fnmatch.fnmatchcase(nodeid, self.nodeid) and \
            fnmatch.fnmatchcase(reason, self.reason)


def read_allowlist(path: Path) -> list[Allowed]:
    """The entries of the skip allowlist; a line without all three fields is an error."""
    out: list[Allowed] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 3 or not all(fields):
            raise pytest.UsageError(f"{path}:{number}: want '<node id glob> | "
                                    f"<skip reason glob> | <why it cannot run in CI>'")
        out.append(Allowed(*fields))
    return out


def skips_fail(config: pytest.Config) -> bool:
    """CI (``CI`` set to anything but empty/0/false) or ``--no-skips``."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or bool(config.getoption("no_skips"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-skips", action="store_true", dest="no_skips",
                     help="fail every skip that tests/skip_allowlist.txt does not name "
                          "(the default when $CI is set)")
    parser.addoption("--skip-allowlist", type=Path, default=ALLOWLIST, dest="skip_allowlist",
                     help=f"the allowlist of skips (default {ALLOWLIST})")


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _forbid(report: pytest.TestReport | pytest.CollectReport, config: pytest.Config) -> None:
    """Turn ``report``'s skip into a failure unless the allowlist names it."""
    if not report.skipped or hasattr(report, "wasxfail") or not skips_fail(config):
        return
    reason = _skip_reason(report.longrepr)
    if any(a.matches(report.nodeid, reason) for a in config.stash[_ALLOWED]):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped ({reason}), and CI skips nothing that "
                       f"{config.getoption('skip_allowlist')} does not name with its reason")


_ALLOWED = pytest.StashKey[list[Allowed]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    del call
    report = yield
    _forbid(report, item.config)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector
                               ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    _forbid(report, collector.config)
    return report


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


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"64m"``) mounted at new directory ``mnt`` for the block
    (a filesystem to fill), detached afterwards."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        ctypes.CDLL(None, use_errno=True).umount2(os.fsencode(str(mnt)), 2)  # MNT_DETACH


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
    from lamina.fs.files import remove_tree

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
    config.stash[_ALLOWED] = read_allowlist(config.getoption("skip_allowlist"))
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
    if _DISK is not None:
        _release_disk(_DISK)
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


_DISK: Path | None = None  # the session's ext4 image mount, when the base is tmpfs
_DISK_SIZE = "64G"  # sparse: tmpfs holds only what the tests write


def _mount_disk(base: Path) -> Path:
    """An ext4 filesystem from a sparse image in ``base``, mounted below it."""
    work = Path(tempfile.mkdtemp(prefix="disk-", dir=base))
    image, mnt = work / "ext4.img", work / "mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", _DISK_SIZE, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,nodiscard",
                    str(image)], check=True, stdin=subprocess.DEVNULL)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    return mnt


def _release_disk(mnt: Path) -> None:
    unmount_all_under(mnt)
    shutil.rmtree(mnt.parent, ignore_errors=True)


def tmp_base() -> Path:
    """Where roots go: ``$LAMINA_TEST_TMP`` (default /var/tmp/lamina-test), or, when
    that is on tmpfs or ramfs, an ext4 image mounted there once per session."""
    global _DISK
    base = Path(os.environ.get("LAMINA_TEST_TMP", "/var/tmp/lamina-test"))
    base.mkdir(parents=True, exist_ok=True)
    if _fs_type(base) not in ("tmpfs", "ramfs"):
        return base
    if _DISK is None:
        require_root_user()
        require_tools("mkfs.ext4", "truncate", "mount")
        _DISK = _mount_disk(base)
    return _DISK


@pytest.fixture
def tmp_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh, empty lamina root dir on a real disk (``$LAMINA_TEST_TMP`` or
    /var/tmp/lamina-test; an ext4 image mounted there when that is tmpfs). At
    teardown everything mounted below it is lazily unmounted (deepest first) and
    the directory removed; set ``LAMINA_KEEP_TMP=1`` to keep it for debugging.
    """
    base = tmp_base()
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name)[:60]
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))
    try:
        yield root
    finally:
        left = unmount_all_under(root)
        if left:
            print(f"\ntmp_root: unmounted leftovers: {left}")
        if not os.environ.get("LAMINA_KEEP_TMP"):
            from lamina.fs.files import remove_tree

            with contextlib.suppress(OSError):
                remove_tree(root)


@pytest.fixture
def open_root(tmp_root: Path) -> Iterator[Root]:
    """A lamina Root opened on a fresh ``tmp_root``, closed afterwards."""
    from lamina.metadata.root import Root

    r = Root(tmp_root / "root")
    try:
        yield r
    finally:
        r.close()


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
