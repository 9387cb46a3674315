"""Cases about the snapshot lifecycle and metadata: keys, kinds, labels, walk, errors."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from lamina.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from lamina.labels import GC_ROOT
from lamina.snapshots import MAX_KEY_SIZE, MAX_LABEL_SIZE, Info, Kind, Snapshotter
from lamina.snapshots.testsuite.fstest import (
    CreateDir,
    CreateFile,
    Remove,
    apply,
    reference_dir,
)
from lamina.snapshots.testsuite.harness import (
    LABELS,
    case,
    check_info,
    commit_empty,
    expect_error,
    mounted,
    same_info,
    same_tree,
    timestamp,
)

# Clock slack when checking that a time lies in an interval measured around a call.
_SLACK = 0.002


def _within(dt: object, lo: float, hi: float, what: str) -> float:
    assert dt is None or hasattr(dt, "timestamp"), what
    t = timestamp(dt, what)  # type: ignore[arg-type]
    if not lo - _SLACK <= t <= hi + _SLACK:
        raise AssertionError(f"{what} {t:.6f} not within [{lo:.6f}, {hi:.6f}]")
    return t


def _prepare_with_file(sn: Snapshotter, work: Path, key: str, name: str, data: bytes) -> None:
    """Prepare ``key`` with no parent and write the file ``name`` into it."""
    with mounted(sn.prepare(key, "", labels=LABELS), work) as root:
        (root / name).write_bytes(data)


@case("Basic")
def basic(sn: Snapshotter, work: Path) -> None:
    """Prepare, fill, commit; a child sees the parent's tree; a view sees both layers."""
    initial = apply(
        CreateFile("/foo", b"foo\n", 0o777),
        CreateDir("/a", 0o755),
        CreateDir("/a/b", 0o755),
        CreateDir("/a/b/c", 0o755),
    )
    diff = apply(
        CreateFile("/bar", b"bar\n", 0o777),
        CreateFile("/foo", b"bar\n", 0o777),
        Remove("/a/b"),
    )
    # Keys that look like paths, as containerd's suite uses.
    preparing = str(work / "preparing")
    mounts = sn.prepare(preparing, "", labels=LABELS)
    with mounted(mounts, work) as root:
        initial(root)
    committed = str(work / "committed")
    sn.commit(committed, preparing, labels=LABELS)
    si = sn.stat(committed)
    check_info(si, name=committed, kind=Kind.COMMITTED, parent="")
    expect_error(NotFound, sn.stat, preparing)

    nxt = str(work / "nextlayer")
    with mounted(sn.prepare(nxt, committed, labels=LABELS), work) as root:
        same_tree(sn, root, reference_dir(work, initial))
        diff(root)
    check_info(sn.stat(nxt), name=nxt, kind=Kind.ACTIVE, parent=committed)

    nxt_committed = str(work / "committed-next")
    sn.commit(nxt_committed, nxt, labels=LABELS)
    si2 = sn.stat(nxt_committed)
    check_info(si2, name=nxt_committed, kind=Kind.COMMITTED, parent=committed)
    expect_error(NotFound, sn.stat, nxt)

    walked = {i.name: i for i in sn.walk()}
    assert set(walked) == {committed, nxt_committed}, sorted(walked)
    same_info(walked[committed], si)
    same_info(walked[nxt_committed], si2)

    view = str(work / "nextnextlayer")
    with mounted(sn.view(view, nxt_committed, labels=LABELS), work) as root:
        same_tree(sn, root, reference_dir(work, initial, diff))
    check_info(sn.stat(view), name=view, kind=Kind.VIEW, parent=nxt_committed)

    sn.remove(view)
    expect_error(FailedPrecondition, sn.remove, committed)
    sn.remove(nxt_committed)
    sn.remove(committed)
    assert list(sn.walk()) == []


@case("StatActive")
def stat_active(sn: Snapshotter, work: Path) -> None:
    """A prepared snapshot stats as active, with its key, parent and labels."""
    key = str(work / "preparing")
    with mounted(sn.prepare(key, "", labels=LABELS), work) as root:
        (root / "foo").write_bytes(b"foo\n")
        check_info(sn.stat(key), name=key, kind=Kind.ACTIVE, parent="", labels=LABELS)


