"""Owners on a root that containerd (through ``lamina serve``) and the CLI share
(lamina.owners): what serve shows containerd, what the CLI may change, blobs
shared by reference, and a root the old code shared migrated without loss.

With real containerd: tests/test_shared_root_containerd.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import require_root_user

from lamina.api.client import RemoteContentStore, RemoteSnapshotter
from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.gen.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
from lamina.api.server import Server
from lamina.content.local import LocalContentStore
from lamina.errors import FailedPrecondition
from lamina.metadata.formats import FORMAT, FORMAT_FILE
from lamina.metadata.root import Root
from lamina.owners import CLI, CONTAINERD
from lamina.snapshots import DeferredRemoval, LocalDirectories

FIXTURE = Path(__file__).parent / "fixtures" / "root-format2-shared.tar.gz"
LAYER = "sha256:f4991e9d21b4b591e1dfada6c89f7368ba5975d18f3da49cd835486725a20106"
CTR_KEYS = {f"lamina-test/2/{LAYER}", "lamina-test/3/ctr-keep"}


def _lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- a root the old code shared ---------------------------------------------------------


def test_a_root_the_old_code_shared_is_repaired_not_emptied(tmp_path: Path) -> None:
    require_root_user()
    r = tmp_path / "shared"
    r.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xpzf", str(FIXTURE), "-C", str(r)], check=True)
    blobs = sorted(p.name for p in (r / "content" / "blobs" / "sha256").iterdir())
    assert len(blobs) == 5

    # lamina's collection on the migrated root: containerd's snapshots are not its own
    gc = _lamina(r, "gc")
    assert gc.returncode == 0, gc.stderr
    assert json.loads((r / FORMAT_FILE).read_text()) == {"format": FORMAT}
    assert "lamina-test/" not in gc.stdout, gc.stdout
    # blobs only containerd needs: the CLI lets go of its reference, the files stay
    released = [line.split()[2] for line in gc.stdout.splitlines()
                if line.startswith("released content ")]
    assert released and not any(line.startswith("removed content ")
                                for line in gc.stdout.splitlines()), gc.stdout
    listed = json.loads(_lamina(r, "snapshot", "ls", "--json").stdout)
    owners = {s["name"]: s["owner"] for s in listed}
    keep = next(k for k in owners if k.startswith("lamina.revision.keep."))
    assert owners == {LAYER: "lamina", keep: "lamina",
                      **{k: "containerd:lamina-test" for k in CTR_KEYS}}, owners
    # every blob is still there, and containerd holds every one of them
    assert sorted(p.name for p in (r / "content" / "blobs" / "sha256").iterdir()) == blobs
    held = json.loads(_lamina(r, "content", "ls", "--json").stdout)
    assert {b["digest"].split(":")[1] for b in held if "containerd" in b["owners"]} == set(blobs)
    assert {b["digest"] for b in held if b["owners"] == ["containerd"]} == set(released)
    check = _lamina(r, "check")
    assert check.returncode == 0, check.stdout + check.stderr

    rm = _lamina(r, "snapshot", "rm", "lamina-test/3/ctr-keep")
    assert rm.returncode == 5, rm.stderr
    assert rm.stderr.strip().endswith(
        "cannot remove snapshot 'lamina-test/3/ctr-keep': it belongs to containerd "
        "(namespace lamina-test), which alone may change it"), rm.stderr

    root = Root(r)
    try:
        overlay = root.snapshotter("overlay")
        assert isinstance(overlay, LocalDirectories)
        # what the CLI's container wrote is still there
        assert (overlay.layer_dir(keep) / "kept").read_text() == \
            "written by the CLI's container\n"
        # containerd's side sees its own only; dropping its blobs leaves the CLI's
        theirs = overlay.scoped(CONTAINERD)  # type: ignore[attr-defined]
        assert {i.name for i in theirs.walk()} == CTR_KEYS
        content = root.content()
        assert isinstance(content, LocalContentStore)
        for name in blobs:
            content.scoped(CONTAINERD).delete(f"sha256:{name}")
        for s in sorted(CTR_KEYS, reverse=True):  # the container's, then the layer
            theirs.remove(s)
    finally:
        root.close()
    check = _lamina(r, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert [i["name"] for i in json.loads(_lamina(r, "image", "ls", "--json").stdout)] == \
        ["docker.io/lamina/shared:old"]
    mounted = tmp_path / "mnt"
    assert _lamina(r, "image", "mount", "docker.io/lamina/shared:old", str(mounted)).returncode == 0
    try:
        assert (mounted / "etc" / "shared").read_text() == "shared by both\n"
    finally:
        _lamina(r, "image", "unmount", str(mounted))
    # and the CLI's own collection takes what the CLI no longer needs
    assert _lamina(r, "container", "rm", "keep").returncode == 0
    assert _lamina(r, "image", "rm", "docker.io/lamina/shared:old").returncode == 0
    assert _lamina(r, "gc").returncode == 0
    assert _lamina(r, "snapshot", "ls", "-q").stdout.split() == []
    assert list((r / "content" / "blobs" / "sha256").iterdir()) == []
    assert _lamina(r, "check").returncode == 0


# -- what serve shows containerd ----------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Root, str]]:
    sockdir = Path(tempfile.mkdtemp(prefix="lamina-owners-", dir="/tmp"))
    root = Root(tmp_path / "root")
    server = Server.for_root(root, str(sockdir / "s.sock"))
    server.start()
    try:
        yield root, server.address
    finally:
        server.stop(grace=1)
        sockdir.rmdir()


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    return err.value.code()


def _write(stub: cpb_grpc.ContentStub, ref: str, data: bytes) -> None:
    """Write and commit ``data`` as containerd's client does (one stream)."""
    reqs = [cpb.WriteContentRequest(action=cpb.STAT, ref=ref, total=len(data),
                                    expected=_digest(data)),
            cpb.WriteContentRequest(action=cpb.COMMIT, ref=ref, offset=0, data=data,
                                    total=len(data), expected=_digest(data))]
    list(stub.Write(iter(reqs)))


