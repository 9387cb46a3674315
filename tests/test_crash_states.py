"""Power loss, explored: the crash states lamina's workloads allow, each opened by lamina.

Each workload runs its lamina commands under strace on a fresh root; the
persistence model of :mod:`crashstates.states` (ordered metadata, lossy
un-fsynced data: ext4 ``data=ordered`` as POSIX promises it) yields the states
a power cut may leave at every point; each is written out as a root. As the
power cut left it, its metadata must not name what its files lack (behind the
disk, never ahead); opened by lamina after a "restart" (a new boot id: lamina
repairs it as ``check --repair`` does), it must pass ``check --deep`` and still
show every step acknowledged before the crash. The durable-only state at each
acknowledgement (every checkpoint state, in CI) goes through the real CLI
(``lamina --root STATE check --deep``).

In CI each workload explores a bounded, seeded sample (the whole states at every
acknowledgement always included); ``LAMINA_CRASH_FULL=1`` explores every
state on larger images; ``LAMINA_CRASH_SEED`` picks another sample;
``LAMINA_CRASH_KEEP=DIR`` keeps the first inconsistent states of each workload
there (as written, with a note).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import consistency
import imagefactory as f
import pytest
import test_containers_cli as containers
from conftest import require_tools
from crashstates import writer
from crashstates.explorer import Outcome, Recording, Step, explore_workload, record_workload
from crashstates.record import Recorder
from crashstates.states import explore, replay
from crashstates.trace import parse, unhex
from crashstates.tree import Create, Op, Rename, Sync, SyncAll, Tree, Write
from registry_peer import running_registry, skopeo_push

from lamina.containers.runtime.criu import find_criu
from lamina.errors import NotFound
from lamina.fs.files import remove_tree
from lamina.metadata.formats import FORMAT
from lamina.metadata.root import Root
from lamina.oci.identity import chain_ids
from lamina.snapshots import Snapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mknod, mounts)")

FULL = os.environ.get("LAMINA_CRASH_FULL") == "1"
SEED = int(os.environ.get("LAMINA_CRASH_SEED", "20261206"))
#: States opened per workload in CI (everything with LAMINA_CRASH_FULL=1).
BUDGET = 10**9 if FULL else 40
LAMINA = [sys.executable, "-m", "lamina"]
WRITER = str(Path(__file__).parent / "crashstates" / "writer.py")

layout = containers.layout  # V1: a tiny rootfs with sh and sleep

IMAGE = "cs:1"
IMAGE2 = "cs:2"


@dataclass(frozen=True)
class Images:
    tar: Path  # IMAGE and IMAGE2
    native_tar: Path  # IMAGE with a layer that needs its parent (native only)
    chains: list[str]  # IMAGE's ChainIDs
    chains2: list[str]
    native_chains: list[str]
    only2: frozenset[str]  # blobs IMAGE2 has and IMAGE has not
    oci_ref: str  # IMAGE, for skopeo


def _files(n: int, prefix: str) -> list[f.Entry]:
    return [f.File(f"{prefix}/f{i:03d}", os.urandom(64 + 97 * i)) for i in range(n)]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (scripts/setup.sh installs it)")
    w = tmp_path_factory.mktemp("cs-images")
    extra = 40 if FULL else 0
    l1 = f.layer_from_entries([
        f.Dir("etc"), f.File("etc/hello", "hello\n"), f.Dir("data"),
        f.File("data/a", b"a" * 3000), f.Symlink("data/ln", "a"),
        f.Hardlink("data/h", "etc/hello"), f.Dir("opq"), f.File("opq/x", "x"),
        f.Dir("bin"), f.File("bin/tool", os.urandom(1 << 20 if FULL else 8192), 0o755),
        f.Dir("many"), *_files(extra, "many"),
    ], w)
    l2 = f.layer_from_entries([
        f.Dir("etc"), f.File("etc/hello", "bye\n"), f.Dir("data"), f.Whiteout("data/a"),
        f.Dir("opq"), f.Opaque("opq"), f.File("opq/y", "y"),
    ], w)
    l3 = f.layer_from_entries([f.Dir("etc"), f.File("etc/other", "two\n")], w)
    ln = f.layer_from_entries([f.Hardlink("data/h2", "etc/hello"), f.Whiteout("data/ln")], w)
    ref = f.build_oci_layout(w / "layout", [l1, l2], ref_name=IMAGE)
    ref2 = f.build_oci_layout(w / "layout", [l1, l3], ref_name=IMAGE2)
    tar = f.as_tar(w / "layout", w / "images.tar")
    refn = f.build_oci_layout(w / "native", [l1, ln], ref_name=IMAGE)
    ntar = f.as_tar(w / "native", w / "native.tar")
    only2 = frozenset({ref2.manifest_digest, ref2.config_digest, l3.digest})
    return Images(tar, ntar, chain_ids(ref.diff_ids), chain_ids(ref2.diff_ids),
                  chain_ids(refn.diff_ids), only2, ref.oci_ref)


# ------------------------------------------------------------------------- expectations


def has_image(name: str, chains: Sequence[str], snapshotter: str = "overlay"
              ) -> Callable[[Root], list[str]]:
    """The image is there and every layer of it is a committed snapshot."""
    def expect(r: Root) -> list[str]:
        out = []
        try:
            r.images().get(name)
        except NotFound:
            out.append(f"acknowledged image {name} is gone")
        sn = r.snapshotter(snapshotter)
        for c in chains:
            try:
                sn.stat(c)
            except NotFound:
                out.append(f"acknowledged layer {c} of {name} is gone")
        return out
    return expect


def lacks_image(name: str) -> Callable[[Root], list[str]]:
    def expect(r: Root) -> list[str]:
        try:
            r.images().get(name)
        except NotFound:
            return []
        return [f"removed image {name} is back"]
    return expect


def lacks_blobs(digests: frozenset[str]) -> Callable[[Root], list[str]]:
    def expect(r: Root) -> list[str]:
        out = []
        for d in sorted(digests):
            try:
                r.content().info(d)
                out.append(f"collected blob {d} is back")
            except NotFound:
                pass
        return out
    return expect


def snapshot_state(present: Sequence[str | tuple[str, str]], absent: Sequence[str],
                   snapshotter: str) -> Callable[[Root], list[str]]:
    """``present`` snapshots exist (a pair: one of the two, as while the next step,
    unacknowledged, may have committed it under its new name); ``absent`` do not."""
    def there(sn: Snapshotter, key: str) -> bool:
        try:
            sn.stat(key)
            return True
        except NotFound:
            return False

    def expect(r: Root) -> list[str]:
        sn = r.snapshotter(snapshotter)
        out = []
        for k in present:
            keys = (k,) if isinstance(k, str) else k
            if not any(there(sn, key) for key in keys):
                out.append(f"acknowledged snapshot {' or '.join(keys)} is gone")
        out += [f"removed snapshot {k} is back" for k in absent if there(sn, k)]
        return out
    return expect


def both(*expects: Callable[[Root], list[str]]) -> Callable[[Root], list[str]]:
    def expect(r: Root) -> list[str]:
        return [p for e in expects for p in e(r)]
    return expect


def has_format(version: int) -> Callable[[Root], list[str]]:
    def expect(r: Root) -> list[str]:
        found = json.loads((r.path / "format").read_text()).get("format")
        return [] if found == version else [f"format {found}, not {version}, after the upgrade"]
    return expect


# ------------------------------------------------------------------------- running


def lamina(root: Path, *args: str) -> list[str]:
    return [*LAMINA, "--root", str(root), *args]


def setup_root(root: Path, *commands: Sequence[str]) -> None:
    """Untraced preparation: the state before the workload, taken as durable."""
    os.mkdir(root, 0o700)
    for argv in commands:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=300,
                              check=False)
        assert proc.returncode == 0, proc.stderr


def recorded(tmp_path: Path, steps: Sequence[Step]) -> Recording:
    return record_workload(tmp_path / "root", steps, tmp_path)


def explored(name: str, tmp_path: Path, steps: Sequence[Step], *,
             capsys: pytest.CaptureFixture[str], budget: int = BUDGET) -> Outcome:
    return explore_states(name, tmp_path, recorded(tmp_path, steps), capsys=capsys,
                          budget=budget)


def explore_states(name: str, tmp_path: Path, rec: Recording, *,
                   capsys: pytest.CaptureFixture[str], budget: int = BUDGET,
                   all_through_cli: bool = False) -> Outcome:
    scratch = tmp_path / "states"
    scratch.mkdir()
    keep = os.environ.get("LAMINA_CRASH_KEEP")
    out = explore_workload(name, rec, scratch, budget=budget, seed=SEED, cli=LAMINA,
                           keep=Path(keep) if keep else None, all_through_cli=all_through_cli)
    with capsys.disabled():
        print(f"\n[crash states] {out.summary()}")
    return out


def no_failures(out: Outcome) -> None:
    lines = [f"{s.describe()}: {'; '.join(p[:3])}" for s, p in out.failures[:5]]
    assert not out.failures, f"{out.summary()}\n" + "\n".join(lines)


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """The test's directory; the root's mounts (a container's rootfs) and trees go after."""
    yield tmp_path
    consistency.unmount_under(tmp_path)
    remove_tree(tmp_path / "root")


# ------------------------------------------------------------------------- workloads


def test_import_survives_power_loss(images: Images, work: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = work / "root"
    setup_root(root)
    steps = [Step("import", lamina(root, "image", "import", str(images.tar)),
                  has_image(IMAGE, images.chains))]
    out = explored("import (overlay)", work, steps, capsys=capsys)
    assert out.explored >= min(BUDGET, 30) and out.candidates > 1000
    no_failures(out)


def test_no_sync_can_lose_an_acknowledged_layer(images: Images, work: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``--no-sync`` is what it says: under the model, a power cut right after the
    import returned leaves a committed layer whose files are gone (the same states
    with the sync pass above; without the syncfs before commit they fail there too)."""
    root = work / "root"
    setup_root(root)
    steps = [Step("import --no-sync",
                  lamina(root, "image", "import", "--no-sync", str(images.tar)),
                  has_image(IMAGE, images.chains))]
    out = explored("import --no-sync (overlay)", work, steps, capsys=capsys, budget=20)
    lost = [(s, p) for s, p in out.failures
            if s.acked == 1 and any("snapshot.layer-changed" in x for x in p)]
    assert lost, f"no state lost an acknowledged layer: {out.summary()}"


def test_import_native_survives_power_loss(images: Images, work: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = work / "root"
    setup_root(root)
    steps = [Step("import", lamina(root, "--snapshotter", "native", "image", "import",
                                   str(images.native_tar)),
                  has_image(IMAGE, images.native_chains, "native"))]
    no_failures(explored("import (native)", work, steps, capsys=capsys))


@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_snapshot_lifecycle_survives_power_loss(images: Images, work: Path, snapshotter: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = work / "root"
    setup_root(root, lamina(root, "--snapshotter", snapshotter, "image", "import",
                            str(images.tar)),
               lamina(root, "--snapshotter", snapshotter, "snapshot", "prepare", "gone",
                      images.chains[-1]))
    top = images.chains[-1]
    sn = ["--snapshotter", snapshotter, "snapshot"]
    prepared = snapshot_state([("work", "done"), top], [], snapshotter)
    steps = [
        Step("prepare", lamina(root, *sn, "prepare", "work", top), prepared),
        Step("write", [sys.executable, WRITER, str(root), snapshotter, "work"], prepared),
        Step("commit", lamina(root, *sn, "commit", "done", "work"),
             snapshot_state(["done"], ["work"], snapshotter)),
        Step("rm", lamina(root, *sn, "rm", "gone"),
             snapshot_state(["done"], ["work", "gone"], snapshotter)),
        Step("prepare on the commit", lamina(root, *sn, "prepare", "next", "done"),
             snapshot_state(["next", "done"], ["work", "gone"], snapshotter)),
    ]
    no_failures(explored(f"snapshots ({snapshotter})", work, steps, capsys=capsys))


def test_gc_survives_power_loss(images: Images, work: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    root = work / "root"
    setup_root(root, lamina(root, "image", "import", str(images.tar)))
    kept = has_image(IMAGE, images.chains)
    steps = [
        Step("image rm", lamina(root, "image", "rm", IMAGE2), both(kept, lacks_image(IMAGE2))),
        Step("gc", lamina(root, "gc"),
             both(kept, lacks_image(IMAGE2), lacks_blobs(images.only2))),
    ]
    out = explored("image rm + gc", work, steps, capsys=capsys)
    no_failures(out)


def test_pull_survives_power_loss(images: Images, work: Path,
                                  tmp_path_factory: pytest.TempPathFactory,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with running_registry(tmp_path_factory.mktemp("cs-registry")) as reg:
        name = f"{reg.host}/crash/states:1"
        skopeo_push(images.oci_ref, name)
        root = work / "root"
        setup_root(root)
        steps = [Step("pull", lamina(root, "image", "pull", name), has_image(name, images.chains))]
        rec = recorded(work, steps)
    no_failures(explore_states("pull (overlay)", work, rec, capsys=capsys))


def _upperdir_of(mountpoint: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            for opt in line.split(" - ")[1].split()[2].split(","):
                if opt.startswith("upperdir="):
                    return opt.removeprefix("upperdir=")
    raise AssertionError(f"no overlay mount on {mountpoint}")


def test_checkpoint_survives_power_loss(work: Path, layout: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``container checkpoint`` of an idle container, left running (runc and CRIU under
    strace; with ``--exit`` the task monitor, outside the trace, reaps runc's state
    meanwhile)."""
    require_tools("runc", "strace")
    if find_criu() is None:
        pytest.skip("criu is not installed (or not in $PATH)")
    root = work / "root"
    setup_root(root, lamina(root, "image", "import", str(layout)),
               lamina(root, "run", "-d", "--name", "ctr", containers.V1,
                      "sh", "-c", containers.IDLE))
    try:
        # The container's upper directory changes outside the trace (CRIU, in the
        # container's mount namespace, copies up its /tmp through the overlay
        # mount); the crash states show it as it was before.
        upper = os.path.relpath(_upperdir_of(root / "tasks" / "ctr" / "rootfs"), root)
        steps = [Step("checkpoint", lamina(root, "container", "checkpoint", "ctr", "ckpt/ctr:1"),
                      has_image("ckpt/ctr:1", []))]
        rec = record_workload(root, steps, work, tolerated=[upper])
    finally:
        problems = containers.cleanup_tasks(root)
        assert not problems, problems
    # in CI every state through the CLI (as a user would see it after the restart)
    no_failures(explore_states("container checkpoint", work, rec, capsys=capsys,
                               budget=BUDGET if FULL else 20, all_through_cli=not FULL))


def on_image(cid: str, image: str | tuple[str, str], files: bool
             ) -> Callable[[Root], list[str]]:
    """Container ``cid`` is on ``image`` (a pair: either), and with ``files`` its
    snapshot still holds what the writer wrote (and fsynced) into it."""
    def expect(r: Root) -> list[str]:
        try:
            c = r.containers().get(cid)
        except NotFound:
            return [f"acknowledged container {cid} is gone"]
        images = (image,) if isinstance(image, str) else image
        out = [] if c.image in images else [f"container {cid} is on {c.image}, not {image}"]
        if files:
            top = writer.writable_dir(r, c.snapshotter, c.snapshot_key)
            for rel, data in writer.FILES.items():
                try:
                    have = Path(top, rel).read_bytes()
                except OSError as exc:
                    have = f"{exc}".encode()
                if have != data:
                    out.append(f"container {cid} lost {rel} on {c.snapshot_key}: "
                               f"{have[:40]!r}")
        return out
    return expect


def test_container_upgrade_survives_power_loss(work: Path, layout: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A container's writes (fsynced by the application) survive ``container upgrade``
    (its rw layer moved onto the new image) and a power cut right after it. Native:
    the upgrade applies the writes through a bind mount, which the recorder follows."""
    root = work / "root"
    sn = ("--snapshotter", "native")
    setup_root(root, lamina(root, *sn, "image", "import", str(layout)))
    steps = [
        Step("create", lamina(root, *sn, "container", "create", containers.V1, "c1", "true"),
             on_image("c1", (containers.V1, containers.V2), files=False)),
        Step("write", [sys.executable, WRITER, str(root), "native", "container:c1", "--sync"],
             on_image("c1", (containers.V1, containers.V2), files=True)),
        Step("upgrade", lamina(root, *sn, "container", "upgrade", "c1", containers.V2),
             on_image("c1", containers.V2, files=True)),
    ]
    no_failures(explored("container upgrade (native)", work, steps, capsys=capsys))


def _as_format_1(root: Path) -> None:
    """What lamina 0.1 left: no format file, group/world-readable stores."""
    (root / "format").unlink()
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p) and "metadata.db" in name:
                os.chmod(p, 0o644)
    os.chmod(root, 0o711)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o711


def test_upgrade_survives_power_loss(images: Images, work: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = work / "root"
    setup_root(root, lamina(root, "image", "import", str(images.tar)))
    _as_format_1(root)
    steps = [Step("open (migrates)", lamina(root, "image", "ls"), has_format(FORMAT))]
    no_failures(explored(f"upgrade 1 -> {FORMAT}", work, steps, capsys=capsys))


# ------------------------------------------------------------------------- the model itself


def _states_after(ops: list[Op]) -> list[Tree]:
    """Every tree the model allows once all of ``ops`` were issued."""
    base = Tree()
    return [replay(ops, base, s) for s in explore(ops, base, [len(ops)])
            if s.point == len(ops)]


def _content(t: Tree, name: str) -> bytes | None:
    ino = t.lookup([name])
    return None if ino is None else bytes(t.data[ino])


def test_model_rename_without_fsync_may_persist_before_its_data() -> None:
    """write tmp; rename tmp -> f: a crash may leave f empty (ext4's zero-length
    files); fsync tmp before the rename and fsync the directory after: it may not."""
    careless: list[Op] = [Create(0, "tmp", 1, "f", 0o600), Write(1, 0, b"data"),
                          Rename(0, "tmp", 0, "f")]
    assert b"" in {_content(t, "f") for t in _states_after(careless)}
    careful: list[Op] = [Create(0, "tmp", 1, "f", 0o600), Write(1, 0, b"data"), Sync(1),
                         Rename(0, "tmp", 0, "f"), Sync(0)]
    assert {_content(t, "f") for t in _states_after(careful)} == {b"data"}
    # without the directory's fsync the rename itself may be lost, never the data
    no_dirsync = careful[:-1]
    assert {_content(t, "f") for t in _states_after(no_dirsync)} == {b"data", None}
    # a file's fsync makes its data durable, not its name (nor any other)
    named: list[Op] = [Create(0, "a", 1, "f", 0o600), Write(1, 0, b"x"), Sync(1)]
    assert {_content(t, "a") for t in _states_after(named)} == {b"x", None}


def test_model_metadata_persists_in_order_and_syncfs_makes_all_durable() -> None:
    ops: list[Op] = [Create(0, "a", 1, "d", 0o700), Create(0, "b", 2, "d", 0o700)]
    present = {(t.lookup(["a"]) is not None, t.lookup(["b"]) is not None)
               for t in _states_after(ops)}
    assert (False, True) not in present  # b never without a
    assert {(True, True), (True, False), (False, False)} <= present
    assert all(t.lookup(["b"]) is not None for t in _states_after([*ops, SyncAll()]))


def test_trace_reader_joins_interrupted_calls(tmp_path: Path) -> None:
    """Two threads: an unfinished write resumed after another call returned; a failed
    call dropped; every string in hex (-xx)."""
    p = '"\\x2f\\x72\\x2f\\x66"'  # "/r/f"
    trace = tmp_path / "t.txt"
    trace.write_text(
        f"10 openat(AT_FDCWD<\\x2f>, {p}, O_WRONLY|O_CREAT, 0600) = 3<\\x2f\\x72\\x2f\\x66>\n"
        "10 write(3<\\x2f\\x72\\x2f\\x66>, \"\\x68\\x69\", 2 <unfinished ...>\n"
        "11 fsync(4<\\x2f\\x72>) = 0\n"
        "10 <... write resumed>)                 = 2\n"
        f"11 unlinkat(AT_FDCWD<\\x2f>, {p}, 0) = -1 ENOENT (No such file or directory)\n"
        "12 ???( <unfinished ...>\n"  # a call strace cannot name, as a process exits
        "13 ???()                                = ?\n"
        "12 <... ??? resumed>)                   = ?\n"
        "11 +++ exited with 0 +++\n")
    calls = list(parse(trace))
    assert [c.name for c in calls] == ["openat", "fsync", "write"]
    assert unhex(calls[2].args[1]) == b"hi" and calls[2].ret == "2"
    rec = Recorder(Path("/r"), Tree())  # /r need not exist: nothing is read
    rec.feed(calls)
    assert [type(op).__name__ for op in rec.ops] == ["Create", "Sync", "Write"]
    assert _content(rec.tree, "f") == b"hi"
