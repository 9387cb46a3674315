"""Rootless lamina, as a real unprivileged user (lamina.rootless).

The test creates a user with subordinate uid/gid ranges (no sudo, nothing
else granted) and runs ``lamina`` as that user, with a clean environment, on
the default per-user root (``~/.local/share/lamina``): the README's main flow
(import, run, upgrade, rollback, gc, check), a tree unpacked rootless
compared with root's unpack of the same image (inside, the same owners; on
the host, owners shifted through the user's ranges), hostile layers rejected
as root rejects them, and what rootless cannot do refused with its reason.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import readable_source, require_root_user, require_tools
from imagefactory import (
    Dir,
    Fifo,
    File,
    Hardlink,
    ImageConfig,
    Layer,
    Opaque,
    Symlink,
    Whiteout,
    as_tar,
    build_oci_layout,
    layer_from_dir,
    layer_from_entries,
    layer_from_raw,
    minimal_rootfs,
)
from test_archive_support import file_, hardlink, make_tar, symlink

REPO = Path(__file__).resolve().parent.parent
USER = "lamina-rootless-test"
BINARIES = ("sh", "stat", "cat", "id", "sleep", "touch", "echo", "ls")
V1, V2, CORPUS = "test/rl:v1", "test/rl:v2", "test/rl:corpus"
IDLE = "trap 'exit 0' TERM; while true; do sleep 0.1; done"

# a tree walker run by root on root's mounts and by the user (in the namespace,
# where the user's mounts are) on the user's: type, mode, owner, size, content,
# link target, user xattrs and hard-link groups of every path. Its argument is
# JSON: {"dir": PATH} walks a mounted tree; {"root": DIR|null, "refs": [...]}
# mounts each image (on that root, or the default one) and walks it; with
# "enter", it joins the user's namespaces first, as every lamina command does.
WALKER = r"""
import hashlib, json, os, stat, sys, tempfile
args = json.loads(sys.argv[1])
if args.get("enter"):
    from lamina import rootless
    rootless.enter()