def test_serve_shows_containerd_its_own_and_the_cli_everything(
        served: tuple[Root, str]) -> None:
    require_root_user()
    root, address = served
    cli_sn = root.snapshotter("overlay")
    cli_sn.prepare("cli-base")
    cli_sn.commit("cli-layer", "cli-base")
    cli_sn.prepare("cli-work", "cli-layer")
    cli_content = root.content()
    assert isinstance(cli_content, LocalContentStore)
    shared, cli_only = b"a layer both use\n", b"the CLI's alone\n"
    cli_content.add(shared, labels={"from": "cli"})
    cli_content.add(cli_only)
    w = cli_content.writer("cli-pull-1")  # a pull the CLI will resume
    w.write(b"partial")
    w.close()

    with grpc.insecure_channel("unix:" + address) as channel:  # containerd: no lamina metadata
        sn = spb_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        cs = cpb_grpc.ContentStub(channel)  # type: ignore[no-untyped-call]
        sn.Prepare(spb.PrepareSnapshotRequest(snapshotter="lamina", key="default/1/extract"))
        sn.Commit(spb.CommitSnapshotRequest(snapshotter="lamina", name="default/2/layer",
                                            key="default/1/extract"))
        listed = [i.name for r in sn.List(spb.ListSnapshotsRequest(snapshotter="lamina"))
                  for i in r.info]
        assert listed == ["default/2/layer"]
        for key in ("cli-layer", "cli-work"):
            assert _code(lambda k=key: sn.Stat(spb.StatSnapshotRequest(
                snapshotter="lamina", key=k))) is grpc.StatusCode.NOT_FOUND
            assert _code(lambda k=key: sn.Remove(spb.RemoveSnapshotRequest(
                snapshotter="lamina", key=k))) is grpc.StatusCode.NOT_FOUND
        assert _code(lambda: sn.Prepare(spb.PrepareSnapshotRequest(
            snapshotter="lamina", key="default/3/x", parent="cli-layer"))) \
            is grpc.StatusCode.NOT_FOUND
        # containerd's content: none of the CLI's blobs or ingests
        assert [i.digest for r in cs.List(cpb.ListContentRequest()) for i in r.info] == []
        assert _code(lambda: cs.Info(cpb.InfoRequest(digest=_digest(shared)))) \
            is grpc.StatusCode.NOT_FOUND
        assert list(cs.ListStatuses(cpb.ListStatusesRequest()).statuses) == []
        assert _code(lambda: cs.Abort(cpb.AbortRequest(ref="cli-pull-1"))) \
            is grpc.StatusCode.NOT_FOUND
        # containerd writes the blob the CLI holds: one file, two references
        _write(cs, "default-1-layer", shared)
        assert cs.Info(cpb.InfoRequest(digest=_digest(shared))).info.size == len(shared)
        assert cli_content.holders()[_digest(shared)] == {CLI, CONTAINERD}
        assert cli_content.info(_digest(shared)).labels == {"from": "cli"}
        assert len(list(cli_content.blobs_dir.iterdir())) == 2
        cs.Delete(cpb.DeleteContentRequest(digest=_digest(shared)))  # containerd's GC
        assert cli_content.read_at(_digest(shared), 0, 100) == shared
        _write(cs, "default-2-layer", shared)
        # containerd's Cleanup leaves the CLI's layer being built alone
        with cli_sn.staging() as staged:  # type: ignore[attr-defined]
            (staged / "f").write_text("in progress")
            sn.Cleanup(spb.CleanupRequest(snapshotter="lamina"))
            assert (staged / "f").read_text() == "in progress"

    # lamina's own client through serve: everything, and only the CLI's to change
    with RemoteSnapshotter(address, "lamina") as remote:
        assert {i.name for i in remote.walk()} == {"cli-layer", "cli-work", "default/2/layer"}
        with pytest.raises(FailedPrecondition, match="belongs to containerd"):
            remote.remove("default/2/layer")
        with pytest.raises(FailedPrecondition, match="not shared between owners"):
            remote.prepare("cli-on-theirs", "default/2/layer")
        remote.prepare("cli-remote", "cli-layer")
    assert root.snapshotter("overlay").owners()["cli-remote"] == CLI  # type: ignore[attr-defined]
    with RemoteContentStore(address) as remote_cs:
        remote_cs.delete(_digest(shared))  # the CLI's reference: containerd's stays
        assert cli_content.holders()[_digest(shared)] == {CONTAINERD}
        with pytest.raises(FailedPrecondition, match="held by containerd"):
            remote_cs.delete(_digest(shared))
    assert cli_content.status("cli-pull-1").offset == len(b"partial")


