"""Limits on what a layer may hold and how far it may grow (lamina.archive.limits).

Every hostile value is written as raw tar headers (octal, GNU base-256 and PAX
forms; Python's tarfile refuses most of them) and applied three ways: onto a
plain directory, onto an overlay staging upperdir, and through the CLI
(``image import`` on both snapshotters, ``diff apply``). Each must end in one
line naming the member and the class's exit code, with nothing written
outside the target and no snapshot left behind. Size and space limits are
tested with decompression bombs on a small tmpfs used as the lamina root.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import imagefactory
import pytest
import zstandard
from conftest import require_root_user

from lamina.api.errors import status_code
from lamina.archive import limits
from lamina.archive.apply import apply_layer
from lamina.archive.compression import size_hint
from lamina.errors import InvalidArgument, ResourceExhausted, from_grpc_code
from lamina.fs.files import remove_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

BLOCK = 512
MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


# --------------------------------------------------------------------------- raw tar


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def header(name: bytes | str, typeflag: str = "0", *, size: int = 0, mode: int = 0o644,
           linkname: bytes | str = b"", **raw: bytes) -> bytes:
    """One ustar header block; ``raw`` overrides fields by name with exact bytes
    (``mode_raw``, ``uid``, ``gid``, ``size_raw``, ``mtime``, ``devmajor``, ``devminor``)."""
    fields = {"mode_raw": (100, 108), "uid": (108, 116), "gid": (116, 124),
              "size_raw": (124, 136),
              "mtime": (136, 148), "devmajor": (329, 337), "devminor": (337, 345)}
    name_b = name.encode() if isinstance(name, str) else name
    link_b = linkname.encode() if isinstance(linkname, str) else linkname
    block = bytearray(BLOCK)
    block[0:len(name_b[:100])] = name_b[:100]
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(1_600_000_000, 12)
    block[156:157] = typeflag.encode()
    block[157:157 + len(link_b[:100])] = link_b[:100]
    block[257:265] = b"ustar\x0000"
    block[329:337] = _octal(0, 8)
    block[337:345] = _octal(0, 8)
    for key, value in raw.items():
        start, end = fields[key]
        block[start:end] = value.ljust(end - start, b"\0")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def pax(records: dict[str, bytes], kind: str = "x") -> bytes:
    data = b"".join(pax_record(k, v) for k, v in records.items())
    return header(b"PaxHeader", kind, size=len(data)) + padded(data)


def longname(name: bytes, kind: str = "L") -> bytes:
    return header(b"././@LongLink", kind, size=len(name) + 1) + padded(name + b"\0")


def tar(*parts: bytes) -> bytes:
    return b"".join(parts) + bytes(2 * BLOCK)


def base256(value: int, width: int) -> bytes:
    """GNU base-256: high bit set, big-endian two's complement."""
    raw = value.to_bytes(width, "big", signed=True)
    return bytes([raw[0] | 0x80]) + raw[1:] if value >= 0 else raw


def dev(name: str, **raw: bytes) -> bytes:
    return header(name, "3", mode=0o600, **raw)


# --------------------------------------------------------------------------- hostile cases

DEEP = "/".join(["a"] * 2000)
XATTRS_10K = {f"SCHILY.xattr.user.x{i}": b"v" for i in range(10_000)}
GLOBAL_XATTRS = [{f"SCHILY.xattr.user.g{i}{j}": b"G" * 60_000 for i in range(10)}
                 for j in range(2)]