def walk(top):
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames) + [""]:
            p = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(p)
            rel = os.path.relpath(p, top)
            e = {"mode": oct(st.st_mode), "owner": f"{st.st_uid}:{st.st_gid}"}
            if stat.S_ISREG(st.st_mode):
                e["sha"] = hashlib.sha256(open(p, "rb").read()).hexdigest()
                if st.st_nlink > 1:
                    e["group"] = inodes.setdefault(st.st_ino, rel)
            elif stat.S_ISLNK(st.st_mode):
                e["link"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = st.st_rdev
            if not stat.S_ISLNK(st.st_mode):
                e["xattrs"] = sorted(k for k in os.listxattr(p) if k.startswith("user.")
                                     and not k.startswith("user.overlay."))
            out[rel] = e
    return out

if "dir" in args:
    json.dump(walk(args["dir"]), sys.stdout, sort_keys=True)
    sys.exit(0)
from lamina.images.service import ImageService
from lamina.metadata.root import Root, default_root
root = Root(args["root"] or default_root())
svc = ImageService(root)
trees = {}
for ref in args["refs"]:
    target = tempfile.mkdtemp(dir=args["tmp"])
    svc.mount(ref, target)
    try:
        trees[ref] = walk(target)
    finally:
        svc.unmount(target)
        os.rmdir(target)
root.close()
json.dump(trees, sys.stdout, sort_keys=True)
"""


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path
    sub_uid: int  # first subordinate uid (namespace ID 1)
    sub_gid: int
    python: str

    @property
    def root(self) -> Path:
        return self.home / ".local" / "share" / "lamina"

    def env(self) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name,
                "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "PYTHONPATH": str(readable_source()), "LANG": "C.UTF-8"}

    def run(self, *argv: str, check: bool = True, timeout: float = 180,
            stdin: Any = subprocess.DEVNULL,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(argv), user=self.uid, group=self.gid, extra_groups=[],
                              env={**self.env(), **(env or {})}, cwd=self.home,
                              capture_output=True, text=True, timeout=timeout, stdin=stdin,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"as {self.name}: {argv} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def lamina(self, *args: str, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-m", "lamina", *args, check=check, env=env)

    def holder(self) -> int | None:
        """The pid of the user's namespace holder (the test ends it)."""
        try:
            pid, start = Path(f"/tmp/lamina-{self.uid}/ns.pid").read_text().split()
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except (OSError, ValueError):
            return None
        return int(pid) if fields[19] == start else None


def _reachable(path: str, need: int = 0o005) -> bool:
    """Whether others (the user) reach ``path`` and have ``need`` on it."""
    p = Path(path).resolve()
    return all(os.stat(d).st_mode & 0o001 for d in p.parents) and \
        os.stat(p).st_mode & need == need


def _python_for_user() -> str:
    """The interpreter the test user runs lamina with: the one running the suite, or
    the venv ``scripts/setup.sh`` makes (which CI has), probed as uid 65534 (what
    another user can run, not what root can). Not finding one is a broken setup,
    reported as a failure: the rootless tests never turn into a skip for it."""
    tried = []
    for candidate in dict.fromkeys((sys.executable, "/opt/lamina/bin/python")):
        if not (os.path.exists(candidate) and _reachable(candidate)):
            tried.append(f"{candidate}: not reachable by other users")
            continue
        probe = subprocess.run([candidate, "-c", "import grpc, zstandard"],
                               user=65534, group=65534, extra_groups=[], cwd="/",
                               capture_output=True, text=True, check=False,
                               stdin=subprocess.DEVNULL)
        if probe.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {probe.stderr.strip().splitlines()[-1:]}")
    pytest.fail("no Python with lamina's dependencies that another user can run "
                f"({'; '.join(tried)}); scripts/setup.sh makes /opt/lamina/bin/python")


def _ranges(path: str, name: str) -> tuple[int, int] | None:
    for line in Path(path).read_text().splitlines():
        parts = line.split(":")
        if len(parts) == 3 and parts[0] == name:
            return int(parts[1]), int(parts[2])
    return None


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    require_root_user()
    require_tools("newuidmap", "newgidmap", "runc", "useradd")
    python = _python_for_user()
    home = Path(tempfile.mkdtemp(prefix="lamina-rootless-home-", dir="/var/tmp"))
    with contextlib.suppress(KeyError):
        pwd.getpwnam(USER)
        subprocess.run(["userdel", USER], check=True)  # left by an interrupted run
    subprocess.run(["useradd", "--home-dir", str(home), "--no-create-home", "--shell",
                    "/bin/sh", "--user-group", USER], check=True)
    entry = pwd.getpwnam(USER)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chmod(home, 0o700)
    for tool, path in (("--add-subuids", "/etc/subuid"), ("--add-subgids", "/etc/subgid")):
        if _ranges(path, USER) is None:
            subprocess.run(["usermod", tool, "1300000-1365535", USER], check=True)
    sub_uid, count = _ranges("/etc/subuid", USER) or (0, 0)
    sub_gid, gcount = _ranges("/etc/subgid", USER) or (0, 0)
    assert count >= 65535 and gcount >= 65535
    u = User(USER, entry.pw_uid, entry.pw_gid, home, sub_uid, sub_gid, python)
    try:
        yield u
    finally:
        with contextlib.suppress(Exception):
            for c in json.loads(u.lamina("container", "ls", "--json").stdout):
                u.lamina("container", "rm", "--force", c["id"], check=False)
        pid = u.holder()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(f"/tmp/lamina-{u.uid}", ignore_errors=True)
        subprocess.run(["userdel", USER], check=False)
        for path in ("/etc/subuid", "/etc/subgid"):
            lines = Path(path).read_text().splitlines(keepends=True)
            Path(path).write_text("".join(ln for ln in lines if not ln.startswith(USER + ":")))
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def images(user: User) -> dict[str, Path]:
    """Image tars in the user's home: V1, V2 (adds /etc/version), the owner corpus."""
    base = user.home / "images"
    base.mkdir()
    rootfs = minimal_rootfs(base / "rootfs", BINARIES)
    lower = layer_from_dir(rootfs, base / "blobs")
    app = layer_from_entries([File("srv/app/data", b"app\n", 0o640, uid=1000, gid=1001)],
                             base / "blobs")
    v2 = layer_from_entries([File("etc/version", b"v2\n")], base / "blobs")
    cfg = ImageConfig(cmd=["sh", "-c", IDLE])
    build_oci_layout(base / "v1", [lower, app], ref_name=V1, config=cfg)
    build_oci_layout(base / "v2", [lower, app, v2], ref_name=V2, config=cfg)
    corpus1 = layer_from_entries([
        Dir("corpus", 0o755),
        File("corpus/root-file", b"root\n", 0o644),
        File("corpus/www", b"www\n", 0o640, uid=33, gid=33),
        File("corpus/nobody", b"n\n", 0o600, uid=65534, gid=65534),
        File("corpus/setuid", b"#!/bin/sh\n", 0o4755, uid=0, gid=0),
        Dir("corpus/sgid", 0o2775, uid=1000, gid=50),
        Dir("corpus/sticky", 0o1777),
        File("corpus/xattr", b"x\n", xattrs={"user.lamina": b"yes"}),
        Symlink("corpus/link", "www", uid=1000, gid=1000),
        File("corpus/hl/a", b"linked\n", uid=7, gid=7),
        Hardlink("corpus/hl/b", "corpus/hl/a", uid=7, gid=7),
        Fifo("corpus/fifo", 0o620, uid=5, gid=5),
        File("corpus/gone", b"bye\n"),
        File("corpus/opaque/old", b"old\n"),
        File("corpus/replace", b"v1\n", uid=1, gid=1),
    ], base / "blobs")
    corpus2 = layer_from_entries([  # listing its directories: extracted staged
        Dir("corpus", 0o755),
        Dir("corpus/opaque", 0o755),
        Whiteout("corpus/gone"),
        Opaque("corpus/opaque"),
        File("corpus/opaque/new", b"new\n", uid=2, gid=2),
        File("corpus/replace", b"version 2\n", 0o600, uid=3, gid=4),
    ], base / "blobs")
    build_oci_layout(base / "corpus", [lower, corpus1, corpus2], ref_name=CORPUS)
    tars = {name: as_tar(base / name, base / f"{name}.tar") for name in ("v1", "v2", "corpus")}
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(base)], check=True)
    return tars


