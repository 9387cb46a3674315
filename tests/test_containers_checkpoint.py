"""Checkpoint containers into OCI image indexes and restore them, with runc and CRIU.

A shell loop counts in the container (``/tmp/count``, in its rw layer). After
a checkpoint and a restore into a new container the count must go on from
where it was dumped — the same shell, not a fresh start — also on a second
root that only got the checkpoint through ``image export``/``image import``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import test_containers_cli as shared
from conftest import ended_within, require_root_user, require_tools
from test_runtime_criu import SEIZE_LOG

import lamina.containers.checkpoint as checkpoint_module
from lamina.containers.checkpoint import (
    ANNOTATION_BIND_DESTINATION,
    ANNOTATION_BIND_SOURCE,
    ANNOTATION_RUNTIME,
    ANNOTATION_SNAPSHOTTER,
    RUNTIME,
)
from lamina.containers.options import make_options
from lamina.containers.runtime import TaskStatus
from lamina.containers.runtime.criu import find_criu
from lamina.containers.runtime.spec import BindMount
from lamina.containers.service import ContainerService
from lamina.containers.taskstate import is_kept
from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from lamina.images.graph import put_document, read_document
from lamina.images.service import ImageService
from lamina.metadata.gc import collect
from lamina.metadata.images import Image
from lamina.metadata.root import Root
from lamina.oci.types import Descriptor, MediaType, host_platform

layout = shared.layout
Cli = shared.Cli
V1, V2 = shared.V1, shared.V2
wait_for = shared.wait_for

# The counts are appended, never rewritten: `echo $i > f` truncates before it writes,
# and a dump taken in between (rare, likelier on a loaded machine) would leave the
# dumped file empty for good. The count is the last whole line.
COUNTER = ("echo started; trap 'exit 0' TERM; i=0; "
           "while true; do i=$((i+1)); echo $i >> /tmp/count; sleep 0.05; done")
BIND_COUNTER = ("echo started; i=0; "
                "while true; do i=$((i+1)); echo $i >> /tmp/count; echo $i >> /data/count; "
                "sleep 0.05; done")


def last_count(text: str) -> int | None:
    """The last whole line of an appended count file (None before the first)."""
    whole = text[:text.rfind("\n") + 1].split()
    return int(whole[-1]) if whole else None

TIMINGS: list[str] = []


@pytest.fixture
def cli(tmp_root: Path, layout: Path) -> Iterator[Cli]:
    require_root_user()
    require_tools("runc")
    if find_criu() is None:
        pytest.skip("criu is not installed (or not in $PATH)")
    c = Cli(tmp_root / "root")
    try:
        c("image", "import", str(layout))
        yield c
    finally:
        problems = [p for r in c.roots for p in shared.cleanup_tasks(r)]
        assert not problems, problems


@pytest.fixture(scope="module", autouse=True)
def report_timings() -> Iterator[None]:
    yield
    if TIMINGS:
        print("\n" + "\n".join(TIMINGS))


def count_in(cli: Cli, cid: str, root: Path | None = None) -> int:
    found = wait_for(lambda: last_count(cli("task", "exec", cid, "cat", "/tmp/count",
                                            root=root).stdout), timeout=60,
                     what=f"/tmp/count of {cid} to hold a count")
    return int(found)


def read_int(path: Path) -> int:
    found = wait_for(lambda: last_count(path.read_text()) if path.exists() else None,
                     timeout=60, what=f"{path} to hold a count")
    return int(found)


def checkpoint(cli: Cli, *args: str, root: Path | None = None) -> tuple[str, dict[str, float]]:
    """``container checkpoint -v ARGS``: the index digest and the timings."""
    t0 = time.monotonic()
    proc = cli("container", "checkpoint", "-v", *args, root=root)
    wall = time.monotonic() - t0
    timings = json.loads(proc.stderr.strip().splitlines()[-1])
    TIMINGS.append(f"checkpoint {' '.join(args)}: wall {wall:.3f}s (cli), {timings}")
    digest = proc.stdout.strip()
    assert digest.startswith("sha256:") and len(digest) == 71
    return digest, timings


def restore(cli: Cli, *args: str, root: Path | None = None) -> tuple[int, dict[str, float]]:
    t0 = time.monotonic()
    proc = cli("container", "restore", "-v", *args, root=root)
    wall = time.monotonic() - t0
    timings = json.loads(proc.stderr.strip().splitlines()[-1])
    TIMINGS.append(f"restore {' '.join(args)}: wall {wall:.3f}s (cli), {timings}")
    _cid, pid = proc.stdout.split()
    return int(pid), timings


def start_counter(cli: Cli, cid: str, *, above: int = 15, script: str = COUNTER,
                  extra: tuple[str, ...] = ()) -> int:
    cli("run", "-d", *extra, "--name", cid, V1, "sh", "-c", script)
    return int(wait_for(lambda: (n := count_in(cli, cid)) > above and n, what="counting"))


def dumped_count(cli: Cli, cid: str) -> int:
    """The count a task stopped by ``--exit`` left in its (still mounted) rootfs."""
    return read_int(cli.root / "tasks" / cid / "rootfs" / "tmp" / "count")


def assert_resumed(cli: Cli, cid: str, dumped: int, root: Path | None = None) -> int:
    """The restored loop counts on from ``dumped``: the count goes past it, and the
    script's first line never ran again (a fresh start would print "started" and
    count from 1)."""
    now = wait_for(lambda: (n := count_in(cli, cid, root)) > dumped and n, timeout=60,
                   what="the count to go past the checkpoint")
    logs = cli("task", "logs", cid, root=root).stdout
    assert "started" not in logs  # the script did not run from its start
    return now


# --------------------------------------------------------------------------- index


def validate_index(root: Path, digest: str) -> dict[str, Any]:
    """Check the checkpoint index as an OCI image index; returns it parsed."""
    r = Root(root)
    try:
        content = r.content()
        with content.reader(digest) as f:
            data = f.read()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        index = json.loads(data)
        assert index["schemaVersion"] == 2
        assert index["mediaType"] == MediaType.OCI_INDEX
        assert isinstance(index["manifests"], list) and index["manifests"]
        for d in index["manifests"]:
            assert set(d) >= {"mediaType", "digest", "size", "platform"}, d
            assert d["platform"] == host_platform()
            assert isinstance(d["size"], int) and d["digest"].startswith("sha256:")
            with content.reader(d["digest"]) as f:
                blob = f.read()
            assert len(blob) == d["size"], d
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == d["digest"], d
        ann = index["annotations"]
        assert ann[ANNOTATION_RUNTIME] == RUNTIME
        assert ann[ANNOTATION_SNAPSHOTTER] == "overlay"
        assert ann["io.containerd.checkpoint.runtime.version"].startswith("1.")
        types = [d["mediaType"] for d in index["manifests"]]
        for needed in (MediaType.CHECKPOINT_CRIU, MediaType.CHECKPOINT_RW,
                       MediaType.CHECKPOINT_CONFIG, MediaType.OCI_MANIFEST):
            assert types.count(needed) == 1, types
        # GC references from the index to each child
        labels = content.info(digest).labels
        for i, d in enumerate(index["manifests"]):
            assert labels[f"containerd.io/gc.ref.content.m.{i}"] == d["digest"]
        return index  # type: ignore[no-any-return]
    finally:
        r.close()


def blob_of(root: Path, index: dict[str, Any], media_type: str) -> bytes:
    d = next(d for d in index["manifests"] if d["mediaType"] == media_type)
    r = Root(root)
    try:
        with r.content().reader(d["digest"]) as f:
            return f.read()
    finally:
        r.close()


# --------------------------------------------------------------------------- tests


def test_checkpoint_exit_and_restore_resumes_count(cli: Cli) -> None:
    start_counter(cli, "ctr", above=20)
    digest, timings = checkpoint(cli, "--exit", "ctr", "ckpt/ctr:one")
    # --exit: paused while its files are saved, then the dump stops it (no resume)
    assert "pause" in timings and "resume" not in timings, timings
    assert cli.task("ctr")["status"] == "stopped"  # type: ignore[index]
    dumped = dumped_count(cli, "ctr")
    assert dumped > 20
    time.sleep(0.3)  # not synchronisation: a stopped loop writes nothing in any 0.3 s
    assert dumped_count(cli, "ctr") == dumped  # nothing runs any more

    images = {i["name"]: i for i in cli.json("image", "ls", "--json")}
    assert images["ckpt/ctr:one"]["target"]["digest"] == digest
    assert images["ckpt/ctr:one"]["target"]["mediaType"] == MediaType.OCI_INDEX

    pid, _ = restore(cli, "ckpt/ctr:one", "ctr2")
    task = cli.task("ctr2")
    assert task is not None and task["status"] == "running" and task["pid"] == pid
    assert_resumed(cli, "ctr2", dumped)
    info = cli.json("container", "info", "ctr2")
    assert info["image"] == V1
    assert info["options"]["args"] == ["sh", "-c", COUNTER]
    assert info["labels"]["lamina.io/checkpoint"] == "ckpt/ctr:one"

    # the restored container is an ordinary one: it stops, starts afresh, goes away
    cli("task", "kill", "ctr2")
    assert cli("task", "wait", "--timeout", "10", "ctr2", check=False).returncode == 0
    cli("container", "rm", "ctr", "ctr2")
    # the checkpoint keeps its blobs (and the image) through garbage collection
    validate_index(cli.root, digest)


def test_checkpoints_of_one_container_take_turns(cli: Cli) -> None:
    """Three checkpoints of one container at once: each takes its turn (before, two
    CRIU dumps of one task failed on each other's seizing or hung, and left the
    task paused); with ``--exit`` the first stops the task and the others say so."""
    start_counter(cli, "busy")

    def at_once(*flags: str) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(3) as pool:
            return list(pool.map(lambda i: cli("container", "checkpoint", *flags, "busy",
                                               f"turns/busy:{i}{''.join(flags)}",
                                               check=False, timeout=100), range(3)))

    procs = at_once()
    assert [p.returncode for p in procs] == [0, 0, 0], [p.stderr for p in procs]
    assert cli.task("busy")["status"] == "running"  # type: ignore[index]
    assert cli("check").stdout.strip() == "consistent"
    procs = at_once("--exit")
    assert sorted(p.returncode for p in procs) == [0, 5, 5], [p.stderr for p in procs]
    assert all("a stopped task; nothing to checkpoint" in p.stderr
               for p in procs if p.returncode), [p.stderr for p in procs]
    assert cli.task("busy")["status"] == "stopped"  # type: ignore[index]
    assert cli("check").stdout.strip() == "consistent"


@pytest.mark.parametrize("flags", [(), ("--exit",)], ids=["leave-running", "exit"])
def test_a_terminated_checkpoint_leaves_the_task_running(
        cli: Cli, flags: tuple[str, ...]) -> None:
    """SIGTERM to ``container checkpoint`` while it holds the task paused (saving
    its files, dumping it): the command ends with 143 and the task runs on —
    thawed, or restored from the dump ``--exit`` took — or, when the checkpoint
    was stored first, the checkpoint holds it. Before, Python died on the spot
    (the task stayed paused; runc killed half-way left CRIU to freeze it again)."""
    start_counter(cli, "term")
    pid = cli.task("term")["pid"]  # type: ignore[index]
    # the task's freezer (cgroup v1): read directly, to catch the pause as it happens
    group = next(line.split(":", 2)[2] for line in
                 Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                 if line.split(":", 2)[1] == "freezer")
    freezer = Path("/sys/fs/cgroup/freezer") / group.lstrip("/") / "freezer.state"
    proc = cli.terminated_when("container", "checkpoint", *flags, "term", "term/ck:1",
                               ready=lambda: freezer.read_text().strip() == "FROZEN")
    err = proc.stderr
    stored = "term/ck:1" in cli("images", "--names").stdout
    task = cli.task("term")
    assert task is not None
    TIMINGS.append(f"SIGTERM to checkpoint {' '.join(flags)}: exit {proc.returncode}, "
                   f"stored {stored}, task {task['status']}")
    if proc.returncode == 143:
        assert err.strip().splitlines()[-1] == "lamina: terminated (SIGTERM)", err
    else:
        assert proc.returncode == 0 and stored, (proc.returncode, err)
    if stored and flags:
        assert task["status"] == "stopped", task
    else:
        assert task["status"] == "running", (task, err)
        before = count_in(cli, "term")
        wait_for(lambda: count_in(cli, "term") > before, what="counting on")
    assert cli("check").stdout.strip() == "consistent"


def test_checkpoint_leave_running_index_valid_and_gc_safe(cli: Cli, tmp_path: Path) -> None:
    before = start_counter(cli, "live")
    cli("task", "exec", "live", "sh", "-c", "echo written > /root/note")
    digest, timings = checkpoint(cli, "live")
    assert {"pause", "criu_dump", "rw_diff", "resume"} <= set(timings)
    # resumed, still counting
    task = cli.task("live")
    assert task is not None and task["status"] == "running"
    wait_for(lambda: count_in(cli, "live") > before + 5, what="counting after checkpoint")

    names = [i["name"] for i in cli.json("image", "ls", "--json")
             if i["target"]["digest"] == digest]
    assert len(names) == 1 and names[0].startswith("checkpoint/live:")
    ref = names[0]

    index = validate_index(cli.root, digest)
    image_entry = next(d for d in index["manifests"]
                       if d["mediaType"] == MediaType.OCI_MANIFEST)
    assert image_entry["annotations"]["io.containerd.image.name"] == V1
    config = json.loads(blob_of(cli.root, index, MediaType.CHECKPOINT_CONFIG))
    assert config["id"] == "live" and config["image"] == V1
    assert config["options"]["args"] == ["sh", "-c", COUNTER]
    assert config["spec"]["process"]["args"] == ["sh", "-c", COUNTER]
    assert config["image_target"]["digest"] == image_entry["digest"]
    criu_tar = blob_of(cli.root, index, MediaType.CHECKPOINT_CRIU)
    with tarfile.open(fileobj=io.BytesIO(criu_tar)) as tar:
        assert "inventory.img" in tar.getnames()
    rw = blob_of(cli.root, index, MediaType.CHECKPOINT_RW)
    with tarfile.open(fileobj=io.BytesIO(rw), mode="r:gz") as tar:
        names_in_rw = tar.getnames()
    assert "root/note" in names_in_rw and "tmp/count" in names_in_rw

    # garbage collection keeps every blob: the image reaches them all
    r = Root(cli.root)
    try:
        report = collect(r)
        removed = {d for d, _ in report.content}
    finally:
        r.close()
    assert not removed & {d["digest"] for d in index["manifests"]}
    validate_index(cli.root, digest)
    listed = cli.json("checkpoint", "ls", "--json")
    assert [(c["ref"], c["container"], c["image"]) for c in listed] == [(ref, "live", V1)]
    inspected = cli.json("checkpoint", "inspect", ref)
    assert inspected["index"]["digest"] == digest
    assert inspected["annotations"][ANNOTATION_RUNTIME] == RUNTIME

    # an exported checkpoint is an OCI layout other tools read
    tar_path = tmp_path / "ckpt.tar"
    cli("image", "export", str(tar_path), ref)
    lay = tmp_path / "layout"
    lay.mkdir()
    with tarfile.open(tar_path) as tar:
        assert all(m.isfile() or m.isdir() for m in tar.getmembers())
        # extraction filters exist from Python 3.11.4 on (Debian bookworm has 3.11.2)
        tar.extractall(lay, **({"filter": "tar"} if hasattr(tarfile, "data_filter") else {}))
    top = json.loads((lay / "index.json").read_text())
    assert top["manifests"][0]["digest"] == digest
    for d in index["manifests"]:
        blob = lay / "blobs" / "sha256" / d["digest"].split(":")[1]
        assert blob.stat().st_size == d["size"]
    if shutil.which("skopeo"):
        raw = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{lay}:{ref}"],
                             capture_output=True, check=True).stdout
        assert hashlib.sha256(raw).hexdigest() == digest.split(":")[1]
        # skopeo picks the host platform's entry: the container's image
        meta = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{lay}:{ref}"],
                                         capture_output=True, check=True, text=True).stdout)
        assert meta["Digest"] == digest and meta["Os"] == "linux"
    cli("container", "rm", "--force", "live")


def test_restore_on_second_root_from_export(cli: Cli, tmp_root: Path) -> None:
    start_counter(cli, "mover", above=20)
    checkpoint(cli, "--exit", "mover", "moving/mover:1")
    dumped = dumped_count(cli, "mover")
    tar_path = tmp_root / "mover.tar"
    cli("image", "export", str(tar_path), "moving/mover:1")

    other = tmp_root / "other"
    cli("image", "import", str(tar_path), root=other)
    names = [i["name"] for i in cli.json("image", "ls", "--json", root=other)]
    assert names == ["moving/mover:1"]  # the image itself travelled inside, unnamed

    pid, _ = restore(cli, "moving/mover:1", "moved", root=other)
    assert pid > 0
    assert_resumed(cli, "moved", dumped, root=other)
    names = [i["name"] for i in cli.json("image", "ls", "--json", root=other)]
    assert sorted(names) == sorted(["moving/mover:1", V1])  # registered from the index
    assert cli.json("container", "info", "moved", root=other)["image"] == V1
    cli("container", "rm", "--force", "moved", root=other)
    cli("container", "rm", "--force", "mover")


def test_checkpoint_binds_restore_to_sources_and_bind_root(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "marker").write_text("bind contents\n")
    (data / "sub").mkdir()
    (data / "sub" / "deep.txt").write_text("deep\n")
    note = tmp_path / "note.txt"
    note.write_text("a single file\n")
    start_counter(cli, "binder", above=10, script=BIND_COUNTER, extra=(
        "--mount", f"type=bind,src={data},dst=/data",
        "--mount", f"type=bind,src={note},dst=/note.txt"))
    digest, timings = checkpoint(cli, "--exit", "--binds", "binder", "binds/binder:1")
    assert "binds" in timings
    dumped = read_int(data / "count")

    index = validate_index(cli.root, digest)
    binds = [d for d in index["manifests"] if d["mediaType"] == MediaType.CHECKPOINT_BINDS]
    assert sorted(d["annotations"][ANNOTATION_BIND_DESTINATION] for d in binds) == [
        "/data", "/note.txt"]

    # back into the original sources (which lost their contents meanwhile) only when
    # asked: the checkpoint names those host paths, and may have come from a registry
    shutil.rmtree(data)
    note.unlink()
    refused = cli("container", "restore", "binds/binder:1", "binder2", check=False)
    assert refused.returncode == 5, refused.stderr  # FailedPrecondition
    line = refused.stderr.strip()
    assert "\n" not in line and "--binds" in line and "--bind-root" in line, line
    assert str(data) in line and str(note) in line, line
    assert not data.exists() and not note.exists()
    assert "binder2" not in cli.containers()
    restore(cli, "--binds", "binds/binder:1", "binder2")
    assert (data / "marker").read_text() == "bind contents\n"
    assert (data / "sub" / "deep.txt").read_text() == "deep\n"
    assert note.read_text() == "a single file\n"
    assert_resumed(cli, "binder2", dumped)
    wait_for(lambda: read_int(data / "count") > dumped, what="counting into the bind mount")
    assert cli("task", "exec", "binder2", "cat", "/note.txt").stdout == "a single file\n"
    cli("task", "kill", "--signal", "KILL", "binder2")

    # or under another directory, which the new container then mounts
    elsewhere = tmp_path / "elsewhere"
    restore(cli, "--bind-root", str(elsewhere), "binds/binder:1", "binder3")
    assert (elsewhere / "data" / "marker").read_text() == "bind contents\n"
    assert (elsewhere / "note.txt").read_text() == "a single file\n"
    wait_for(lambda: (elsewhere / "data" / "count").exists()
             and read_int(elsewhere / "data" / "count") > dumped, what="counting elsewhere")
    opts = cli.json("container", "info", "binder3")["options"]
    assert {m["destination"]: m["source"] for m in opts["mounts"]} == {
        "/data": str(elsewhere / "data"), "/note.txt": str(elsewhere / "note.txt")}
    cli("container", "rm", "--force", "binder", "binder2", "binder3")


# --------------------------------------------------------------------------- library


@pytest.fixture
def services(tmp_root: Path, layout: Path) -> Iterator[tuple[ContainerService, ContainerService]]:
    require_root_user()
    require_tools("runc")
    if find_criu() is None:
        pytest.skip("criu is not installed (or not in $PATH)")
    root = Root(tmp_root / "lib")
    images = ImageService(root)
    containers = ContainerService(root, images=images)
    try:
        images.import_(layout)
        yield containers, containers
    finally:
        problems = shared.cleanup_tasks(root.path)
        containers.close()
        images.close()
        root.close()
        assert not problems, problems


def test_failed_checkpoint_resumes_the_task(
    services: tuple[ContainerService, ContainerService], monkeypatch: pytest.MonkeyPatch
) -> None:
    ct, cps = services
    ct.create(V1, "frail", options=make_options(args=["sh", "-c", COUNTER]))
    with pytest.raises(FailedPrecondition):  # no task yet
        cps.checkpoint("frail")
    ct.start("frail", detach=True)

    def broken(*args: Any, **kwargs: Any) -> Any:
        assert ct.tasks.state("frail").status == TaskStatus.PAUSED
        raise Internal("criu exploded")

    monkeypatch.setattr(ct.tasks, "checkpoint", broken)
    with pytest.raises(Internal, match="criu exploded"):
        cps.checkpoint("frail", "broken:1")
    assert ct.tasks.state("frail").status == TaskStatus.RUNNING
    with pytest.raises(NotFound):
        ct.images.get("broken:1")
    assert list((ct.root.path / "checkpoints").iterdir()) == []
    monkeypatch.undo()

    result = cps.checkpoint("frail", "works:1")
    assert ct.tasks.state("frail").status == TaskStatus.RUNNING
    TIMINGS.append(f"library checkpoint (leave running): {dict(result.timings)}")
    with pytest.raises(AlreadyExists):
        cps.checkpoint("frail", "works:1")
    # restoring onto an existing container id fails and leaves that container alone
    with pytest.raises(AlreadyExists):
        cps.restore("works:1", "frail")
    assert ct.tasks.state("frail").status == TaskStatus.RUNNING
    # an ordinary image is not a checkpoint
    with pytest.raises(InvalidArgument, match="not a checkpoint"):
        cps.restore(V2, "x")
    with pytest.raises(NotFound):
        ct.get("x")

    restored = cps.restore("works:1", "frail2")
    TIMINGS.append(f"library restore: {dict(restored.timings)}")
    assert restored.task.status == TaskStatus.RUNNING
    # both run, each in its own cgroup
    assert restored.task.pid is not None
    original = ct.tasks.state("frail").pid
    assert Path(f"/proc/{original}/cgroup").read_text() != \
        Path(f"/proc/{restored.task.pid}/cgroup").read_text()
    assert "frail2" in Path(f"/proc/{restored.task.pid}/cgroup").read_text()
    ct.remove("frail", force=True)
    ct.remove("frail2", force=True)


def test_a_failed_seize_is_retried_with_the_task_running_between(
    services: tuple[ContainerService, ContainerService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leave-running checkpoint holds its task paused; when CRIU could not seize it
    (a task in state D for CRIU's 10 s, seen in CI four attempts in a row while the
    task stayed in the freezer), the task runs before the next attempt, which is
    made paused again."""
    ct, cps = services
    ct.create(V1, "seized", options=make_options(args=["sh", "-c", COUNTER]))
    ct.start("seized", detach=True)
    runc = ct.tasks.runc
    events: list[str] = []
    counts: list[int] = []

    def count() -> int:
        pid = ct.tasks.state("seized").pid
        return int(wait_for(lambda: last_count(Path(f"/proc/{pid}/root/tmp/count").read_text()),
                            what="a count"))

    def logged(name: str, call: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            events.append(f"{name} ({ct.tasks.state('seized').status})")
            if name == "checkpoint":
                counts.append(count())
                if len(counts) == 1:  # CRIU could not seize the task: nothing dumped
                    (Path(kwargs["work_path"]) / "dump.log").write_text(SEIZE_LOG)
                    raise Internal("runc checkpoint seized: criu failed: type NOTIFY errno 0")
            return call(*args, **kwargs)
        return run

    count()
    for name in ("pause", "resume", "checkpoint"):
        monkeypatch.setattr(runc, name, logged(name, getattr(runc, name)))
    result = cps.checkpoint("seized", "seized:1")
    assert events == ["pause (running)", "checkpoint (paused)", "resume (paused)",
                      "pause (running)", "checkpoint (paused)", "resume (paused)"]
    assert counts[1] > counts[0]  # it ran between the attempts
    # and its rw layer was saved again: as it was when its memory was dumped
    index = validate_index(ct.root.path, result.index.digest)
    rw = blob_of(ct.root.path, index, MediaType.CHECKPOINT_RW)
    with tarfile.open(fileobj=io.BytesIO(rw), mode="r:gz") as tar:
        member = tar.extractfile("tmp/count")
        assert member is not None
        assert last_count(member.read().decode()) == counts[1]
    assert ct.tasks.state("seized").status == TaskStatus.RUNNING
    monkeypatch.undo()
    restored = cps.restore("seized:1", "seized2")
    assert restored.task.status == TaskStatus.RUNNING
    ct.remove("seized", force=True)
    ct.remove("seized2", force=True)


def test_restore_writes_bind_contents_only_where_asked_and_below_the_bind_root(
    services: tuple[ContainerService, ContainerService], tmp_path: Path
) -> None:
    """A checkpoint may come from a registry: the host paths its bind archives name
    are written only with ``binds``, and with a bind root nothing lands outside it —
    whatever destinations, sources or mounts the checkpoint was made to carry."""
    ct, cps = services
    data = tmp_path / "data"
    data.mkdir()
    (data / "marker").write_text("bind contents\n")
    ct.create(V1, "binder", options=make_options(args=["sh", "-c", COUNTER],
                                                 mounts=[BindMount(str(data), "/data")]))
    ct.start("binder", detach=True)
    cps.checkpoint("binder", "binds:1", exit=True, binds=True)
    content = ct.root.content()
    index = json.loads(read_document(content, ct.images.get("binds:1").target))

    def tampered(name: str, bind: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None) -> str:
        """A copy of the checkpoint with the bind archive's annotations and the
        config's entries replaced."""
        doc = json.loads(json.dumps(index))
        for d in doc["manifests"]:
            if d["mediaType"] == MediaType.CHECKPOINT_BINDS and bind:
                d["annotations"].update(bind)
            if d["mediaType"] == MediaType.CHECKPOINT_CONFIG and config:
                cfg = json.loads(read_document(content, Descriptor.from_json(d, "config")))
                cfg.update(config)
                raw = json.dumps(cfg).encode()
                d["digest"], d["size"] = put_document(content, raw), len(raw)
        raw = json.dumps(doc).encode()
        ct.images.images.put(Image(name=name, target=Descriptor(
            MediaType.OCI_INDEX, put_document(content, raw), len(raw))))
        return name

    bind_root = tmp_path / "bind-root"
    outside = tmp_path / "outside"
    escaped = tmp_path / "escaped"
    climb = "/" + "../" * 40 + str(escaped).lstrip("/")
    config_desc = next(d for d in index["manifests"]
                       if d["mediaType"] == MediaType.CHECKPOINT_CONFIG)
    options = json.loads(read_document(content, Descriptor.from_json(config_desc, "config"))
                         )["options"]
    cases: list[tuple[str, type[Exception], str, dict[str, Any]]] = [
        # neither --binds nor --bind-root: the recorded source is not written
        (tampered("plain:1"), FailedPrecondition, "--binds", {}),
        # an archive for a destination no mount has fell back to its recorded source
        (tampered("stray:1", bind={ANNOTATION_BIND_DESTINATION: "/elsewhere",
                                   ANNOTATION_BIND_SOURCE: str(outside)}),
         InvalidArgument, "no mount of the checkpoint has", {"bind_root": bind_root}),
        # a destination that climbs out of the bind root
        (tampered("climb:1", bind={ANNOTATION_BIND_DESTINATION: climb},
                  config={"options": {**options, "mounts": [
                      {**options["mounts"][0], "destination": climb}]}}),
         InvalidArgument, "would not stay under --bind-root", {"bind_root": bind_root}),
        # mounts that are not a list of objects (was an internal TypeError)
        (tampered("mangled:1", config={"options": {**options, "mounts": "/data"}}),
         InvalidArgument, "not a list of objects", {"bind_root": bind_root}),
        (tampered("both:1"), InvalidArgument, "not both",
         {"bind_root": bind_root, "binds": True}),
    ]
    shutil.rmtree(data)
    for i, (ref, error, words, kwargs) in enumerate(cases):
        with pytest.raises(error, match=words):
            cps.restore(ref, f"r{i}", **kwargs)
        with pytest.raises(NotFound):
            ct.get(f"r{i}")
        assert not data.exists() and not outside.exists() and not escaped.exists(), ref
        assert not bind_root.exists() or not any(bind_root.rglob("marker")), ref

    restored = cps.restore("binds:1", "binder2", binds=True)  # asked: back to the source
    assert restored.task.status == TaskStatus.RUNNING
    assert (data / "marker").read_text() == "bind contents\n"
    ct.remove("binder2", force=True)
    ct.remove("binder", force=True)


def _crafted(ct: ContainerService, name: str, change: dict[str, Any] | None = None,
             criu: bytes = b"not read") -> str:
    """Checkpoint image ``name`` made by hand, as a registry could serve it: V1's
    image, a CRIU blob of ``criu``'s bytes, a config with ``change`` applied."""
    content = ct.root.content()
    image = ct.images.get(V1)

    def put(raw: bytes) -> dict[str, Any]:
        return {"digest": put_document(content, raw), "size": len(raw)}

    config = {"version": 1, "id": "c", "image": V1, "image_target": image.target.to_json(),
              "snapshotter": "overlay", "runtime": {"name": RUNTIME}, "labels": {},
              "options": {"args": ["sh"]}, "spec": {"process": {"args": ["sh"]}},
              **(change or {})}
    index = json.dumps({
        "schemaVersion": 2, "mediaType": MediaType.OCI_INDEX,
        "annotations": {ANNOTATION_RUNTIME: RUNTIME},
        "manifests": [
            image.target.to_json(),
            {"mediaType": MediaType.CHECKPOINT_CRIU, **put(criu)},
            {"mediaType": MediaType.CHECKPOINT_CONFIG, **put(json.dumps(config).encode())},
        ]}).encode()
    ct.images.images.put(Image(name=name, target=Descriptor(
        MediaType.OCI_INDEX, put_document(content, index), len(index))))
    return name


def test_a_checkpoint_config_of_the_wrong_shape_is_invalid_argument(
    services: tuple[ContainerService, ContainerService],
) -> None:
    """A checkpoint may come from a registry: each part of its config a restore reads
    is checked first — one InvalidArgument, no container made (were TypeError,
    ValueError and AttributeError: internal errors, or runc's unmarshal error). The
    CRIU blob is a real image directory's tar, so a restore would get as far as
    the network attachment and runc."""
    ct, _ = services
    criu = _criu_tar(tarfile.TarInfo("dump.log"))
    wrong: dict[str, tuple[dict[str, Any], str]] = {
        "labels-list": ({"labels": ["a"]}, "labels are not an object of strings"),
        "labels-number": ({"labels": {"a": 1}}, "labels are not an object of strings"),
        "options-list": ({"options": [["args", "sh"]]}, "options are not an object"),
        "options-text": ({"options": "sh"}, "options are not an object"),
        "spec-list": ({"spec": [1]}, "runtime spec is not an object"),
        "annotations-list": ({"spec": {"annotations": [1]}}, "spec's annotations is not an"),
        # the parts the network attachment and runc read
        "linux-list": ({"spec": {"linux": [1]}}, "spec's linux is not an object"),
        "namespaces-text": ({"spec": {"linux": {"namespaces": "net"}}},
                            "spec's linux.namespaces is not a list of objects"),
        "spec-mounts": ({"spec": {"mounts": [1]}}, "spec's mounts is not a list of objects"),
        "hostname-number": ({"spec": {"hostname": 5}}, "spec's hostname is not a string"),
        "process-args": ({"spec": {"process": {"args": 5}}},
                         "spec's process.args is not a list of strings"),
        # hooks run on the host, outside any container (were passed on to runc)
        "hooks": ({"spec": {"process": {"args": ["sh"]}, "hooks": {"createRuntime": [
            {"path": "/bin/sh", "args": ["sh", "-c", "touch /tmp/hooked"]}]}}},
                  "runtime spec has hooks"),
        "image-number": ({"image": 5}, "'image' is not a string"),
        "args-number": ({"options": {"args": 5}}, "'args' is not a list of strings"),
        "env-text": ({"options": {"env": "A=1"}}, "'env' is not a list of strings"),
        "mount-source": ({"options": {"mounts": [{"source": 1, "destination": "/d"}]}},
                         "a bind mount of its options"),
        "mount-relative": ({"options": {"mounts": [{"source": "d", "destination": "/d"}]}},
                           "must be absolute"),
        "userns-text": ({"options": {"userns": "0:1000:1"}}, "bad userns option"),
        "cwd-number": ({"options": {"cwd": 5}}, "'cwd' is not a string"),
    }
    for name, (change, words) in wrong.items():
        with pytest.raises(InvalidArgument, match=words):
            ct.restore(_crafted(ct, f"bad/{name}:1", change, criu), f"r-{name}")
        with pytest.raises(NotFound):
            ct.get(f"r-{name}")


def _criu_tar(metadata: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """A CRIU image directory as a checkpoint carries it: an inventory and the
    metadata member given."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(tarfile.TarInfo("inventory.img"), io.BytesIO(b""))
        tar.addfile(metadata, io.BytesIO(data) if metadata.isfile() else None)
    return out.getvalue()


def test_checkpoint_metadata_cannot_steer_runc_or_hang_the_restore(
    services: tuple[ContainerService, ContainerService], tmp_path: Path,
) -> None:
    """The CRIU images' metadata record names the runc restore flags: only those a
    dump records are honoured (a ``--pid-file`` had runc write a host path), and
    a record that is a FIFO is refused, not waited on."""
    ct, _ = services
    victim = tmp_path / "victim"
    record = json.dumps({"options": ["--tcp-established", "--pid-file", str(victim)]}).encode()
    info = tarfile.TarInfo("lamina-checkpoint.json")
    info.size = len(record)
    fifo = tarfile.TarInfo("lamina-checkpoint.json")
    fifo.type = tarfile.FIFOTYPE
    cases = [(_crafted(ct, "steer:1", criu=_criu_tar(info, record)), "only --tcp-established"),
             (_crafted(ct, "fifo:1", criu=_criu_tar(fifo)), "not a regular file")]
    for ref, words in cases:
        raised = ended_within(60, lambda ref=ref: ct.restore(ref, "steered"), f"restore {ref}")
        assert isinstance(raised, InvalidArgument) and words in str(raised), raised
        with pytest.raises(NotFound):
            ct.get("steered")
        assert not victim.exists()


def test_a_failed_exiting_checkpoint_leaves_the_task_running(
    services: tuple[ContainerService, ContainerService], tmp_path: Path
) -> None:
    """``--exit``: the dump stops the task, so whatever can fail is saved before it.
    Here the bind mount's source is no directory any more when the checkpoint
    archives it, and then a file the layer format cannot carry is in the rw layer:
    FailedPrecondition both times, and the task still runs (it was dumped and
    stopped first, and the checkpoint then lost)."""
    ct, cps = services
    data = tmp_path / "data"
    data.mkdir()
    ct.create(V1, "keeper", options=make_options(args=["sh", "-c", COUNTER],
                                                 mounts=[BindMount(str(data), "/data")]))
    ct.start("keeper", detach=True)
    data.rename(tmp_path / "moved")
    os.mkfifo(data)
    with pytest.raises(FailedPrecondition, match="neither a directory nor a regular file"):
        cps.checkpoint("keeper", "keeper:1", exit=True, binds=True)
    assert ct.tasks.state("keeper").status == TaskStatus.RUNNING
    pid = ct.tasks.state("keeper").pid
    Path(f"/proc/{pid}/root/root/.wh.note").write_text("a user's file\n")
    with pytest.raises(FailedPrecondition, match=r"\.wh\.note"):
        cps.checkpoint("keeper", "keeper:1", exit=True)
    assert ct.tasks.state("keeper").status == TaskStatus.RUNNING
    with pytest.raises(NotFound):
        ct.images.get("keeper:1")
    ct.remove("keeper", force=True)


def test_an_exiting_checkpoint_that_fails_after_its_dump_restores_the_task(
    services: tuple[ContainerService, ContainerService], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--exit``: once the dump has stopped the task, storing the checkpoint can
    still fail (its CRIU images on a full disk); the task is then restored from
    that dump where it stopped — its count goes on, not from 1 — and the error
    says so."""
    ct, cps = services
    ct.create(V1, "phoenix", options=make_options(args=["sh", "-c", COUNTER]))
    ct.start("phoenix", detach=True)
    pid = ct.tasks.state("phoenix").pid
    wait_for(lambda: (n := last_count(Path(f"/proc/{pid}/root/tmp/count").read_text())) and n > 5,
             what="counting")

    def full(content: Any, src: Path, media_type: str, what: str) -> Descriptor:
        raise ResourceExhausted("no space left on device")

    monkeypatch.setattr(checkpoint_module, "_tar_tree", full)
    with pytest.raises(ResourceExhausted,
                       match=r"no space left on device \(the task was restored from its dump"):
        cps.checkpoint("phoenix", "phoenix:1", exit=True)
    monkeypatch.undo()
    with pytest.raises(NotFound):
        ct.images.get("phoenix:1")
    info = ct.tasks.state("phoenix")
    assert info.status == TaskStatus.RUNNING
    count = Path(f"/proc/{info.pid}/root/tmp/count")
    dumped = len(count.read_text().splitlines())
    wait_for(lambda: len(count.read_text().splitlines()) > dumped + 5, what="counting on")
    counts = [int(n) for n in count.read_text().split()]
    assert counts == list(range(1, len(counts) + 1))  # one run, never started again
    assert not is_kept(ct.tasks, "phoenix")
    assert list((ct.root.path / "checkpoints").iterdir()) == []
    # and it can still be checkpointed
    cps.checkpoint("phoenix", "phoenix:2", exit=True)
    ct.remove("phoenix", force=True)
