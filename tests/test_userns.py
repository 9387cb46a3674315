"""Containers with their own user namespace (``lamina run --userns``), rootful.

The image's layers are mounted ID-mapped (lamina.mounts.idmap): inside, the image's
owners show as they are in the image; on the host, the layers keep their own
owners and are never chowned (their ctimes do not move); what the container
creates lands in the container's rw layer with host IDs HOSTID+n. The same
holds for the chowned-copy fallback (``LAMINA_IDMAP=copy``), which says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_root_user, require_tools
from imagefactory import File, build_oci_layout, layer_from_dir, layer_from_entries, minimal_rootfs

from lamina.errors import InvalidArgument
from lamina.mounts.idmap import IDMap, UserNamespace, chowned_copy, idmap_supported, parse_userns

BINARIES = ("sh", "stat", "touch", "chown", "mkdir", "id", "cat", "echo")
IMAGE = "test/userns:1"
HOST = 410000
SIZE = 65536
# what the container prints: its uid, and owner + mode of image files
PROBE = ("id -u; stat -c '%u:%g %a %n' /etc/passwd /srv/app /srv/app/data; "
         "touch /made-by-root; touch /srv/app/by-app; chown 7:8 /made-by-root; "
         "echo written > /etc/motd; cat /etc/motd")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("userns-image")
    rootfs = minimal_rootfs(base / "rootfs", BINARIES)
    lower = layer_from_dir(rootfs, base / "blobs")
    app = layer_from_entries([
        File("srv/app/data", b"app data\n", mode=0o640, uid=1000, gid=1001),
    ], base / "blobs")
    build_oci_layout(base / "oci", [lower, app], ref_name=IMAGE)
    return base / "oci"


def lamina(root: Path, *args: str, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "lamina", "--root", str(root), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"lamina {args} exited {proc.returncode}: {proc.stderr}")
    return proc


def layer_stats(root: Path, ids: list[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Owner, mode and ctime of every file in the snapshots ``ids`` (default: all)."""
    base = root / "snapshots" / "overlay" / "snapshots"
    out: dict[str, tuple[int, ...]] = {}
    for sid in ids if ids is not None else sorted(os.listdir(base)):
        fs = base / sid / "fs"
        for dirpath, dirnames, filenames in os.walk(fs):
            for name in ["", *dirnames, *filenames]:
                p = os.path.join(dirpath, name) if name else dirpath
                st = os.lstat(p)
                out[os.path.relpath(p, base)] = (st.st_uid, st.st_gid, st.st_mode,
                                                 st.st_ctime_ns)
    return out


@pytest.fixture
def root(tmp_root: Path, layout: Path) -> Path:
    require_root_user()
    require_tools("runc")
    # runc mounts a user-namespaced container's rootfs from inside its namespace:
    # lamina opens its own directories (0711), what is above must let it through
    os.chmod(tmp_root, 0o711)
    r = tmp_root / "root"
    lamina(r, "image", "import", str(layout))
    return r


def _upper(root: Path, cid: str) -> Path:
    info = json.loads(lamina(root, "container", "info", cid).stdout)
    mounts = lamina(root, "snapshot", "mounts", "/x", info["snapshot_key"]).stdout
    upper = mounts.split("upperdir=")[1].split(",")[0].split()[0]
    return Path(upper)