def test_readme_main_flow_without_root(user: User, images: dict[str, Path]) -> None:
    u = user
    u.lamina("image", "import", str(images["v1"]))
    u.lamina("image", "import", str(images["v2"]))
    assert (u.root / "metadata.db").exists()  # the default per-user root
    assert os.stat(u.root / "metadata.db").st_uid == u.uid
    # a container shows the image's owners; its root is the user
    lines = u.lamina("run", "--rm", "--name", "once", V1, "sh", "-c",
                     "id -u; stat -c '%u:%g %a' /etc/passwd /srv/app/data").stdout.split("\n")
    assert lines[:3] == ["0", "0:0 644", "1000:1001 640"]
    # a detached task: later commands (new processes) see and stop it
    u.lamina("run", "-d", "--name", "app", V1, "sh", "-c", f"echo kept > /kept; {IDLE}")
    tasks = {t["id"]: t for t in json.loads(u.lamina("task", "ls", "--json").stdout)}
    assert tasks["app"]["status"] == "running"
    assert str(tasks["app"]["pid"]) in u.lamina("task", "ps", "app").stdout.split()
    assert u.lamina("task", "exec", "app", "cat", "/kept").stdout == "kept\n"
    # upgrade keeps what it wrote, rollback returns to v1 (still with it)
    u.lamina("container", "upgrade", "app", V2)
    out = u.lamina("task", "exec", "app", "sh", "-c", "cat /kept /etc/version").stdout
    assert out == "kept\nv2\n"
    u.lamina("container", "rollback", "app")
    out = u.lamina("task", "exec", "app", "sh", "-c", "cat /kept; ls /etc").stdout
    assert out.startswith("kept\n") and "version" not in out
    # what the container wrote is on the host with the user's own uid (its root)
    kept = list(u.root.glob("snapshots/overlay/snapshots/*/fs/kept"))
    assert kept and all(os.stat(p).st_uid == u.uid for p in kept)
    u.lamina("container", "rm", "--force", "app")
    u.lamina("image", "rm", V2)
    gc = u.lamina("gc")
    assert "snapshots" in gc.stdout
    check = u.lamina("check")
    assert check.stdout.strip() == "consistent", check.stdout
    # native works as well
    out = u.lamina("--snapshotter", "native", "run", "--rm", "--name", "nat", V1,
                   "stat", "-c", "%u:%g", "/srv/app/data").stdout
    assert out.strip() == "1000:1001"
    assert u.lamina("check").stdout.strip() == "consistent"


