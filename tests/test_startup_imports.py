"""What a command imports before it does its work (start-up time, bench/startup.py):
each command, run as ``lamina`` runs it, leaves out the modules only other paths
need. An erofs pull from a loopback registry imports no proxy lookup, no zstd, no
directory extraction, no image converter and no archive importer; image rm no GC; gc no layer writer
or reader; run no checkpointing; none of them gRPC."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user, require_tools
from registry_peer import Registry as Peer
from registry_peer import skopeo_push
from test_registry_pull import peer

__all__ = ["modules_after", "peer"]

#: never imported by a command that runs on a local root
SERVER_ONLY = {"grpc", "google.protobuf", "lamina.api.server"}
#: only for a zstd layer, and for a directory-backed snapshotter's extraction
LAYER_EXTRAS = {"zstandard", "lamina.archive.apply", "lamina.archive.mtree",
                "lamina.snapshots.erofs.convert", "lamina.differ"}
#: CRIU, checkpoint images
CHECKPOINTS = {"lamina.containers.checkpoint"}


def modules_after(root: Path, *words: str, ok: bool = True) -> set[str]:
    """The modules loaded once ``lamina --root ROOT WORDS`` has run (in a process of
    its own); with ``ok``, the command must succeed."""
    code = ("import sys\nfrom lamina.cli import main\n"
            f"code = main(['--root', {str(root)!r}, *{list(words)!r}])\n"
            "print(code, ' '.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, check=False)
    last = done.stdout.splitlines()[-1] if done.stdout else ""
    status, _, loaded = last.partition(" ")
    assert status == "0" or (not ok and status.isdigit()), done.stderr
    return set(loaded.split())


def _any_of(loaded: set[str], *groups: set[str]) -> list[str]:
    """Which modules of ``groups`` were loaded (an assertion shows them)."""
    return sorted(loaded & set().union(*groups))


def _layout(work: Path) -> f.ImageRef:
    """An OCI layout of image demo:1: sh, on one gzip layer."""
    layer = f.layer_from_dir(f.minimal_rootfs(work / "rootfs", ("sh",)), work / "blobs")
    return f.build_oci_layout(work / "layout", [layer], ref_name="demo:1")


def test_erofs_import_rm_and_gc_leave_out_what_they_do_not_use(tmp_root: Path) -> None:
    require_root_user()
    layout, root = _layout(tmp_root / "w").layout, tmp_root / "root"
    imported = modules_after(root, "--snapshotter", "erofs", "image", "import", "-q",
                             str(layout))
    assert "lamina.erofs.writer" in imported  # the path was taken
    assert _any_of(imported, SERVER_ONLY, LAYER_EXTRAS, CHECKPOINTS,
                   {"http.client", "ssl", "lamina.remotes.auth"}) == []
    removed = modules_after(root, "--snapshotter", "erofs", "image", "rm", "demo:1")
    assert _any_of(removed, SERVER_ONLY,
                   {"lamina.metadata.gc", "lamina.snapshots.erofs", "hmac"}) == []
    collected = modules_after(root, "--snapshotter", "erofs", "gc")
    assert "lamina.snapshots.erofs" in collected
    assert _any_of(collected, SERVER_ONLY, LAYER_EXTRAS, {
        "lamina.erofs.writer", "lamina.erofs.reader", "lamina.archive.compression",
        "hmac"}) == []


def test_erofs_pull_from_loopback_leaves_out_what_it_does_not_use(
        require_root: None, peer: Peer, tmp_root: Path) -> None:
    name = f"{peer.host}/test/startup:1"
    skopeo_push(_layout(tmp_root / "w").oci_ref, name)
    pulled = modules_after(tmp_root / "root", "--snapshotter", "erofs", "image", "pull", "-q",
                           name)
    assert "lamina.erofs.writer" in pulled
    # urllib.request reads the environment's proxies, which loopback never uses;
    # the importer (tarfile) reads image archives
    assert _any_of(pulled, SERVER_ONLY, LAYER_EXTRAS, CHECKPOINTS,
                   {"urllib.request", "lamina.images.importer", "tarfile"}) == []


def test_run_rm_leaves_out_checkpoints_and_the_differ(tmp_root: Path) -> None:
    require_root_user()
    require_tools("runc")
    root = tmp_root / "root"
    modules_after(root, "image", "import", "-q", str(_layout(tmp_root / "w").layout))
    ran = modules_after(root, "run", "--rm", "demo:1", "sh", "-c", "exit 0")
    assert "lamina.containers.service" in ran
    assert _any_of(ran, SERVER_ONLY, CHECKPOINTS, {"lamina.differ", "uuid", "zstandard"}) == []


@pytest.mark.parametrize("words", [("--version",), ("image", "ls")])
def test_the_quickest_commands_import_no_store_machinery(tmp_root: Path,
                                                         words: tuple[str, ...]) -> None:
    loaded = modules_after(tmp_root / "root", *words)
    assert _any_of(loaded, SERVER_ONLY, LAYER_EXTRAS, {"http.client", "lamina.metadata.gc"}) == []
