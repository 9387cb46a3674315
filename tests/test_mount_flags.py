"""Mounts of image content are ``nosuid,nodev`` unless the user drops them.

The image carries a setuid-root copy of ``id`` and a ``/dev/null`` node. Run
by uid 65534 through ``lamina image mount`` (or ``snapshot mount``), ``id -u``
must still say 65534 and the device must not open; with ``--allow-suid
--allow-dev`` both work again (and the flags are gone from mountinfo).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_root_user, require_tools
from imagefactory import (
    CharDev,
    Dir,
    File,
    build_oci_layout,
    layer_from_dir,
    layer_from_entries,
    minimal_rootfs,
)

from lamina.cli import main
from lamina.mounts.mount import Mount, mount_all, temp_mount, unmount_all

REF = "test/suid:1"
NOBODY = 65534
OPT_OUT = ("--allow-suid", "--allow-dev")


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("suid-image")
    rootfs = minimal_rootfs(base / "rootfs", ("id",))
    lower = layer_from_dir(rootfs, base / "blobs")
    id_binary = Path(os.path.realpath(shutil.which("id") or "/usr/bin/id")).read_bytes()
    upper = layer_from_entries([
        File("bin/suid-id", id_binary, 0o4755),
        Dir("dev", 0o755),
        CharDev("dev/null", 1, 3, 0o666),
    ], base / "blobs")
    build_oci_layout(base / "oci", [lower, upper], ref_name=REF)
    return base / "oci"


def lamina(root: Path, snapshotter: str, *args: str) -> None:
    rc = main(["--root", str(root), "--snapshotter", snapshotter, *args])
    assert rc == 0, f"lamina {' '.join(args)}: exit {rc}"


@pytest.fixture(params=["overlay", "native"])
def snapshotter(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def setup(tmp_root: Path, layout: Path, snapshotter: str) -> Iterator[tuple[Path, Path]]:
    """(lamina root with the image imported, a mount target uid 65534 can reach)."""
    require_root_user()
    require_tools("setpriv")
    os.chmod(tmp_root, 0o755)  # the target's path; the lamina root below stays 0700
    root, target = tmp_root / "root", tmp_root / "mnt"
    lamina(root, snapshotter, "image", "import", str(layout))
    target.mkdir()
    yield root, target
    unmount_all(target)


def per_mount_options(target: str | Path) -> set[str]:
    """The per-mount options (mountinfo field 6) of the top mount on ``target``."""
    found: list[set[str]] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == os.path.realpath(target):
                found.append(set(fields[5].split(",")))
    assert found, f"nothing mounted on {target}"
    return found[-1]


def euid_of_suid_binary(target: Path) -> int:
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         str(target / "bin" / "suid-id"), "-u"],
        capture_output=True, text=True, check=True, timeout=30,
    )
    return int(proc.stdout)


def device_opens(target: Path) -> bool:
    try:
        fd = os.open(target / "dev" / "null", os.O_RDONLY)
    except PermissionError as exc:
        assert exc.errno == errno.EACCES
        return False
    os.close(fd)
    return True


def assert_hardened(target: Path) -> None:
    assert euid_of_suid_binary(target) == NOBODY, "a setuid-root binary ran as root"
    assert not device_opens(target), "a device node of the image opened"
    assert {"nosuid", "nodev"} <= per_mount_options(target)


def assert_not_hardened(target: Path) -> None:
    assert not {"nosuid", "nodev"} & per_mount_options(target)
    assert euid_of_suid_binary(target) == 0
    assert device_opens(target)


def test_image_mount_is_nosuid_nodev(setup: tuple[Path, Path], snapshotter: str) -> None:
    root, target = setup
    lamina(root, snapshotter, "image", "mount", REF, str(target))
    try:
        assert_hardened(target)
        # what a user reads through the mount is still the image
        assert (target / "bin" / "suid-id").stat().st_mode & 0o4000
    finally:
        lamina(root, snapshotter, "image", "unmount", str(target))


def test_image_mount_rw_is_nosuid_nodev(setup: tuple[Path, Path], snapshotter: str) -> None:
    root, target = setup
    lamina(root, snapshotter, "image", "mount", "--rw", REF, str(target))
    try:
        assert_hardened(target)
        (target / "written").write_text("rw\n")
    finally:
        lamina(root, snapshotter, "image", "unmount", str(target))


def test_image_mount_opt_out(setup: tuple[Path, Path], snapshotter: str) -> None:
    root, target = setup
    lamina(root, snapshotter, "image", "mount", *OPT_OUT, REF, str(target))
    try:
        assert_not_hardened(target)
    finally:
        lamina(root, snapshotter, "image", "unmount", str(target))


def test_image_mount_allow_suid_only(setup: tuple[Path, Path], snapshotter: str) -> None:
    root, target = setup
    lamina(root, snapshotter, "image", "mount", "--allow-suid", REF, str(target))
    try:
        opts = per_mount_options(target)
        assert "nodev" in opts and "nosuid" not in opts
        assert euid_of_suid_binary(target) == 0
        assert not device_opens(target)
    finally:
        lamina(root, snapshotter, "image", "unmount", str(target))


@pytest.mark.parametrize("opt_out", [False, True], ids=["default", "opt-out"])
def test_snapshot_mount(setup: tuple[Path, Path], snapshotter: str, opt_out: bool,
                        capsys: pytest.CaptureFixture[str]) -> None:
    root, target = setup
    capsys.readouterr()
    lamina(root, snapshotter, "image", "unpack", REF)
    chain = capsys.readouterr().out.split()[1]
    lamina(root, snapshotter, "snapshot", "view", "look", chain)
    lamina(root, snapshotter, "snapshot", "mount", *(OPT_OUT if opt_out else ()),
           str(target), "look")
    try:
        (assert_not_hardened if opt_out else assert_hardened)(target)
    finally:
        lamina(root, snapshotter, "snapshot", "unmount", str(target))


def test_temp_mounts_are_nosuid_nodev(tmp_root: Path) -> None:
    """The temporary mounts of unpack, diff, checkpoint and the container
    commands all go through temp_mount."""
    require_root_user()
    src = tmp_root / "src"
    src.mkdir()
    with temp_mount([Mount("bind", str(src), options=("rbind", "ro"))], base=tmp_root) as t:
        assert {"nosuid", "nodev", "ro"} <= per_mount_options(t)
    with temp_mount([Mount("bind", str(src), options=("rbind",))], base=tmp_root,
                    allow_suid=True, allow_dev=True) as t:
        assert not {"nosuid", "nodev", "ro"} & per_mount_options(t)


@pytest.mark.parametrize("opt_out", [False, True], ids=["default", "opt-out"])
def test_long_overlay_options_through_new_mount_api(tmp_root: Path, opt_out: bool) -> None:
    """Option strings longer than a page go through fsopen/fsmount: the flags
    must reach MOUNT_ATTR_* there too."""
    require_root_user()
    lowers = []
    for i in range(24):
        d = tmp_root / f"{i:03d}-{'l' * 100}"  # fsconfig takes values up to 255 bytes
        d.mkdir()
        (d / f"f{i}").write_text(str(i))
        lowers.append(str(d))
    opts = ("lowerdir=" + ":".join(lowers),)
    assert len(opts[0]) > os.sysconf("SC_PAGE_SIZE")
    target = tmp_root / "merged"
    target.mkdir()
    mount_all([Mount("overlay", "overlay", options=opts)], target,
              allow_suid=opt_out, allow_dev=opt_out)
    try:
        assert (target / "f23").read_text() == "23"
        has = {"nosuid", "nodev"} & per_mount_options(target)
        assert has == (set() if opt_out else {"nosuid", "nodev"})
    finally:
        unmount_all(target)
