"""Trees far deeper than PATH_MAX: removal, usage, diff, gc and check never recurse.

A container can ``mkdir`` in a loop; a layer can nest thousands of
directories. Every tree walk in lamina works relative to directory fds with
an explicit stack, so these trees commit, diff, and go away again.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tarfile
from collections.abc import Iterator
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user

from lamina.archive import limits
from lamina.archive.changes import write_diff
from lamina.cli import main
from lamina.differ import apply_diff, create_diff
from lamina.errors import AlreadyExists, InvalidArgument
from lamina.fs.files import remove_tree
from lamina.metadata.root import Root
from lamina.mounts.mount import temp_mount
from lamina.snapshots.directory import DirectorySnapshotter
from lamina.snapshots.usage import disk_usage

SNAPSHOTTERS = ["overlay", "native"]
DEEP = 10_000
IMAGE_DEPTH = 1_500
PAYLOAD = b"at the bottom\n"
TYPE_REGULAR, TYPE_DIR = "0", "5"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_deep(base: str | os.PathLike[str], depth: int, *, payload: bytes = PAYLOAD) -> None:
    """``base/d/d/.../d/bottom`` with ``depth`` directories ``d``, built by fds."""
    fd = os.open(base, _DIR)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", _DIR, dir_fd=fd)
            os.close(fd)
            fd = sub
        out = os.open("bottom", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        os.write(out, payload)
        os.close(out)
    finally:
        os.close(fd)


def read_deep(base: str | os.PathLike[str], depth: int) -> bytes:
    """The content of ``base/d/.../d/bottom`` (``depth`` levels), read by fds."""
    fd = os.open(base, _DIR)
    try:
        for _ in range(depth):
            sub = os.open("d", _DIR, dir_fd=fd)
            os.close(fd)
            fd = sub
        leaf = os.open("bottom", os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(leaf, 1 << 16)
        finally:
            os.close(leaf)
    finally:
        os.close(fd)


def deep_name(depth: int, leaf: str = "bottom", prefix: str = "") -> str:
    return prefix + "d/" * depth + leaf


@contextlib.contextmanager
def few_fds(limit: int = 256) -> Iterator[None]:
    """Run the block with at most ``limit`` open files: a walk must not hold
    one descriptor per level."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def work(tmp_root: Path) -> Iterator[Path]:
    """``tmp_root``, emptied with lamina's own removal first (the fixture's
    shutil.rmtree recurses and cannot remove what a failed test left)."""
    yield tmp_root
    for entry in os.listdir(tmp_root):
        with contextlib.suppress(OSError):
            remove_tree(tmp_root / entry)


def layer_members(root: Root, digest: str) -> dict[str, tuple[str, bytes]]:
    """Member name -> (type, data) of a layer in the content store.

    Read with Python's tarfile: lamina's own reader refuses member names of
    PATH_MAX or more (its layer limits), and these are 20,000 bytes long.
    """
    out: dict[str, tuple[str, bytes]] = {}
    with root.content().reader(digest) as r, tarfile.open(fileobj=r, mode="r|gz") as tar:
        for m in tar:
            data = b""
            if m.isfile():
                fh = tar.extractfile(m)
                assert fh is not None
                data = fh.read()
            out[m.name.rstrip("/")] = (m.type.decode(), data)
    return out


# -- the helpers ------------------------------------------------------------------------