def _walk_as_root(tmp: Path, tar: Path, ref: str) -> dict[str, Any]:
    root = tmp / "rootful"
    lam = [sys.executable, "-m", "lamina", "--root", str(root)]
    subprocess.run([*lam, "image", "import", str(tar)], check=True, capture_output=True)
    mnt = tmp / "rootful-mnt"
    mnt.mkdir()
    subprocess.run([*lam, "image", "mount", ref, str(mnt)], check=True, capture_output=True)
    try:
        walk = json.dumps({"dir": str(mnt / "corpus")})
        out = subprocess.run([sys.executable, "-c", WALKER, walk], check=True,
                             capture_output=True, text=True).stdout
    finally:
        subprocess.run([*lam, "image", "unmount", str(mnt)], check=True, capture_output=True)
    result: dict[str, Any] = json.loads(out)
    return result


def test_unpacked_tree_matches_roots(user: User, images: dict[str, Path],
                                     tmp_root: Path) -> None:
    u = user
    u.lamina("image", "import", str(images["corpus"]))
    mnt = u.home / "corpus-mnt"
    u.run("mkdir", "-p", str(mnt))
    u.lamina("image", "mount", CORPUS, str(mnt))  # stays mounted in the user's namespace
    try:
        walk = {"dir": str(mnt / "corpus"), "enter": True}
        mine = json.loads(u.run(u.python, "-c", WALKER, json.dumps(walk)).stdout)
    finally:
        u.lamina("image", "unmount", str(mnt))
    theirs = _walk_as_root(tmp_root, images["corpus"], CORPUS)
    assert mine == theirs
    assert mine["www"]["owner"] == "33:33" and "gone" not in mine
    assert sorted(k for k in mine if k.startswith("opaque")) == ["opaque", "opaque/new"]
    assert mine["hl/b"]["group"] == mine["hl/a"]["group"]
    # on the host: owners through the mapping (0 -> the user, n -> first subordinate + n - 1)
    layers = u.root / "snapshots" / "overlay" / "snapshots"
    www = next(layers.glob("*/fs/corpus/www"))
    assert (os.stat(www).st_uid, os.stat(www).st_gid) == (u.sub_uid + 32, u.sub_gid + 32)
    assert os.stat(www.with_name("root-file")).st_uid == u.uid
    # the upper layer holds overlayfs's markers in the form a user namespace can use
    opaque = next(p for p in layers.glob("*/fs/corpus/opaque") if (p / "new").exists())
    assert os.getxattr(opaque, "user.overlay.opaque") == b"y"
    gone = next(p for p in layers.glob("*/fs/corpus/gone") if stat.S_ISCHR(os.lstat(p).st_mode))
    assert os.lstat(gone).st_rdev == 0
    assert u.lamina("check").stdout.strip() == "consistent"


def _raw_layer(base: Path, tar_bytes: bytes) -> Layer:
    def write(f: IO[bytes]) -> None:
        f.write(tar_bytes)

    return layer_from_raw(write, base / "blobs")


def _raw_image(base: Path, name: str, tar_bytes: bytes) -> Path:
    layer = _raw_layer(base, tar_bytes)
    build_oci_layout(base / name, [layer], ref_name=f"test/hostile:{name}")
    return as_tar(base / name, base / f"{name}.tar")


