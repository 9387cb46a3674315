"""EROFS images written by lamina from a layer's tar stream.

Every image is checked by an independent implementation (erofs-utils'
``fsck.erofs``, with ``--extract``, and ``dump.erofs``) and mounted by the
kernel; the mounted tree must equal what :func:`apply_layer` makes of the
same layer on an empty directory, entry by entry (type, mode, owner, size,
content, link target, device numbers, xattrs, mtimes, hard-link groups,
opaque markers), with the same one-line InvalidArgument where apply_layer
refuses the layer.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_archive_cpu_bounds as cpu
import treesum
from conftest import require_root_user, require_tools
from test_archive_limits import CASES as HOSTILE
from test_archive_limits import CountingReader, bomb, dir_chain, header, pax
from test_archive_support import (
    CAP_NET_BIND,
    Member,
    dev,
    dir_,
    fifo,
    file_,
    hardlink,
    make_tar,
    symlink,
)
from test_layer_parity import CASES as PARITY
from test_layer_parity import summarize

from lamina.archive import limits
from lamina.archive.apply import NeedsLowerLayers, apply_layer
from lamina.erofs import format as F
from lamina.erofs.digest import file_digest, parse_record
from lamina.erofs.inode import RootMeta
from lamina.erofs.reader import ErofsImage
from lamina.erofs.writer import write_image
from lamina.errors import InvalidArgument, ResourceExhausted

_OPAQUE = "trusted.overlay.opaque"


@pytest.fixture(autouse=True)
def _root_and_tools() -> None:
    require_root_user()
    require_tools("fsck.erofs", "dump.erofs")


def _big_stack() -> None:
    # fsck.erofs 1.5 recurses once per directory level: 8 MiB of stack ends near
    # 1,000 levels (a segfault on mkfs.erofs' images as on lamina's)
    resource.setrlimit(resource.RLIMIT_STACK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def check_image(image: Path, work: Path, *, extract: bool = True) -> None:
    """fsck.erofs passes (with ``extract``, every file extracted and decoded:
    not for trees whose paths reach PATH_MAX) and dump.erofs reads it."""
    out = work / f"fsck-{image.name}"
    runs = [["fsck.erofs", str(image)], ["dump.erofs", "-s", "-S", str(image)],
            ["dump.erofs", "--path=/", str(image)]]
    if extract:
        runs.append(["fsck.erofs", "-d3", f"--extract={out}", str(image)])
    for args in runs:
        proc = subprocess.run(args, capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL, preexec_fn=_big_stack)
        assert proc.returncode == 0, f"{args}: {(proc.stdout + proc.stderr)[-2000:]}"
        assert "<E>" not in proc.stderr, f"{args}: {proc.stderr}"
    subprocess.run(["rm", "-rf", str(out)], check=True)


@contextlib.contextmanager
def mounted(image: Path, target: Path) -> Iterator[Path]:
    """The image mounted read-only (file-backed; a loop device where the kernel needs one)."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "erofs", "-o", "ro", str(image), str(target)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(target)],
                       check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def opaque_dirs(root: Path) -> list[str]:
    out = []
    for dirpath, _dirs, _files in os.walk(root):
        with contextlib.suppress(OSError):
            if os.getxattr(dirpath, _OPAQUE) == b"y":
                out.append("/" + os.path.relpath(dirpath, root))
    return sorted(out)


def comparable(root: Path, *, dir_mtimes: bool = False) -> dict[str, Any]:
    """The parity summary, plus opaque directories; the mtimes of whiteout devices
    (apply_layer makes them now) left out, and those of directories unless
    ``dir_mtimes`` (a directory the layer does not list is made now)."""
    tree = summarize(root)
    if dir_mtimes:
        tree.update(treesum.summarize(root))
    for path, value in tree.items():
        if path.startswith("/") and value[0] == stat.S_IFCHR and value[7] == 0:
            tree[path] = (*value[:8], 0, value[9])
    tree["<opaque>"] = opaque_dirs(root)
    return tree