def test_remove_tree_deep_read_only_and_symlinks_with_few_fds(work: Path) -> None:
    tree = work / "tree"
    tree.mkdir()
    outside = work / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    make_deep(tree, DEEP)
    fd = os.open(tree, _DIR)  # read-only directories and an escaping symlink, 3,000 deep
    try:
        for _ in range(3_000):
            sub = os.open("d", _DIR, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.symlink(str(outside), "out", dir_fd=fd)
        os.mkdir("ro", dir_fd=fd)
        os.close(os.open("ro/f", os.O_WRONLY | os.O_CREAT, 0o444, dir_fd=fd))
        os.chmod("ro", 0o500, dir_fd=fd)
        os.fchmod(fd, 0o500)
    finally:
        os.close(fd)
    with few_fds():
        remove_tree(tree)
    assert not os.path.lexists(tree)
    assert (outside / "keep").read_text() == "keep", "a symlink was followed"
    remove_tree(tree)  # a missing tree is fine


def test_disk_usage_deep_with_few_fds(work: Path) -> None:
    tree = work / "tree"
    tree.mkdir()
    make_deep(tree, DEEP)
    with few_fds():
        usage = disk_usage(tree)
    assert usage.inodes == 1 + DEEP + 1  # the root, the directories, the file
    assert usage.size >= (DEEP + 1) * 512


# -- a deep tree in a real active snapshot ------------------------------------------------


@pytest.mark.parametrize("name", SNAPSHOTTERS)
def test_deep_tree_in_active_snapshot(name: str, work: Path) -> None:
    require_root_user()
    root = Root(work / "root")
    try:
        sn = root.snapshotter(name)
        assert isinstance(sn, DirectorySnapshotter)
        tmp = str(root.tmpmounts)
        with temp_mount(sn.prepare("base-a", ""), base=tmp) as target:
            os.makedirs(os.path.join(target, "etc"))
            Path(target, "etc", "hello").write_text("hello")
            os.mkdir(os.path.join(target, "d"))
        sn.commit("base", "base-a")

        mounts = sn.prepare("deep-a", "base")
        with temp_mount(mounts, base=tmp) as target:
            os.unlink(os.path.join(target, "etc", "hello"))
            make_deep(os.path.join(target, "d"), DEEP - 1)  # d/ comes from the parent

        # diff the way `lamina snapshot diff` does (overlay: upperdir walk;
        # native: double walk against a view of the parent) ...
        outcome = create_diff(sn, root.content(), "deep-a", tmpmounts=tmp)
        # ... and the double walk with a lower tree on every snapshotter
        view = sn.view("base-v", "base")
        with (temp_mount(view, base=tmp) as lower,
              temp_mount(sn.mounts("deep-a"), base=tmp) as upper,
              root.content().writer("double") as w):
            double = write_diff(lower, upper, _Sink(w), compression="gzip")
            with contextlib.suppress(AlreadyExists):  # the same bytes as the first
                w.commit(double.size, double.digest)
        sn.remove("base-v")
        for digest in (outcome.descriptor.digest, double.digest):
            members = layer_members(root, digest)
            assert members[deep_name(DEEP)] == (TYPE_REGULAR, PAYLOAD)
            assert members["etc/.wh.hello"][0] == TYPE_REGULAR
            dirs = [n for n, (t, _) in members.items()
                    if t == TYPE_DIR and (n == "d" or n.startswith("d/"))]
            assert len(dirs) == DEEP  # d/ and every level below it

        sn.commit("deep", "deep-a")
        usage = sn.usage("deep")
        # native: the whole tree (root, etc, d and below, the file); overlay:
        # its upper layer, which also holds the whiteout of etc/hello
        expected = 1 + 1 + DEEP + 1 + (1 if name == "overlay" else 0)
        assert usage.inodes == expected
        assert usage.size >= DEEP * 512

        # re-applying the layer is refused, as the README's layer limits say: its
        # member names grow past PATH_MAX ("d/" per level) long before DEEP levels
        applied = sn.prepare("applied-a", "base")
        # (the first refused: the directory "d/" * 2048, exactly PATH_MAX bytes)
        with pytest.raises(InvalidArgument,
                           match=rf"member name 'd/d/.*'\.\.\. is {limits.MAX_PATH} bytes "
                                 rf"long \(limit {limits.MAX_PATH - 1}, PATH_MAX\)"):
            apply_diff(root.content(), outcome.descriptor, applied,
                       diff_id=outcome.diff_id, tmpmounts=tmp)

        if name == "overlay":  # a child sees the deep tree and can diff against it
            with temp_mount(sn.prepare("child-a", "deep"), base=tmp) as target:
                assert read_deep(target, DEEP) == PAYLOAD
            child = create_diff(sn, root.content(), "child-a", tmpmounts=tmp)
            assert not [n for n in layer_members(root, child.descriptor.digest)
                        if n.startswith("d/")]
            sn.remove("child-a")

        for key in ("applied-a", "deep", "base"):
            sn.remove(key)
        sn.cleanup()
        assert os.listdir(work / "root" / "snapshots" / name / "snapshots") == []
    finally:
        root.close()


class _Sink:
    def __init__(self, writer: object) -> None:
        self._w = writer

    def write(self, data: bytes, /) -> int:
        self._w.write(data)  # type: ignore[attr-defined]
        return len(data)

    def flush(self) -> None:
        pass


# -- the scenario, through the CLI --------------------------------------------------


@pytest.fixture(scope="module")
def deep_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root_user()
    w = tmp_path_factory.mktemp("deep-image")
    entries = [f.Dir(deep_name(i, leaf="d")) for i in range(IMAGE_DEPTH)]
    entries.append(f.File(deep_name(IMAGE_DEPTH), PAYLOAD.decode()))
    layer = f.layer_from_entries(entries, w)
    f.build_oci_layout(w / "layout", [layer], ref_name="deep:1")
    return f.as_tar(w / "layout", w / "deep.tar")


def _cli(root: Path, *args: str) -> int:
    return main(["--root", str(root), *args])


def _orphan(snapshots_dir: Path, name: str) -> Path:
    orphan = snapshots_dir / name
    (orphan / "fs").mkdir(parents=True)
    make_deep(orphan / "fs", DEEP)
    return orphan


@pytest.mark.parametrize("name", SNAPSHOTTERS)
def test_deep_image_import_rm_gc_check(name: str, deep_image: Path, work: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    root = work / "root"
    sn_dirs = root / "snapshots" / name / "snapshots"
    assert _cli(root, "--snapshotter", name, "image", "import", str(deep_image)) == 0
    (sid,) = os.listdir(sn_dirs)
    assert read_deep(sn_dirs / sid / "fs", IMAGE_DEPTH - 1 + 1) == PAYLOAD

    assert _cli(root, "image", "rm", "deep:1") == 0
    capsys.readouterr()
    assert _cli(root, "gc") == 0
    assert os.listdir(sn_dirs) == [], "gc left the deep snapshot's directory behind"
    assert "Traceback" not in capsys.readouterr().err

    # an orphan 10,000 levels deep (a crash mid-removal, or a directory the
    # metadata never knew): overlay's is removed by check --repair, native's by cleanup
    orphan = _orphan(sn_dirs, "rm-77" if name == "overlay" else "4242")
    assert _cli(root, "check") != 0
    if name == "overlay":
        assert _cli(root, "check", "--repair") == 0
    else:
        assert _cli(root, "--snapshotter", name, "snapshot", "cleanup") == 0
    assert not os.path.lexists(orphan)
    assert _cli(root, "check") == 0
    assert os.listdir(sn_dirs) == []
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RecursionError" not in err