def test_hostile_layers_rejected_alike(user: User, tmp_root: Path) -> None:
    u = user
    base = u.home / "hostile"
    base.mkdir()
    cases = {
        "dotdot": make_tar([file_("../outside/evil", b"x")]),
        "symlink-out": make_tar([symlink("link", "../../.."), file_("link/evil", b"x")]),
        "hardlink-out": make_tar([hardlink("h", "../outside/file")]),
    }
    tars = {name: _raw_image(base, name, data) for name, data in cases.items()}
    far = layer_from_entries([File("far", b"x", uid=70000, gid=70000)], base / "blobs")
    build_oci_layout(base / "far", [far], ref_name="test/hostile:far")
    subprocess.run(["chown", "-R", f"{u.uid}:{u.gid}", str(base)], check=True)
    root = tmp_root / "rootful"
    for name, tar in tars.items():
        theirs = subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), "image",
                                 "import", str(tar)], capture_output=True, text=True)
        mine = u.lamina("image", "import", str(tar), check=False)
        assert theirs.returncode == mine.returncode == 6, (name, theirs.stderr, mine.stderr)
        assert mine.stderr == theirs.stderr, name
    # an owner beyond the user's ranges: root stores it, rootless cannot
    as_tar(base / "far", base / "far.tar")
    os.chown(base / "far.tar", u.uid, u.gid)
    far_out = u.lamina("image", "import", str(base / "far.tar"), check=False)
    assert far_out.returncode == 5
    assert ("lamina: FailedPrecondition: layer member 'far' is owned by 70000:70000, outside "
            "the IDs this user namespace maps (uids 0-65536, gids 0-65536") in far_out.stderr
    assert u.lamina("check").stdout.strip() == "consistent"
    assert not (u.home / "outside").exists()


def test_parity_corpus_alike(user: User, tmp_root: Path) -> None:
    """Every case of the layer-parity corpus (tests/test_layer_parity.py): rootless
    rejects what root rejects, with the same line, and makes the same tree of the
    rest (a layer with a device node aside, which a user namespace cannot create: it
    is imported without it, and one line says so)."""
    from test_layer_parity import CASES

    u = user
    base = u.home / "parity"
    base.mkdir()
    tars: dict[str, Path] = {}
    for case in CASES:
        layers = [_raw_layer(base, make_tar(members)) for members in [*case.base, case.layer]]
        ref = f"parity/{case.name}:1"
        build_oci_layout(base / case.name, layers, ref_name=ref)
        tars[ref] = as_tar(base / case.name, base / f"{case.name}.tar")
    subprocess.run(["chown", "-R", f"{u.uid}:{u.gid}", str(base)], check=True)
    rootful = tmp_root / "rootful"
    good: list[str] = []
    for ref, tar in tars.items():
        theirs = subprocess.run([sys.executable, "-m", "lamina", "--root", str(rootful), "image",
                                 "import", str(tar)], capture_output=True, text=True)
        mine = u.lamina("image", "import", str(tar), check=False)
        if theirs.returncode == 0 and "lamina: rootless: left out" in mine.stderr:
            # a device node, which a user namespace cannot create, was left out
            assert mine.returncode == 0, (ref, mine)
            assert "device node" in mine.stderr and theirs.stderr == "", (ref, mine)
            continue
        assert (mine.returncode, mine.stderr) == (theirs.returncode, theirs.stderr), ref
        if mine.returncode == 0:
            good.append(ref)
    assert len(good) > len(CASES) // 2
    walk: dict[str, Any] = {"root": str(rootful), "refs": good, "tmp": str(tmp_root)}
    theirs_trees = json.loads(subprocess.run([sys.executable, "-c", WALKER, json.dumps(walk)],
                                             check=True, capture_output=True, text=True).stdout)
    walk = {"root": None, "refs": good, "tmp": str(u.home), "enter": True}
    mine_trees = json.loads(u.run(u.python, "-c", WALKER, json.dumps(walk)).stdout)
    for ref in good:
        assert mine_trees[ref] == theirs_trees[ref], ref
    assert u.lamina("check").stdout.strip() == "consistent"