def applied(raw: bytes, where: Path, *, overlay: bool,
            dir_mtimes: bool = False) -> dict[str, Any] | InvalidArgument:
    where.mkdir(mode=0o755)
    os.chmod(where, 0o755)
    try:
        apply_layer(io.BytesIO(raw), where, overlay=overlay)
    except InvalidArgument as exc:
        return exc
    return comparable(where, dir_mtimes=dir_mtimes)


def written(raw: bytes, image: Path, work: Path, *, overlay: bool, root: RootMeta | None = None,
            dir_mtimes: bool = False) -> dict[str, Any] | InvalidArgument:
    try:
        write_image(io.BytesIO(raw), image, overlay=overlay, root=root)
    except InvalidArgument as exc:
        assert not image.exists()
        assert not [p for p in image.parent.iterdir() if p.name.startswith(".tmp-")]
        return exc
    check_image(image, work)
    with mounted(image, work / f"mnt-{image.name}") as mnt:
        return comparable(mnt, dir_mtimes=dir_mtimes)


def assert_same(want: dict[str, Any] | InvalidArgument,
                got: dict[str, Any] | InvalidArgument) -> None:
    if isinstance(want, InvalidArgument):
        assert isinstance(got, InvalidArgument), f"not rejected; apply_layer said {want}"
        assert (type(got), got.message) == (type(want), want.message)
        return
    assert not isinstance(got, InvalidArgument), f"rejected: {got}"
    assert treesum.diff(want, got) == []


# -- the layer-parity corpus, each layer alone -----------------------------------

PARITY_LAYERS = [(f"{c.name}-{i}", layer) for c in PARITY
                 for i, layer in enumerate([*c.base, c.layer])]


@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "native"])
@pytest.mark.parametrize("layer", [m for _, m in PARITY_LAYERS],
                         ids=[n for n, _ in PARITY_LAYERS])
def test_parity_layer_alone(layer: list[Member], overlay: bool, tmp_path: Path) -> None:
    raw = make_tar(layer)
    want = applied(raw, tmp_path / "applied", overlay=overlay)
    assert_same(want, written(raw, tmp_path / "layer.erofs", tmp_path, overlay=overlay))


# -- stacked as overlay lowers -------------------------------------------------


def _root_meta(image: Path) -> RootMeta:
    with ErofsImage(image) as im:
        info = im.inode(im.root_nid)
    return RootMeta(stat.S_IMODE(info.mode), info.uid, info.gid, info.mtime_ns,
                    tuple((k, v) for k, v in info.xattrs.items() if not k.startswith(_OPAQUE)))


@contextlib.contextmanager
def stacked(images: list[Path], work: Path) -> Iterator[Path | None]:
    """The images mounted as overlayfs lowers (the last one on top); None for none."""
    if not images:
        yield None
        return
    work.mkdir()
    with contextlib.ExitStack() as stack:
        mnts = [stack.enter_context(mounted(img, work / f"m{i}"))
                for i, img in enumerate(images)]
        if len(mnts) == 1:
            yield mnts[0]
            return
        merged = work / "merged"
        merged.mkdir()
        lower = ":".join(str(m) for m in reversed(mnts))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower}",
                        str(merged)], check=True)
        try:
            yield merged
        finally:
            subprocess.run(["umount", str(merged)], check=True)


@pytest.mark.parametrize("case", [c for c in PARITY if not c.reject],
                         ids=[c.name for c in PARITY if not c.reject])