def _run_probe(root: Path, cid: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    proc = lamina(root, "run", "--userns", f"{HOST}:{SIZE}", "--name", cid, IMAGE,
                  "sh", "-c", PROBE, env=env)
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("mode", ["idmapped", "copy"])
def test_userns_container_sees_image_owners_and_layers_stay(root: Path, mode: str) -> None:
    env = {"LAMINA_IDMAP": "copy"} if mode == "copy" else None
    if mode == "idmapped" and not idmap_supported(root):
        pytest.skip("the kernel cannot ID-map mounts of this filesystem")
    layer_ids = sorted(os.listdir(root / "snapshots" / "overlay" / "snapshots"))
    before = layer_stats(root, layer_ids)
    out, err = _run_probe(root, "c1", env)
    lines = out.splitlines()
    assert lines[0] == "0"  # root inside
    assert lines[1] == "0:0 644 /etc/passwd"  # the image's root-owned file, as root's
    assert lines[3] == "1000:1001 640 /srv/app/data"
    assert lines[-1] == "written"
    if mode == "copy":
        assert "chowned copy" in err
    else:
        assert "chowned" not in err, err
    # the image's layers: neither chowned nor touched
    assert layer_stats(root, layer_ids) == before
    assert any(v[0] == 0 for k, v in before.items() if k.endswith("fs/etc/passwd"))
    # what the container wrote: in its rw layer, with host IDs HOST+n
    upper = _upper(root, "c1")
    st = os.lstat(upper / "made-by-root")
    assert (st.st_uid, st.st_gid) == (HOST + 7, HOST + 8)
    st = os.lstat(upper / "etc" / "motd")
    assert (st.st_uid, st.st_gid) == (HOST, HOST)
    st = os.lstat(upper / "srv" / "app" / "by-app")
    assert (st.st_uid, st.st_gid) == (HOST, HOST)
    assert os.lstat(upper).st_uid == HOST  # the rw layer's root belongs to the container's root
    # a second start reuses what the first made and sees what it wrote
    out2 = lamina(root, "run", "--userns", f"{HOST}:{SIZE}", "--name", "c2", IMAGE, "sh", "-c",
                  "stat -c '%u:%g' /etc/passwd", env=env).stdout
    assert out2.strip() == "0:0"
    assert layer_stats(root, layer_ids) == before
    assert lamina(root, "check").stdout.strip() == "consistent"
    # removing the containers removes what they made (the copy lives in their snapshot)
    lamina(root, "container", "rm", "c1", "c2")
    lamina(root, "gc")
    assert not list((root / "snapshots" / "overlay" / "snapshots").glob("*/idmap-*"))
    assert lamina(root, "check").stdout.strip() == "consistent"
    assert layer_stats(root, layer_ids) == before


def test_host_namespace_container_unchanged(root: Path) -> None:
    """Without --userns nothing is mapped: the same image runs as before."""
    out = lamina(root, "run", "--name", "plain", IMAGE,
                 "sh", "-c", "stat -c '%u:%g' /srv/app/data").stdout
    assert out.strip() == "1000:1001"
    spec = json.loads(lamina(root, "container", "info", "plain").stdout)["spec"]
    assert {"type": "user"} not in spec["linux"]["namespaces"]
    assert "uidMappings" not in spec["linux"]


@pytest.mark.parametrize("mode", ["idmapped", "copy"])
def test_native_snapshotter(root: Path, mode: str) -> None:
    """native: the container's own copy is bind-mounted ID-mapped (what it writes keeps
    the image's IDs on disk), or chowned in place by the fallback (host IDs)."""
    if mode == "idmapped" and not idmap_supported(root):
        pytest.skip("the kernel cannot ID-map mounts of this filesystem")
    env = {"LAMINA_IDMAP": "copy"} if mode == "copy" else None
    lamina(root, "--snapshotter", "native", "image", "unpack", IMAGE)
    base = root / "snapshots" / "native" / "snapshots"
    layer_ids = sorted(os.listdir(base))
    before = {sid: os.stat(base / sid / "fs" / "etc" / "passwd").st_ctime_ns
              for sid in layer_ids}
    out = lamina(root, "--snapshotter", "native", "run", "--userns", f"{HOST}:{SIZE}",
                 "--name", "n1", IMAGE, "sh", "-c",
                 "stat -c '%u:%g' /etc/passwd /srv/app/data; id -u; touch /made", env=env)
    assert out.stdout.split() == ["0:0", "1000:1001", "0"]
    made = next(base.glob("*/fs/made"))
    assert os.stat(made).st_uid == (0 if mode == "idmapped" else HOST)
    after = {sid: os.stat(base / sid / "fs" / "etc" / "passwd").st_ctime_ns
             for sid in layer_ids}
    assert after == before  # the committed layers were not touched


def test_userns_spec_and_bad_flags(root: Path) -> None:
    bad = lamina(root, "run", "--userns", "0:65536", "--name", "b1", IMAGE, check=False)
    assert bad.returncode == 6
    assert "no isolation" in bad.stderr
    bad = lamina(root, "run", "--userns", "lots", "--name", "b2", IMAGE, check=False)
    assert bad.returncode == 6 and "HOSTID:SIZE" in bad.stderr
    lamina(root, "container", "create", "--userns", f"{HOST}:{SIZE}", IMAGE, "s1")
    lamina(root, "task", "start", "s1", check=False)
    spec = json.loads(lamina(root, "container", "info", "s1").stdout)["spec"]
    assert {"type": "user"} in spec["linux"]["namespaces"]
    assert spec["linux"]["uidMappings"] == [{"containerID": 0, "hostID": HOST, "size": SIZE}]
    assert spec["linux"]["gidMappings"] == [{"containerID": 0, "hostID": HOST, "size": SIZE}]


def test_userns_refused_where_the_root_is_unreachable(tmp_root: Path, layout: Path) -> None:
    require_root_user()
    require_tools("runc")
    r = tmp_root / "root"  # tmp_root itself is 0700
    lamina(r, "image", "import", str(layout))
    # (sh: the image has no true, and a missing command is refused first)
    out = lamina(r, "run", "--userns", f"{HOST}:{SIZE}", "--name", "u1", IMAGE, "sh", "-c", ":",
                 check=False)
    assert out.returncode == 5
    assert out.stderr == (f"lamina: FailedPrecondition: {tmp_root} is not searchable by "
                          "others: a container with a user namespace cannot reach its root "
                          "filesystem through it\n")
    # without: as before
    assert lamina(r, "run", "--name", "plain", IMAGE, "id", "-u").stdout == "0\n"


def test_parse_userns() -> None:
    ns = parse_userns("100000:65536")
    assert ns.to_host(0) == 100000 and ns.to_host(65535) == 165535 and ns.to_host(65536) is None
    ns = parse_userns("100000:200000:10")
    assert ns.to_host(3, gid=True) == 200003
    for text in ("100000", "a:b", "1:2:3:4", "100000:0", "4294967290:100"):
        with pytest.raises(InvalidArgument):
            parse_userns(text)


def test_chowned_copy_shifts_owners_keeps_links(tmp_path: Path) -> None:
    require_root_user()
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    os.chown(src / "d" / "f", 5, 6)
    os.chmod(src / "d" / "f", 0o4755)
    os.link(src / "d" / "f", src / "hard")
    os.symlink("d/f", src / "sym")
    os.chown(src / "sym", 3, 3, follow_symlinks=False)
    os.mkfifo(src / "fifo")
    os.chown(src / "fifo", 70000, 70000)  # beyond the range: the overflow ID
    ns = UserNamespace((IDMap(0, 500000, 65536),), (IDMap(0, 600000, 65536),))
    chowned_copy(str(src), str(tmp_path / "dst"), ns)
    dst = tmp_path / "dst"
    st = os.lstat(dst / "d" / "f")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (500005, 600006, 0o4755)
    assert os.lstat(dst / "hard").st_ino == st.st_ino
    assert os.lstat(dst / "sym").st_uid == 500003 and os.readlink(dst / "sym") == "d/f"
    assert os.lstat(dst / "fifo").st_uid == 65534
    assert os.lstat(dst).st_uid == 500000
    assert os.lstat(src / "d" / "f").st_uid == 5  # the source untouched


def test_idmap_probe_raises_what_is_not_the_kernel_saying_no(tmp_root: Path) -> None:
    """``idmap_supported`` answers False only for the probe syscalls' "cannot" errnos;
    a path that does not exist is an error of the caller, raised, not a "no" that
    would turn the ID-mapped tests into skips."""
    require_root_user()
    assert idmap_supported(tmp_root) is True  # ext4 (or any disk filesystem) on 6.x
    with pytest.raises(FileNotFoundError):
        idmap_supported(tmp_root / "absent")