@case("StatCommitted")
def stat_committed(sn: Snapshotter, work: Path) -> None:
    """A committed snapshot stats as committed and carries the commit's labels."""
    key = str(work / "preparing")
    _prepare_with_file(sn, work, key, "foo", b"foo\n")
    name = str(work / "committed")
    sn.commit(name, key, labels={**LABELS, "at": "commit"})
    info = sn.stat(name)
    check_info(info, name=name, kind=Kind.COMMITTED, parent="")
    for k, v in {**LABELS, "at": "commit"}.items():
        assert info.labels.get(k) == v, (k, dict(info.labels))


@case("Transitivity")
def transitivity(sn: Snapshotter, work: Path) -> None:
    """A <- B: B's parent is A, A's parent is empty, stat of B's parent is A."""
    # As in containerd's suite, each layer is committed while still mounted.
    a_key = str(work / "preparing")
    snap_a, snap_b = str(work / "snapA"), str(work / "snapB")
    b_key = str(work / "next")
    with mounted(sn.prepare(a_key, "", labels=LABELS), work) as root_a:
        (root_a / "foo").write_bytes(b"foo\n")
        sn.commit(snap_a, a_key, labels=LABELS)
        with mounted(sn.prepare(b_key, snap_a, labels=LABELS), work) as root_b:
            assert (root_b / "foo").read_bytes() == b"foo\n"
            (root_b / "foo").write_bytes(b"foo bar\n")
            sn.commit(snap_b, b_key, labels=LABELS)
    si_a, si_b = sn.stat(snap_a), sn.stat(snap_b)
    assert si_a.parent == ""
    assert si_b.parent == snap_a
    assert sn.stat(si_b.parent).parent == ""


@case("PrepareViewFailingtest")
def prepare_view_conflicts(sn: Snapshotter, work: Path) -> None:
    """Keys of every kind share one space: reusing one is AlreadyExists, and changes nothing."""
    commit_empty(sn, "snapA", key="preparing")

    sn.prepare("newlayer", "snapA", labels=LABELS)
    expect_error(AlreadyExists, sn.view, "newlayer", "snapA", labels=LABELS)
    expect_error(AlreadyExists, sn.prepare, "newlayer", "snapA", labels=LABELS)
    sn.view("viewlayer", "snapA", labels=LABELS)
    expect_error(AlreadyExists, sn.view, "viewlayer", "snapA", labels=LABELS)
    expect_error(AlreadyExists, sn.prepare, "viewlayer", "", labels=LABELS)
    # A committed name is a key too.
    expect_error(AlreadyExists, sn.prepare, "snapA", "", labels=LABELS)
    expect_error(AlreadyExists, sn.view, "snapA", "snapA", labels=LABELS)

    # Commit onto an existing name of any kind fails and leaves the active key alone.
    sn.prepare("tocommit", "snapA", labels=LABELS)
    for taken in ("snapA", "newlayer", "viewlayer", "tocommit"):
        expect_error(AlreadyExists, sn.commit, taken, "tocommit", labels=LABELS)
        check_info(sn.stat("tocommit"), name="tocommit", kind=Kind.ACTIVE, parent="snapA")
    check_info(sn.stat("newlayer"), name="newlayer", kind=Kind.ACTIVE, parent="snapA")
    check_info(sn.stat("viewlayer"), name="viewlayer", kind=Kind.VIEW, parent="snapA")
    check_info(sn.stat("snapA"), name="snapA", kind=Kind.COMMITTED, parent="")
    names = sorted(i.name for i in sn.walk())
    assert names == ["newlayer", "snapA", "tocommit", "viewlayer"], names


def _base_snapshots(sn: Snapshotter) -> None:
    commit_empty(sn, "c1")
    commit_empty(sn, "c2", "c1")
    sn.prepare("a1", "c2", labels=LABELS)
    sn.prepare("a2", "", labels=LABELS)
    sn.view("v1", "c2", labels=LABELS)
    sn.view("v2", "", labels=LABELS)


_BASE = [
    ("c1", Kind.COMMITTED, ""),
    ("c2", Kind.COMMITTED, "c1"),
    ("a1", Kind.ACTIVE, "c2"),
    ("a2", Kind.ACTIVE, ""),
    ("v1", Kind.VIEW, "c2"),
    ("v2", Kind.VIEW, ""),
]