def test_stacked_images_equal_native_apply(case: Any, tmp_path: Path) -> None:
    """Each layer an image (overlay form), the images stacked as overlayfs lowers:
    whiteouts and opaque directories hide what the lower images have, as the
    native apply of the whole stack removes it."""
    layers = [make_tar(m) for m in [*case.base, case.layer]]
    images: list[Path] = []
    for i, raw in enumerate(layers):
        image = tmp_path / f"l{i}.erofs"
        with stacked(images, tmp_path / f"below{i}") as below:
            try:
                write_image(io.BytesIO(raw), image, overlay=True,
                            root=_root_meta(images[-1]) if images else None,
                            drop_needless_whiteouts=True, lower=below)
            except NeedsLowerLayers:
                # what an upper directory cannot say: the snapshotter applies this
                # layer on a mount instead, as apply_layer's staged mode does
                staged = tmp_path / f"staged{i}"
                staged.mkdir()
                with pytest.raises(NeedsLowerLayers):
                    apply_layer(io.BytesIO(raw), staged, overlay=True)
                return
        check_image(image, tmp_path)
        images.append(image)
    native = tmp_path / "native"
    native.mkdir(mode=0o755)
    os.chmod(native, 0o755)
    for raw in layers:
        apply_layer(io.BytesIO(raw), native)
    want = summarize(native)
    with stacked(images, tmp_path / "top") as merged:
        assert merged is not None
        got = summarize(merged)
    assert treesum.diff(want, got) == []


# -- hostile layers --------------------------------------------------------------


@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "native"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layer_same_error(case: str, overlay: bool, tmp_path: Path) -> None:
    raw, pattern, _member = HOSTILE[case]
    want = applied(raw, tmp_path / "applied", overlay=overlay)
    assert isinstance(want, InvalidArgument)
    got = written(raw, tmp_path / "layer.erofs", tmp_path, overlay=overlay)
    assert_same(want, got)
    assert isinstance(got, InvalidArgument) and pattern in got.message
    assert "\n" not in got.message


# -- every kind of member ------------------------------------------------------

# system.posix_acl_access: user::rw-, user:1000:r--, group::r--, mask::r--, other::---
ACL_ACCESS = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in [(1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF),
                             (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)])
ACL_DEFAULT = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in [(1, 7), (4, 5), (0x20, 5)])
# an access ACL that says no more than the mode: folded into the mode, no xattr
ACL_PLAIN = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in [(1, 7), (4, 1), (0x20, 0)])

KINDS = [
    dir_("./", mode=0o755),
    dir_("etc", mode=0o755, mtime="1700000000.987654321"),
    file_("etc/passwd", b"root:x:0:0\n" * 500, uid=70000, gid=70001),
    file_("etc/block", b"B" * 8192),
    file_("etc/tail", b"T" * 5000, mtime="1600000000.5"),
    file_("bin-ping", b"\x7fELF" * 10, mode=0o4755, xattrs={"security.capability": CAP_NET_BIND}),
    file_("bin-ping6", b"\x7fELF" * 11, mode=0o755, xattrs={"security.capability": CAP_NET_BIND,
                                                             "user.own": b"mine"}),
    file_("acl", b"a", mode=0o640, xattrs={"system.posix_acl_access": ACL_ACCESS}),
    file_("acl-plain", b"a", mode=0o644, xattrs={"system.posix_acl_access": ACL_PLAIN}),
    dir_("shared", mode=0o3777, xattrs={"system.posix_acl_default": ACL_DEFAULT,
                                        "user.note": b"n" * 300}),
    file_("shared/" + "n" * 255, b"long name"),
    symlink("shared/" + "s" * 255, "/" + "t" * 4000),
    file_("fat-xattrs", b"F" * 6000, xattrs={"user.big": b"x" * 3500}),
    hardlink("etc/passwd-link", "etc/passwd", uid=70000, gid=70001),
    hardlink("passwd-again", "etc/passwd", uid=70000, gid=70001),
    dev("dev-null", 1, 3, mode=0o666),
    dev("dev-sda", 8, 0, block=True, mode=0o660, gid=6),
    dev("dev-big", 4095, 1048575),
    fifo("pipe", mode=0o600),
    symlink("link", "etc/passwd", uid=70000, gid=70000),
    symlink("dangling", "../../nowhere"),
    file_("empty", b"", mtime="-1000.25"),
    file_("trusted", b"t", xattrs={"trusted.x": b"1", "user.y": b"2", "security.z": b"3"}),
]


