"""A hostile layer cannot make its own apply cost grow faster than its size.

Layer apply resolves every member's parent one component at a time with
O_NOFOLLOW and follows symlinked parents inside the root (lamina.archive.safepath).
Without a cache, every member reached through a symlink to a deep directory
re-opened the whole chain (up to 2,048 opens for 512 bytes of tar), and
symlinks pointing at each other's deep targets multiplied that by up to 40.
Each attack below is a layer whose members go through such paths; the work
safepath does is counted (``safepath.WORK``: syscalls on existing entries,
symlink-target steps) and bounded per member; time is printed, never asserted.
The cache must not change what is written: the second half replaces, re-links
and whites out cached directories and symlinks, and checks where members land
and that nothing leaves the root.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_archive_support import Member, dir_, file_, make_tar, symlink, tree_state

from lamina.archive import safepath
from lamina.archive.apply import apply_layer
from lamina.errors import InvalidArgument
from lamina.fs.files import remove_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

DEPTH = 1000  # levels of the deep chains the attacks point into
MEMBERS = 400  # tiny members written through them


def chain(comp: str, levels: int) -> str:
    return "/".join([comp] * levels)


def deep_dirs(top: str, levels: int) -> list[Member]:
    """Directory members of ``top/top/...`` (``levels`` of them), parents first."""
    return [dir_(chain(top, n)) for n in range(1, levels + 1)]


@dataclass
class Attack:
    layer: bytes
    members: int  # the members written through the hostile paths
    check: Callable[[Path], None]


def deep_symlink_parent() -> Attack:
    """One symlink to the bottom of a deep chain; tiny files written through it."""
    bottom = chain("a", DEPTH)
    members = [*deep_dirs("a", DEPTH), symlink("s", "/" + bottom)]
    members += [file_(f"s/f{i}", b"") for i in range(MEMBERS)]

    def check(root: Path) -> None:
        assert _count(root, bottom) == MEMBERS

    return Attack(make_tar(members), MEMBERS, check)


def symlink_ping_pong() -> Attack:
    """Two deep chains whose bottoms hold symlinks to each other's bottoms,
    39 hops in all (the loop limit is 40); files written through the first."""
    a, b = chain("a", DEPTH), chain("b", DEPTH)
    members = [*deep_dirs("a", DEPTH), *deep_dirs("b", DEPTH), dir_(f"{a}/x0")]
    for k in range(1, 39):
        if k % 2:
            members.append(symlink(f"{b}/y{k}", f"/{a}/x{k - 1}"))
        else:
            members.append(symlink(f"{a}/x{k}", f"/{b}/y{k - 1}"))
    members.append(symlink("s", f"/{b}/y37"))
    members += [file_(f"s/f{i}", b"") for i in range(MEMBERS)]

    def check(root: Path) -> None:
        assert _count(root, f"{a}/x0") == MEMBERS

    return Attack(make_tar(members), MEMBERS, check)


def dotdot_climb() -> Attack:
    """A symlink at the bottom of one chain climbs all the way up with ``..``
    and down another; a relative symlink at the root leads to it."""
    levels = 600
    a, b = chain("a", levels), chain("b", levels)
    members = [*deep_dirs("a", levels), *deep_dirs("b", levels),
               symlink(f"{a}/u", "../" * levels + b), symlink("s", f"{a}/u")]
    members += [file_(f"s/f{i}", b"") for i in range(MEMBERS)]

    def check(root: Path) -> None:
        assert _count(root, b) == MEMBERS

    return Attack(make_tar(members), MEMBERS, check)


def many_links_one_dir() -> Attack:
    """Fifty symlinks to the same deep directory, used in turn."""
    bottom = chain("a", DEPTH)
    members = [*deep_dirs("a", DEPTH)]
    members += [symlink(f"l{k}", "/" + bottom) for k in range(50)]
    members += [file_(f"l{i % 50}/f{i}", b"") for i in range(MEMBERS)]

    def check(root: Path) -> None:
        assert _count(root, bottom) == MEMBERS

    return Attack(make_tar(members), MEMBERS, check)


def alternating_deep_dirs() -> Attack:
    """No symlinks: members alternate between the bottoms of two deep chains."""
    a, b = chain("a", DEPTH), chain("b", DEPTH)
    members = [*deep_dirs("a", DEPTH), *deep_dirs("b", DEPTH)]
    members += [file_(f"{(a, b)[i % 2]}/f{i}", b"") for i in range(MEMBERS)]

    def check(root: Path) -> None:
        assert _count(root, a) == MEMBERS // 2

    return Attack(make_tar(members), MEMBERS, check)


def many_deep_targets() -> Attack:
    """More deep directories than the cache keeps open, visited in turn
    through one symlink each (the fd cache cannot hold them all)."""
    n = safepath.MAX_OPEN + 72
    members = [*deep_dirs("a", 300)]
    for k in range(n):
        members += [dir_(f"{chain('a', 300)}/{k}"), symlink(f"l{k}", f"/{chain('a', 300)}/{k}")]
    members += [file_(f"l{i % n}/f{i}", b"") for i in range(2 * n)]

    def check(root: Path) -> None:
        fd = _open(root, f"{chain('a', 300)}/0")
        try:
            assert sorted(os.listdir(fd)) == ["f0", f"f{n}"]
        finally:
            os.close(fd)

    return Attack(make_tar(members), 2 * n, check)


ATTACKS = {
    "deep-symlink-parent": deep_symlink_parent,
    "symlink-ping-pong": symlink_ping_pong,
    "dotdot-climb": dotdot_climb,
    "many-links-one-dir": many_links_one_dir,
    "alternating-deep-dirs": alternating_deep_dirs,
    "many-deep-targets": many_deep_targets,
}


def _count(root: Path, rel: str) -> int:
    fd = _open(root, rel)
    try:
        return len(os.listdir(fd))
    finally:
        os.close(fd)


def _open(root: Path, rel: str) -> int:
    """An fd for ``root/rel`` opened level by level (the paths pass PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for comp in rel.split("/"):
        nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "file").write_bytes(b"precious")
    yield root, outside
    remove_tree(root)


