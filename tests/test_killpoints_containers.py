"""SIGKILL ``container upgrade``, ``rollback``, ``prune-revisions`` and ``checkpoint`` at
every crash point they pass, then recover the way a user does and lose nothing.

Each operation runs as the ``lamina`` command on a copy of a prepared root, with
``LAMINA_CRASH_AFTER=N`` for N = 1, 2, ... until it completes without being killed.
After a kill the user's recovery is all that runs: ``lamina check --repair`` and
``lamina gc``; then ``lamina check`` must say ``consistent``, the container must hold
what it held before (the file its task wrote, on an image that matches its
revision: nothing acknowledged is lost, and the operation happened wholly or not at
all), and running the operation again must finish it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import mounts_under, require_root_user, require_tools
from imagefactory import (
    File,
    ImageConfig,
    build_oci_layout,
    layer_from_dir,
    layer_from_entries,
    minimal_rootfs,
)

V1 = "kill/app:v1"
V2 = "kill/app:v2"
BINARIES = ("sh", "echo", "cat", "sleep", "true")
IDLE = "trap 'exit 0' TERM; while true; do sleep 0.1; done"
MAX_POINTS = 200
WORKERS = 2


def lamina(root: Path, *args: str, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300, check=False,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"lamina {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


@dataclass(frozen=True)
class Seen:
    """What a user sees of container ``app``: its image, its revisions and its files."""

    image: str
    revisions: tuple[str, ...]
    mine: str
    version: str


def look(root: Path, mnt: Path) -> Seen:
    info = json.loads(lamina(root, "container", "info", "app").stdout)
    revs = json.loads(lamina(root, "container", "revisions", "--json", "app").stdout)
    mnt.mkdir(exist_ok=True)
    lamina(root, "snapshot", "mount", str(mnt), info["snapshot_key"])
    try:
        mine = (mnt / "root" / "mine").read_text()
        version = (mnt / "etc" / "version").read_text() if (mnt / "etc" / "version").exists() \
            else ""
    finally:
        lamina(root, "snapshot", "unmount", str(mnt))
    return Seen(info["image"], tuple(r["key"] for r in revs), mine, version)


def recover(root: Path) -> None:
    """What a user runs after a crash, and what they must then see."""
    lamina(root, "check", "--repair", check=False)
    lamina(root, "gc")
    out = lamina(root, "check", check=False)
    assert out.stdout.strip() == "consistent", out.stdout + out.stderr


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Roots to copy: container ``app`` on V1 holding /root/mine (``v1``), upgraded to
    V2 once (``v2``) and twice (``v2x2``, three revisions); and the images' OCI
    layout (``layout``)."""
    require_root_user()
    require_tools("runc")
    base = tmp_path_factory.mktemp("kill-containers")
    rootfs = minimal_rootfs(base / "rootfs", BINARIES)
    (rootfs / "root").mkdir(exist_ok=True)
    lower = layer_from_dir(rootfs, base / "blobs")
    extra = layer_from_entries([File("etc/version", b"v2\n")], base / "blobs")
    cfg = ImageConfig(cmd=["sh", "-c", IDLE])
    build_oci_layout(base / "oci", [lower], ref_name=V1, config=cfg)
    build_oci_layout(base / "oci", [lower, extra], ref_name=V2, config=cfg)
    out: dict[str, Path] = {}
    root = base / "v1"
    lamina(root, "image", "import", str(base / "oci"))
    lamina(root, "container", "create", V1, "app", "sh", "-c", "echo kept > /root/mine")
    lamina(root, "task", "start", "app")  # runs to its end: the write is in the rw layer
    lamina(root, "task", "delete", "app", check=False)
    out["v1"] = root
    for name, src in (("v2", "v1"), ("v2x2", "v2")):
        shutil.copytree(out[src], base / name, symlinks=True)
        lamina(base / name, "container", "upgrade", "app", V2)
        out[name] = base / name
    for r in out.values():
        assert not mounts_under(r), r
    out["layout"] = base / "oci"
    yield out


@dataclass
class Tally:
    kills: int = 0
    points: set[str] = field(default_factory=set)


def _kill_at(template: Path, work: Path, op: tuple[str, ...], n: int,
             settle: Callable[[Path, Seen, Seen], None], before: Seen) -> str | None:
    """Kill ``op`` at its n-th crash point on a copy of ``template``, recover as a user
    and ``settle``: the point's name, or None when ``op`` completed first."""
    root = work / f"n{n}"
    shutil.copytree(template, root, symlinks=True)
    log = work / f"n{n}.log"
    proc = lamina(root, *op, check=False,
                  env={"LAMINA_CRASH_AFTER": str(n), "LAMINA_CRASH_LOG": str(log)})
    if proc.returncode == 0:
        assert not log.exists()
        shutil.rmtree(root)
        return None
    assert proc.returncode == -9, (n, proc.returncode, proc.stderr)
    point = log.read_text().split()[1]
    recover(root)
    settle(root, before, look(root, work / f"mnt{n}"))
    assert not mounts_under(root), (n, mounts_under(root))
    shutil.rmtree(root)
    return point