def test_every_kind_of_member(tmp_path: Path) -> None:
    # a link header adds xattrs that leave no room for the tail streamed aside:
    # the file's blocks are moved next to a tail block of its own
    grown, _ = hardlink("grow-link", "grow")
    grown.pax_headers = {"SCHILY.xattr.user.grown": "g" * 3500}
    members = [*KINDS, dir_("many", mode=0o700, uid=70000), file_("grow", b"G" * 9192),
               (grown, None)]
    for i in range(400):  # a directory of many blocks
        members.append(file_(f"many/{'f' * 40}{i:05d}", bytes([i % 256]) * (i % 7)))
    raw = make_tar(members)
    want = applied(raw, tmp_path / "applied", overlay=False, dir_mtimes=True)
    assert isinstance(want, dict)
    got = written(raw, tmp_path / "kinds.erofs", tmp_path, overlay=False, dir_mtimes=True)
    assert_same(want, got)
    assert isinstance(got, dict)
    assert got["/etc/passwd"][2:4] == (70000, 70001)
    assert ("/etc/passwd", "/etc/passwd-link", "/passwd-again") in got["<hardlinks>"]
    assert got["/acl"][1] == 0o640 and ("system.posix_acl_access", ACL_ACCESS) in got["/acl"][9]
    assert got["/acl-plain"][1] == 0o710 and got["/acl-plain"][9] == ()
    assert got["/dev-big"][7] == os.makedev(4095, 1048575)
    assert got["/etc"][8] == 1_700_000_000_987_654_321
    assert got["/empty"][8] == -1_000_250_000_000
    with ErofsImage(tmp_path / "kinds.erofs") as im:
        layouts = {p: (i.layout, i.nlink) for p, i in im.walk()}
        assert layouts["/etc/passwd"] == (F.EROFS_INODE_FLAT_INLINE, 3)
        assert layouts["/etc/block"][0] == F.EROFS_INODE_FLAT_PLAIN
        assert layouts["/fat-xattrs"][0] == F.EROFS_INODE_FLAT_PLAIN  # no room inline
        assert layouts["/grow"] == (F.EROFS_INODE_FLAT_PLAIN, 2)
        # the capability both pings carry is stored once, in the shared area
        assert im.xattr_blkaddr != 0
        pings = [i for p, i in im.walk() if p in ("/bin-ping", "/bin-ping6")]
        assert [i.shared_xattrs for i in pings] == [1, 1]


def test_reader_lists_what_the_kernel_mounts(tmp_path: Path) -> None:
    raw = make_tar(KINDS)
    image = tmp_path / "r.erofs"
    write_image(io.BytesIO(raw), image, overlay=False)
    with mounted(image, tmp_path / "mnt") as mnt, ErofsImage(image) as im:
        seen = 0
        for path, info in im.walk():
            real = os.path.join(mnt, path.lstrip("/"))
            st = os.lstat(real)
            assert (info.mode, info.uid, info.gid, info.nlink, info.mtime_ns) == \
                (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns), path
            if stat.S_ISREG(info.mode):
                assert im.read(info) == Path(real).read_bytes(), path
            elif stat.S_ISLNK(info.mode):
                assert im.read(info) == os.fsencode(os.readlink(real)), path
            elif stat.S_ISCHR(info.mode) or stat.S_ISBLK(info.mode):
                assert info.rdev == st.st_rdev, path
            names = sorted(n for n in os.listxattr(real, follow_symlinks=False))
            assert sorted(info.xattrs) == names, path
            seen += 1
        assert seen == len(os.listdir(mnt)) + 1 + sum(
            len(os.listdir(os.path.join(mnt, d))) for d in ("etc", "shared"))