@case("Update")
def update(sn: Snapshotter, work: Path) -> None:
    """Label updates by field path; times; immutable fields; every kind alike."""
    t1 = time.time()
    _base_snapshots(sn)
    t2 = time.time()
    gc = GC_ROOT
    for name, kind, parent in _BASE:
        st = sn.stat(name)
        check_info(st, name=name, kind=kind, parent=parent)
        created = _within(st.created, t1, t2, f"{name}: created")
        if st.updated != st.created:
            raise AssertionError(f"{name}: updated {st.updated} != created {st.created}")

        root_time = str(time.time())
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", gc: root_time}
        # No field paths: labels replaced; other fields of the Info are ignored.
        other_kind = Kind.VIEW if kind is not Kind.VIEW else Kind.ACTIVE
        u1 = time.time()
        st = sn.update(replace(st, parent="doesnotexist", kind=other_kind, labels=expected))
        u2 = time.time()
        check_info(st, name=name, kind=kind, parent=parent, labels=expected)
        if timestamp(st.created, "created") != created:
            raise AssertionError(f"{name}: created changed to {st.created}")
        last = _within(st.updated, u1, u2, f"{name}: updated")
        same_info(sn.stat(name), st)

        # labels.<k>: set from the Info, or delete when the Info has no value for it.
        time.sleep(0.003)
        st = sn.update(replace(st, labels={"l1": "updated", "l4": "v4"}), "labels.l1", "labels.l2")
        check_info(st, name=name, kind=kind, parent=parent,
                   labels={"l1": "updated", "l3": "v3", gc: root_time})
        t = timestamp(st.updated, "updated")
        assert t > last, f"{name}: updated did not advance ({t} <= {last})"
        last = t

        # An empty value deletes; deleting a missing label is fine.
        st = sn.update(replace(st, labels={"l3": "", "nope": ""}), "labels.l3", "labels.nope")
        check_info(st, name=name, kind=kind, parent=parent, labels={"l1": "updated", gc: root_time})

        # "labels" replaces all of them.
        time.sleep(0.003)
        want = {"l4": "v4", gc: root_time}
        st = sn.update(replace(st, labels=want), "labels")
        check_info(st, name=name, kind=kind, parent=parent, labels=want)
        assert timestamp(st.updated, "updated") > last, f"{name}: updated did not advance"
        same_info(sn.stat(name), st)

        # Immutable or unknown field paths.
        for path in ("parent", "kind", "name", "created", "updated", "bogus", "labelsx"):
            expect_error(InvalidArgument, sn.update, replace(st, parent="doesnotexist"), path)
        same_info(sn.stat(name), st)

        # Label size limit (key + value bytes) through update.
        big = "x" * (MAX_LABEL_SIZE - 2)  # len("big") + this = limit + 1
        expect_error(InvalidArgument, sn.update, replace(st, labels={"big": big}), "labels.big")
        expect_error(InvalidArgument, sn.update, replace(st, labels={"big": big}))
        same_info(sn.stat(name), st)

    expect_error(NotFound, sn.update, Info(kind=Kind.ACTIVE, name="missing", labels={"a": "b"}))