# id: (layer, pattern the one-line error matches, the member it names)
CASES: dict[str, tuple[bytes, str, str]] = {
    "devmajor-octal": (tar(dev("dev/x", devmajor=b"7777777")), "device number", "dev/x"),
    "devminor-octal": (tar(dev("dev/x", devminor=b"7777777")), "device number", "dev/x"),
    "devmajor-4096": (tar(dev("dev/x", devmajor=_octal(4096, 8))), "device number", "dev/x"),
    "devmajor-base256": (tar(dev("dev/x", devmajor=base256(1 << 50, 8))), "device number",
                         "dev/x"),
    "devminor-negative": (tar(dev("dev/x", devminor=base256(-1, 8))), "device number", "dev/x"),
    "devmajor-pax": (tar(pax({"SCHILY.devmajor": b"99999999999"}), dev("dev/x")),
                     "device number", "dev/x"),
    "devminor-pax-negative": (tar(pax({"SCHILY.devminor": b"-1"}), dev("dev/x")),
                              "not a decimal", ""),
    "mtime-pax-huge": (tar(pax({"mtime": b"9999999999999999999"}), header("f")),
                       "out of range", ""),
    "mtime-pax-negative-huge": (tar(pax({"mtime": b"-9999999999999999999.5"}), header("f")),
                                "out of range", ""),
    "mtime-pax-garbage": (tar(pax({"mtime": b"12x.5"}), header("f")), "not a time", ""),
    "mtime-pax-too-long": (tar(pax({"mtime": b"1" * 40}), header("f")), "not a time", ""),
    "atime-pax-huge": (tar(pax({"atime": b"99999999999999999999"}), header("f")),
                       "not a time", ""),
    "mtime-base256-huge": (tar(header("f", mtime=base256(1 << 80, 12))), "mtime", "f"),
    "mtime-base256-negative": (tar(header("f", mtime=base256(-(1 << 80), 12))), "mtime", "f"),
    "mtime-dir-pax": (tar(pax({"mtime": b"-99999999999999999999"}), header("d/", "5",
                                                                            mode=0o755)),
                      "not a time", ""),
    "mtime-dir-base256": (tar(header("d/", "5", mode=0o755, mtime=base256(1 << 70, 12))),
                          "mtime", "d/"),
    "mtime-garbage-octal": (tar(header("f", mtime=b"12345z")), "not an octal number", ""),
    "path-8k-pax": (tar(pax({"path": b"p" * 8192}), header("f")), "PATH_MAX", "ppppp"),
    "path-8k-gnu": (tar(longname(b"q" * 8192), header("f")), "PATH_MAX", "qqqqq"),
    "path-4096": (tar(pax({"path": b"/".join([b"d" * 200] * 20) + b"/x" * 48}), header("f")),
                  "PATH_MAX", "ddddd"),
    "path-component-256": (tar(pax({"path": b"d/" + b"c" * 256}), header("f")), "NAME_MAX",
                           "d/ccc"),
    "symlink-8k": (tar(pax({"linkpath": b"t" * 8192}), header("l", "2")), "PATH_MAX", "l"),
    "hardlink-component": (tar(header("f"), pax({"linkpath": b"h" * 300}), header("h", "1")),
                           "NAME_MAX", "h"),
    "longlink-8k": (tar(longname(b"k" * 8192, "K"), header("l", "2")), "PATH_MAX", "l"),
    "longname-1g": (header(b"././@LongLink", "L", size=1 << 30), "exceeds", ""),
    "pax-1g": (header(b"PaxHeader", "x", size=1 << 30), "exceeds", ""),
    "pax-chain-total": (tar(pax({"comment": b"c" * 700_000}), pax({"comment": b"d" * 700_000}),
                            header("f")), "metadata of one member", ""),
    "xattr-70k": (tar(pax({"SCHILY.xattr.user.big": b"A" * 70_000}), header("f")),
                  "value is 70000 bytes", "f"),
    "xattr-10000": (tar(pax(XATTRS_10K), header("f")), "10000 xattrs", "f"),
    "xattr-129": (tar(pax({f"SCHILY.xattr.user.x{i}": b"v" for i in range(129)}),
                      header("f")), "129 xattrs", "f"),
    "xattr-name-300": (tar(pax({"SCHILY.xattr.user." + "n" * 300: b"v"}), header("f")),
                       "xattr name", "f"),
    "xattr-total-global": (tar(pax(GLOBAL_XATTRS[0], "g"), pax(GLOBAL_XATTRS[1], "g"),
                               header("f")), "xattrs take", "f"),
    "uid-pax-huge": (tar(pax({"uid": b"99999999999999"}), header("f")), "owner", "f"),
    # 2**32-1 is chown's "no change": out of range, not silently root
    "uid-pax-minus-one": (tar(pax({"uid": b"4294967295"}), header("f")), "owner", "f"),
    "gid-pax-minus-one": (tar(pax({"gid": b"4294967295"}), header("f")), "owner", "f"),
    "gid-base256-negative": (tar(header("f", gid=base256(-5, 8))), "owner", "f"),
    "mode-base256-negative": (tar(header("f", mode_raw=base256(-1, 8))), "mode", "f"),
    "mode-high-bits": (tar(header("f", mode_raw=_octal(0o777777, 8))), "mode", "f"),
    "size-negative": (tar(header("f", size_raw=base256(-512, 12))), "out of range",
                      ""),
    "size-pax-garbage": (tar(pax({"size": b"12e4"}), header("f")), "not a decimal", ""),
    "size-octal-garbage": (tar(header("f", size_raw=b"0x1F")),
                           "not an octal number", ""),
    "sparse-type": (tar(header("s", "S")), "sparse", ""),
    "sparse-pax": (tar(pax({"GNU.sparse.major": b"1", "GNU.sparse.minor": b"0"}),
                       header("s")), "sparse", ""),
}