def sweep(template: Path, work: Path, op: tuple[str, ...],
          settle: Callable[[Path, Seen, Seen], None]) -> Tally:
    """Kill ``op`` at each of its crash points in turn (two at a time, each on its own
    copy of ``template``) until it completes without being killed."""
    before = look(template, work / "mnt-template")
    tally = Tally()
    with ThreadPoolExecutor(WORKERS) as pool:
        for first in range(1, MAX_POINTS + 1, WORKERS):
            batch = [pool.submit(_kill_at, template, work, op, n, settle, before)
                     for n in range(first, first + WORKERS)]
            points = [f.result() for f in batch]
            done = [p for p in points if p is not None]
            tally.kills += len(done)
            tally.points |= set(done)
            if len(done) < len(points):
                assert points[len(done):] == [None] * (len(points) - len(done)), points
                return tally
    pytest.fail(f"{' '.join(op)} passed more than {MAX_POINTS} crash points")


def _done_upgrade(root: Path, before: Seen, after: Seen) -> None:
    assert after.mine == "kept\n"
    assert (after.image, after.version) in ((V1, ""), (V2, "v2\n"))
    if after.image == V1:  # not done: the user runs it again
        lamina(root, "container", "upgrade", "app", V2)
        after = look(root, root.parent / f"{root.name}-mnt-again")
    assert (after.image, after.mine, after.version) == (V2, "kept\n", "v2\n")
    recover(root)


def test_kill_upgrade(templates: dict[str, Path], tmp_root: Path) -> None:
    tally = sweep(templates["v1"], tmp_root, ("container", "upgrade", "app", V2),
                  _done_upgrade)
    print(f"\nupgrade: {tally.kills} kill points, {len(tally.points)} distinct")
    assert tally.kills >= 10 and "container.update.committed" in tally.points


def _done_rollback(root: Path, before: Seen, after: Seen) -> None:
    assert after.mine == "kept\n" and after.revisions == before.revisions
    assert (after.image, after.version) in ((V1, ""), (V2, "v2\n"))
    if after.image == V2:
        lamina(root, "container", "rollback", "app")
        after = look(root, root.parent / f"{root.name}-mnt-again")
    assert (after.image, after.mine, after.version) == (V1, "kept\n", "")


def test_kill_rollback(templates: dict[str, Path], tmp_root: Path) -> None:
    tally = sweep(templates["v2"], tmp_root, ("container", "rollback", "app"), _done_rollback)
    print(f"\nrollback: {tally.kills} kill points")
    assert tally.kills >= 1 and tally.points == {"container.update.committed"}


def _done_prune(root: Path, before: Seen, after: Seen) -> None:
    assert (after.image, after.mine, after.version) == (V2, "kept\n", "v2\n")
    current = before.revisions[-1]
    assert current in after.revisions and set(after.revisions) <= set(before.revisions)
    lamina(root, "container", "prune-revisions", "app", "--keep", "1")
    revs: list[dict[str, Any]] = json.loads(
        lamina(root, "container", "revisions", "--json", "app").stdout)
    assert [(r["key"], r["previous"], r["current"]) for r in revs] == [(current, "", True)]
    recover(root)


def test_kill_prune_revisions(templates: dict[str, Path], tmp_root: Path) -> None:
    tally = sweep(templates["v2x2"], tmp_root,
                  ("container", "prune-revisions", "app", "--keep", "1"), _done_prune)
    print(f"\nprune-revisions: {tally.kills} kill points")
    assert tally.kills >= 4


# ------------------------------------------------------------------------- checkpoint

CKPT = "kill/ckpt:1"


def _running_app(root: Path, layout: Path) -> None:
    """``root`` with the images and container ``app`` running, /root/mine written."""
    lamina(root, "image", "import", str(layout))
    lamina(root, "run", "-d", "--name", "app", V1, "sh", "-c", IDLE)
    lamina(root, "task", "exec", "app", "sh", "-c", "echo kept > /root/mine")


def _task(root: Path) -> dict[str, Any] | None:
    tasks = {t["id"]: t for t in json.loads(lamina(root, "task", "ls", "--json").stdout)}
    return tasks.get("app")


def _end_tasks(root: Path) -> None:
    for cid in ("app", "back"):
        lamina(root, "task", "delete", "--force", cid, check=False)


