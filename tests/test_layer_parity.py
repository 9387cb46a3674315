"""The unpacked tree does not depend on the snapshotter or on the way a layer is applied.

Each case is a small stack: base layer(s), then the case layer (hostile or
merely unusual). The stack goes through every way lamina puts a layer on a
snapshot:

* ``native``: the unpacker on the native snapshotter (a layer applied onto a
  full copy of its parent);
* ``staged``: the unpacker on overlay, the normal import path (layers
  extracted into staging upperdirs without their lowers, falling back to a
  mounted snapshot when the layer needs its lowers);
* ``mounted``: each layer applied onto a mounted overlay snapshot;
* ``cli-overlay`` / ``cli-native``: the base unpacked, then ``lamina diff
  apply`` of the case layer onto an active snapshot of its parent.

The mounted trees must be equal in every mode (type, mode, owner, size,
content, link target, device numbers, xattrs except ``trusted.overlay.*``,
file mtimes, hard-link groups, and the root directory itself), and match
what the case expects. A layer that must be rejected is rejected everywhere
with the same InvalidArgument message, and the unpack leaves no snapshot.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import treesum
from conftest import require_root_user
from test_archive_support import Member, dev, dir_, file_, hardlink, make_tar, symlink

from lamina.archive.apply import apply_layer
from lamina.cli import main
from lamina.content import write_blob
from lamina.errors import AlreadyExists, InvalidArgument
from lamina.images.unpack import Unpacker
from lamina.metadata.root import Root
from lamina.mounts.mount import temp_mount
from lamina.oci.identity import chain_ids
from lamina.oci.types import Descriptor, ImageConfig, Manifest, MediaType

MODES = ("native", "staged", "mounted", "cli-overlay", "cli-native")


def wh(path: str) -> Member:
    """The OCI whiteout entry deleting ``path``."""
    head, _, base = path.rpartition("/")
    return file_(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opq(dirpath: str) -> Member:
    return file_(f"{dirpath}/.wh..wh..opq" if dirpath else ".wh..wh..opq")


@dataclass(frozen=True)
class Case:
    name: str
    base: list[list[Member]]
    layer: list[Member]
    #: path -> None (must be absent) or {"kind": "f"|"d"|"l"|"c", "data": ..., "gid": ...}
    expect: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    #: a substring of the InvalidArgument message every mode must raise
    reject: str | None = None
    check: Callable[[dict[str, Any]], None] | None = None


LOWER_TREE = [
    dir_("etc", mode=0o755),
    file_("etc/passwd", b"root:x:0:0\n"),
    file_("etc/group", b"root:x:0:\n"),
    dir_("d", mode=0o750, xattrs={"user.lower": b"1"}),
    file_("d/old", b"old"),
    dir_("d/sub"),
    file_("d/sub/deep", b"deep"),
    file_("top", b"lower top"),
]

CASES = [
    # -- issue 9, item 6 -----------------------------------------------------
    Case("opaque-root", [LOWER_TREE],
         [opq(""), file_("new", b"n")],
         {"/etc": None, "/d": None, "/top": None, "/new": {"kind": "f", "data": b"n"}}),
    Case("opaque-root-dot-slash", [LOWER_TREE],
         [dir_("./", mode=0o755), file_("./.wh..wh..opq"), dir_("./etc"), file_("etc/x", b"x")],
         {"/etc/passwd": None, "/etc/x": {"kind": "f"}, "/d": None, "/top": None}),
    Case("whiteout-then-recreate-dir", [LOWER_TREE],
         [wh("etc"), dir_("etc"), file_("etc/new", b"new")],
         {"/etc/passwd": None, "/etc/group": None, "/etc/new": {"kind": "f", "data": b"new"}}),
    Case("whiteout-then-recreate-dir-deep", [LOWER_TREE],
         [dir_("d", mode=0o750), wh("d/sub"), dir_("d/sub"), file_("d/sub/fresh", b"f")],
         {"/d/sub/deep": None, "/d/old": {"kind": "f"}, "/d/sub/fresh": {"kind": "f"}}),
    Case("chardev-0-0", [LOWER_TREE],
         [dir_("dev"), dev("dev/null0", 0, 0)],
         reject="character device 0/0 is overlayfs's whiteout"),
    Case("chardev-0-0-over-lower-file", [LOWER_TREE],
         [dev("top", 0, 0, mode=0o644)],
         reject="character device 0/0 is overlayfs's whiteout"),
    Case("same-layer-file-then-whiteout", [LOWER_TREE],
         [file_("top", b"upper top"), wh("top"), file_("fresh", b"f"), wh("fresh")],
         {"/top": {"kind": "f", "data": b"upper top"}, "/fresh": {"kind": "f", "data": b"f"}}),
    Case("same-layer-whiteout-then-file", [LOWER_TREE],
         [wh("top"), file_("top", b"upper top")],
         {"/top": {"kind": "f", "data": b"upper top"}}),
    Case("same-layer-dir-then-whiteout", [LOWER_TREE],
         [dir_("d", mode=0o700), file_("d/x", b"x"), wh("d")],
         {"/d/old": None, "/d/sub": None, "/d/x": {"kind": "f"},
          "/d": {"kind": "d", "mode": 0o700}}),
    Case("same-layer-whiteout-then-dir", [LOWER_TREE],
         [wh("d"), dir_("d", mode=0o700), file_("d/x", b"x")],
         {"/d/old": None, "/d/sub": None, "/d/x": {"kind": "f"},
          "/d": {"kind": "d", "mode": 0o700}}),
    Case("same-layer-implicit-dir-then-whiteout", [LOWER_TREE],
         [file_("d/x", b"x"), wh("d")],
         {"/d/old": None, "/d/sub": None, "/d/x": {"kind": "f"},
          "/d": {"kind": "d", "mode": 0o755}}),
    Case("same-layer-whiteout-then-implicit-dir", [LOWER_TREE],
         [wh("d"), file_("d/x", b"x")],
         {"/d/old": None, "/d/sub": None, "/d/x": {"kind": "f"},
          "/d": {"kind": "d", "mode": 0o755}}),
    Case("setgid-root-entry", [LOWER_TREE],
         [dir_("./", mode=0o2755, gid=1234), file_("f", b"f", gid=0), dir_("sub", gid=0),
          file_("sub/g", b"g", gid=0), symlink("s", "f"), dev("null", 1, 3)],
         {"/": {"kind": "d", "mode": 0o2755, "gid": 1234}, "/f": {"kind": "f", "gid": 0},
          "/sub": {"kind": "d", "gid": 0, "mode": 0o755}, "/sub/g": {"kind": "f", "gid": 0},
          "/s": {"kind": "l", "gid": 0}, "/null": {"kind": "c", "gid": 0}}),
    Case("setgid-root-slash", [LOWER_TREE],
         [dir_("/", mode=0o2775, gid=1234), file_("f", b"f", gid=0)],
         {"/": {"kind": "d", "mode": 0o2775, "gid": 1234}, "/f": {"kind": "f", "gid": 0}}),
    # -- the same classes, found while fixing them -------------------------------
    Case("setgid-dir-set-after-use", [],
         [dir_("d"), file_("d/a", b"a"), dir_("d", mode=0o2755, gid=77), file_("d/b", b"b"),
          dir_("d/c")],
         {"/d/b": {"kind": "f", "gid": 0}, "/d/c": {"kind": "d", "gid": 0, "mode": 0o755}}),
    Case("root-metadata-kept-from-lower",
         [[dir_("./", mode=0o750, uid=5, gid=6), *LOWER_TREE]],
         [file_("new", b"n")],
         {"/": {"kind": "d", "mode": 0o750, "uid": 5, "gid": 6}}),
    Case("opaque-and-whiteout-in-one-dir", [LOWER_TREE],
         [dir_("d", mode=0o750), opq("d"), wh("d/old"), file_("d/c", b"c"), wh("d/c")],
         {"/d/old": None, "/d/sub": None, "/d/c": {"kind": "f"}}),
    Case("opaque-listed-after-children", [LOWER_TREE],
         [dir_("d", mode=0o750), file_("d/new", b"n"), dir_("d/sub"), file_("d/sub/n2", b""),
          opq("d"), dir_("d", mode=0o711)],
         {"/d/old": None, "/d/sub/deep": None, "/d/new": {"kind": "f"},
          "/d/sub/n2": {"kind": "f"}, "/d": {"kind": "d", "mode": 0o711}}),
    Case("opaque-keeps-implicit-children", [LOWER_TREE],
         [dir_("d", mode=0o750), file_("d/sub/n2", b""), opq("d")],
         {"/d/old": None, "/d/sub/deep": None, "/d/sub/n2": {"kind": "f"}}),
    Case("whiteout-through-lower-symlink",
         [[dir_("usr"), dir_("usr/lib"), file_("usr/lib/a", b"a"), file_("usr/lib/b", b"b"),
           symlink("lib", "usr/lib")]],
         [wh("lib/a")],
         {"/usr/lib/a": None, "/usr/lib/b": {"kind": "f"}, "/lib": {"kind": "l"}}),
    Case("opaque-through-lower-symlink",
         [[dir_("usr"), dir_("usr/lib"), file_("usr/lib/a", b"a"), symlink("lib", "usr/lib")]],
         [opq("lib"), file_("lib/new", b"n")],
         {"/usr/lib/a": None, "/usr/lib/new": {"kind": "f"}, "/lib": {"kind": "l"}}),
    Case("hardlink-to-lower-then-whiteout", [LOWER_TREE],
         [hardlink("hl", "top"), wh("top")],
         {"/top": None, "/hl": {"kind": "f", "data": b"lower top"}}),
    Case("hardlink-same-layer-then-whiteout", [LOWER_TREE],
         [file_("f", b"f"), hardlink("hl", "f"), wh("f")],
         {"/f": {"kind": "f"}, "/hl": {"kind": "f", "data": b"f"}}),
    Case("whiteout-then-hardlink-to-it", [LOWER_TREE],
         [wh("top"), hardlink("hl", "top")],
         reject="does not exist"),
    Case("whiteout-then-other-type", [LOWER_TREE],
         [wh("d"), file_("d", b"now a file"), wh("top"), dir_("top"), file_("top/in", b"i"),
          wh("etc"), symlink("etc", "d")],
         {"/d": {"kind": "f", "data": b"now a file"}, "/top/in": {"kind": "f"},
          "/etc": {"kind": "l"}}),
    Case("dir-replaced-by-file-and-back", [LOWER_TREE],
         [file_("d", b"file"), dir_("d", mode=0o700), file_("d/new", b"n")],
         {"/d/old": None, "/d/sub": None, "/d/new": {"kind": "f"}}),
    Case("dir-replaced-by-symlink-and-back", [LOWER_TREE],
         [symlink("etc", "d"), dir_("etc"), file_("etc/new", b"n")],
         {"/etc/passwd": None, "/etc/new": {"kind": "f"}}),
    Case("file-replaced-by-dir-and-back", [LOWER_TREE],
         [dir_("top"), file_("top/x", b"x"), file_("top", b"again")],
         {"/top": {"kind": "f", "data": b"again"}}),
    Case("repeated-entries", [LOWER_TREE],
         [file_("top", b"1"), file_("top", b"2", mode=0o600), dir_("d", mode=0o700),
          dir_("d", mode=0o751, uid=3), wh("etc/passwd"), wh("etc/passwd"),
          symlink("s", "a"), symlink("s", "b")],
         {"/top": {"kind": "f", "data": b"2", "mode": 0o600}, "/d": {"kind": "d", "mode": 0o751},
          "/d/old": {"kind": "f"}, "/etc/passwd": None, "/s": {"kind": "l", "link": "b"}}),
    Case("whiteout-of-same-layer-symlink", [LOWER_TREE],
         [symlink("s", "top"), wh("s")],
         {"/s": {"kind": "l", "link": "top"}}),
    Case("dir-xattrs-hidden-by-whiteout", [LOWER_TREE],
         [wh("d"), dir_("d", mode=0o750)],
         {"/d": {"kind": "d", "xattrs": ()}, "/d/old": None}),
    Case("whiteout-in-missing-dir", [LOWER_TREE],
         [wh("nodir/x"), file_("ok", b"")],
         {"/nodir": None, "/ok": {"kind": "f"}}),
    Case("whiteout-in-new-dir-hides-nothing", [LOWER_TREE],
         [dir_("newdir"), wh("newdir/ghost"), file_("newdir/y", b"y"), wh("ghost-at-root")],
         {"/newdir/ghost": None, "/newdir/y": {"kind": "f"}, "/ghost-at-root": None}),
    Case("whiteout-in-first-layer", [],
         [dir_("d"), wh("d/x"), wh("y"), file_("z", b"z")],
         {"/d/x": None, "/y": None, "/z": {"kind": "f"}}),
    Case("whiteout-below-opaque-dir", [LOWER_TREE],
         [dir_("d", mode=0o750), opq("d"), dir_("d/sub"), wh("d/sub/deep"), file_("d/sub/n", b"")],
         {"/d/old": None, "/d/sub/deep": None, "/d/sub/n": {"kind": "f"}}),
    Case("whiteout-in-dir-replacing-lower-symlink",
         [[dir_("usr"), dir_("usr/lib"), file_("usr/lib/a", b"a"), symlink("lib", "usr/lib")]],
         [dir_("lib"), wh("lib/a"), file_("lib/b", b"b")],
         {"/lib": {"kind": "d"}, "/lib/a": None, "/lib/b": {"kind": "f"},
          "/usr/lib/a": {"kind": "f"}}),
    Case("dir-over-dir-metadata-replaced", [LOWER_TREE],
         [dir_("d", mode=0o700, uid=9, xattrs={"user.new": b"2"})],
         {"/d": {"kind": "d", "mode": 0o700, "uid": 9, "xattrs": (("user.new", b"2"),)},
          "/d/old": {"kind": "f"}}),
    Case("root-entry-replaces-root-xattrs",
         [[dir_("./", mode=0o755, xattrs={"user.root": b"1"}), *LOWER_TREE]],
         [dir_("./", mode=0o711), file_("new", b"n")],
         {"/": {"kind": "d", "mode": 0o711, "xattrs": ()}}),
    Case("whiteout-then-hardlink-below-it", [LOWER_TREE],
         [wh("d"), hardlink("hl", "d/old")],
         reject="does not exist"),
    Case("whiteout-of-lower-symlink-to-dir",
         [[dir_("usr"), dir_("usr/lib"), file_("usr/lib/a", b"a"), symlink("lib", "usr/lib")]],
         [wh("lib"), dir_("lib"), file_("lib/own", b"o")],
         {"/usr/lib/a": {"kind": "f"}, "/lib": {"kind": "d"}, "/lib/own": {"kind": "f"},
          "/lib/a": None}),
    Case("whiteout-below-a-file-of-the-layer", [LOWER_TREE],
         [file_("d", b"file"), wh("d/old")],
         reject="is not a directory"),
    Case("hardlink-header-on-lower-group",
         [[file_("f", b"shared"), hardlink("g", "f")]],
         [hardlink("h", "f", mode=0o600)],
         {"/h": {"kind": "f", "mode": 0o600}}),
    Case("opaque-root-through-symlink", [LOWER_TREE],
         [symlink("s", "/"), opq("s"), file_("new", b"n")],
         {"/etc": None, "/top": None, "/s": {"kind": "l", "link": "/"}, "/new": {"kind": "f"}}),
    Case("hardlink-to-lower-then-opaque-parent", [LOWER_TREE],
         [hardlink("hl", "d/old"), opq("d")],
         {"/d/old": None, "/d/sub": None, "/hl": {"kind": "f", "data": b"old"}}),
    Case("whiteout-that-is-a-directory", [LOWER_TREE],
         [dir_(".wh.top")],
         reject="a whiteout cannot be a directory"),
    Case("whiteout-of-nothing", [LOWER_TREE],
         [file_("d/.wh.")],
         reject="does not name an entry"),
    Case("whiteout-of-dot-dot", [LOWER_TREE],
         [dir_("d", mode=0o750), file_("d/.wh..")],
         reject="does not name an entry"),
    Case("root-xattrs-kept-from-lower",
         [[dir_("./", mode=0o755, xattrs={"user.root": b"1"}), *LOWER_TREE]],
         [file_("new", b"n")],
         {"/": {"kind": "d", "xattrs": (("user.root", b"1"),)}}),
    Case("whiteout-dir-on-two-layers",
         [LOWER_TREE, [dir_("d", mode=0o750), file_("d/mid", b"m")]],
         [wh("d"), dir_("d"), file_("d/top", b"t")],
         {"/d/old": None, "/d/mid": None, "/d/top": {"kind": "f"}}),
]

_KINDS = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "c": stat.S_IFCHR}


def summarize(target: str | os.PathLike[str]) -> dict[str, Any]:
    """treesum's summary plus the root directory itself; directory mtimes left out
    (a directory the layer changes gets the current time, in every mode)."""
    out = treesum.summarize(target, dir_mtimes=False)
    st = os.lstat(target)
    xattrs = tuple(sorted((k, os.getxattr(target, k)) for k in os.listxattr(target)
                          if not k.startswith(("trusted.overlay.", "security.selinux"))))
    out["/"] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                0, "", "", 0, 0, xattrs)
    return out


def check_expect(case: Case, tree: dict[str, Any], mode: str) -> None:
    for path, want in case.expect.items():
        got = tree.get(path)
        if want is None:
            assert got is None, f"{mode}: {path} should be absent, is {got}"
            continue
        assert got is not None, f"{mode}: {path} should exist"
        kind, perm, uid, gid, _size, sha, link, _rdev, _mtime, xattrs = got
        assert kind == _KINDS[want["kind"]], f"{mode}: {path} is {kind:o}"
        if "mode" in want:
            assert perm == want["mode"], f"{mode}: {path} mode {perm:o}"
        if "uid" in want:
            assert uid == want["uid"], f"{mode}: {path} uid {uid}"
        if "gid" in want:
            assert gid == want["gid"], f"{mode}: {path} gid {gid}"
        if "data" in want:
            assert sha == hashlib.sha256(want["data"]).hexdigest(), f"{mode}: {path} content"
        if "link" in want:
            assert link == want["link"], f"{mode}: {path} -> {link}"
        if "xattrs" in want:
            assert xattrs == want["xattrs"], f"{mode}: {path} xattrs {xattrs}"


class Stack:
    """A case's layers in a content store, as an image the unpacker takes."""

    def __init__(self, root: Root, layers: list[bytes]) -> None:
        self.root = root
        self.layers = layers
        content = root.content()
        descs = []
        for raw in layers:
            digest = "sha256:" + hashlib.sha256(raw).hexdigest()
            with contextlib.suppress(AlreadyExists):
                write_blob(content, f"layer-{digest}", raw)
            descs.append(Descriptor(MediaType.OCI_LAYER, digest, len(raw)))
        self.diff_ids = tuple(d.digest for d in descs)
        cfg = json.dumps({"rootfs": {"type": "layers", "diff_ids": list(self.diff_ids)}}).encode()
        cdigest = "sha256:" + hashlib.sha256(cfg).hexdigest()
        with contextlib.suppress(AlreadyExists):
            write_blob(content, f"config-{cdigest}", cfg)
        self.manifest = Manifest(Descriptor(MediaType.OCI_CONFIG, cdigest, len(cfg)),
                                 tuple(descs))
        self.config = ImageConfig.parse(cfg)
        self.chains = chain_ids(list(self.diff_ids))

    def unpack(self, snapshotter: str, upto: int | None = None) -> str:
        """Unpack the first ``upto`` layers (all by default); the top ChainID."""
        n = len(self.layers) if upto is None else upto
        manifest = Manifest(self.manifest.config, self.manifest.layers[:n])
        config = ImageConfig(self.config.diff_ids[:n], self.config.config, self.config.raw)
        unpacker = Unpacker(self.root.content(), self.root.snapshotter(snapshotter),
                            snapshotter_name=snapshotter, locks_dir=self.root.path / "locks",
                            tmpmounts=self.root.tmpmounts)
        return unpacker.unpack(manifest, config).chain_id


