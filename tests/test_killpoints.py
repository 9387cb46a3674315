"""SIGKILL image import/unpack, content ingest, GC and snapshot operations at every
crash point, then recover the way a user does and require that nothing was lost.

Each operation runs in a child process with ``LAMINA_CRASH_AFTER=N`` for
N = 1, 2, ... until the child completes without being killed (``LAMINA_CRASH_LOG``
says where it died). After every kill the root is recovered only with what a
user runs (:data:`RECOVERY`): ``lamina check --repair``, the interrupted command
run again, ``lamina lease rm`` for the lease the dead command held, ``lamina
content abort`` for the ingests it left, ``lamina gc``; then ``lamina check``
must say consistent, the test's own stricter checker (:func:`consistency.problems`:
nothing mounted, no ingest, every image resolves) must find nothing, and the
operation's result is verified (an imported image is mounted and its files
compared; what the setup made is still there). An operation that is a library
client rather than a command (a content ingest, a snapshot call) is re-run by
that client after ``check --repair``, as it would resume after a restart.
Everything the test expects to find afterwards is an image's or a GC root
(``containerd.io/gc.root``), so what the recovery's ``gc`` removes was garbage
and whatever is missing afterwards was lost.

The commands of one recovery run through lamina's command-line entry point
(``lamina.cli.main``, the user's argv) one after another in one helper process,
each opening the root afresh: hundreds of recoveries of six commands each would
otherwise start thousands of interpreters.

A kill point is one (operation, N) pair: the N-th crash point the operation
passes, named by ``crash.point``. The summary counts them and requires exactly
the figure the README states ("N deterministic kill points").

Independent N run in parallel (each on its own root) to keep the file fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import consistency
import imagefactory as f
import pytest

from lamina.content.local import LocalContentStore
from lamina.errors import AlreadyExists, NotFound
from lamina.images.service import ImageService
from lamina.labels import GC_ROOT
from lamina.metadata.root import Root
from lamina.mounts.mount import temp_mount
from lamina.oci.identity import chain_ids
from lamina.snapshots.directory import DirectorySnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")

WORKERS = max(2, min(4, (os.cpu_count() or 2)))
MAX_POINTS = 400
README = Path(__file__).resolve().parent.parent / "README.md"
README_FIGURE = re.compile(r"(\d[\d,]*) deterministic kill points")

IMAGE = "kp:latest"
IMAGE2 = "kp2:latest"
DOCKER_IMAGE = "docker.io/library/kpd:latest"


# --------------------------------------------------------------------------- tally


@dataclass
class Kill:
    op: str
    n: int
    point: str  # "" when the run completed (it passed n - 1 points)
    repaired: Counter[str]  # what recovery found to repair or collect, by kind

    def leftovers(self, baseline: Counter[str] | None) -> Counter[str]:
        """What the kill left for recovery and GC beyond what a completed run leaves
        (a docker archive's untyped files are unreferenced blobs even then)."""
        return self.repaired - (baseline or Counter())


@dataclass
class _Tally:
    kills: list[Kill] = field(default_factory=list)
    completed: dict[str, int] = field(default_factory=dict)  # op -> points passed
    baseline: dict[str, Counter[str]] = field(default_factory=dict)  # op -> completed run
    lock: threading.Lock = field(default_factory=threading.Lock)


TALLY = _Tally()
ALL_OPS: list[str] = []  # filled below, for the final summary
OP_TESTS: set[str] = set()  # the test functions that sweep ALL_OPS


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


# --------------------------------------------------------------------------- recovery

# What a user runs after a command was killed, in order (see the module docs). Each
# step is lamina's CLI entry point with the argv a shell would pass; the child
# prints one JSON line per command (argv, exit code, stdout) for the test to check.
RECOVERY = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from lamina.cli import main

    root, rerun, repair_only = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "repair"

    def lamina(*argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--root", root, *argv])
        print(json.dumps({"argv": list(argv), "code": code, "stdout": out.getvalue()}),
              flush=True)
        return code, out.getvalue()

    lamina("check", "--repair", "--json")
    if repair_only:  # a client resumes its own work next (an ingest, a snapshot call)
        sys.exit(0)
    if rerun:
        lamina(*rerun)
    # the dead command's lease (it would expire by itself) and its ingests
    leases = lamina("lease", "ls", "--quiet")[1].split()
    if leases:
        lamina("lease", "rm", *leases)
    refs = [s["ref"] for s in json.loads(lamina("content", "active", "--json")[1])]
    if refs:
        lamina("content", "abort", *refs)
    lamina("gc", "--json")
    lamina("check", "--json")
    """
)


def _recover(root: Path, rerun: list[str] | None, *, ok_rerun: tuple[int, ...] = (0,),
             repair_only: bool = False) -> Counter[str]:
    """Run :data:`RECOVERY` on ``root`` (only its ``check --repair`` if ``repair_only``);
    check every command's outcome; return what it repaired, removed or collected,
    by kind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINA_CRASH")}
    mode = "repair" if repair_only else "all"
    proc = subprocess.run([sys.executable, "-c", RECOVERY, str(root), json.dumps(rerun), mode],
                          env=env, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and steps, f"recovery died: {proc.stderr[-2000:]}"
    found: Counter[str] = Counter()
    for step in steps:
        verb, out = step["argv"][:2], step["stdout"]
        allowed = ok_rerun if step["argv"] == rerun else (0,)
        assert step["code"] in allowed, f"lamina {' '.join(step['argv'])} exited " \
            f"{step['code']}: {out[-1000:]} {proc.stderr[-1000:]}"
        if verb == ["check", "--repair"]:
            report = json.loads(out)
            assert report["ok"] and not report["broken_images"], report
            found.update(p["kind"] for p in report["problems"])
            found.update("temp-mount" for r in report["repaired"] if "mount" in r)
        elif verb == ["lease", "rm"]:
            found["lease"] += len(step["argv"]) - 2
        elif verb == ["content", "abort"]:
            found["ingest"] += len(step["argv"]) - 2
        elif verb[0] == "gc":
            report = json.loads(out)
            found["gc-blob"] += len(report["content"])
            found["gc-snapshot"] += len(report["snapshots"])
    if not repair_only:
        last = steps[-1]
        assert last["argv"] == ["check", "--json"] and json.loads(last["stdout"])["ok"], last
    return found


# --------------------------------------------------------------------------- driver


@dataclass
class Op:
    """One operation to kill: ``argv`` runs it in a child (``{root}`` substituted).

    After a kill, ``rerun`` is the lamina command (argv after ``--root``) a user
    runs again, exiting with one of ``ok_rerun``; an operation that is a library
    client (an ingest, a snapshot call) is re-run by ``resume`` instead. ``verify``
    then checks that nothing was lost."""

    name: str
    setup: Callable[[Path], None]
    argv: list[str]
    verify: Callable[[Path], None]
    rerun: list[str] | None = None
    ok_rerun: tuple[int, ...] = (0,)
    resume: Callable[[Path], None] | None = None


def _child_env(n: int, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LAMINA_CRASH_AT", None)
    env["LAMINA_CRASH_AFTER"] = str(n)
    env["LAMINA_CRASH_LOG"] = str(log)
    return env


def _new_root(root: Path) -> None:
    """An empty root, made as lamina makes one (its format recorded)."""
    Root(root).close()


class _CompletedRunFailed(AssertionError):
    """The run that was not killed failed its checks (no higher N needs trying)."""


def _one(op: Op, work: Path, n: int) -> Kill:
    """Kill ``op`` at its n-th point, recover as a user does and check the aftermath
    (the same when the run completed instead: then the Kill's point is "")."""
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
        if op.resume is not None:
            repaired = _recover(root, None, repair_only=True)
            op.resume(root)
            repaired.update(_recover(root, None))
        else:
            repaired = _recover(root, op.rerun, ok_rerun=op.ok_rerun)
        bad = consistency.problems(root)
        assert not bad, f"lamina check says consistent, but: {bad}"
        op.verify(root)
        return Kill(op.name, n, point, repaired)
    except BaseException as exc:
        if proc.returncode == 0:
            raise _CompletedRunFailed(f"{op.name}: the run that completed (after {n - 1} "
                                      f"points): {exc}") from exc
        where = log.read_text().strip() if log.exists() else "?"
        raise AssertionError(f"{op.name}: killed at point {n} ({where}): {exc}") from exc
    finally:
        consistency.unmount_under(root)  # teardown only: recovery had to leave none
        shutil.rmtree(root, ignore_errors=True)


def _sweep(op: Op, work: Path) -> None:
    """Kill ``op`` at points 1, 2, ... (in parallel) until a run completes."""
    work.mkdir(parents=True, exist_ok=True)
    kills: list[Kill] = []
    errors: list[str] = []
    done_at: int | None = None
    baseline: Counter[str] | None = None
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
                    if isinstance(exc, _CompletedRunFailed) and (done_at is None or n < done_at):
                        done_at = n
                    continue
                if not kill.point:
                    if done_at is None or n < done_at:
                        done_at, baseline = n, kill.repaired
                else:
                    kills.append(kill)
    if done_at is not None:  # runs past the completing one were not kills
        kills = [k for k in kills if k.n < done_at]
    with TALLY.lock:
        TALLY.kills += kills
        TALLY.completed[op.name] = (done_at or 0) - 1
        if baseline is not None:
            TALLY.baseline[op.name] = baseline
    assert not errors, "\n".join(sorted(errors))
    assert done_at is not None, f"{op.name}: still being killed after {MAX_POINTS} points"
    assert len(kills) == done_at - 1, f"{op.name}: kills {len(kills)}, points {done_at - 1}"
    assert len(kills) >= 2, f"{op.name}: passed fewer crash points than expected"


# --------------------------------------------------------------------------- (a) import

LAMINA = [sys.executable, "-m", "lamina", "--root", "{root}"]


@pytest.mark.parametrize(("kind", "fmt"), [("overlay", "oci"), ("native", "oci"),
                                           ("overlay", "docker")])
def test_kill_image_import(kind: str, fmt: str, images: Images, tmp_root: Path) -> None:
    tar, name = (images.tar, IMAGE) if fmt == "oci" else (images.docker, DOCKER_IMAGE)
    command = ["--snapshotter", kind, "image", "import", str(tar)]
    op = Op(f"import-{fmt}-{kind}", _new_root, [*LAMINA, *command],
            lambda root: _verify_image(root, kind, images, name), rerun=command)
    _sweep(op, tmp_root)


OP_TESTS.add("test_kill_image_import")

# --------------------------------------------------------------------------- (b) ingest

REF = "killpoint-ingest"
_INGEST = textwrap.dedent(
    """
    import hashlib, sys
    from lamina.metadata.root import Root
    data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(6000))
    root = Root(sys.argv[1])
    w = root.content().writer(sys.argv[2], total=len(data), expected=sys.argv[3])
    for i in range(0, len(data), 64000):
        w.write(data[i:i + 64000])
    w.commit(len(data), sys.argv[3], labels={"containerd.io/gc.root": "killpoint"})
    root.close()
    """
)
_DATA = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(6000))
_DIGEST = f"sha256:{hashlib.sha256(_DATA).hexdigest()}"
KEEP = {GC_ROOT: "killpoint"}  # what keeps a blob from `lamina gc`


def _resume_ingest(root: Path) -> None:
    """What a client does after its writer died: resume the ref, or find the blob there.
    (``check --repair`` ran first: it keeps a resumable ingest.)"""
    r = Root(root)
    try:
        store = r.content()
        try:
            w = store.writer(REF, total=len(_DATA), expected=_DIGEST)
        except AlreadyExists:
            pass
        else:
            assert w.offset <= len(_DATA)
            w.write(_DATA[w.offset:])
            with contextlib.suppress(AlreadyExists):
                w.commit(len(_DATA), _DIGEST, labels=KEEP)
        # a row check --repair restored (the kill fell between the blob's rename and
        # its metadata commit) has no labels: the client sets what its commit would have
        info = store.info(_DIGEST)
        if info.labels != KEEP:
            store.update(replace(info, labels=KEEP), "labels")
    finally:
        r.close()


def _verify_ingest(root: Path) -> None:
    with LocalContentStore(root / "content") as store:
        info = store.verify(_DIGEST)
        assert info.size == len(_DATA)
        assert info.labels == KEEP
        assert store.read_at(_DIGEST, 0, len(_DATA)) == _DATA


def test_kill_content_ingest(tmp_root: Path) -> None:
    op = Op("content-ingest", _new_root,
            [sys.executable, "-c", _INGEST, "{root}", REF, _DIGEST], _verify_ingest,
            resume=_resume_ingest)
    _sweep(op, tmp_root)


def test_kill_content_rm(tmp_root: Path) -> None:
    def setup(root: Path) -> None:
        r = Root(root)
        try:
            store = r.content()
            store.add(_DATA, expected=_DIGEST)
            store.add(b"kept", labels=KEEP)
        finally:
            r.close()

    def verify(root: Path) -> None:
        with LocalContentStore(root / "content") as store:
            assert [i.labels for i in store.walk()] == [KEEP]
            assert not store.blob_path(_DIGEST).exists()

    # the blob may be gone already: NotFound (exit 3) is what a re-run then says
    op = Op("content-rm", setup, [*LAMINA, "content", "rm", _DIGEST], verify,
            rerun=["content", "rm", _DIGEST], ok_rerun=(0, NotFound.exit_code))
    _sweep(op, tmp_root)


OP_TESTS.update({"test_kill_content_ingest", "test_kill_content_rm"})

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

    def verify(root: Path) -> None:
        r = Root(root)
        try:
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

    # the image may be gone already: NotFound (exit 3); the recovery's gc collects
    op = Op("gc-after-image-rm", setup, [*LAMINA, "image", "rm", "--sync", IMAGE2], verify,
            rerun=["image", "rm", "--sync", IMAGE2], ok_rerun=(0, NotFound.exit_code))
    _sweep(op, tmp_root)


OP_TESTS.add("test_kill_gc_after_image_remove")

# --------------------------------------------------------------------------- (d) snapshots

# every snapshot a scenario makes is a GC root (``R``), so the recovery's `lamina gc`
# keeps it: what the test then finds missing was lost, not collected
SNAPSHOT_SCENARIOS = {
    "prepare": ("", "sn.prepare('child', 'base', labels={'l': '1', **R})"),
    "view": ("", "sn.view('v', 'base', labels=R)"),
    "commit": ("sn.prepare('child', 'base', labels=R)", "sn.commit('done', 'child', labels=R)"),
    "remove-active": ("sn.prepare('child', 'base', labels=R)", "sn.remove('child')"),
    "remove-committed": ("sn.prepare('child', 'base', labels=R); "
                         "sn.commit('done', 'child', labels=R)", "sn.remove('done')"),
}
# what each scenario leaves when it happened (it happened whole, or not at all)
SNAPSHOT_AFTER = {
    "prepare": {"base", "child"},
    "view": {"base", "v"},
    "commit": {"base", "done"},
    "remove-active": {"base"},
    "remove-committed": {"base"},
}
_SNAP_CHILD = textwrap.dedent(
    """
    import sys
    from lamina.metadata.root import Root
    root = Root(sys.argv[2])
    sn = root.snapshotter(sys.argv[1])
    exec(sys.argv[3], {"sn": sn, "R": {"containerd.io/gc.root": "killpoint"}})
    root.close()
    """
)


def snapshot_setup(kind: str, setup_code: str) -> Callable[[Path], None]:
    """A snapshot scenario's setup: a committed base layer holding ``kept``,
    then the scenario's own ``setup_code`` (``sn``, ``R``: the labels that keep)."""
    def setup(root: Path) -> None:
        r = Root(root)
        try:
            sn = r.snapshotter(kind)
            with temp_mount(sn.prepare("b", ""), base=str(r.tmpmounts)) as t:
                Path(t, "kept").write_text("base content")
            sn.commit("base", "b", labels=KEEP)
            if setup_code:
                exec(setup_code, {"sn": sn, "R": KEEP})
        finally:
            r.close()
    return setup


@pytest.mark.parametrize("kind", ["overlay", "native"])
@pytest.mark.parametrize("scenario", sorted(SNAPSHOT_SCENARIOS))
def test_kill_snapshot_op(kind: str, scenario: str, tmp_root: Path) -> None:
    setup_code, code = SNAPSHOT_SCENARIOS[scenario]

    setup = snapshot_setup(kind, setup_code)

    def resume(root: Path) -> None:
        """The client runs its call again unless it had happened whole."""
        r = Root(root)
        try:
            sn = r.snapshotter(kind)
            done = {i.name for i in sn.walk()}
            if done != SNAPSHOT_AFTER[scenario]:
                exec(code, {"sn": sn, "R": KEEP})
        finally:
            r.close()

    def verify(root: Path) -> None:
        r = Root(root)
        try:
            sn = r.snapshotter(kind)
            assert isinstance(sn, DirectorySnapshotter)
            assert {i.name for i in sn.walk()} == SNAPSHOT_AFTER[scenario]
            kept = sn.fs_dir(sn.snapshot("base").id) / "kept"
            assert kept.read_text() == "base content"
            if scenario == "prepare":
                assert sn.stat("child").labels == {"l": "1", **KEEP}
        finally:
            r.close()

    op = Op(f"snapshot-{scenario}-{kind}", setup,
            [sys.executable, "-c", _SNAP_CHILD, kind, "{root}", code], verify, resume=resume)
    _sweep(op, tmp_root)


OP_TESTS.add("test_kill_snapshot_op")
ALL_OPS += ["import-oci-overlay", "import-oci-native", "import-docker-overlay",
            "content-ingest", "content-rm", "gc-after-image-rm"]
ALL_OPS += [f"snapshot-{s}-{k}" for s in SNAPSHOT_SCENARIOS for k in ("overlay", "native")]


# --------------------------------------------------------------------------- summary


def readme_figure() -> int:
    """The number of kill points the README states."""
    found = README_FIGURE.findall(README.read_text())
    assert len(found) == 1, f"README.md states the kill-point figure {len(found)} times"
    return int(found[0].replace(",", ""))


def test_kill_point_summary(request: pytest.FixtureRequest,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """The figure: kill points survived, by operation; exactly what the README says."""
    selected = {getattr(item, "originalname", "") for item in request.session.items
                if getattr(item, "module", None) is request.module}
    if not selected >= OP_TESTS:
        pytest.skip("not every kill test was selected "
                    f"(missing {', '.join(sorted(OP_TESTS - selected))})")
    missing = [op for op in ALL_OPS if op not in TALLY.completed]
    # This module's operations only: other modules (the erofs snapshotter's kill
    # tests) share the tally, and the figure must not depend on what else ran.
    kills = [k for k in TALLY.kills if k.op in ALL_OPS]
    by_op: dict[str, list[Kill]] = {}
    for k in kills:
        by_op.setdefault(k.op, []).append(k)
    lines = ["", "kill points survived (operation: kills, distinct point names, "
             "leftovers repaired or collected):"]
    for op in ALL_OPS:
        ks = by_op.get(op, [])
        base = TALLY.baseline.get(op)
        left = sum(sum(k.leftovers(base).values()) for k in ks)
        lines.append(f"  {op:34} {len(ks):4} {len({k.point for k in ks}):4} {left:5}"
                     + ("  (did not finish its sweep)" if op in missing else ""))
    total = len({(k.op, k.n) for k in kills})
    named = len({(k.op, k.point) for k in kills})
    lines.append(f"  total: {total} kill points (operation, N); {named} distinct "
                 f"(operation, point name) pairs")
    kinds: Counter[str] = Counter()
    for k in kills:
        kinds.update(k.leftovers(TALLY.baseline.get(k.op)))
    lines.append(f"  leftovers the kills left, repaired by check --repair or collected: "
                 f"{sum(kinds.values())}: " +
                 ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
    text = "\n".join(lines)
    with capsys.disabled():
        print(text)
    summary = os.environ.get("LAMINA_KILLPOINTS_SUMMARY")
    if summary:
        Path(summary).write_text(text + "\n")
    assert not missing, f"kill tests that did not finish their sweep: {missing}"
    # every point passed was a kill point
    assert total == sum(n for op, n in TALLY.completed.items() if op in ALL_OPS)
    assert total == readme_figure(), \
        f"{total} kill points, README.md says {readme_figure()}: update the README"


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
