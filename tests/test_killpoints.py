"""SIGKILL image import/unpack, content ingest, GC and snapshot operations at every
crash point, then check that a restart finds a consistent root.

Each operation runs in a child process with ``LAMINA_CRASH_AFTER=N`` for
N = 1, 2, ... until the child completes without being killed (``LAMINA_CRASH_LOG``
says where it died). After every kill the root is recovered as a restart would
(:func:`consistency.recover`: leftover mounts, content cleanup, snapshot
cleanup), checked (:func:`consistency.problems`), the interrupted operation is
run again and must succeed, and its result is verified (an imported image is
mounted and its files compared) before a final strict check.

A kill point is one (operation, N) pair: the N-th crash point the operation
passes, named by ``crash.point``. The summary also counts distinct
(operation, point name) pairs. Both must reach 100 over the file.

Independent N run in parallel (each on its own root) to keep the file fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import consistency
import imagefactory as f
import pytest

from lamina.content.local import LocalContentStore
from lamina.errors import AlreadyExists, NotFound
from lamina.gc import collect
from lamina.images.identity import chain_ids
from lamina.images.service import ImageService
from lamina.images.store import ImageStore
from lamina.mount import temp_mount
from lamina.root import SNAPSHOTTERS, Root
from lamina.snapshots.base import DirectorySnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

WORKERS = max(2, min(4, (os.cpu_count() or 2)))
MAX_POINTS = 400
MIN_KILL_POINTS = 100

IMAGE = "kp:latest"
IMAGE2 = "kp2:latest"
DOCKER_IMAGE = "docker.io/library/kpd:latest"


# --------------------------------------------------------------------------- tally


@dataclass
class Kill:
    op: str
    n: int
    point: str  # "" when the run completed (it passed n - 1 points)
    repaired: consistency.Repairs

    def leftovers(self, baseline: consistency.Repairs | None) -> dict[str, int]:
        """What the kill left for recovery and GC beyond what a completed run leaves
        (a docker archive's untyped files are unreferenced blobs even then)."""
        base = baseline.kinds() if baseline is not None else {}
        out = {k: v - base.get(k, 0) for k, v in self.repaired.kinds().items()}
        return {k: v for k, v in out.items() if v > 0}


@dataclass
class _Tally:
    kills: list[Kill] = field(default_factory=list)
    completed: dict[str, int] = field(default_factory=dict)  # op -> points passed
    baseline: dict[str, consistency.Repairs] = field(default_factory=dict)  # op -> completed run
    seconds: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


TALLY = _Tally()
ALL_OPS: list[str] = []  # filled below, for the final summary


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Images:
    tar: Path  # OCI layout tar with IMAGE
    tar2: Path  # OCI layout tar with IMAGE and IMAGE2
    docker: Path  # `docker save` tar of IMAGE's top two layers, as DOCKER_IMAGE
    diff_ids: list[str]
    docker_diff_ids: list[str]
    diff_ids2: list[str]
    only2_blobs: frozenset[str]  # blobs IMAGE2 has and IMAGE has not


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    w = tmp_path_factory.mktemp("kp-images")
    base = f.minimal_layer(w)
    l1 = f.layer_from_entries([
        f.Dir("etc"), f.File("etc/hello", "hello\n"),
        f.Dir("data"), f.File("data/a", b"a" * 3000), f.Symlink("data/ln", "a"),
        f.Dir("opq"), f.File("opq/x", "x"),
    ], w)
    l2 = f.layer_from_entries([
        f.Whiteout("data/a"), f.File("etc/hello", "bye\n"),
        f.Hardlink("data/h", "etc/hello"), f.Opaque("opq"), f.File("opq/y", "y"),
    ], w)
    l3 = f.layer_from_entries([f.Dir("etc"), f.File("etc/other", "two\n")], w)
    ref = f.build_oci_layout(w / "layout", [base, l1, l2], ref_name=IMAGE)
    tar = f.as_tar(w / "layout", w / "image.tar")
    ref2 = f.build_oci_layout(w / "layout", [base, l3], ref_name=IMAGE2)
    only2 = {ref2.manifest_digest, ref2.config_digest, l3.digest}
    docker = f.build_docker_save(w / "docker.tar", [l1, l2], "kpd:latest")  # small: no base
    return Images(tar, f.as_tar(w / "layout", w / "images.tar"), docker.path,
                  ref.diff_ids, list(docker.diff_ids), ref2.diff_ids, frozenset(only2))


def _verify_image(root: Path, kind: str, im: Images, name: str = IMAGE) -> None:
    """Image ``name`` (IMAGE or DOCKER_IMAGE) is present, unpacked into ``kind``, and
    mounts with the expected files."""
    r = Root(root)
    svc = ImageService(r, snapshotter=kind)
    try:
        svc.get(name)
        top = chain_ids(im.diff_ids if name == IMAGE else im.docker_diff_ids)[-1]
        assert r.snapshotter(kind).stat(top).name == top
        mnt = root / f"check-{kind}"
        svc.mount(name, mnt)
        try:
            assert (mnt / "bin/sh").is_file() or name != IMAGE
            assert (mnt / "etc/hello").read_text() == "bye\n"
            assert not (mnt / "data/a").exists()
            assert os.readlink(mnt / "data/ln") == "a"
            assert os.stat(mnt / "data/h").st_ino == os.stat(mnt / "etc/hello").st_ino
            assert sorted(os.listdir(mnt / "opq")) == ["y"]
        finally:
            svc.unmount(mnt)
            mnt.rmdir()
    finally:
        svc.close()
        r.close()


# --------------------------------------------------------------------------- driver


@dataclass
class Op:
    """One operation to kill: ``argv`` runs it in a child (``{root}`` substituted)."""

    name: str
    setup: Callable[[Path], None]
    argv: list[str]
    finish: Callable[[Path], consistency.Repairs | None]  # run it again, verify the result
    keep_ingests: bool = False  # recovery keeps resumable ingests (finish resumes them)


def _child_env(n: int, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LAMINA_CRASH_AT", None)
    env["LAMINA_CRASH_AFTER"] = str(n)
    env["LAMINA_CRASH_LOG"] = str(log)
    return env


def _discard(root: Path) -> None:
    if consistency.mounts_under(root):
        consistency.recover(root)
    shutil.rmtree(root, ignore_errors=True)


def _one(op: Op, work: Path, n: int) -> Kill:
    """Kill ``op`` at its n-th point and check the aftermath (the same checks when
    the run completed instead: then the Kill's point is "")."""
    root = work / f"n{n}"
    log = work / f"n{n}.log"
    op.setup(root)
    argv = [a.replace("{root}", str(root)) for a in op.argv]
    proc = subprocess.run(argv, env=_child_env(n, log), capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL)
    try:
        if proc.returncode == 0:
            point = ""
        elif proc.returncode == -signal.SIGKILL:
            count, point = log.read_text().split()
            assert int(count) == n, f"crash log says point {count}, expected {n}"
        else:
            raise AssertionError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
        repairs = consistency.recover(root, drop_ingests=not op.keep_ingests)
        bad = consistency.problems(root, allow_ingests=op.keep_ingests)
        assert not bad, f"inconsistent after recovery: {bad}"
        more = op.finish(root)
        if more is not None:
            repairs.merge(more)
        repairs.merge(consistency.recover(root))
        bad = consistency.problems(root)
        assert not bad, f"inconsistent after re-running the operation: {bad}"
        return Kill(op.name, n, point, repairs)
    except BaseException as exc:
        where = log.read_text().strip() if log.exists() else "?"
        raise AssertionError(f"{op.name}: killed at point {n} ({where}): {exc}") from exc
    finally:
        _discard(root)


def _sweep(op: Op, work: Path) -> None:
    """Kill ``op`` at points 1, 2, ... (in parallel) until a run completes."""
    start = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    kills: list[Kill] = []
    errors: list[str] = []
    done_at: int | None = None
    baseline: consistency.Repairs | None = None
    next_n = 1
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        running: dict[Future[Kill], int] = {}
        while True:
            while len(running) < WORKERS and done_at is None and next_n <= MAX_POINTS:
                running[pool.submit(_one, op, work, next_n)] = next_n
                next_n += 1
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                n = running.pop(fut)
                try:
                    kill = fut.result()
                except AssertionError as exc:
                    errors.append(str(exc))
                    continue
                if not kill.point:
                    if done_at is None or n < done_at:
                        done_at, baseline = n, kill.repaired
                else:
                    kills.append(kill)
    with TALLY.lock:
        TALLY.kills += kills
        TALLY.completed[op.name] = (done_at or 0) - 1
        if baseline is not None:
            TALLY.baseline[op.name] = baseline
        TALLY.seconds[op.name] = time.monotonic() - start
    assert not errors, "\n".join(sorted(errors))
    assert done_at is not None, f"{op.name}: still being killed after {MAX_POINTS} points"
    assert len(kills) >= 2, f"{op.name}: passed fewer crash points than expected"


# --------------------------------------------------------------------------- (a) import

LAMINA = [sys.executable, "-m", "lamina", "--root", "{root}"]


@pytest.mark.parametrize(("kind", "fmt"), [("overlay", "oci"), ("native", "oci"),
                                           ("overlay", "docker")])
def test_kill_image_import(kind: str, fmt: str, images: Images, tmp_root: Path) -> None:
    tar, name = (images.tar, IMAGE) if fmt == "oci" else (images.docker, DOCKER_IMAGE)

    def finish(root: Path) -> consistency.Repairs:
        r = Root(root)
        svc = ImageService(r, snapshotter=kind)
        try:
            assert [i.name for i in svc.import_(tar)] == [name]
        finally:
            svc.close()
            r.close()
        _verify_image(root, kind, images, name)
        # once the killed process's leases expire, GC takes what it left unreferenced
        collected = consistency.recover(root, gc=True, expire_leases=True)
        _verify_image(root, kind, images, name)
        return collected

    op = Op(f"import-{fmt}-{kind}", lambda root: root.mkdir(),
            [*LAMINA, "--snapshotter", kind, "image", "import", str(tar)], finish)
    _sweep(op, tmp_root)


# --------------------------------------------------------------------------- (b) ingest

REF = "killpoint-ingest"
_INGEST = textwrap.dedent(
    """
    import hashlib, sys
    from lamina.content.local import LocalContentStore
    data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(6000))
    store = LocalContentStore(sys.argv[1])
    w = store.writer(sys.argv[2], total=len(data), expected=sys.argv[3])
    for i in range(0, len(data), 64000):
        w.write(data[i:i + 64000])
    w.commit(len(data), sys.argv[3], labels={"killpoint": "yes"})
    store.close()
    """
)
_DATA = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(6000))
_DIGEST = f"sha256:{hashlib.sha256(_DATA).hexdigest()}"


def _resume_ingest(root: Path) -> None:
    """What a client does after its writer died: resume the ref, or find the blob there."""
    store = LocalContentStore(root / "content")
    try:
        try:
            w = store.writer(REF, total=len(_DATA), expected=_DIGEST)
        except AlreadyExists:
            pass
        else:
            assert w.offset <= len(_DATA)
            w.write(_DATA[w.offset:])
            with contextlib.suppress(AlreadyExists):
                w.commit(len(_DATA), _DIGEST, labels={"killpoint": "yes"})
        info = store.verify(_DIGEST)
        assert info.size == len(_DATA)
        # a row cleanup restored (crash between the rename and the metadata commit)
        # has no labels; otherwise the commit's labels are there
        assert info.labels in ({"killpoint": "yes"}, {})
        assert store.read_at(_DIGEST, 0, len(_DATA)) == _DATA
    finally:
        store.close()


def test_kill_content_ingest(tmp_root: Path) -> None:
    op = Op("content-ingest", lambda root: root.mkdir(),
            [sys.executable, "-c", _INGEST, "{root}/content", REF, _DIGEST],
            _resume_ingest, keep_ingests=True)
    _sweep(op, tmp_root)


def test_kill_content_rm(tmp_root: Path) -> None:
    def setup(root: Path) -> None:
        with LocalContentStore(root / "content") as store:
            store.add(_DATA, expected=_DIGEST)
            store.add(b"kept", labels={"k": "v"})

    def finish(root: Path) -> None:
        with LocalContentStore(root / "content") as store:
            with contextlib.suppress(NotFound):
                store.delete(_DIGEST)
            assert [i.labels for i in store.walk()] == [{"k": "v"}]
            assert not store.blob_path(_DIGEST).exists()

    op = Op("content-rm", setup, [*LAMINA, "content", "rm", _DIGEST], finish)
    _sweep(op, tmp_root)


# --------------------------------------------------------------------------- (c) gc


@pytest.fixture(scope="module")
def gc_template(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with IMAGE and IMAGE2 imported and unpacked into overlay and native."""
    root = tmp_path_factory.mktemp("kp-gc") / "root"
    r = Root(root)
    for kind in ("overlay", "native"):
        svc = ImageService(r, snapshotter=kind)
        try:
            if kind == "overlay":
                svc.import_(images.tar2)
            else:
                svc.unpack(IMAGE)
                svc.unpack(IMAGE2)
        finally:
            svc.close()
    r.close()
    assert consistency.problems(root) == []
    return root


def test_kill_gc_after_image_remove(images: Images, gc_template: Path, tmp_root: Path) -> None:
    only2_chain = chain_ids(images.diff_ids2)[-1]

    def setup(root: Path) -> None:
        subprocess.run(["cp", "-a", str(gc_template), str(root)], check=True)

    def finish(root: Path) -> None:
        r = Root(root)
        try:
            store = ImageStore(r.metadata_path)
            with contextlib.suppress(NotFound):
                store.delete(IMAGE2)
            store.close()
            collect(r)
            assert collect(r, dry_run=True).bytes_freed == 0
            have = {i.digest for i in r.content().walk()}
            assert not (have & images.only2_blobs), "IMAGE2's blobs survived the collection"
            for kind in ("overlay", "native"):
                names = {i.name for i in r.snapshotter(kind).walk()}
                assert only2_chain not in names
                assert set(chain_ids(images.diff_ids)) <= names
        finally:
            r.close()
        for kind in ("overlay", "native"):
            _verify_image(root, kind, images)

    op = Op("gc-after-image-rm", setup,
            [*LAMINA, "image", "rm", "--sync", IMAGE2], finish)
    _sweep(op, tmp_root)


# --------------------------------------------------------------------------- (d) snapshots

SNAPSHOT_SCENARIOS = {
    "prepare": ("", "sn.prepare('child', 'base', labels={'l': '1'})"),
    "view": ("", "sn.view('v', 'base')"),
    "commit": ("sn.prepare('child', 'base')", "sn.commit('done', 'child')"),
    "remove-active": ("sn.prepare('child', 'base')", "sn.remove('child')"),
    "remove-committed": ("sn.prepare('child', 'base'); sn.commit('done', 'child')",
                         "sn.remove('done')"),
}
_SNAP_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from lamina.root import SNAPSHOTTERS
    sn = SNAPSHOTTERS[sys.argv[1]](Path(sys.argv[2]))
    exec(sys.argv[3])
    sn.close()
    """
)


@pytest.mark.parametrize("kind", ["overlay", "native"])
@pytest.mark.parametrize("scenario", sorted(SNAPSHOT_SCENARIOS))
def test_kill_snapshot_op(kind: str, scenario: str, tmp_root: Path) -> None:
    setup_code, code = SNAPSHOT_SCENARIOS[scenario]

    def setup(root: Path) -> None:
        sn = SNAPSHOTTERS[kind](root / "snapshots" / kind)
        try:
            with temp_mount(sn.prepare("b", "")) as t:
                Path(t, "kept").write_text("base content")
            sn.commit("base", "b")
            if setup_code:
                exec(setup_code, {"sn": sn})
        finally:
            sn.close()

    def finish(root: Path) -> None:
        sn = SNAPSHOTTERS[kind](root / "snapshots" / kind)
        try:
            assert isinstance(sn, DirectorySnapshotter)
            kept = sn.fs_dir(sn.snapshot("base").id) / "kept"
            assert kept.read_text() == "base content"
            done = {i.name for i in sn.walk()}
            # the interrupted operation happened whole or not at all; finish it
            if scenario == "prepare" and "child" in done:
                assert sn.stat("child").labels == {"l": "1"}
            elif scenario == "view" and "v" in done:
                pass
            elif scenario == "commit" and "done" in done:
                assert "child" not in done
            elif scenario.startswith("remove") and not {"child", "done"} & done:
                pass
            else:
                exec(code, {"sn": sn})
        finally:
            sn.close()

    op = Op(f"snapshot-{scenario}-{kind}", setup,
            [sys.executable, "-c", _SNAP_CHILD, kind, "{root}/snapshots/" + kind, code],
            finish)
    _sweep(op, tmp_root)


ALL_OPS += ["import-oci-overlay", "import-oci-native", "import-docker-overlay",
            "content-ingest", "content-rm", "gc-after-image-rm"]
ALL_OPS += [f"snapshot-{s}-{k}" for s in SNAPSHOT_SCENARIOS for k in ("overlay", "native")]


# --------------------------------------------------------------------------- summary


def test_kill_point_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """The figure: kill points survived, by operation (needs the whole file to run)."""
    missing = [op for op in ALL_OPS if op not in TALLY.completed]
    if missing:
        pytest.skip(f"not every kill test ran (missing {', '.join(missing)})")
    by_op: dict[str, list[Kill]] = {}
    for k in TALLY.kills:
        by_op.setdefault(k.op, []).append(k)
    lines = ["", "kill points survived (operation: kills, distinct point names, "
             "leftovers repaired, seconds):"]
    for op in ALL_OPS:
        ks = by_op.get(op, [])
        base = TALLY.baseline.get(op)
        left = sum(sum(k.leftovers(base).values()) for k in ks)
        lines.append(f"  {op:34} {len(ks):4} {len({k.point for k in ks}):4} "
                     f"{left:5} {TALLY.seconds[op]:7.1f}")
    total = len({(k.op, k.n) for k in TALLY.kills})
    named = len({(k.op, k.point) for k in TALLY.kills})
    lines.append(f"  total: {total} kill points (operation, N); {named} distinct "
                 f"(operation, point name) pairs")
    kinds: dict[str, int] = {}
    for k in TALLY.kills:
        for what, count in k.leftovers(TALLY.baseline.get(k.op)).items():
            kinds[what] = kinds.get(what, 0) + count
    lines.append(f"  leftovers (orphans) the kills left, repaired by recovery/GC: "
                 f"{sum(kinds.values())}: " +
                 ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
    text = "\n".join(lines)
    with capsys.disabled():
        print(text)
    summary = os.environ.get("LAMINA_KILLPOINTS_SUMMARY")
    if summary:
        Path(summary).write_text(text + "\n")
    assert total >= MIN_KILL_POINTS
    assert named >= MIN_KILL_POINTS


def test_consistency_checker_sees_damage(images: Images, tmp_root: Path) -> None:
    """The checker the kill tests rely on does flag each kind of damage."""
    root = tmp_root / "root"
    r = Root(root)
    svc = ImageService(r, snapshotter="overlay")
    svc.import_(images.tar)
    svc.close()
    store = r.content()
    assert isinstance(store, LocalContentStore)
    sn = r.snapshotter("overlay")
    assert isinstance(sn, DirectorySnapshotter)
    assert consistency.problems(root) == []
    layer = next(i.digest for i in store.walk() if i.size > 100_000)
    path = store.blob_path(layer)
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:  # one flipped byte
        fh.seek(10)
        byte = fh.read(1)
        fh.seek(10)
        fh.write(bytes([byte[0] ^ 1]))
    (store.blobs_dir / ("ab" * 32)).write_bytes(b"stray")
    (store.ingest_dir / "half").mkdir()
    (sn.root / "snapshots" / "999").mkdir()
    top = chain_ids(images.diff_ids)[-1]
    fs = sn.fs_dir(sn.snapshot(top).id)
    os.rename(fs, fs.with_name("gone"))
    r.close()
    found = "\n".join(consistency.problems(root))
    for expected in ("is corrupt", "is writable", "has no row", "orphan ingest",
                     "unknown to the metadata", "has no directory"):
        assert expected in found, f"{expected!r} not reported in:\n{found}"