def dir_chain(prefix: str, comp: str, levels: int) -> bytes:
    """Every directory of ``prefix/comp/comp/...`` (``levels`` of them), parents first."""
    path = prefix
    out = []
    for _ in range(levels):
        path = f"{path}/{comp}" if path else comp
        out.append(pax({"path": path.encode() + b"/"}) + header("x/", "5", mode=0o755))
    return b"".join(out)


def deep_via_symlink(below: int) -> bytes:
    """A 2,000-deep chain, a symlink ``s`` to its bottom, then ``below`` levels under ``s``."""
    return tar(dir_chain("", "a", 2000), pax({"linkpath": DEEP.encode()}), header("s", "2"),
               dir_chain("s", "b", below))


# 2,049 deep once the symlink is resolved
CASES["depth-through-symlink"] = (deep_via_symlink(49), "directories deep", "s/b/b")


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "file").write_bytes(b"precious")
    yield root, outside
    remove_tree(root)


def _state(path: Path) -> list[tuple[str, int, int]]:
    out = []
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            out.append((os.path.join(dirpath, name), st.st_mode, st.st_mtime_ns))
    return sorted(out)


@pytest.mark.parametrize("overlay", [False, True], ids=["native", "overlay-staging"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_value_is_invalid_argument(case: str, overlay: bool,
                                           sandbox: tuple[Path, Path]) -> None:
    layer, pattern, member = CASES[case]
    root, outside = sandbox
    before = _state(outside.parent / "outside")
    parent = sorted(os.listdir(outside.parent))
    with pytest.raises(InvalidArgument) as info:
        apply_layer(io.BytesIO(layer), root, overlay=overlay)
    msg = info.value.message
    assert type(info.value) is InvalidArgument
    assert "\n" not in msg and len(msg) < 400, msg
    assert pattern in msg, msg
    if member:
        assert f"'{member}" in msg, msg
    assert _state(outside) == before
    assert sorted(os.listdir(outside.parent)) == parent


def test_values_at_the_limits_are_accepted(small_fs: Path) -> None:
    """The largest values each cap allows still apply (the caps are not off by one);
    on tmpfs, which holds 64 KiB xattr values (ext4 without ea_inode does not)."""
    name = "/".join(["n" * 255] * 15) + "/" + "m" * 254  # 4094 bytes
    assert len(name) == limits.MAX_PATH - 2
    layer = tar(
        dev("dev/x", devmajor=_octal(limits.MAX_DEVMAJOR, 8),
            devminor=_octal(limits.MAX_DEVMINOR, 8)),
        pax({"SCHILY.xattr.user.v": b"V" * limits.MAX_XATTR_VALUE}), header("big"),
        pax({f"SCHILY.xattr.user.x{i}": b"v" for i in range(limits.MAX_XATTRS)}),
        header("many", mode=0o4755),
        pax({"mtime": b"-1.5", "uid": str(limits.MAX_ID).encode()}), header("old"),
        pax({"path": name.encode()}), header("long"),
        pax({"linkpath": b"t" * (limits.MAX_PATH - 1)}), header("link", "2"),
        header("sock", mode_raw=_octal(0o140755, 8)),
    )
    root = small_fs / "root"
    root.mkdir()
    apply_layer(io.BytesIO(layer), root)
    st = os.lstat(root / "dev/x")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (4095, 1048575)
    assert os.lstat(root / "old").st_uid == limits.MAX_ID
    assert os.lstat(root / "old").st_mtime_ns == -1_500_000_000
    assert os.lstat(root / "many").st_mode & 0o7777 == 0o4755
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert os.stat(name, dir_fd=fd).st_size == 0  # the full path is past PATH_MAX here
    finally:
        os.close(fd)
    assert len(os.readlink(root / "link")) == limits.MAX_PATH - 1
    assert os.getxattr(root / "big", "user.v") == b"V" * limits.MAX_XATTR_VALUE
    assert len(os.listxattr(root / "many")) == limits.MAX_XATTRS
    assert not (root / "sock").exists()


def test_resolved_depth_below_the_cap_applies(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    try:
        apply_layer(io.BytesIO(deep_via_symlink(48)), root, overlay=True)  # 2,048 deep
    except BaseException:
        remove_tree(root)
        raise
    fd = os.open(root, os.O_RDONLY)
    try:
        for comp in DEEP.split("/") + ["b"] * 48:
            nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)
        remove_tree(root)


# --------------------------------------------------------------------------- error model


def test_resource_exhausted_travels_as_its_own_class() -> None:
    err = ResourceExhausted("layer expands")
    assert err.exit_code == 9
    assert len({c.exit_code for c in (ResourceExhausted, InvalidArgument)}) == 2
    assert status_code(err) is grpc.StatusCode.RESOURCE_EXHAUSTED
    back = from_grpc_code(grpc.StatusCode.RESOURCE_EXHAUSTED.name, "m")
    assert type(back) is ResourceExhausted and back.message == "m"


def test_parse_size() -> None:
    assert limits.parse_size("64G") == 64 << 30
    assert limits.parse_size("512MiB") == 512 << 20
    assert limits.parse_size("1048576") == 1 << 20
    assert limits.parse_size("4k") == 4096
    for bad in ("", "0", "-1", "12x", "1.5G", "G"):
        with pytest.raises(InvalidArgument):
            limits.parse_size(bad)


# --------------------------------------------------------------------------- bombs


_PIECE = 64 << 20


def bomb(size: int, kind: str, *, diff_id: bool = True) -> tuple[bytes, str]:
    """(compressed stream, DiffID) of a tar holding one ``size``-byte file of zeros.

    Built from repeated gzip members / zstd frames of 64 MiB of zeros each
    (both formats allow concatenation), so a 3 GiB bomb is ~3 MB of gzip and
    is made in a moment. zstd frames carry no content size (nothing announced
    up front); gzip's last member announces 128 MiB in its trailer."""
    assert size % _PIECE == 0 and size >= 2 * _PIECE
    head = header("bomb", size=size)
    tail = bytes(2 * BLOCK)

    def pack(data: bytes) -> bytes:
        if kind == "gzip":
            comp = zlib.compressobj(9, zlib.DEFLATED, 31)
            return comp.compress(data) + comp.flush()
        buf = io.BytesIO()
        with zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False) as w:
            w.write(data)
        return buf.getvalue()

    zeros = bytes(_PIECE)
    middle = pack(zeros)
    blob = pack(head + zeros) + middle * (size // _PIECE - 3) + pack(zeros + zeros + tail)
    digest = ""
    if diff_id:
        h = hashlib.sha256(head)
        for _ in range(size // _PIECE):
            h.update(zeros)
        h.update(tail)
        digest = "sha256:" + h.hexdigest()
    return blob, digest


def zero_file_tar(size: int, name: str) -> bytes:
    return header(name, size=size) + bytes(size) + bytes(-size % BLOCK) + bytes(2 * BLOCK)


class CountingReader(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.read_bytes += len(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@pytest.fixture(scope="module")
def bombs() -> dict[str, tuple[bytes, str]]:
    """3 GiB of zeros: ~3 MB of gzip, ~100 KB of zstd (the same tar, so one DiffID)."""
    gz, diff_id = bomb(3 << 30, "gzip")
    return {"gzip": (gz, diff_id), "zstd": (bomb(3 << 30, "zstd", diff_id=False)[0], diff_id)}


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_bomb_stops_at_the_size_cap(kind: str, tmp_path: Path) -> None:
    blob, _ = bomb(32 << 30, kind, diff_id=False)  # 32 GiB
    src = CountingReader(blob)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ResourceExhausted, match=r"^layer expands beyond 33554432 bytes "
                       r"\(--max-layer-size\)$"):
        apply_layer(src, root, max_size=32 << 20)
    assert src.read_bytes < len(blob)  # stopped early (gzip reads ahead 8 MiB, zstd 1 MiB)
    assert os.path.getsize(root / "bomb") <= 33 << 20


def test_size_hint() -> None:
    gz = _gz(zero_file_tar(5 << 20, "f"))
    assert size_hint(gz[:18], gz[-4:], len(gz)) == 5 * (1 << 20) + 3 * BLOCK
    plain = zero_file_tar(1000, "f")
    assert size_hint(plain[:18], plain[-4:], len(plain)) == len(plain)
    z = zstandard.ZstdCompressor().compress(plain)
    assert size_hint(z[:18], z[-4:], len(z)) == len(plain)


def _tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        _libc.umount2(os.fsencode(str(mnt)), MNT_DETACH)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted afterwards."""
    yield from _tmpfs(tmp_path / "small", "size=64m,mode=0700")


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_apply_stops_at_the_space_reserve(small_fs: Path,
                                          bombs: dict[str, tuple[bytes, str]]) -> None:
    target = small_fs / "t"
    target.mkdir()
    blob, _ = bombs["zstd"]
    with pytest.raises(ResourceExhausted, match="bytes left on the filesystem") as info:
        apply_layer(io.BytesIO(blob), target)
    assert "\n" not in info.value.message
    reserve = limits.space_reserve(64 << 20)
    assert _free(small_fs) >= reserve // 2  # stopped at the reserve (one chunk late at most)


def test_enospc_between_checks_is_resource_exhausted(tmp_path: Path) -> None:
    """Out of inodes between two checks (they run per MiB read, and 200 empty files are
    100 KiB of tar): the ENOSPC is ResourceExhausted naming the member, one line."""
    for fs in _tmpfs(tmp_path / "few-inodes", "size=64m,nr_inodes=100"):
        target = fs / "t"
        target.mkdir()
        layer = tar(*(header(f"f{i}") for i in range(200)))
        with pytest.raises(ResourceExhausted, match=r"^apply layer at 'f\d+': 0 inodes left"):
            apply_layer(io.BytesIO(layer), target)


def test_a_member_larger_than_the_space_left(small_fs: Path) -> None:
    target = small_fs / "t"
    target.mkdir()
    with pytest.raises(ResourceExhausted, match="bytes left on the filesystem") as info:
        apply_layer(io.BytesIO(zero_file_tar(80 << 20, "big")), target)
    assert "\n" not in info.value.message
    assert _free(small_fs) > 0


# --------------------------------------------------------------------------- CLI


def lamina(root: Path, *args: str, snapshotter: str = "overlay",
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from lamina.cli import main; sys.exit(main())",
         "--root", str(root), "--snapshotter", snapshotter, *args],
        capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def one_line(proc: subprocess.CompletedProcess[str], cls: type[Exception], code: int) -> str:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"lamina: {cls.__name__}: "), lines
    return lines[0]


def oci_tar(workdir: Path, blob: bytes, diff_id: str, media: str) -> Path:
    """An OCI layout tar with one layer ``blob``."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    path = workdir / "blob"
    path.write_bytes(blob)
    layer = imagefactory.Layer(blob=path, digest=digest, diff_id=diff_id, size=len(blob),
                               compression="gzip", media_type=media, entries=None, comment="")
    layout = workdir / "layout"
    imagefactory.build_oci_layout(layout, [layer], ref_name="hostile:latest")
    return imagefactory.as_tar(layout, workdir / "image.tar")


def assert_clean(root: Path, snapshotter: str) -> None:
    """No snapshot, no directory left, and ``lamina check`` finds the root consistent."""
    check = lamina(root, "check", snapshotter=snapshotter)
    assert check.returncode == 0, check.stdout + check.stderr
    snaps = root / "snapshots" / snapshotter / "snapshots"
    assert snaps.is_dir() and os.listdir(snaps) == [], os.listdir(snaps)


CLI_CASES = ["devmajor-base256", "mtime-base256-huge", "path-8k-pax", "xattr-70k",
             "xattr-10000", "uid-pax-minus-one", "depth-through-symlink"]


@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_cli_import_of_hostile_layers(snapshotter: str, tmp_path: Path) -> None:
    require_root_user()
    for case in CLI_CASES:
        layer, pattern, member = CASES[case]
        work = tmp_path / case
        work.mkdir()
        diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
        image = oci_tar(work, _gz(layer), diff_id, "application/vnd.oci.image.layer.v1.tar+gzip")
        root = work / "root"
        line = one_line(lamina(root, "image", "import", str(image), snapshotter=snapshotter),
                        InvalidArgument, 6)
        assert pattern in line and (not member or f"'{member}" in line), line
        assert_clean(root, snapshotter)


def _gz(data: bytes) -> bytes:
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    return comp.compress(data) + comp.flush()


@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_cli_diff_apply_of_hostile_layers(snapshotter: str, tmp_path: Path) -> None:
    require_root_user()
    root = tmp_path / "root"
    assert lamina(root, "snapshot", "prepare", "work", snapshotter=snapshotter).returncode == 0
    for case in CLI_CASES:
        layer, pattern, _ = CASES[case]
        path = tmp_path / f"{case}.tar"
        path.write_bytes(layer)
        line = one_line(lamina(root, "diff", "apply", str(path), "work",
                               snapshotter=snapshotter), InvalidArgument, 6)
        assert pattern in line, line
    # nothing outside the snapshot: the root holds only lamina's own entries
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "root") == sorted(
        f"{c}.tar" for c in CLI_CASES)


@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_cli_bomb_on_a_small_filesystem(snapshotter: str, small_fs: Path, tmp_path: Path,
                                        bombs: dict[str, tuple[bytes, str]]) -> None:
    """3 GiB bombs on a 64 MiB lamina root: ResourceExhausted, one line, exit 9, check clean."""
    require_root_user()
    root = small_fs / "root"
    for kind, media in (("gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
                        ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd")):
        blob, diff_id = bombs[kind]
        work = tmp_path / kind
        work.mkdir()
        image = oci_tar(work, blob, diff_id, media)
        line = one_line(lamina(root, "image", "import", str(image), snapshotter=snapshotter),
                        ResourceExhausted, 9)
        # gzip announces 3 GiB in its trailer: refused before writing; zstd stops at the reserve
        want = "announce" if kind == "gzip" else "bytes left on the filesystem"
        assert want in line, line
        assert_clean(root, snapshotter)
        assert _free(small_fs) > 48 << 20  # the partial layer is gone
        # with a cap, the layer is named
        line = one_line(lamina(root, "image", "unpack", "hostile:latest", "--max-layer-size",
                               "8M", snapshotter=snapshotter), ResourceExhausted, 9)
        assert line.endswith(" expands beyond 8388608 bytes (--max-layer-size)"), line
        assert "layer sha256:" in line
        assert_clean(root, snapshotter)
        lamina(root, "image", "rm", "hostile:latest", snapshotter=snapshotter)


@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_cli_diff_apply_bomb(snapshotter: str, tmp_path: Path,
                             bombs: dict[str, tuple[bytes, str]]) -> None:
    require_root_user()
    root = tmp_path / "root"
    assert lamina(root, "snapshot", "prepare", "work", snapshotter=snapshotter).returncode == 0
    path = tmp_path / "bomb.tar.zst"
    path.write_bytes(bombs["zstd"][0])
    line = one_line(lamina(root, "diff", "apply", "--max-layer-size", "16M", str(path), "work",
                           snapshotter=snapshotter), ResourceExhausted, 9)
    assert line == "lamina: ResourceExhausted: layer expands beyond 16777216 bytes " \
                   "(--max-layer-size)"
    line = one_line(lamina(root, "diff", "apply", str(path), "work", snapshotter=snapshotter,
                           env={"LAMINA_MAX_LAYER_SIZE": "4M"}), ResourceExhausted, 9)
    assert "beyond 4194304 bytes" in line
    proc = lamina(root, "diff", "apply", "--max-layer-size", "lots", str(path), "work",
                  snapshotter=snapshotter)
    assert proc.returncode == 2 and "not a positive size" in proc.stderr



@pytest.mark.parametrize("writer", ["apply_layer", "write_image"])
def test_a_layer_past_the_member_limit_is_resource_exhausted(
        writer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an unpack keeps grows with a layer's members (an EROFS layer's whole tree
    is built in memory: about 650 bytes a member), so a layer of a hundred million
    empty files — a few hundred MB of gzip from a hostile registry — would have run
    the machine out of memory. One past the limit is ResourceExhausted, one line,
    before the next member is kept; at the limit the layer is taken. (The limit is
    lowered here: a layer of 2,097,153 members takes minutes to build in Python.)"""
    from lamina.erofs.writer import write_image

    monkeypatch.setattr(limits, "MAX_MEMBERS", 100)

    def members(n: int) -> bytes:
        return tar(header("d/", "5", mode=0o755),
                   *(header(f"d/f{i}", size=0) for i in range(n - 1)))

    def unpack(layer: bytes, where: Path) -> None:
        if writer == "apply_layer":
            where.mkdir()
            apply_layer(io.BytesIO(layer), where)
        else:
            write_image(io.BytesIO(layer), where)

    unpack(members(100), tmp_path / "at-limit")
    with pytest.raises(ResourceExhausted) as info:
        unpack(members(101), tmp_path / "past-limit")
    assert info.value.message == ("layer has more than 100 members, the limit "
                                  "(what an unpack keeps grows with them)")
    if writer == "write_image":  # no half-written image
        assert not (tmp_path / "past-limit").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["at-limit"]
    monkeypatch.undo()  # the default: ten times a full distribution's files
    assert limits.MAX_MEMBERS >= 2_000_000