def _descend(root: Path) -> list[tuple[tuple[str, ...], int, int]]:
    """Along the only entry of each directory, by fds (the path is past PATH_MAX):
    (names, mode, mtime) at each level."""
    out = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            names = tuple(sorted(os.listdir(fd)))
            if len(names) != 1:
                out.append((names, 0, 0))
                return out
            st = os.lstat(names[0], dir_fd=fd)
            out.append((names, st.st_mode, st.st_mtime_ns))
            if not stat.S_ISDIR(st.st_mode):
                return out
            nfd = os.open(names[0], os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def test_deep_tree(tmp_path: Path) -> None:
    """2,048 components deep (2,047 directories and a file: a 4,095-byte name)."""
    raw = dir_chain("", "a", 2047) + pax({"path": ("a/" * 2047 + "f").encode()}) \
        + header("x", size=0) + bytes(1024)
    assert limits.MAX_DEPTH == 2048
    target = tmp_path / "applied"
    target.mkdir()
    apply_layer(io.BytesIO(raw), target, overlay=True)
    want = _descend(target)
    assert len(want) == 2048 and want[-1][0] == ("f",)
    image = tmp_path / "deep.erofs"
    write_image(io.BytesIO(raw), image, overlay=True)
    check_image(image, tmp_path, extract=False)
    with mounted(image, tmp_path / "mnt") as mnt:
        assert _descend(mnt) == want
    with ErofsImage(image) as im:
        assert max(p.count("/") for p, _ in im.walk()) == 2048
    deeper = dir_chain("", "a", 2048) + bytes(1024)
    with pytest.raises(InvalidArgument, match="PATH_MAX"):  # depth: the hostile corpus
        write_image(io.BytesIO(deeper), tmp_path / "deeper.erofs", overlay=True)


class ZeroFileTar(io.RawIOBase):
    """A tar of one file of ``size`` bytes: zeros, then ``marker`` as its last
    bytes; generated as it is read, never held whole."""

    def __init__(self, size: int, marker: bytes) -> None:
        self.head = header("huge", size=size)
        self.size = size
        self.marker = marker
        self.pos = 0
        self.total = 512 + size + (-size % 512) + 1024

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.total - self.pos, 1 << 20)
        if n <= 0:
            return 0
        view = memoryview(buf)[:n]
        view[:] = bytes(n)
        start = self.pos
        if start < 512:
            k = min(n, 512 - start)
            view[:k] = self.head[start:start + k]
        mstart = 512 + self.size - len(self.marker)
        for i in range(max(start, mstart), min(start + n, 512 + self.size)):
            view[i - start] = self.marker[i - mstart]
        self.pos += n
        return n