@case("LabelLimits")
def label_limits(sn: Snapshotter, work: Path) -> None:
    """key + value may be MAX_LABEL_SIZE bytes (UTF-8), not one more, on every call."""
    at_limit = {"k": "v" * (MAX_LABEL_SIZE - 1)}
    over = {"k": "v" * MAX_LABEL_SIZE}
    over_utf8 = {"k": "é" * (MAX_LABEL_SIZE // 2)}  # 1 + 4096 bytes, 2049 characters
    sn.prepare("ok", "", labels=at_limit)
    assert dict(sn.stat("ok").labels) == at_limit
    for bad in (over, over_utf8):
        expect_error(InvalidArgument, sn.prepare, "bad-active", "", labels=bad)
        expect_error(NotFound, sn.stat, "bad-active")
        expect_error(InvalidArgument, sn.view, "bad-view", "", labels=bad)
        expect_error(NotFound, sn.stat, "bad-view")
        expect_error(InvalidArgument, sn.commit, "bad-commit", "ok", labels=bad)
        expect_error(NotFound, sn.stat, "bad-commit")
        check_info(sn.stat("ok"), name="ok", kind=Kind.ACTIVE, parent="", labels=at_limit)
    sn.commit("done", "ok", labels=at_limit)
    assert dict(sn.stat("done").labels) == at_limit


@case("KeyLimits")
def key_limits(sn: Snapshotter, work: Path) -> None:
    """A key (or a commit's name) may be MAX_KEY_SIZE bytes (UTF-8), not one more; one
    past the limit is refused with nothing made, and its error line stays short."""
    at_limit = "k" * MAX_KEY_SIZE
    sn.prepare(at_limit, "")
    check_info(sn.stat(at_limit), name=at_limit, kind=Kind.ACTIVE, parent="")
    before = sorted(i.name for i in sn.walk())
    for bad in ("k" * (MAX_KEY_SIZE + 1), "é" * (MAX_KEY_SIZE // 2 + 1), "x" * (1 << 20)):
        for fn, args in ((sn.prepare, (bad, "")), (sn.view, (bad, "")),
                         (sn.commit, (bad, at_limit))):
            refused = expect_error(InvalidArgument, fn, *args)
            assert len(refused.message) < 512, len(refused.message)
        found = expect_error(NotFound, sn.stat, bad)
        assert len(str(found)) <= 8192, len(str(found))  # echoes at most a part of it
    assert sorted(i.name for i in sn.walk()) == before
    sn.commit("c" * MAX_KEY_SIZE, at_limit)
    check_info(sn.stat("c" * MAX_KEY_SIZE), name="c" * MAX_KEY_SIZE, kind=Kind.COMMITTED,
               parent="")


@case("Remove")
def remove(sn: Snapshotter, work: Path) -> None:
    """Removed keys can be reused by any kind; parents go only after their children."""
    commit_empty(sn, "committed-1", key="committed-a")
    sn.prepare("reuse-1", "committed-1", labels=LABELS)
    sn.remove("reuse-1")
    expect_error(NotFound, sn.stat, "reuse-1")
    sn.view("reuse-1", "committed-1", labels=LABELS)
    expect_error(FailedPrecondition, sn.remove, "committed-1")  # a view is a child too
    sn.remove("reuse-1")
    sn.prepare("reuse-1", "", labels=LABELS)
    sn.remove("committed-1")
    expect_error(NotFound, sn.remove, "committed-1")
    sn.commit("committed-1", "reuse-1", labels=LABELS)
    # A committed key's active key is free again.
    sn.prepare("reuse-1", "committed-1", labels=LABELS)
    expect_error(FailedPrecondition, sn.remove, "committed-1")
    check_info(sn.stat("committed-1"), name="committed-1", kind=Kind.COMMITTED, parent="")
    sn.remove("reuse-1")
    sn.remove("committed-1")
    expect_error(NotFound, sn.remove, "missing")
    assert list(sn.walk()) == []


@case("RemoveIntermediateSnapshot")
def remove_intermediate(sn: Snapshotter, work: Path) -> None:
    """base <- inter <- top: removing inter fails until top is gone."""
    base = str(work / "base")
    _prepare_with_file(sn, work, base, "f", b"x")
    committed_base = str(work / "committed-base")
    sn.commit(committed_base, base, labels=LABELS)
    committed_inter = str(work / "committed-inter")
    commit_empty(sn, committed_inter, committed_base, key=str(work / "intermediate"))
    top = str(work / "toplayer")
    sn.prepare(top, committed_inter, labels=LABELS)
    expect_error(FailedPrecondition, sn.remove, committed_inter)
    expect_error(FailedPrecondition, sn.remove, committed_base)
    sn.remove(top)
    expect_error(FailedPrecondition, sn.remove, committed_base)
    sn.remove(committed_inter)
    sn.remove(committed_base)
    assert list(sn.walk()) == []


def _walk_names(sn: Snapshotter, *filters: str) -> list[str]:
    return sorted(i.name for i in sn.walk(*filters))


@case("Walk")
def walk(sn: Snapshotter, work: Path) -> None:
    """Filters: fields, labels (quoted keys, presence), != , AND with ',', OR across filters."""
    gc = {GC_ROOT: "check-walk"}
    sn.prepare("a-np", "", labels=gc)
    commit_empty(sn, "p", key="p-tmp", labels=gc)
    sn.prepare("a", "p", labels=gc)
    sn.view("v", "p", labels=gc)
    sn.prepare("p-wl-tmp", "", labels=gc)
    sn.commit("p-wl", "p-wl-tmp", labels={**gc, "l": "1"})
    sn.prepare("a-wl", "p-wl", labels={**gc, "l": "2"})
    sn.view("v-wl", "p-wl", labels={**gc, "l": "3"})
    sn.prepare("a-np-wl", "", labels={**gc, "l": "2"})
    sn.prepare("x-nogc", "")

    everything = ["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl", "x-nogc"]
    table: list[tuple[list[str], list[str]]] = [
        ([], everything),
        (['labels."containerd.io/gc.root"==check-walk'],
         ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
        (['labels."containerd.io/gc.root"'],
         ["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"]),
        (['kind==active,labels."containerd.io/gc.root"==check-walk'],
         ["a-np", "a", "a-wl", "a-np-wl"]),
        (["kind==active"], ["a-np", "a", "a-wl", "a-np-wl", "x-nogc"]),
        (['kind==view,labels."containerd.io/gc.root"==check-walk'], ["v", "v-wl"]),
        (['kind==committed,labels."containerd.io/gc.root"==check-walk'], ["p", "p-wl"]),
        (["name==p", "name==a-np-wl"], ["p", "a-np-wl"]),
        (['name=="p"'], ["p"]),
        (["name==missing"], []),
        (["name==a-wl,labels.l"], ["a-wl"]),
        (["parent==p"], ["a", "v"]),
        (['parent!=""'], ["a", "v", "a-wl", "v-wl"]),
        (['parent!="",labels."containerd.io/gc.root"==check-walk'], ["a", "v", "a-wl", "v-wl"]),
        (["labels.l"], ["p-wl", "a-wl", "v-wl", "a-np-wl"]),
        (["labels.l==2"], ["a-wl", "a-np-wl"]),
        (["labels.l!=2"], everything_but(everything, "a-wl", "a-np-wl")),
        (["labels.l==2", "kind==view"], ["a-wl", "a-np-wl", "v", "v-wl"]),
    ]
    for filters, want in table:
        got = _walk_names(sn, *filters)
        if got != sorted(want):
            raise AssertionError(f"walk{tuple(filters)!r}: got {got}, want {sorted(want)}")
    for bad in ('labels."unterminated', "==x", "name==a,,"):
        expect_error(InvalidArgument, sn.walk, bad)


def everything_but(names: list[str], *drop: str) -> list[str]:
    return [n for n in names if n not in drop]


def _named_snapshots(sn: Snapshotter, work: Path, prefix: str) -> None:
    c1, c2 = f"{prefix}c1", f"{prefix}c2"
    _prepare_with_file(sn, work, f"{c1}-a", "base", b"base\n")
    sn.commit(c1, f"{c1}-a", labels=LABELS)
    commit_empty(sn, c2, c1)
    sn.prepare(f"{prefix}a1", c2, labels=LABELS)
    sn.view(f"{prefix}v1", c2, labels=LABELS)


@case("StatInWalk")
def stat_in_walk(sn: Snapshotter, work: Path) -> None:
    """stat() while a walk is being iterated works and agrees with the walk."""
    prefix = "stats-in-walk-"
    _named_snapshots(sn, work, prefix)
    seen = 0
    for info in sn.walk():
        if info.name.startswith(prefix):
            same_info(info, sn.stat(info.name))
            seen += 1
    assert seen == 4, seen


@case("UpdateInWalk")
def update_in_walk(sn: Snapshotter, work: Path) -> None:
    """Writes (update, prepare, remove) while a walk is being iterated do not fail."""
    _named_snapshots(sn, work, "uiw-")
    names = []
    for info in sn.walk():
        names.append(info.name)
        sn.update(replace(info, labels={"walked": "yes"}), "labels.walked")
        sn.prepare(f"during-{info.name}", "")
        sn.remove(f"during-{info.name}")
    assert sorted(names) == ["uiw-a1", "uiw-c1", "uiw-c2", "uiw-v1"], names
    for n in names:
        assert sn.stat(n).labels.get("walked") == "yes", n


@case("CloseTwice")
def close_twice(sn: Snapshotter, work: Path) -> None:
    """close() after some work, twice, does not fail."""
    commit_empty(sn, "close", key="close-prepare")
    sn.remove("close")
    sn.close()
    sn.close()


@case("Errors")
def errors(sn: Snapshotter, work: Path) -> None:
    """NotFound, FailedPrecondition and InvalidArgument where they belong; nothing changes."""
    commit_empty(sn, "c")
    sn.prepare("active", "c", labels=LABELS)
    sn.view("view", "c", labels=LABELS)
    before = {i.name: i for i in sn.walk()}

    # NotFound: missing key, missing parent
    expect_error(NotFound, sn.stat, "missing")
    expect_error(NotFound, sn.update, Info(kind=Kind.ACTIVE, name="missing"))
    expect_error(NotFound, sn.remove, "missing")
    expect_error(NotFound, sn.commit, "new-name", "missing")
    expect_error(NotFound, sn.mounts, "missing")
    expect_error(NotFound, sn.usage, "missing")
    expect_error(NotFound, sn.prepare, "k1", "missing-parent")
    expect_error(NotFound, sn.view, "k2", "missing-parent")
    expect_error(NotFound, sn.stat, "c-a")  # committed away

    # FailedPrecondition: wrong kind for the operation
    expect_error(FailedPrecondition, sn.commit, "new-name", "view")
    expect_error(FailedPrecondition, sn.commit, "new-name", "c")
    expect_error(FailedPrecondition, sn.mounts, "c")
    expect_error(FailedPrecondition, sn.remove, "c")

    # InvalidArgument: parents must be committed
    expect_error(InvalidArgument, sn.prepare, "k3", "active")
    expect_error(InvalidArgument, sn.prepare, "k4", "view")
    expect_error(InvalidArgument, sn.view, "k5", "active")
    expect_error(InvalidArgument, sn.view, "k6", "view")

    after = {i.name: i for i in sn.walk()}
    assert sorted(after) == sorted(before), (sorted(before), sorted(after))
    for name, info in before.items():
        same_info(after[name], info)
    assert len(sn.mounts("active")) >= 1
    assert len(sn.mounts("view")) >= 1


_ODD_KEYS = [
    "default/12/sha256:abc",
    "with space",
    "..",
    ".",
    "../escape",
    "/abs/path/../../escape",
    "a//b/",
    "tab\tand\nnewline",
    "ключ-🔑",
    "quote\"and'apostrophe",
    "x" * 300,
]


@case("KeysWithAnyCharacters")
def odd_keys(sn: Snapshotter, work: Path) -> None:
    """Keys are opaque strings: slashes, dots, spaces, unicode, 300 characters."""
    base = work.parent
    outside_before = sorted(os.listdir(base))
    parent = "sha256:" + "0" * 64
    key0 = f"{parent}-prepare"
    layer = apply(CreateFile("/base", b"base\n", 0o644))
    with mounted(sn.prepare(key0, "", labels=LABELS), work) as root:
        layer(root)
    sn.commit(parent, key0, labels=LABELS)
    expected = reference_dir(work, layer)
    for i, key in enumerate(_ODD_KEYS):
        with mounted(sn.prepare(key, parent, labels={"i": str(i)}), work) as root:
            same_tree(sn, root, expected)
            (root / f"file-{i}").write_bytes(key.encode())
        check_info(sn.stat(key), name=key, kind=Kind.ACTIVE, parent=parent, labels={"i": str(i)})
        assert len(sn.mounts(key)) >= 1
        name = f"{key}@committed"
        sn.commit(name, key)
        check_info(sn.stat(name), name=name, kind=Kind.COMMITTED, parent=parent)
        sn.view(key, name)  # the key is free again
        with mounted(sn.mounts(key), work) as root:
            assert (root / f"file-{i}").read_bytes() == key.encode()
            assert (root / "base").read_bytes() == b"base\n"
    names = _walk_names(sn)
    want = sorted([parent, *_ODD_KEYS, *(f"{k}@committed" for k in _ODD_KEYS)])
    assert names == want, names
    assert sorted(os.listdir(base)) == outside_before, "snapshotter wrote outside its root"
    for key in _ODD_KEYS:
        sn.remove(key)
        sn.remove(f"{key}@committed")
    sn.remove(parent)
    assert list(sn.walk()) == []
    assert sorted(os.listdir(base)) == outside_before, "snapshotter wrote outside its root"
