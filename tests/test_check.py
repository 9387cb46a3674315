"""``lamina check``: finds corruption and leftovers; ``--repair`` fixes what it can."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user

from lamina.cli import main
from lamina.errors import FailedPrecondition, InvalidArgument
from lamina.images.service import ImageService
from lamina.metadata.check import check
from lamina.metadata.containers import Container, ContainerStore
from lamina.metadata.root import Root
from lamina.oci.identity import chain_ids
from lamina.snapshots import LocalDirectories

FAILED = FailedPrecondition.exit_code


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> f.ImageRef:
    require_root_user()
    w = tmp_path_factory.mktemp("check-image")
    base = f.minimal_layer(w)
    top = f.layer_from_entries([f.File("hello.txt", "hello")], w)
    return f.build_oci_layout(w / "layout", [base, top], ref_name="c:1")


@pytest.fixture
def root_dir(image: f.ImageRef, tmp_root: Path) -> Path:
    root = Root(tmp_root / "root")
    svc = ImageService(root, snapshotter="overlay")
    svc.import_(image.layout)
    svc.close()
    root.close()
    return tmp_root / "root"


def _cli(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["--root", str(root), *args])
    return code, capsys.readouterr().out


def _flip_byte(path: Path) -> None:
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) | stat.S_IWUSR)
    with open(path, "r+b") as fh:
        first = fh.read(1)
        fh.seek(0)
        fh.write(bytes([first[0] ^ 0xFF]))


def test_clean_root_is_consistent(root_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _cli(capsys, root_dir, "check")
    assert code == 0 and "consistent" in out
    code, out = _cli(capsys, root_dir, "check", "--json")
    assert code == 0 and json.loads(out)["problems"] == []
    assert _cli(capsys, root_dir, "check", "--repair")[0] == 0


def test_corrupt_image_blob(root_dir: Path, image: f.ImageRef,
                            capsys: pytest.CaptureFixture[str]) -> None:
    layer = image.layers[1].digest
    root = Root(root_dir)
    _flip_byte(root.content().blob_path(layer))
    root.close()
    code, out = _cli(capsys, root_dir, "check", "--json")
    report = json.loads(out)
    assert code == FAILED and not report["ok"]
    assert [(p["kind"], p["subject"]) for p in report["problems"]] == [
        ("content.corrupt", layer)]
    # repair deletes the corrupt blob; the image is then broken, which repair cannot fix
    code, out = _cli(capsys, root_dir, "check", "--repair")
    assert code == FAILED
    assert f"deleted corrupt blob {layer}" in out
    assert "broken image: c:1" in out
    code, out = _cli(capsys, root_dir, "check", "--json")
    report = json.loads(out)
    assert code == FAILED
    assert [(p["kind"], p["subject"]) for p in report["problems"]] == [("image", "c:1")]
    assert layer in report["problems"][0]["message"]
    # importing the image again makes the root whole
    assert _cli(capsys, root_dir, "image", "import", str(image.layout))[0] == 0
    assert _cli(capsys, root_dir, "check")[0] == 0


def test_corrupt_unreferenced_blob_is_repaired(root_dir: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = Root(root_dir)
    digest = root.content().add(b"some unreferenced bytes").digest
    _flip_byte(root.content().blob_path(digest))
    report = check(root)
    assert [(p.kind, p.subject) for p in report.problems] == [("content.corrupt", digest)]
    repaired = check(root, repair=True)
    assert repaired.ok and repaired.remaining == [] and repaired.broken_images == []
    assert not root.content().blob_path(digest).exists()
    assert digest not in {i.digest for i in root.content().walk()}
    root.close()


def test_missing_blob_and_orphan_blob_files(root_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = Root(root_dir)
    content = root.content()
    gone = content.add(b"file will vanish").digest
    path = content.blob_path(gone)
    path.unlink()
    good = b"a good blob without its row"
    import hashlib

    good_hex = hashlib.sha256(good).hexdigest()
    (content.blobs_dir / good_hex).write_bytes(good)  # type: ignore[attr-defined]
    (content.blobs_dir / ("0" * 64)).write_bytes(b"garbage")  # type: ignore[attr-defined]
    root.close()
    code, out = _cli(capsys, root_dir, "check", "--json")
    kinds = sorted(p["kind"] for p in json.loads(out)["problems"])
    assert code == FAILED
    assert kinds == ["content.missing", "content.orphan", "content.orphan"]
    code, out = _cli(capsys, root_dir, "check", "--repair")
    assert code == 0, out
    assert f"dropped metadata of missing blob {gone}" in out
    assert f"restored metadata of blob sha256:{good_hex}" in out
    root = Root(root_dir)
    assert root.content().info(f"sha256:{good_hex}").size == len(good)
    assert not (root.content_dir / "blobs" / "sha256" / ("0" * 64)).exists()
    root.close()


def test_snapshot_problems(root_dir: Path, image: f.ImageRef,
                          capsys: pytest.CaptureFixture[str]) -> None:
    root = Root(root_dir)
    sn = root.snapshotter("overlay")
    top = chain_ids(image.diff_ids)[-1]
    sn.prepare("leaf", top)
    sid = sn.snapshot("leaf").id  # type: ignore[attr-defined]
    snapdirs = root.snapshots_dir("overlay") / "snapshots"
    import shutil

    shutil.rmtree(snapdirs / sid)
    (snapdirs / "999").mkdir()
    (snapdirs / "999" / "fs").mkdir()
    root.close()
    code, out = _cli(capsys, root_dir, "check")
    assert code == FAILED
    assert f"snapshot id {sid}: metadata names it" in out
    assert "999: directory unknown to the metadata" in out
    code, out = _cli(capsys, root_dir, "check", "--repair")
    assert code == 0, out
    assert "removed snapshot overlay/leaf: its directory was missing" in out
    assert not (snapdirs / "999").exists()
    root = Root(root_dir)
    assert "leaf" not in {i.name for i in root.snapshotter("overlay").walk()}
    root.close()


def test_missing_layer_directory_with_children_remains(
        root_dir: Path, image: f.ImageRef, capsys: pytest.CaptureFixture[str]) -> None:
    root = Root(root_dir)
    sn = root.snapshotter("overlay")
    base = chain_ids(image.diff_ids)[0]
    sid = sn.snapshot(base).id  # type: ignore[attr-defined]
    import shutil

    shutil.rmtree(root.snapshots_dir("overlay") / "snapshots" / sid)
    root.close()
    code, out = _cli(capsys, root_dir, "check", "--repair")
    assert code == FAILED
    assert f"remaining: [snapshot.missing-directory] snapshot id {sid}" in out
    root = Root(root_dir)
    assert base in {i.name for i in root.snapshotter("overlay").walk()}  # kept: it has a child
    root.close()


# Rows edited (or corrupted) into what no snapshotter writes: check said
# "consistent" for all of them; gc, snapshot ls, snapshot rm and check --repair
# stopped with an internal error on a loop, an unknown kind, a time or a usage
# that is not one.
_DAMAGE = {
    # the image's base layer names its top layer as its parent
    "loop": ("UPDATE snapshots SET parent_id=(SELECT id FROM snapshots WHERE key=:top)"
             " WHERE key=:base", "their parents form a loop", {"base", "top"}),
    "missing parent": ("UPDATE snapshots SET parent_id=9999 WHERE key=:top",
                       "its parent (id 9999) does not exist", set()),
    "unknown kind": ("UPDATE snapshots SET kind='bogus' WHERE key=:top",
                     "its kind 'bogus' is unknown", {"base", "top"}),
    "bad time": ("UPDATE snapshots SET created_ns='x' WHERE key=:top",
                 "its creation time 'x' is not a time", {"base", "top"}),
    "bad usage": ("UPDATE snapshots SET size='x' WHERE key=:top",
                  "its recorded usage 'x'", set()),
    "active parent": ("UPDATE snapshots SET parent_id=(SELECT id FROM snapshots WHERE "
                      "key='other') WHERE key=:top", "its parent 'other' is not committed",
                      set()),
    # label rows: `snapshot info` stopped with "internal error: TypeError", check said
    # consistent; a snapshot read without a label it has may be collected where the
    # label (a gc root, say) keeps it, so it is left alone
    "label name": ("INSERT INTO labels VALUES ((SELECT id FROM snapshots WHERE key=:top),"
                   " x'fffe', 'v')", "its label name b'\\xff\\xfe' is not text",
                   {"base", "top"}),
    "label value": ("INSERT INTO labels VALUES ((SELECT id FROM snapshots WHERE key=:top),"
                    " 'x', x'00ff')", "its label 'x' has a value that is not text (b'\\x00\\xff')",
                    {"base", "top"}),
    # with foreign keys off, a row for an id no snapshot has (yet)
    "orphan label": ("INSERT INTO labels VALUES (9999, 'containerd.io/gc.root', 'x')",
                     "a label row ('containerd.io/gc.root') names a snapshot that does "
                     "not exist", set()),
}


@pytest.mark.parametrize("damage", sorted(_DAMAGE))
def test_damaged_snapshot_rows_are_reported_and_the_rest_still_works(
        damage: str, root_dir: Path, image: f.ImageRef,
        capsys: pytest.CaptureFixture[str]) -> None:
    import sqlite3

    sql, what, kept = _DAMAGE[damage]
    base, top = chain_ids(image.diff_ids)
    names = {"base": base, "top": top, "other": "other"}
    root = Root(root_dir)
    root.snapshotter("overlay").prepare("leaf", top)
    root.snapshotter("overlay").prepare("other", "")
    root.close()
    dbpath = root_dir / "snapshots" / "overlay" / "metadata.db"
    db = sqlite3.connect(dbpath)
    with db:
        db.execute(sql, {"base": base, "top": top})
    db.close()
    code, out = _cli(capsys, root_dir, "check")
    assert code == FAILED and "[snapshot.damaged]" in out and what in out, out
    assert _cli(capsys, root_dir, "snapshot", "ls")[0] == 0
    # the damaged snapshot's own lookup: read, or one line saying it is damaged
    code = main(["--root", str(root_dir), "snapshot", "info", top])
    err = capsys.readouterr().err
    assert code == 0 or (code == 1 and err.startswith("lamina: Internal: snapshot ")
                         and "damaged" in err and err.count("\n") == 1), err
    code, out = _cli(capsys, root_dir, "snapshot", "rm", "leaf")
    assert code == 0, out
    assert _cli(capsys, root_dir, "image", "rm", "c:1")[0] == 0
    code, out = _cli(capsys, root_dir, "gc")
    assert code == 0, out
    code, out = _cli(capsys, root_dir, "check", "--repair")
    assert code in (0, FAILED), out  # never an internal error
    db = sqlite3.connect(dbpath)
    left = {k for (k,) in db.execute("SELECT key FROM snapshots")}
    # what a row left holds through its labels that read (a layer's tree manifest)
    held = {v for (v,) in db.execute(
        "SELECT value FROM labels WHERE snapshot_id IN (SELECT id FROM snapshots) AND "
        "typeof(key) = 'text' AND typeof(value) = 'text' AND "
        "key LIKE 'containerd.io/gc.ref.content%'")}
    db.close()
    # no row a damaged one stands on is collected: what it holds cannot be told;
    # nor any blob a row left names (gc read no edge of a row it left out)
    assert {names[k] for k in kept} <= left, left
    root = Root(root_dir)
    stored = {i.digest for i in root.content().walk()}
    root.close()
    assert held <= stored, held - stored


def test_a_new_snapshot_takes_no_label_a_stray_row_left_for_its_id(root_dir: Path) -> None:
    # A label row for an id no snapshot has yet (a database edited with foreign keys
    # off) went to the next snapshot made: a stray gc root kept it for ever, and the
    # same label given at prepare failed as "internal error: IntegrityError".
    import sqlite3

    root = Root(root_dir)
    sn = root.snapshotter("overlay")
    sn.prepare("first", "")
    root.close()
    db = sqlite3.connect(root_dir / "snapshots" / "overlay" / "metadata.db")
    (last,) = db.execute("SELECT seq FROM sqlite_sequence WHERE name='snapshots'").fetchone()
    with db:
        db.executemany("INSERT INTO labels VALUES (?, ?, 'stray')",
                       [(last + 1, "containerd.io/gc.root"), (last + 2, "mine")])
    db.close()
    root = Root(root_dir)
    sn = root.snapshotter("overlay")
    sn.prepare("second", "")
    sn.prepare("third", "", labels={"mine": "given"})
    assert sn.stat("second").labels == {}
    assert sn.stat("third").labels == {"mine": "given"}
    root.close()


@pytest.mark.parametrize("sql, what", [
    ("UPDATE blobs SET created='garbage' WHERE digest=:d", "Invalid isoformat string"),
    ("UPDATE blob_refs SET labels='[1,2]' WHERE digest=:d", "are not an object of strings"),
    ("UPDATE blobs SET size='x' WHERE digest=:d", "its size 'x' is not a size"),
], ids=["time", "labels", "size"])
def test_a_damaged_content_row_is_reported_and_its_blob_kept(
        sql: str, what: str, root_dir: Path, image: f.ImageRef,
        capsys: pytest.CaptureFixture[str]) -> None:
    # check, content ls and gc stopped with "internal error: ValueError" (or
    # AttributeError); had the row only been skipped, its blob file would have
    # looked like an orphan, which check --repair deletes
    import sqlite3

    root = Root(root_dir)
    digest = next(iter(root.content().walk())).digest
    blob = root.content().blob_path(digest)  # type: ignore[attr-defined]
    root.close()
    db = sqlite3.connect(root_dir / "content" / "metadata.db")
    with db:
        db.execute(sql, {"d": digest})
    db.close()
    code, out = _cli(capsys, root_dir, "check")
    assert code == FAILED and f"[content.damaged] content {digest}: its metadata row is " \
        "damaged: " in out and what in out, out
    assert "content.orphan" not in out, out
    for args in (("content", "ls"), ("image", "rm", "c:1"), ("gc",)):
        code, out = _cli(capsys, root_dir, *args)
        assert code == 0, (args, out)
    code, out = _cli(capsys, root_dir, "check", "--repair")
    assert code == FAILED and "remaining: [content.damaged]" in out, out
    assert blob.is_file()  # kept: whose it is cannot be told


@pytest.mark.parametrize("sql, subject", [
    ("UPDATE images SET target='{bad' WHERE name='c:1'", "image 'c:1'"),
    ("UPDATE images SET created_ns='x' WHERE name='c:1'", "image 'c:1'"),
    ("UPDATE containers SET spec='[' WHERE id='box'", "container 'box'"),
    ("INSERT INTO leases VALUES ('L', 'zz', NULL, '{}')", "lease 'L'"),
], ids=["image-target", "image-time", "container-spec", "lease-time"])
def test_a_damaged_record_is_reported_and_gc_stops_rather_than_guess(
        sql: str, subject: str, root_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # check, image ls, lease ls and gc stopped with "internal error: JSONDecodeError"
    # or TypeError. A record that cannot be read may hold anything: gc refuses in
    # one line (collecting what it might reference would lose it) until the record
    # is removed; check reports it and lists the rest.
    import sqlite3

    root = Root(root_dir)
    store = ContainerStore(root.metadata_path)
    store.create(Container(id="box", image="c:1", snapshotter="overlay",
                           snapshot_key="box-snap"))
    store.close()
    root.snapshotter("overlay").prepare("box-snap", "")
    root.close()
    db = sqlite3.connect(root_dir / "metadata.db")
    with db:
        db.execute(sql)
    db.close()
    code, out = _cli(capsys, root_dir, "check")
    assert code == FAILED and f"[record.damaged] {subject}: its record is damaged (" in out, out
    capsys.readouterr()
    code = main(["--root", str(root_dir), "gc"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"lamina: Internal: {subject}: its record is "
                                        "damaged (") and err.count("\n") == 1, err
    kind, name = subject.split(" ", 1)
    rm = {"image": ("image", "rm"), "container": ("container", "rm"),
          "lease": ("lease", "rm")}[kind]
    code, out = _cli(capsys, root_dir, *rm, name.strip("'"))
    assert code == 0, out
    assert _cli(capsys, root_dir, "gc")[0] == 0
    code, out = _cli(capsys, root_dir, "check")
    assert code == 0, out


@pytest.mark.parametrize("kind", ["image", "container", "lease"])
def test_a_listing_shows_what_reads_and_tells_of_a_damaged_record(
        kind: str, root_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # image ls, container ls and lease ls stopped at the first damaged record:
    # one bad row hid every other (and `image rm $(image ls -q)` removed nothing)
    import sqlite3

    if kind == "image":
        assert _cli(capsys, root_dir, "image", "tag", "c:1", "c:2")[0] == 0
        sql, good, bad = "UPDATE images SET target='{bad' WHERE name='c:2'", "c:1", "c:2"
    elif kind == "container":
        store = ContainerStore(Root(root_dir).metadata_path)
        for cid in ("box", "crate"):
            store.create(Container(id=cid, image="c:1", snapshotter="overlay",
                                   snapshot_key=f"{cid}-snap"))
        store.close()
        sql, good, bad = "UPDATE containers SET spec='[' WHERE id='crate'", "box", "crate"
    else:
        assert _cli(capsys, root_dir, "lease", "create", "--id", "good")[0] == 0
        sql, good, bad = "INSERT INTO leases VALUES ('L', 'zz', NULL, '{}')", "good", "L"
    db = sqlite3.connect(root_dir / "metadata.db")
    with db:
        db.execute(sql)
    db.close()
    names = ("--names",) if kind == "image" else ()  # else repository and tag, or the id
    for flags in (names, ("-q", *names), ("--json",)):
        capsys.readouterr()
        code = main(["--root", str(root_dir), kind, "ls", *flags])
        out, err = capsys.readouterr()
        assert code == 1, (flags, out, err)
        assert good in out and f"{bad!r}" not in out and f'"{bad}"' not in out, (flags, out)
        assert err.startswith(f"lamina: Internal: {kind} {bad!r}: its record is damaged (") \
            and err.count("\n") == 1, (flags, err)


def test_container_without_its_snapshot(root_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = Root(root_dir)
    store = ContainerStore(root.metadata_path)
    store.create(Container(id="ghost", image="c:1", snapshotter="overlay",
                           snapshot_key="no-such-snapshot"))
    store.close()
    report = check(root, repair=True)
    assert not report.ok
    assert [(p.kind, p.subject) for p in report.remaining] == [("container", "ghost")]
    root.close()
    code, out = _cli(capsys, root_dir, "check")
    assert code == FAILED and "container ghost: snapshot overlay/no-such-snapshot" in out


@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_deep_check_finds_a_changed_lower_layer(
        image: f.ImageRef, tmp_root: Path, snapshotter: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    root_dir = tmp_root / "deep"
    root = Root(root_dir)
    ImageService(root, snapshotter=snapshotter).import_(image.layout)
    sn = root.snapshotter(snapshotter)
    base = chain_ids(image.diff_ids)[0]
    assert isinstance(sn, LocalDirectories)
    layer = sn.layer_dir(base)
    victim = next(p for p in sorted(layer.rglob("*")) if p.is_file() and not p.is_symlink()
                  and p.stat().st_size > 0)
    rel = victim.relative_to(layer).as_posix()
    root.close()
    assert _cli(capsys, root_dir, "check", "--deep") == (0, "consistent\n")

    _flip_byte(victim)
    # the cheap check does not read layers; the deep one does
    assert _cli(capsys, root_dir, "check")[0] == 0
    code, out = _cli(capsys, root_dir, "check", "--deep")
    assert code == FAILED
    assert f"[snapshot.layer-changed] layer {snapshotter}/{base}: changed since it was " \
           f"unpacked: {rel}: sha256, mtime_ns changed" in out
    # a removed file, a new one and a mode change are all named; repair leaves it reported
    victim.unlink()
    (layer / "planted").write_text("x")
    os.chmod(layer, 0o777)
    code, out = _cli(capsys, root_dir, "check", "--deep", "--json")
    [problem] = json.loads(out)["problems"]
    assert code == FAILED and problem["subject"] == f"{snapshotter}/{base}"
    assert f"{rel}: missing" in problem["message"] and "planted: extra" in problem["message"]
    code, out = _cli(capsys, root_dir, "check", "--deep", "--repair")
    assert code == FAILED and "remaining: [snapshot.layer-changed]" in out


def test_mtree_records_and_compares_any_tree(tmp_path: Path) -> None:
    from lamina.archive import mtree
    from lamina.fs.files import remove_tree

    top = tmp_path / "t"
    top.mkdir()
    (top / "a").write_bytes(b"abc")
    os.symlink("a", top / "l")
    os.mkfifo(top / "p")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:  # deeper than PATH_MAX, built relative to directory fds
        for _ in range(3000):
            os.mkdir("dd", dir_fd=fd)
            nxt = os.open("dd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # 3,000 levels, few fds
        try:
            recorded = list(mtree.record(top))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert len(recorded) == 3 + 3000 + 1
        assert recorded[0].path == "a" and recorded[0].sha256 == hashlib.sha256(b"abc").hexdigest()
        [leaf] = [e for e in recorded if e.path.endswith("/leaf")]
        assert leaf.path.count("/") == 3000 and [e.path for e in recorded[-2:]] == ["l", "p"]
        import io

        buf = io.BytesIO()
        mtree.encode(recorded, buf)
        buf.seek(0)
        assert list(mtree.decode(buf)) == recorded
        assert list(mtree.compare(recorded, mtree.record(top))) == []
        os.chmod(top / "a", 0o600)
        os.unlink(top / "l")
        os.symlink("elsewhere", top / "l")
        diffs = {str(d) for d in mtree.compare(recorded, mtree.record(top))}
        assert diffs == {"a: mode changed", "l: target, mtime_ns changed"}
        with pytest.raises(InvalidArgument):
            list(mtree.decode(io.BytesIO(b"not a manifest")))
        # a blob of one endless line (no newline) is read only to the line limit
        endless = gzip.compress(b"x" * (17 << 20), compresslevel=1)
        with pytest.raises(InvalidArgument, match="a line longer than"):
            list(mtree.decode(io.BytesIO(endless)))
    finally:  # pytest cannot remove a tree this deep
        remove_tree(top)
