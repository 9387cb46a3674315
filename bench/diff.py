"""Diff of a small change on a big snapshot: ``lamina snapshot diff`` vs ``ctr snapshots diff``.

Both sides get the same tree: a committed snapshot of 5,000 files (100
directories of 50 files of 4 KiB) and an active snapshot on it where 10
files changed through the overlay mount (5 modified, 3 created, 2 deleted).
The diff is the gzip layer of the active snapshot against its parent, written
to the content store and streamed to a file, as ``ctr snapshots diff`` does.
lamina walks only the overlay upperdir; containerd 1.6 mounts both sides
and compares them. Wall time of each command; ratio target <= 0.2.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Ctx,
    Row,
    Skip,
    lamina_cli,
    lamina_has_command,
    paired,
    run_cmd,
    time_cmd,
)
from bench.peer import close_channel, containerd, require_containerd

NAME = "diff"
DIRS = 100
PER_DIR = 50
FILE_SIZE = 4096

# Used while `lamina snapshot diff` does not exist: the same work through the library.
_FALLBACK = """\
import shutil, sys
from lamina.differ import create_diff
from lamina.metadata.root import Root
root = Root(sys.argv[1])
sn = root.snapshotter("overlay")
out = create_diff(sn, root.content(), sys.argv[2])
with root.content().reader(out.descriptor.digest) as r:
    shutil.copyfileobj(r, sys.stdout.buffer, 1 << 20)
"""


def _fill(target: Path) -> None:
    block = os.urandom(FILE_SIZE)
    for d in range(DIRS):
        sub = target / f"d{d:03d}"
        sub.mkdir()
        for f in range(PER_DIR):
            (sub / f"f{f:03d}").write_bytes(block[f:] + block[:f])


def _change(target: Path) -> None:
    for i in range(5):
        (target / f"d{i * 17:03d}" / "f007").write_bytes(b"modified %d\n" % i)
    for i in range(3):
        (target / f"d{i * 31:03d}" / f"new{i}").write_bytes(b"new %d\n" % i)
    for i in range(2):
        (target / f"d{i * 41 + 3:03d}" / "f011").unlink()


def _build(sn: Any, mnt: Path) -> None:
    """base (5,000 files, committed) and work (10 changes on base, active)."""
    from lamina.mounts.mount import mount_all, unmount_all

    mount_all(sn.prepare("base-active", ""), mnt)
    try:
        _fill(mnt)
    finally:
        unmount_all(mnt)
    sn.commit("base", "base-active")
    mount_all(sn.prepare("work", "base"), mnt)
    try:
        _change(mnt)
    finally:
        unmount_all(mnt)


def _has_output_option() -> bool:
    proc = subprocess.run([*lamina_cli(), "snapshot", "diff", "--help"], capture_output=True,
                          text=True, check=False)
    return "--output" in proc.stdout


def _time_to_file(cmd: list[str], out: Path) -> float:
    """Run ``cmd`` with stdout to ``out`` (unless it writes ``out`` itself)."""
    writes_itself = str(out) in cmd
    with open(os.devnull if writes_itself else out, "wb") as f:
        t0 = time.perf_counter()
        run_cmd(cmd, stdout=f)
        dt = time.perf_counter() - t0
    if out.stat().st_size < 100:
        raise RuntimeError(f"{' '.join(cmd)} wrote only {out.stat().st_size} bytes")
    return dt


def run(ctx: Ctx) -> list[Row]:
    require_containerd()
    if os.geteuid() != 0:
        raise Skip("needs root (mounts)")
    try:
        from lamina.metadata.root import Root
    except ImportError as exc:
        raise Skip(f"lamina.metadata.root missing: {exc}") from exc
    if lamina_has_command("snapshot", "diff"):
        how = "lamina snapshot diff"
    else:
        try:
            import lamina.differ  # noqa: F401
        except ImportError as exc:
            raise Skip("neither `lamina snapshot diff` nor lamina.differ exist") from exc
        how = "lamina.differ.create_diff in a subprocess (no `lamina snapshot diff` yet)"

    reps = ctx.pick(9, 3)
    with ctx.tempdir("diff-") as d, containerd(d) as ctd:
        mnt = d / "mnt"
        mnt.mkdir()
        lroot = d / "lamina"
        root = Root(lroot)
        try:
            _build(root.snapshotter("overlay"), mnt)
        finally:
            root.close()
        peer_sn = ctd.snapshotter("overlayfs")
        try:
            _build(peer_sn, mnt)
        finally:
            close_channel(peer_sn)

        out = Path(tempfile.mkdtemp(dir=d))
        if how.startswith("lamina snapshot diff"):
            lam_cmd = [*lamina_cli(), "--root", str(lroot), "snapshot", "diff", "work"]
            if _has_output_option():  # else the layer goes to stdout, as with ctr
                lam_cmd[-1:-1] = ["--output", str(out / "lamina.tgz")]
                how += " --output FILE"
        else:
            lam_cmd = [sys.executable, "-c", _FALLBACK, str(lroot), "work"]
        peer_cmd = ctd.ctr("snapshots", "--snapshotter", "overlayfs", "diff", "work")
        _time_to_file(lam_cmd, out / "lamina.tgz")
        _time_to_file(peer_cmd, out / "ctr.tgz")
        sizes = _layer_members(out / "lamina.tgz"), _layer_members(out / "ctr.tgz")
        if sizes[0] != sizes[1]:
            raise RuntimeError(f"layers differ: lamina has {sizes[0]} members, ctr {sizes[1]}")
        p = paired(lambda i: _time_to_file(lam_cmd, out / "lamina.tgz"),
                   lambda i: _time_to_file(peer_cmd, out / "ctr.tgz"), reps)
        floor = min(time_cmd([sys.executable, "-c", "pass"]) for _ in range(3))
        root = Root(lroot)
        try:
            sn = root.snapshotter("overlay")
            content = root.content()
            q = paired(lambda i: _in_process(sn, content, out / "inproc.tgz"),
                       lambda i: _time_to_file(peer_cmd, out / "ctr.tgz"), reps)
        finally:
            root.close()
    title = f"diff: 10 changes on {DIRS * PER_DIR:,} files"
    return [
        p.row(title, "s", "ctr snapshots diff (overlayfs)", target="<= 0.2", limit=0.2,
              note=f"{how}; layer members lamina/ctr: {sizes[0]}/{sizes[1]}; "
                   f"`python3 -c pass` alone takes {floor:.3f}s here"),
        q.row(f"{title}, lamina in-process", "s", "ctr snapshots diff (overlayfs)",
              note="informational: lamina.differ.create_diff + read blob, no interpreter "
                   "start; peer still a process"),
    ]


def _in_process(sn: Any, content: Any, out: Path) -> float:
    import shutil

    from lamina.differ import create_diff

    t0 = time.perf_counter()
    res = create_diff(sn, content, "work")
    with content.reader(res.descriptor.digest) as r, open(out, "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
    dt = time.perf_counter() - t0
    content.delete(res.descriptor.digest)
    return dt


def _layer_members(path: Path) -> int:
    proc = subprocess.run(["tar", "-tzf", str(path)], capture_output=True, check=False)
    return len(proc.stdout.splitlines())