def test_file_over_4_gib_sparse(tmp_path: Path) -> None:
    size = (4 << 30) + 12345
    marker = b"the end of a big file"
    image = tmp_path / "huge.erofs"
    result = write_image(io.BufferedReader(ZeroFileTar(size, marker)), image)
    st = image.stat()
    assert st.st_size > size and result.image_size == st.st_size
    assert st.st_blocks * 512 < 64 << 20, "the zero blocks became holes"
    proc = subprocess.run(["fsck.erofs", str(image)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dump = subprocess.run(["dump.erofs", "--path=/huge", str(image)], capture_output=True,
                          text=True, check=True).stdout
    assert f"Size: {size}" in dump
    with mounted(image, tmp_path / "mnt") as mnt, open(mnt / "huge", "rb") as f:
        assert os.fstat(f.fileno()).st_size == size
        f.seek(size - len(marker) - 10)
        assert f.read() == bytes(10) + marker
        f.seek(3 << 30)
        assert f.read(4096) == bytes(4096)
    with ErofsImage(image) as im:
        info = dict(im.walk())["/huge"]
        assert im.read(info, size - len(marker), 100) == marker


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    image = tmp_path / "out.erofs"
    image.write_bytes(b"previous")
    raw = make_tar([file_("a", b"a"), hardlink("b", "missing")])
    with pytest.raises(InvalidArgument, match="does not exist"):
        write_image(io.BytesIO(raw), image, overlay=False)
    good = make_tar([file_("a", b"a" * 10000)])
    with pytest.raises(InvalidArgument, match="diff id mismatch"):
        write_image(io.BytesIO(good), image, expected_diff_id="sha256:" + "0" * 64)
    assert image.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.erofs"]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_bomb_stops_at_the_size_cap(kind: str, tmp_path: Path) -> None:
    """The layer size cap stops a decompression bomb as apply_layer does (same
    error), and no image is left."""
    blob, _ = bomb(32 << 30, kind, diff_id=False)
    src = CountingReader(blob)
    seen: list[int] = []
    with pytest.raises(ResourceExhausted, match=r"^layer expands beyond 33554432 bytes "
                       r"\(--max-layer-size\)$"):
        write_image(src, tmp_path / "bomb.erofs", max_size=32 << 20, progress=seen.append)
    assert src.read_bytes < len(blob)
    assert seen and seen[-1] <= 33 << 20
    assert list(tmp_path.iterdir()) == []


def test_inode_spanning_blocks_and_inode_numbers(tmp_path: Path) -> None:
    """A file whose xattrs take more than a block (its inode spans blocks, its
    tail gets a block of its own after its whole blocks); no inode is number 0
    (readdir(3) drops entries of inode 0: the root's ``.`` and ``..`` would go)."""
    big = {"user.a": b"A" * 60000, "trusted.b": b"B" * 30000}
    raw = make_tar([file_("fat", b"D" * 9000, xattrs=big), dir_("d"), file_("d/f", b"f")])
    image = tmp_path / "fat.erofs"
    write_image(io.BytesIO(raw), image, overlay=True)
    check_image(image, tmp_path)
    with mounted(image, tmp_path / "mnt") as mnt:
        assert (mnt / "fat").read_bytes() == b"D" * 9000
        for key, value in big.items():
            assert os.getxattr(mnt / "fat", key) == value
        assert os.stat(mnt).st_ino != 0
        with os.scandir(mnt / "d") as it:
            assert all(e.inode() != 0 for e in it)
    with ErofsImage(image) as im:
        assert im.root_nid != 0
        info = dict(im.walk())["/fat"]
        assert info.layout == F.EROFS_INODE_FLAT_PLAIN and info.xattrs == big
        assert im.read(info) == b"D" * 9000
    too_big = make_tar([file_("f", xattrs={"user.a": b"A" * 65536})])
    with pytest.raises(InvalidArgument, match="too large for an EROFS image"):
        write_image(io.BytesIO(too_big), tmp_path / "no.erofs")


def test_debian_layer_equals_its_extraction(debian_layer: Any, tmp_path: Path) -> None:
    blob = debian_layer.blob
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    with open(blob, "rb") as f:
        apply_layer(f, extracted, overlay=True)
    image = tmp_path / "debian.erofs"
    with open(blob, "rb") as f:
        result = write_image(f, image, overlay=True, expected_diff_id=debian_layer.diff_id)
    assert result.diff_id == debian_layer.diff_id
    check_image(image, tmp_path)
    want = treesum.summarize(extracted)
    with mounted(image, tmp_path / "mnt") as mnt:
        got = treesum.summarize(mnt)
    assert len(want) > 1000
    assert treesum.diff(want, got) == []


# -- symlink storms and deep resolved parents (tests/test_archive_cpu_bounds.py) ---


def _fd_tree(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """path -> (type, mode, size, link target), walked by fds (paths past PATH_MAX)."""
    out: dict[str, tuple[int, int, int, str]] = {}
    todo = [("", os.open(root, os.O_RDONLY | os.O_DIRECTORY))]
    while todo:
        rel, fd = todo.pop()
        try:
            for name in os.listdir(fd):
                st = os.lstat(name, dir_fd=fd)
                path = f"{rel}/{name}"
                link = os.readlink(name, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else ""
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0
                out[path] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size, link)
                if stat.S_ISDIR(st.st_mode):
                    todo.append((path, os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)))
        finally:
            os.close(fd)
    return out


def _image_tree(image: Path) -> dict[str, tuple[int, int, int, str]]:
    out: dict[str, tuple[int, int, int, str]] = {}
    with ErofsImage(image) as im:
        for path, info in im.walk():
            if path == "/":
                continue
            link = os.fsdecode(im.read(info)) if stat.S_ISLNK(info.mode) else ""
            size = info.size if stat.S_ISREG(info.mode) else 0
            out[path] = (stat.S_IFMT(info.mode), stat.S_IMODE(info.mode), size, link)
    return out


def _storm(name: str) -> bytes:
    """The layer of one symlink storm (built when its test runs)."""
    make = cpu.ATTACKS.get(name)
    if make is not None:
        return make().layer
    return _STORM_EXTRAS[name]()


def _relink() -> bytes:
    a, b = cpu.chain("a", cpu.DEPTH), cpu.chain("b", cpu.DEPTH)
    relink = [*cpu.deep_dirs("a", cpu.DEPTH), *cpu.deep_dirs("b", cpu.DEPTH), dir_(f"{a}/x0")]
    for k in range(1, 39):
        relink.append(symlink(f"{b}/y{k}", f"/{a}/x{k - 1}") if k % 2
                      else symlink(f"{a}/x{k}", f"/{b}/y{k - 1}"))
    for i in range(400):
        relink += [symlink("s", f"/{b}/y37"), file_(f"s/f{i}", b"")]
    return make_tar(relink)


def _below_the_cap() -> bytes:
    deep = cpu.chain("a", 1500)
    return make_tar([*cpu.deep_dirs("a", 1500), symlink(f"{deep}/down", "b/" * 1000 + "c"),
                     symlink("s", f"{deep}/down"), file_("s/f", b"")])


def _past_path_max() -> bytes:
    long = "/".join(["N" * 255] * 15)
    return make_tar(
        [symlink("l1", long), *[symlink(f"l{k}", f"l{k - 1}/{long}") for k in range(2, 40)],
         *[file_(f"l39/f{i}", b"") for i in range(100)]])


def _replaced_on_the_way() -> bytes:
    # d/l/back/l/ reaches d through the symlink d/l it replaces: what follows it
    # resolves through the new directory, not through the directories found before
    return make_tar([dir_("d"), dir_("d/x"), symlink("d/x/back", "/d"), symlink("d/l", "x"),
                     file_("d/l/back/x/a", b"0"), dir_("d/l/back/l"), file_("d/l/back/l/f", b"1"),
                     dir_("d/l/back/l/g"), file_("d/l/back/l/g/h", b"2"),
                     file_("d/x/back/l/i", b"3")])


_STORM_EXTRAS = {"relink-every-member": _relink, "resolved-below-the-cap": _below_the_cap,
                 "resolved-past-path-max": _past_path_max,
                 "dir-replaces-the-symlink-it-was-reached-through": _replaced_on_the_way}


@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "native"])
@pytest.mark.parametrize("name", sorted([*cpu.ATTACKS, *_STORM_EXTRAS]))
def test_symlink_storms_same_tree_or_error(name: str, overlay: bool, tmp_path: Path) -> None:
    raw = _storm(name)
    target = tmp_path / "applied"
    target.mkdir()
    image = tmp_path / "storm.erofs"
    try:
        apply_layer(io.BytesIO(raw), target, overlay=overlay)
    except InvalidArgument as exc:
        with pytest.raises(InvalidArgument) as info:
            write_image(io.BytesIO(raw), image, overlay=overlay)
        assert (type(info.value), info.value.message) == (type(exc), exc.message)
        return
    write_image(io.BytesIO(raw), image, overlay=overlay)
    check_image(image, tmp_path, extract=False)
    assert _image_tree(image) == _fd_tree(target)


def test_digest_is_hashed_as_the_image_is_written(tmp_path: Path) -> None:
    """The digest the writer reports is lamina.erofs.digest's of the image on disk:
    zero blocks left as holes, a tail moved next to its blocks, padding, block 0."""
    grown, _ = hardlink("grow-link", "grow")
    grown.pax_headers = {"SCHILY.xattr.user.grown": "g" * 3500}
    raw = make_tar([*KINDS, file_("grow", b"G" * 9192), (grown, None),
                    file_("holes", bytes(3 * 4096) + b"end" + bytes(5000) + b"x")])
    image = tmp_path / "digest.erofs"
    result = write_image(io.BytesIO(raw), image, overlay=False)
    digest, block0_last = parse_record(result.digest)
    assert block0_last and result.digest.endswith(" block0-last")
    assert digest == file_digest(image, block0_last=True)
    assert digest != file_digest(image, block0_last=False)
