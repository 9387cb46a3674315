"""Tests for the local test-image builder (tests/imagefactory.py).

Cross-checked with independent tools: skopeo (inspect / copy) and umoci
(ls / unpack), each skipped only when the tool is not installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import imagefactory as imf
import pytest
from conftest import require_root_user, require_tools

COMPRESSIONS: list[imf.Compression] = ["none", "gzip", "zstd"]


def run(*cmd: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
        **kw,
    )
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------- pure python


def test_debian_mirror_from_apt_config() -> None:
    assert imf.debian_mirror().startswith(("http://", "https://"))


def test_debian_mirror_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMINA_DEBIAN_MIRROR", "http://mirror.invalid/debian/")
    assert imf.debian_mirror() == "http://mirror.invalid/debian"


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_entries_layer_digests_and_members(tmp_path: Path, compression: imf.Compression) -> None:
    ents = imf.rich_entries()[0]
    layer = imf.layer_from_entries(ents, tmp_path, compression=compression)
    assert layer.blob.name == layer.digest.split(":")[1]
    assert sha256_file(layer.blob) == layer.digest
    assert layer.size == layer.blob.stat().st_size
    assert "sha256:" + hashlib.sha256(layer.tar_bytes()).hexdigest() == layer.diff_id
    assert layer.media_type == imf.MT_OCI_LAYER[compression]
    if compression == "none":
        assert layer.digest == layer.diff_id
    else:
        assert layer.digest != layer.diff_id

    members = {m.name.rstrip("/"): m for m in layer.members()}
    assert [m.rstrip("/") for m in members] == [e.tar_name for e in ents]
    for m in members.values():
        assert m.uname == "" and m.gname == ""
    assert members["lamina/hl/b"].islnk() and members["lamina/hl/b"].linkname == "lamina/hl/a"
    assert members["lamina/link-abs"].issym()
    assert members["lamina/dev/null-like"].ischr()
    assert (members["lamina/dev/loop-like"].devmajor, members["lamina/dev/loop-like"].devminor) == (
        7,
        200,
    )
    assert members["lamina/dev/fifo"].isfifo()
    assert members["lamina/suid"].mode == 0o4755
    assert members["lamina/sticky"].mode == 0o1777
    assert members[imf.LONG_NAME].isfile()
    cap = members["lamina/cap-bin"].pax_headers["SCHILY.xattr.security.capability"]
    assert cap.encode("utf-8", "surrogateescape") == imf.vfs_cap_v2(
        (1 << imf.CAP_NET_BIND_SERVICE) | (1 << imf.CAP_NET_RAW)
    )
    # raw xattr bytes, no hdrcharset=BINARY (as GNU tar / Go write them)
    assert b"hdrcharset" not in layer.tar_bytes()


def test_whiteout_and_opaque_names(tmp_path: Path) -> None:
    layer = imf.layer_from_entries(imf.rich_entries()[1], tmp_path, compression="none")
    names = [m.name for m in layer.members()]
    assert "lamina/.wh.gone-file" in names
    assert "lamina/.wh.gone-dir" in names
    assert "etc/.wh.issue.net" in names
    assert "lamina/opaque-me/.wh..wh..opq" in names


def test_layers_are_reproducible(tmp_path: Path) -> None:
    a = imf.rich_layers(tmp_path / "a")
    b = imf.rich_layers(tmp_path / "b")
    assert [x.digest for x in a] == [y.digest for y in b]
    assert [x.diff_id for x in a] == [y.diff_id for y in b]


def test_expected_tree_model() -> None:
    exp = imf.RICH_EXPECTED
    for gone in (
        "lamina/gone-file",
        "lamina/gone-dir/x",
        "lamina/gone-dir/y/z",
        "lamina/opaque-me/a",
        "lamina/opaque-me/sub/c",
        "lamina/d2f/child",
        "etc/issue.net",
    ):
        assert gone in exp.removed, gone
        assert gone not in exp.entries
    assert "lamina/gone-dir" not in exp.removed
    assert exp.entries["lamina/gone-dir"].mode == 0o700
    assert exp.entries["lamina/f2d"].kind == "dir"
    assert exp.entries["lamina/d2f"].kind == "file"
    assert exp.entries["lamina/replace-me"].data.startswith(b"version 2")
    assert exp.entries["lamina/link-replaced"].kind == "file"
    assert exp.links["lamina/hl/c"] == "lamina/hl/a"
    assert exp.links["lamina/hl-lower"] == "lamina/file.txt"
    assert exp.entries["lamina/xattr.txt"].xattrs == {
        "user.lamina.a": b"alpha-2",
        "user.lamina.b": b"beta",
    }


def test_dir_layer_roundtrip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "f").write_text("f")
    os.link(src / "d" / "f", src / "g")
    os.symlink("d/f", src / "s")
    os.mkfifo(src / "p")
    os.setxattr(src / "d" / "f", "user.k", b"\xffv")
    layer = imf.layer_from_dir(src, tmp_path / "w", compression="zstd")
    ms = layer.members()
    assert [m.name.rstrip("/") for m in ms] == ["d", "d/e", "d/f", "g", "p", "s"]
    by = {m.name.rstrip("/"): m for m in ms}
    assert by["g"].islnk() and by["g"].linkname == "d/f"
    assert by["s"].issym() and by["p"].isfifo()
    assert by["d/f"].pax_headers["SCHILY.xattr.user.k"].encode("utf-8", "surrogateescape") == (
        b"\xffv"
    )


def _check_layout(ref: imf.ImageRef) -> None:
    layout = ref.layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    assert index["schemaVersion"] == 2
    (desc,) = [
        m for m in index["manifests"] if m["annotations"][imf.ANNOTATION_REF_NAME] == ref.ref_name
    ]
    assert desc["digest"] == ref.manifest_digest
    for blob in (layout / "blobs" / "sha256").iterdir():
        assert sha256_file(blob) == "sha256:" + blob.name
    manifest = json.loads(ref.blob_path(ref.manifest_digest).read_bytes())
    assert manifest["mediaType"] == imf.MT_OCI_MANIFEST
    assert manifest["config"]["digest"] == ref.config_digest
    config = json.loads(ref.blob_path(ref.config_digest).read_bytes())
    assert config["rootfs"]["diff_ids"] == ref.diff_ids
    assert [x["digest"] for x in manifest["layers"]] == [x.digest for x in ref.layers]


def test_oci_layout_structure(tmp_path: Path) -> None:
    layers = imf.rich_layers(tmp_path / "blobs", compression="zstd")
    cfg = imf.ImageConfig(
        cmd=["-c", "echo hi"],
        entrypoint=["/bin/sh"],
        env=[imf.DEFAULT_PATH_ENV, "FOO=bar"],
        working_dir="/lamina",
        labels={"a": "b"},
    )
    ref = imf.build_oci_layout(tmp_path / "oci", layers, config=cfg)
    _check_layout(ref)
    c = ref.config["config"]
    assert c["Entrypoint"] == ["/bin/sh"] and c["Cmd"] == ["-c", "echo hi"]
    assert c["WorkingDir"] == "/lamina" and "FOO=bar" in c["Env"]
    # a second tag in the same layout
    ref2 = imf.build_oci_layout(tmp_path / "oci", layers[:1], ref_name="test:one")
    _check_layout(ref2)
    _check_layout(ref)
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert len(index["manifests"]) == 2


# --------------------------------------------------------------------------- external tools


def _mixed_rich(tmp_path: Path, compressions: tuple[imf.Compression, ...]) -> imf.ImageRef:
    layers = [
        imf.rich_layers(tmp_path / "blobs", compression=c)[i] for i, c in enumerate(compressions)
    ]
    return imf.build_oci_layout(tmp_path / "oci", layers)


@pytest.fixture
def rich_oci(tmp_path: Path) -> imf.ImageRef:
    """The rich layers, one per compression (gzip, zstd, none)."""
    return _mixed_rich(tmp_path, ("gzip", "zstd", "none"))


def test_skopeo_inspect_oci_layout(rich_oci: imf.ImageRef) -> None:
    require_tools("skopeo")
    out = json.loads(run("skopeo", "inspect", rich_oci.oci_ref).stdout)
    assert out["Digest"] == rich_oci.manifest_digest
    assert out["Layers"] == [x.digest for x in rich_oci.layers]
    assert out["Architecture"] == imf.host_arch()
    raw = json.loads(run("skopeo", "inspect", "--config", rich_oci.oci_ref).stdout)
    assert raw["rootfs"]["diff_ids"] == rich_oci.diff_ids


def test_skopeo_inspect_oci_archive(rich_oci: imf.ImageRef, tmp_path: Path) -> None:
    require_tools("skopeo")
    tar = imf.as_tar(rich_oci.layout, tmp_path / "image.tar")
    with tarfile.open(tar) as tf:
        names = tf.getnames()
    assert "index.json" in names and "oci-layout" in names
    out = json.loads(run("skopeo", "inspect", f"oci-archive:{tar}:test:latest").stdout)
    assert out["Digest"] == rich_oci.manifest_digest


def test_umoci_ls(rich_oci: imf.ImageRef) -> None:
    require_tools("umoci")
    out = run("umoci", "ls", "--layout", rich_oci.layout).stdout.split()
    assert "test:latest" in out


def test_umoci_unpack_matches_expected(tmp_path: Path) -> None:
    """An independent applier (umoci) produces what RICH_EXPECTED describes."""
    require_root_user()
    require_tools("umoci")
    ref = _mixed_rich(tmp_path, ("gzip", "none", "gzip"))  # umoci 0.4 has no zstd
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{ref.layout}:test:latest", bundle)
    imf.RICH_EXPECTED.verify(bundle / "rootfs")


def test_docker_save_archive(tmp_path: Path) -> None:
    require_tools("skopeo")
    layers = imf.rich_layers(tmp_path / "blobs")
    arch = imf.build_docker_save(tmp_path / "save.tar", layers, "lamina/test:v1")
    with tarfile.open(arch.path) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))  # type: ignore[arg-type]
        repos = json.load(tf.extractfile("repositories"))  # type: ignore[arg-type]
        first = tf.extractfile(manifest[0]["Layers"][0])
        assert first is not None
        assert "sha256:" + hashlib.sha256(first.read()).hexdigest() == layers[0].diff_id
    assert manifest[0]["RepoTags"] == ["lamina/test:v1"]
    assert set(repos) == {"lamina/test"}
    out = json.loads(run("skopeo", "inspect", "--config", f"docker-archive:{arch.path}").stdout)
    assert out["rootfs"]["diff_ids"] == [x.diff_id for x in layers]

    # skopeo's own docker-archive of the same image has the same diff_ids
    oci = imf.build_oci_layout(tmp_path / "oci", layers)
    theirs = tmp_path / "skopeo.tar"
    run("skopeo", "copy", "--quiet", oci.oci_ref, f"docker-archive:{theirs}:lamina/test:v1")
    out2 = json.loads(run("skopeo", "inspect", "--config", f"docker-archive:{theirs}").stdout)
    assert out2["rootfs"]["diff_ids"] == out["rootfs"]["diff_ids"]


def test_minimal_rootfs_runs(tmp_path: Path) -> None:
    require_root_user()
    require_tools("chroot", "ldd")
    root = imf.minimal_rootfs(tmp_path / "rootfs")
    out = run("chroot", root, "/bin/sh", "-c", "echo hello; cat /etc/passwd; ls /").stdout
    assert out.startswith("hello\nroot:x:0:0")
    layer = imf.minimal_layer(tmp_path / "blobs")
    assert any(m.name == "bin/sh" for m in layer.members())


# --------------------------------------------------------------------------- debootstrap


@pytest.mark.slow
def test_debootstrap_rootfs(debian_rootfs: Path) -> None:
    assert (debian_rootfs / "etc" / "debian_version").read_text().startswith("12.")
    assert (debian_rootfs / "usr" / "bin" / "dpkg").exists()
    assert (debian_rootfs / "bin").is_symlink()  # merged /usr
    assert not list((debian_rootfs / "var/cache/apt/archives").glob("*.deb"))
    assert imf.debootstrap_rootfs(debian_rootfs.parent.parent) == debian_rootfs  # cached


@pytest.mark.slow
def test_rich_image_on_debian(debian_layer: imf.Layer, tmp_path: Path) -> None:
    require_tools("skopeo", "umoci")
    layers = [debian_layer, *imf.rich_layers(tmp_path / "blobs")]
    ref = imf.build_oci_layout(tmp_path / "oci", layers, ref_name="debian:rich")
    out = json.loads(run("skopeo", "inspect", f"oci:{ref.layout}:debian:rich").stdout)
    assert len(out["Layers"]) == 4
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{ref.layout}:debian:rich", bundle)
    rootfs = bundle / "rootfs"
    imf.RICH_EXPECTED.verify(rootfs)
    assert not (rootfs / "etc/issue.net").exists()
    assert (rootfs / "etc/issue").exists()
    assert (rootfs / "etc/lamina-release").read_text() == "lamina test image 2\n"


# --------------------------------------------------------------------------- conftest helpers


def test_tmp_root_is_fresh_and_unmounts(tmp_root: Path) -> None:
    from conftest import mounts_under, unmount_all_under

    require_root_user()
    require_tools("mount")
    assert tmp_root.is_dir() and not any(tmp_root.iterdir())
    a, b = tmp_root / "a b", tmp_root / "a b" / "c"
    a.mkdir()
    run("mount", "-t", "tmpfs", "tmpfs", a)
    b.mkdir()
    run("mount", "-t", "tmpfs", "tmpfs", b)
    run("mount", "-t", "tmpfs", "tmpfs", b)  # stacked
    assert set(mounts_under(tmp_root)) == {str(a), str(b)}
    assert mounts_under(tmp_root)[0] == str(b)  # deepest first
    unmount_all_under(tmp_root)
    assert mounts_under(tmp_root) == []
    # leave one mounted: the fixture's teardown must clean it up
    run("mount", "-t", "tmpfs", "tmpfs", a)