def test_pull_rootless(user: User, images: dict[str, Path], tmp_path: Path) -> None:
    """``image pull`` from a registry (a private docker-registry on loopback)."""
    from registry_peer import running_registry, skopeo_push

    require_tools("skopeo")
    with running_registry(tmp_path / "registry") as reg:
        name = f"{reg.host}/test/rootless:1"
        skopeo_push(f"oci:{user.home / 'images' / 'v1'}:{V1}", name)
        user.lamina("image", "pull", name)
        out = user.lamina("run", "--rm", "--name", "pulled", name, "stat", "-c", "%u:%g",
                          "/srv/app/data").stdout
    assert out.strip() == "1000:1001"
    user.lamina("image", "rm", name)
    user.lamina("gc")
    assert user.lamina("check").stdout.strip() == "consistent"


def test_what_rootless_cannot_do(user: User) -> None:
    for verb in (("container", "checkpoint", "any"), ("container", "restore", "ref", "any")):
        out = user.lamina(*verb, check=False)
        assert out.returncode == 8
        assert "not available rootless: CRIU needs CAP_CHECKPOINT_RESTORE" in out.stderr
    base = user.home / "dev"
    base.mkdir()
    from imagefactory import CharDev

    layer = layer_from_entries([CharDev("null", 1, 3)], base / "blobs")
    build_oci_layout(base / "oci", [layer], ref_name="test/dev:1")
    as_tar(base / "oci", base / "dev.tar")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(base)], check=True)
    strict = {"LAMINA_ROOTLESS_DEVICES": "strict"}
    out = user.lamina("image", "import", str(base / "dev.tar"), check=False, env=strict)
    assert out.returncode == 5
    assert out.stderr == ("lamina: FailedPrecondition: layer member 'null' is a device node "
                          "(1:3): a user namespace cannot create device nodes (rootless "
                          "lamina with LAMINA_ROOTLESS_DEVICES=strict; unset it to leave them "
                          "out)\n")
    assert user.lamina("check").stdout.strip() == "consistent"
    out = user.lamina("image", "import", str(base / "dev.tar"), check=False,
                      env={"LAMINA_ROOTLESS_DEVICES": "sometimes"})
    assert out.returncode == 6
    assert "LAMINA_ROOTLESS_DEVICES='sometimes': expected one of skip, strict" in out.stderr
    # by default, as containerd and podman do in a user namespace: the device is
    # left out, and one line says so
    out = user.lamina("image", "import", str(base / "dev.tar"))
    assert ("lamina: rootless: left out 1 device node of a layer ('null'): a user namespace "
            "cannot create them (LAMINA_ROOTLESS_DEVICES=strict refuses such layers)\n"
            ) in out.stderr
    layers = user.root / "snapshots" / "overlay" / "snapshots"
    assert not list(layers.glob("*/fs/null"))
    assert user.lamina("check", "--deep").stdout.strip() == "consistent"


def test_userns_container_inside_rootless(user: User, images: dict[str, Path]) -> None:
    """--userns in the user's namespace: the kernel refuses an ID-mapped mount of
    the host filesystem there (EPERM), so lamina says so and uses the chowned copy."""
    user.lamina("image", "import", str(images["v1"]))
    probe = "id -u; stat -c '%u:%g' /etc/passwd /srv/app/data"
    out = user.lamina("run", "--rm", "--userns", "1000:2000", "--name", "nested", V1,
                      "sh", "-c", probe, check=False)
    assert out.returncode == 5  # runc, in the container's namespace, must reach the rootfs
    assert f"{user.home} is not searchable by others" in out.stderr
    os.chmod(user.home, 0o711)
    try:
        out = user.lamina("run", "--rm", "--userns", "1000:2000", "--name", "nested", V1,
                          "sh", "-c", probe)
        # the copy is of the merged layers: whiteouts and opaque directories applied
        user.lamina("image", "import", str(images["corpus"]))
        merged = user.lamina("run", "--rm", "--userns", "1000:2000", "--name", "nested2",
                             CORPUS, "sh", "-c", "ls /corpus/opaque; ls /corpus").stdout.split()
    finally:
        os.chmod(user.home, 0o700)
    assert out.stdout.split() == ["0", "0:0", "1000:1001"]
    assert "ID-mapped lower layers unavailable" in out.stderr
    assert "using a chowned copy of the image's layers" in out.stderr
    assert merged[0] == "new" and "gone" not in merged and "old" not in merged
    assert user.lamina("check").stdout.strip() == "consistent"