def test_a_root_containerd_never_used_migrates_to_the_clis_alone(tmp_path: Path) -> None:
    """Without containerd's snapshots there is nobody to share with: a migrated
    root's blobs are the CLI's, so lamina's collection can still free them."""
    require_root_user()
    r = tmp_path / "cli-only"
    r.mkdir()
    fixture = FIXTURE.with_name("root-format1.tar.gz")
    subprocess.run(["tar", "--numeric-owner", "-xpzf", str(fixture), "-C", str(r)], check=True)
    held = json.loads(_lamina(r, "content", "ls", "--json").stdout)
    assert held and {tuple(b["owners"]) for b in held} == {("lamina",)}, held
    assert _lamina(r, "image", "rm", "fixture:1").returncode == 0
    gc = _lamina(r, "gc")
    assert gc.returncode == 0, gc.stderr
    assert [p for p in (r / "content" / "blobs" / "sha256").iterdir()] == []


def test_a_blob_restored_after_a_crash_is_the_clis(tmp_path: Path) -> None:
    """A blob file without its row (a crash between the rename and the metadata
    commit) comes back held by the CLI alone: its writer was never answered, and
    containerd writes what it wants again (which adds its reference)."""
    store = LocalContentStore(tmp_path / "content")
    try:
        data = b"committed, then the process died\n"
        (store.blobs_dir / _digest(data).split(":")[1]).write_bytes(data)
        report = store.cleanup()
        assert report.restored_rows == [_digest(data)]
        assert store.holders() == {_digest(data): {CLI}}
        store.scoped(CONTAINERD).add(data)
        assert store.holders() == {_digest(data): {CLI, CONTAINERD}}
    finally:
        store.close()


def test_check_beside_a_removal_in_progress_is_consistent(tmp_path: Path) -> None:
    """``lamina check`` while another process (``lamina serve``'s reaper, here a
    deferred removal) is deleting a removed snapshot's directory: not a leftover."""
    require_root_user()
    root = Root(tmp_path / "root")
    try:
        sn = root.snapshotter("overlay")
        assert isinstance(sn, DeferredRemoval)
        sn.prepare("going")
        with sn.deferred_removal():
            sn.remove("going")
            assert [p.name for p in (tmp_path / "root/snapshots/overlay/snapshots").iterdir()
                    if p.name.startswith("rm-")]
            check = _lamina(tmp_path / "root", "check")
            assert check.returncode == 0, check.stdout + check.stderr
        assert list((tmp_path / "root/snapshots/overlay/snapshots").iterdir()) == []
    finally:
        root.close()
    # a removal nobody is finishing (its process died) is a leftover, as before
    (tmp_path / "root/snapshots/overlay/snapshots/rm-9").mkdir()
    check = _lamina(tmp_path / "root", "check")
    assert check.returncode == 5 and "rm-9: directory unknown" in check.stdout, check.stdout