def _tree_of(root: Root, snapshotter: str, name: str, active: bool = False) -> dict[str, Any]:
    sn = root.snapshotter(snapshotter)
    mounts = sn.mounts(name) if active else sn.view(f"view-{name}", name)
    try:
        with temp_mount(mounts, base=root.tmpmounts) as target:
            return summarize(target)
    finally:
        if not active:
            sn.remove(f"view-{name}")


def _names(root: Root, snapshotter: str) -> set[str]:
    return {i.name for i in root.snapshotter(snapshotter).walk()}


def run_mode(mode: str, stack: Stack, tmp: Path,
             capsys: pytest.CaptureFixture[str]) -> dict[str, Any] | str:
    """The mounted tree ``mode`` makes of the stack, or the InvalidArgument message."""
    root = stack.root
    top = len(stack.layers) - 1
    if mode in ("native", "staged"):
        name = "native" if mode == "native" else "overlay"
        before = _names(root, name)
        try:
            chain = stack.unpack(name)
        except InvalidArgument as exc:
            left = _names(root, name) - before - set(stack.chains[:-1])
            assert not left, f"{mode}: the failed unpack left {left}"
            return exc.message
        return _tree_of(root, name, chain)
    if mode == "mounted":
        sn = root.snapshotter("overlay")
        parent = ""
        for i, raw in enumerate(stack.layers):
            key = f"mounted-{i}"
            mounts = sn.prepare(key, parent)
            try:
                with temp_mount(mounts, base=root.tmpmounts) as target:
                    apply_layer(io.BytesIO(raw), target)
            except InvalidArgument as exc:
                assert i == top, f"base layer {i} rejected: {exc}"
                sn.remove(key)
                return exc.message
            sn.commit(f"mounted-layer-{i}", key)
            parent = f"mounted-layer-{i}"
        return _tree_of(root, "overlay", parent)
    name = mode.split("-")[1]
    parent = stack.unpack(name, top) if top else ""
    sn = root.snapshotter(name)
    key = f"cli-{name}"
    sn.prepare(key, parent)
    layer = tmp / "case-layer.tar"
    layer.write_bytes(stack.layers[-1])
    capsys.readouterr()
    code = main(["--root", str(root.path), "--snapshotter", name, "diff", "apply",
                 str(layer), key])
    out, err = capsys.readouterr()
    if code != 0:
        assert code == 6, f"{mode}: exit code {code}: {err}"
        assert err.startswith("lamina: InvalidArgument: "), err
        assert err.count("\n") == 1, err
        return err[len("lamina: InvalidArgument: "):].rstrip("\n")
    assert out.strip() == stack.diff_ids[-1]
    return _tree_of(root, name, key, active=True)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer_parity(case: Case, tmp_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_root_user()
    root = Root(tmp_root / "r")
    try:
        stack = Stack(root, [make_tar(layer) for layer in [*case.base, case.layer]])
        results = {mode: run_mode(mode, stack, tmp_root, capsys) for mode in MODES}
    finally:
        root.close()
    if case.reject is not None:
        for mode, got in results.items():
            assert isinstance(got, str), f"{mode}: not rejected"
            assert case.reject in got, f"{mode}: {got}"
        assert len(set(results.values())) == 1, results
        return
    for mode, got in results.items():
        assert not isinstance(got, str), f"{mode}: rejected: {got}"
    ref = results["native"]
    assert isinstance(ref, dict)
    for mode, got in results.items():
        assert isinstance(got, dict)
        check_expect(case, got, mode)
        assert treesum.diff(ref, got) == [], f"{mode} differs from native"
    if case.check is not None:
        case.check(ref)


def test_every_mode_is_exercised() -> None:
    """The corpus covers rejections and trees, so no comparison is vacuous."""
    assert any(c.reject for c in CASES) and any(not c.reject for c in CASES)
    assert all(c.expect or c.reject for c in CASES)