def test_serve_rootless(user: User) -> None:
    sock = user.home / "lamina.sock"
    proc = subprocess.Popen([user.python, "-m", "lamina", "serve", "--address", str(sock)],
                            user=user.uid, group=user.gid, extra_groups=[], env=user.env(),
                            cwd=user.home, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "lamina serve did not listen"
            time.sleep(0.1)
        out = user.lamina("--address", str(sock), "snapshot", "prepare", "over-grpc")
        assert out.returncode == 0
        listed = user.lamina("--address", str(sock), "snapshot", "ls").stdout
        assert "over-grpc" in listed
        user.lamina("--address", str(sock), "snapshot", "rm", "over-grpc")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_namespace_is_shared_and_mapped(user: User) -> None:
    """Commands join one namespace holder; it maps the user and the full ranges."""
    user.lamina("image", "ls")
    pid = user.holder()
    assert pid is not None
    uid_map = Path(f"/proc/{pid}/uid_map").read_text().split()
    assert uid_map[:3] == ["0", str(user.uid), "1"]
    assert uid_map[3:5] == ["1", str(user.sub_uid)]
    user.lamina("image", "ls")
    assert user.holder() == pid
    assert grp.getgrgid(user.gid)  # the user's own group exists


def test_subordinate_ranges_parsing(tmp_path: Path) -> None:
    from lamina.errors import FailedPrecondition
    from lamina.rootless import check_member, subordinate_ranges

    name = pwd.getpwuid(os.getuid()).pw_name
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text(f"other:1:5\n{name}:100000:65536\n{os.getuid()}:300000:10\nbad\n")
    subgid.write_text(f"{name}:200000:65536\n{name}:x:1\n")
    r = subordinate_ranges(os.getuid(), subuid=str(subuid), subgid=str(subgid))
    assert r.uids == ((100000, 65536), (300000, 10)) and r.gids == ((200000, 65536),)
    assert r.size == 65537
    subgid.write_text("")
    with pytest.raises(FailedPrecondition, match=f"{name} has no range in {subgid}"):
        subordinate_ranges(os.getuid(), subuid=str(subuid), subgid=str(subgid))
    check_member("'x'", uid=4_000_000, gid=4_000_000, device=(1, 3))  # initial namespace: ok


def test_debootstrap_image_imports_by_default(user: User, debian_layer: Any) -> None:
    """A debootstrap image carries device nodes in /dev: rootless, they are left out by
    default (as containerd and podman do) with one line saying so, and the image runs."""
    base = user.home / "debian"
    build_oci_layout(base / "oci", [debian_layer], ref_name="test/debian:1",
                     config=ImageConfig(cmd=["sh"]))
    as_tar(base / "oci", base / "debian.tar")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(base)], check=True)
    out = user.lamina("image", "import", str(base / "debian.tar"))
    notes = [line for line in out.stderr.splitlines() if "left out" in line]
    assert len(notes) == 1, out.stderr
    assert notes[0] == (
        "lamina: rootless: left out 8 device nodes of a layer ('dev/console', 'dev/full', "
        "'dev/null', 'dev/ptmx', 'dev/random' and 3 more): a user namespace cannot create "
        "them (LAMINA_ROOTLESS_DEVICES=strict refuses such layers)")
    ran = user.lamina("run", "--rm", "--name", "deb", "test/debian:1", "cat", "/etc/debian_version")
    assert ran.stdout.strip().startswith("12")
    user.lamina("image", "rm", "test/debian:1")
    user.lamina("gc")
    assert user.lamina("check").stdout.strip() == "consistent"