def _checkpoint_at(layout: Path, work: Path, tag: str, crash: dict[str, str],
                   flags: tuple[str, ...]) -> str | None:
    """Kill ``container checkpoint [--exit] app`` where ``crash`` says; recover as a
    user; the task must still run with what it wrote — or, once an exiting
    checkpoint is stored, the checkpoint must hold it — and checkpointing again
    must work. The point it died at, or None when it completed."""
    root = work / f"c-{tag}"
    try:
        _running_app(root, layout)
        log = work / f"c-{tag}.log"
        proc = lamina(root, "container", "checkpoint", *flags, "app", CKPT, check=False,
                      env={**crash, "LAMINA_CRASH_LOG": str(log)})
        if proc.returncode == 0:
            assert not log.exists()
            return None
        assert proc.returncode == -9, (tag, proc.returncode, proc.stderr)
        point = log.read_text().split()[1]
        # every crash point of a checkpoint is inside its work directory's life
        seen = lamina(root, "check", check=False)
        assert seen.returncode == 5 and "problem: [checkpoint.interrupted]" in seen.stdout, (
            tag, point, seen.stdout)
        recover(root)
        task = _task(root)
        if CKPT in lamina(root, "images", "--names").stdout and "--exit" in flags:
            # done wholly: the dump stopped the task, the checkpoint holds it
            assert task is not None and task["status"] == "stopped", (tag, point, task)
            lamina(root, "container", "restore", CKPT, "back")
            mine = lamina(root, "task", "exec", "back", "cat", "/root/mine").stdout
            assert mine == "kept\n", (tag, point)
        else:
            assert task is not None and task["status"] == "running", (tag, point, task)
            mine = lamina(root, "task", "exec", "app", "cat", "/root/mine").stdout
            assert mine == "kept\n", (tag, point)
        if CKPT not in lamina(root, "images", "--names").stdout:  # not done: run it again
            lamina(root, "container", "checkpoint", *flags, "app", CKPT)
        assert json.loads(lamina(root, "checkpoint", "inspect", CKPT).stdout), (tag, point)
        out = lamina(root, "check", "--deep", check=False)
        assert out.stdout.strip() == "consistent", (tag, point, out.stdout)
        return point
    finally:
        _end_tasks(root)
        shutil.rmtree(root, ignore_errors=True)


def _checkpoint_points(layout: Path, work: Path,
                       flags: tuple[str, ...]) -> list[tuple[int, str]]:
    """The crash points one checkpoint passes, in order (a traced run that completes)."""
    root = work / "traced"
    trace = work / "trace"
    try:
        _running_app(root, layout)
        lamina(root, "container", "checkpoint", *flags, "app", CKPT,
               env={"LAMINA_CRASH_TRACE": str(trace)})
    finally:
        _end_tasks(root)
        shutil.rmtree(root, ignore_errors=True)
    rows = [line.split() for line in trace.read_text().splitlines()]
    return [(int(n), name) for n, name in rows]


@pytest.mark.parametrize("flags", [(), ("--exit",)], ids=["leave-running", "exit"])
def test_kill_checkpoint(templates: dict[str, Path], tmp_root: Path,
                         flags: tuple[str, ...]) -> None:
    """A checkpoint (CRIU dump of a running task, paused meanwhile; with ``--exit``
    the dump stops it) killed at the first pass of each of its crash points
    (``LAMINA_KILL_FULL=1``: at every pass)."""
    require_tools("criu")
    passed = _checkpoint_points(templates["layout"], tmp_root, flags)
    names = list(dict.fromkeys(name for _, name in passed))
    if os.environ.get("LAMINA_KILL_FULL"):
        runs = {f"n{n}": {"LAMINA_CRASH_AFTER": str(n)} for n, _ in passed}
    else:
        # the first pass of each point before the dump and after it: the same
        # content points store the rw layer before and CRIU's images after
        dumped = next(n for n, name in passed if name == "checkpoint.dumped")
        firsts: dict[str, int] = {}
        for n, name in passed:
            firsts.setdefault(f"{name}{'@dumped' if n > dumped else ''}", n)
        runs = {tag: {"LAMINA_CRASH_AFTER": str(n)} for tag, n in firsts.items()}
    with ThreadPoolExecutor(WORKERS) as pool:
        died = dict(zip(runs, pool.map(
            lambda tag: _checkpoint_at(templates["layout"], tmp_root, tag, runs[tag], flags),
            runs), strict=True))
    print(f"\ncheckpoint {' '.join(flags)}: {len(passed)} crash points passed "
          f"({len(names)} distinct); killed at {len(died)}")
    assert all(point is not None for point in died.values()), died
    assert {p for p in died.values() if p} == set(names)
    assert len(names) >= 8 and any(n.startswith("content.") for n in names)