def _work() -> tuple[int, int, int]:
    w = safepath.WORK
    return w.syscalls, w.steps, w.lookups


def _fds() -> set[str]:
    """This process's open descriptors. Compared as sets: a test fails on an fd
    it left open, not on one something else in the process closed meanwhile."""
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("overlay", [False, True], ids=["native", "overlay-staging"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_costs_a_constant_per_member(name: str, overlay: bool,
                                            sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    attack = ATTACKS[name]()
    fds = _fds()
    syscalls0, steps0, lookups0 = _work()
    start = time.monotonic()
    apply_layer(io.BytesIO(attack.layer), root, overlay=overlay)
    took = time.monotonic() - start
    syscalls, steps, lookups = (a - b for a, b in zip(_work(), (syscalls0, steps0, lookups0),
                                                       strict=True))
    print(f"\n{name}: {lookups} lookups, {syscalls} syscalls, {steps} symlink steps; "
          f"{attack.members / took:.0f} members/s ({len(attack.layer)} bytes)")
    attack.check(root)
    assert _fds() - fds == set()  # every cached fd closed
    # Work linear in the layer: a few syscalls per member once the hostile paths
    # are known, and symlink targets walked about once each (a target step needs
    # at least two bytes of the layer). Uncached, each member cost 600 to 39,000 opens.
    assert syscalls <= 4 * lookups + 600, (syscalls, lookups)
    assert steps <= len(attack.layer) // 2, (steps, len(attack.layer))


def test_relinking_a_symlink_on_every_member_hits_the_budget(sandbox: tuple[Path, Path]) -> None:
    """Replacing a symlink voids every remembered resolution; a layer that does so
    between every member written through a 39-hop chain of deep symlinks would
    cost ~39,000 steps per member: it stops at the budget, with one line."""
    root, outside = sandbox
    a, b = chain("a", DEPTH), chain("b", DEPTH)
    members = [*deep_dirs("a", DEPTH), *deep_dirs("b", DEPTH), dir_(f"{a}/x0")]
    for k in range(1, 39):
        if k % 2:
            members.append(symlink(f"{b}/y{k}", f"/{a}/x{k - 1}"))
        else:
            members.append(symlink(f"{a}/x{k}", f"/{b}/y{k - 1}"))
    members.append(symlink("s", f"/{b}/y37"))
    for i in range(400):
        members += [symlink("s", f"/{b}/y37"), file_(f"s/f{i}", b"")]
    layer = make_tar(members)
    before = tree_state(outside)
    fds = _fds()
    syscalls0, steps0, lookups0 = _work()
    with pytest.raises(InvalidArgument) as info:
        apply_layer(io.BytesIO(layer), root)
    assert _fds() - fds == set()
    msg = info.value.message
    assert "too many symlink resolutions" in msg and "\n" not in msg and len(msg) < 400, msg
    steps, lookups = safepath.WORK.steps - steps0, safepath.WORK.lookups - lookups0
    syscalls = safepath.WORK.syscalls - syscalls0
    assert steps + syscalls <= safepath.WORK_BASE + safepath.WORK_PER_LOOKUP * lookups + 2 * DEPTH
    print(f"\nstopped after {lookups} lookups, {steps} steps, {syscalls} syscalls: {msg}")
    assert tree_state(outside) == before


# --------------------------------------------------------------------------- correctness


def _apply(root: Path, *members: Member) -> None:
    apply_layer(io.BytesIO(make_tar(members)), root)


def test_directory_replacing_a_cached_symlink(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    _apply(root, dir_("d"), symlink("s", "d"), file_("s/f1", b"1"), dir_("s"), file_("s/f2", b"2"))
    assert sorted(os.listdir(root / "d")) == ["f1"]
    assert not (root / "s").is_symlink() and sorted(os.listdir(root / "s")) == ["f2"]


def test_symlink_replacing_a_cached_directory_cannot_escape(sandbox: tuple[Path, Path]) -> None:
    root, outside = sandbox
    before = tree_state(outside)
    for target in ("../outside", "../../" + str(outside), "d/../.."):
        with pytest.raises(InvalidArgument, match="leads out of the root"):
            _apply(root, dir_("d"), dir_("d/x"), file_("d/x/f1", b""), symlink("d", target),
                   file_("d/x/f2", b"pwn"))
        assert tree_state(outside) == before
    # an absolute target is read inside the root
    _apply(root, dir_("e/x"), file_("e/x/f1", b""), symlink("e", str(outside)),
           file_("e/x/f2", b"in"))
    assert (root / str(outside).lstrip("/") / "x/f2").read_bytes() == b"in"
    assert tree_state(outside) == before


def test_retargeted_symlinks_are_followed_afresh(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    _apply(root, dir_("a/x"), dir_("b/x"), symlink("s2", "a"), symlink("s1", "s2/x"),
           file_("s1/f1", b""), symlink("s2", "b"), file_("s1/f2", b""),
           symlink("s1", "a"), file_("s1/f3", b""))
    assert sorted(os.listdir(root / "a/x")) == ["f1"]
    assert sorted(os.listdir(root / "b/x")) == ["f2"]
    assert sorted(os.listdir(root / "a")) == ["f3", "x"]


def test_file_then_directory_over_a_cached_chain(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    with pytest.raises(InvalidArgument, match="not a directory"):
        _apply(root, file_("p/q/f1", b""), file_("p", b"file"), file_("p/q/f2", b""))
    _apply(root, file_("r/q/f1", b""), file_("r", b"file"), dir_("r"), file_("r/q/f2", b""))
    assert sorted(os.listdir(root / "r/q")) == ["f2"]


def test_whiteout_of_a_lower_symlink_used_as_parent(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    (root / "real").mkdir()
    os.symlink("real", root / "ln")
    _apply(root, file_("ln/f1", b""), file_(".wh.ln", b""), file_("ln/f2", b""))
    assert sorted(os.listdir(root / "real")) == ["f1"]
    assert not (root / "ln").is_symlink() and sorted(os.listdir(root / "ln")) == ["f2"]


def test_opaque_directory_under_cached_symlinks(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    (root / "d/sub").mkdir(parents=True)
    (root / "d/sub/lower").write_bytes(b"")
    (root / "d/old").write_bytes(b"")
    os.symlink("d/sub", root / "l")
    _apply(root, file_("l/f1", b""), dir_("d"), file_("d/.wh..wh..opq", b""),
           file_("l/f2", b""), file_("d/sub/f3", b""))
    assert sorted(os.listdir(root / "d")) == ["sub"]
    assert sorted(os.listdir(root / "d/sub")) == ["f1", "f2", "f3"]


def test_more_directories_than_open_fds(sandbox: tuple[Path, Path]) -> None:
    root, _ = sandbox
    n = safepath.MAX_OPEN * 2 + 3
    fds = _fds()
    members = [file_(f"d{i % n}/x/f{i}", b"") for i in range(3 * n)]
    members += [symlink("s", "d0"), file_("s/x/last", b""), symlink("d1", "d0"),
                file_("d1/x/via", b"")]
    _apply(root, *members)
    assert _fds() - fds == set()
    assert sorted(os.listdir(root / "d0/x")) == sorted(["f0", f"f{n}", f"f{2 * n}", "last", "via"])
    assert os.readlink(root / "d1") == "d0"
    assert len(os.listdir(root / f"d{n - 1}/x")) == 3


def test_resolved_parents_deeper_than_the_cap_are_not_created(
        sandbox: tuple[Path, Path]) -> None:
    """A symlink leading below the 2,048-level cap fails before making anything there."""
    root, _ = sandbox
    deep = chain("a", 1500)
    with pytest.raises(InvalidArgument, match="2048 directories deep"):
        _apply(root, *deep_dirs("a", 1500), symlink(f"{deep}/down", "b/" * 1000 + "c"),
               symlink("s", f"{deep}/down"),
               file_("s/f", b""))
    fd = _open(root, deep)
    try:  # the 548 levels below the chain that the cap allows, and no more
        levels = 0
        while "b" in os.listdir(fd):
            nfd = os.open("b", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd, levels = nfd, levels + 1
        assert levels == 2048 - 1500
        assert os.listdir(fd) == []
    finally:
        os.close(fd)


def test_resolved_parents_longer_than_path_max_are_refused(sandbox: tuple[Path, Path]) -> None:
    """Symlinks chained through long names would make each tiny member stand for a
    ~150 KB path (kept for every member: 1.2 MB of layer held 370 MiB)."""
    root, _ = sandbox
    long = "/".join(["N" * 255] * 15)
    members = [symlink("l1", long)]
    members += [symlink(f"l{k}", f"l{k - 1}/{long}") for k in range(2, 40)]
    members += [file_(f"l39/f{i}", b"") for i in range(100)]
    with pytest.raises(InvalidArgument) as info:
        _apply(root, *members)
    msg = info.value.message
    assert "bytes once symlinks are resolved (limit 4095, PATH_MAX)" in msg, msg
    assert "\n" not in msg and len(msg) < 400
    # the longest allowed: 4,095 bytes
    target = "/".join(["M" * 255] * 15) + "/" + "M" * 255
    assert len(target) == 4095
    _apply(root, symlink("m", target), file_("m/f", b"in"))
    fd = _open(root, target)
    try:
        assert os.listdir(fd) == ["f"]
    finally:
        os.close(fd)
