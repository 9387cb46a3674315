"""lamina.fs.walk: the one directory walker (and its paired form for diffs).

Every tree walk in lamina (diffs, manifests, usage, the ID-mapped copy) goes
through it, so these cases pin what they rely on: order, pruning by not
entering, descriptors bounded at any depth, the paired view of two trees,
and leaving a directory (settle it, or walk it again).
"""

from __future__ import annotations

import contextlib
import os
import resource
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_root_user
from test_deep_trees import make_deep, read_deep

from lamina.fs.tree import DIR_FLAGS
from lamina.fs.walk import BYTES, PairedWalk, Walk
from lamina.mounts.idmap import IDMap, UserNamespace, _shift_in_place, chowned_copy

DEPTH = 2_500  # 'd/' a level: paths of 5,000 bytes, beyond PATH_MAX


@contextlib.contextmanager
def opened(path: Path) -> Iterator[int]:
    fd = os.open(path, DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def few_descriptors(limit: int = 200) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def tree(base: Path) -> Path:
    for rel in ("b/y", "b/x/deep", "a", "c/z"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(rel.encode())
    (base / "Z").mkdir()
    os.symlink("b", base / "link")
    return base


def test_walk_sorted_parents_first_and_prunes_where_not_entered(tmp_path: Path) -> None:
    root = tree(tmp_path / "t")
    seen: list[str] = []
    with opened(root) as fd:
        walk = Walk(fd)
        for e in walk:
            seen.append(e.path)
            assert os.stat(e.name, dir_fd=e.parent, follow_symlinks=False).st_ino == e.stat.st_ino
            assert e.depth == e.path.count("/") + 1
            if e.name != "c" and stat.S_ISDIR(e.stat.st_mode):
                walk.enter()
    assert seen == ["Z", "a", "b", "b/x", "b/x/deep", "b/y", "c", "link"]


def test_walk_directory_order_and_bytes_order(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    names = ["\udcff", "\ue000", "b", "a"]  # a surrogate-escaped byte sorts last as bytes
    for n in names:
        (root / n).write_bytes(b"")
    with opened(root) as fd:
        as_str = [e.name for e in Walk(fd)]
        as_bytes = [e.name for e in Walk(fd, key=BYTES)]
        listed = [e.name for e in Walk(fd, sort=False)]
    assert as_str == ["a", "b", "\udcff", "\ue000"]
    assert as_bytes == ["a", "b", "\ue000", "\udcff"]
    assert listed == os.listdir(root)


def test_walk_any_depth_with_few_descriptors(tmp_path: Path) -> None:
    make_deep(tmp_path, DEPTH)
    with opened(tmp_path) as fd, few_descriptors():
        walk = Walk(fd)
        deepest = ""
        for e in walk:
            if e.name == "d":
                walk.enter()
            else:
                deepest = e.path
                data = os.open(e.name, os.O_RDONLY, dir_fd=e.parent)
                assert os.read(data, 100) == b"at the bottom\n"
                os.close(data)
    assert deepest == "d/" * DEPTH + "bottom"


def test_walk_again_when_leaving_says_so(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "one").write_bytes(b"")
    seen: list[str] = []
    left = []

    def leave(parent: int, name: str) -> bool:
        left.append(name)
        if len(left) == 1:  # it filled up meanwhile: walk it again
            sub = os.open(name, DIR_FLAGS, dir_fd=parent)
            os.close(os.open("two", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=sub))
            os.close(sub)
            return True
        return False

    with opened(root) as fd:
        walk = Walk(fd)
        for e in walk:
            seen.append(e.path)
            if e.name == "sub":
                walk.enter(on_leave=leave)
    assert seen == ["sub", "sub/one", "sub/one", "sub/two"]
    assert left == ["sub", "sub"]


def test_paired_walk_sees_both_sides(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for base, files in ((lower, ["d/gone", "d/kept", "was-dir/x", "only-lower"]),
                        (upper, ["d/kept", "d/new", "only-upper"])):
        for rel in files:
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_bytes(b"")
    (upper / "was-dir").mkdir()  # a directory on both sides: entered on both
    seen = {}
    with opened(upper) as ufd, opened(lower) as lfd:
        walk = PairedWalk(ufd, lfd)
        for p in walk:
            seen[p.path] = (p.upper_stat is not None, p.lower_stat is not None)
            if p.upper_stat is not None and stat.S_ISDIR(p.upper_stat.st_mode):
                walk.enter()
    assert list(seen) == ["d", "d/gone", "d/kept", "d/new", "only-lower", "only-upper",
                          "was-dir", "was-dir/x"]
    assert seen["d/gone"] == (False, True) and seen["d/new"] == (True, False)
    assert seen["d/kept"] == (True, True) and seen["was-dir/x"] == (False, True)
    with opened(upper) as ufd:
        assert [p.path for p in PairedWalk(ufd, None)] == ["d", "only-upper", "was-dir"]


def test_chowned_copy_and_shift_at_any_depth(tmp_path: Path) -> None:
    require_root_user()
    src = tmp_path / "src"
    src.mkdir()
    make_deep(src, DEPTH)
    (src / "f").write_bytes(b"x")
    os.symlink("f", src / "sym")
    os.link(src / "sym", src / "sym2", follow_symlinks=False)  # a hard-linked symlink
    ns = UserNamespace((IDMap(0, 500000, 65536),), (IDMap(0, 600000, 65536),))
    with few_descriptors():
        chowned_copy(str(src), str(tmp_path / "dst"), ns)
    dst = tmp_path / "dst"
    assert read_deep(dst, DEPTH) == b"at the bottom\n"
    assert os.path.islink(dst / "sym2") and os.readlink(dst / "sym2") == "f"
    assert os.lstat(dst / "sym2").st_ino == os.lstat(dst / "sym").st_ino
    assert os.lstat(dst / "d").st_uid == 500000 and os.lstat(dst).st_gid == 600000
    with few_descriptors():
        _shift_in_place(str(src), ns)
    fd = os.open(src, DIR_FLAGS)
    for _ in range(DEPTH):
        sub = os.open("d", DIR_FLAGS, dir_fd=fd)
        os.close(fd)
        fd = sub
    try:
        assert os.stat("bottom", dir_fd=fd).st_uid == 500000
    finally:
        os.close(fd)


def test_remove_walks_a_directory_again_that_filled_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lamina.fs import remove

    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "sub" / "f").write_bytes(b"")
    real = remove._rmdir
    calls: list[str] = []

    def rmdir(dir_fd: int, name: str) -> bool:
        calls.append(name)
        if calls.count(name) == 1 and name == "sub":  # a writer was faster: one more file
            sub = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            os.close(os.open("late", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=sub))
            os.close(sub)
        return real(dir_fd, name)

    monkeypatch.setattr(remove, "_rmdir", rmdir)
    with opened(tmp_path) as fd:
        remove.remove_tree_at(fd, "t")
    assert not (tmp_path / "t").exists()
    assert calls == ["sub", "sub", "t"]
