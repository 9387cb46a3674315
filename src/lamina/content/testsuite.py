"""Conformance cases every :class:`~lamina.content.ContentStore` must pass.

Each case is a plain function taking a *factory* that returns a fresh, empty
store; the case closes the store it made. A test module runs them all::

    @pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
    def test_conformance(case, tmp_path):
        case(lambda: LocalContentStore(tmp_path / "content"))

The cases use only the protocol (plus :func:`~lamina.content.write_blob` and
:func:`~lamina.content.set_labels`),
so a remote client is held to exactly the same behaviour.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

from lamina.content import ContentStore, Info, set_labels, sha256_digest, write_blob
from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

__all__ = ["CASES", "StoreFactory"]

StoreFactory = Callable[[], ContentStore]
Case = Callable[[StoreFactory], None]

CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


@contextlib.contextmanager
def _store(factory: StoreFactory) -> Iterator[ContentStore]:
    store = factory()
    try:
        yield store
    finally:
        store.close()


def _raises(exc: type[BaseException], fn: Callable[[], object], contains: str = "") -> str:
    try:
        fn()
    except exc as e:
        msg = str(e)
        assert contains.lower() in msg.lower(), f"{msg!r} does not mention {contains!r}"
        return msg
    raise AssertionError(f"expected {exc.__name__}")


def _put(store: ContentStore, data: bytes, labels: dict[str, str] | None = None) -> str:
    w = store.writer(f"put-{sha256_digest(data)}", total=len(data))
    try:
        w.write(data)
        digest = sha256_digest(data)
        w.commit(len(data), digest, labels=labels)
        return digest
    finally:
        w.close()


@case
def case_write_commit_info_read(factory: StoreFactory) -> None:
    with _store(factory) as s:
        data = b"hello, content store\n" * 100
        digest = sha256_digest(data)
        w = s.writer("ref-1", total=len(data), expected=digest)
        assert w.offset == 0
        assert w.write(data[:10]) == 10
        assert w.write(data[10:]) == len(data) - 10
        assert w.offset == len(data)
        assert w.digest() == digest
        st = w.status()
        assert (st.ref, st.offset, st.total) == ("ref-1", len(data), len(data))
        before = time.time()
        w.commit(len(data), digest, labels={"a": "1"})
        w.close()
        info = s.info(digest)
        assert isinstance(info, Info)
        assert (info.digest, info.size, dict(info.labels)) == (digest, len(data), {"a": "1"})
        assert info.created.tzinfo is not None
        assert abs(info.created.timestamp() - before) < 60
        assert info.updated >= info.created
        with s.reader(digest) as r:
            assert r.read() == data
            r.seek(7)
            assert r.read(5) == data[7:12]
        assert s.read_at(digest, 3, 4) == data[3:7]
        assert s.read_at(digest, len(data) - 2, 100) == data[-2:]
        assert s.read_at(digest, len(data) + 5, 10) == b""
        _raises(NotFound, lambda: s.status("ref-1"))
        _raises(FailedPrecondition, lambda: w.write(b"more"))


@case
def case_empty_blob(factory: StoreFactory) -> None:
    with _store(factory) as s:
        w = s.writer("empty")
        w.commit(0, sha256_digest(b""))
        w.close()
        assert s.info(sha256_digest(b"")).size == 0
        assert s.read_at(sha256_digest(b""), 0, 10) == b""


@case
def case_commit_wrong_digest(factory: StoreFactory) -> None:
    with _store(factory) as s:
        data = b"some bytes"
        wrong = sha256_digest(b"other bytes")
        w = s.writer("bad-digest")
        w.write(data)
        _raises(FailedPrecondition, lambda: w.commit(len(data), wrong), "digest")
        _raises(NotFound, lambda: s.info(sha256_digest(data)))
        _raises(NotFound, lambda: s.info(wrong))
        assert list(s.walk()) == []
        assert s.status("bad-digest").offset == len(data)  # kept for a retry
        # the writer stays usable: truncate, rewrite, commit
        w.truncate(0)
        assert w.offset == 0
        w.write(b"other bytes")
        w.commit(11, wrong)
        w.close()
        assert s.info(wrong).size == 11


@case
def case_commit_wrong_size(factory: StoreFactory) -> None:
    with _store(factory) as s:
        data = b"0123456789"
        w = s.writer("bad-size")
        w.write(data)
        _raises(FailedPrecondition, lambda: w.commit(11, sha256_digest(data)), "size")
        _raises(FailedPrecondition, lambda: w.commit(9, ""), "size")
        _raises(NotFound, lambda: s.info(sha256_digest(data)))
        w.close()
        assert s.status("bad-size").offset == 10
        s.abort("bad-size")
        _raises(NotFound, lambda: s.status("bad-size"))


@case
def case_commit_unchecked(factory: StoreFactory) -> None:
    with _store(factory) as s:
        w = s.writer("unchecked")
        w.write(b"abc")
        w.commit(0, "")
        w.close()
        assert s.info(sha256_digest(b"abc")).size == 3


@case
def case_write_beyond_total(factory: StoreFactory) -> None:
    with _store(factory) as s:
        w = s.writer("capped", total=4)
        w.write(b"abc")
        _raises(FailedPrecondition, lambda: w.write(b"de"), "total")
        assert w.offset == 3
        w.write(b"d")
        w.commit(4, sha256_digest(b"abcd"))
        w.close()


@case
def case_resume_after_close(factory: StoreFactory) -> None:
    with _store(factory) as s:
        data = bytes(range(256)) * 64
        digest = sha256_digest(data)
        w = s.writer("resumable", total=len(data), expected=digest)
        w.write(data[:5000])
        w.close()
        w.close()  # idempotent
        _raises(FailedPrecondition, lambda: w.write(b"x"))
        st = s.status("resumable")
        assert (st.offset, st.total, st.expected) == (5000, len(data), digest)
        w2 = s.writer("resumable")
        assert w2.offset == 5000
        assert w2.digest() == sha256_digest(data[:5000])
        assert w2.status().total == len(data)
        w2.write(data[5000:])
        w2.commit(len(data), digest)
        w2.close()
        with s.reader(digest) as r:
            assert r.read() == data
        # write_blob resumes from a seekable source
        other = b"z" * 3000
        w3 = s.writer("wb")
        w3.write(other[:1000])
        w3.close()
        assert write_blob(s, "wb", io.BytesIO(other), expected=sha256_digest(other)) == (
            sha256_digest(other)
        )
        assert s.info(sha256_digest(other)).size == 3000


@case
def case_locked_ref(factory: StoreFactory) -> None:
    with _store(factory) as s:
        w = s.writer("busy")
        w.write(b"abc")
        msg = _raises(Unavailable, lambda: s.writer("busy"), "locked")
        assert "busy" in msg
        assert s.status("busy").offset == 3  # status works on a held ref
        s.writer("not-busy").close()  # other refs are independent
        w.close()
        w2 = s.writer("busy")
        assert w2.offset == 3
        w2.close()


@case
def case_already_exists(factory: StoreFactory) -> None:
    with _store(factory) as s:
        digest = _put(s, b"exists", {"keep": "me"})
        w = s.writer("dup")
        w.write(b"exists")
        _raises(AlreadyExists, lambda: w.commit(6, digest))
        w.close()
        _raises(NotFound, lambda: s.status("dup"))  # ingest dropped
        assert dict(s.info(digest).labels) == {"keep": "me"}  # untouched
        _raises(AlreadyExists, lambda: s.writer("dup2", expected=digest))
        _raises(NotFound, lambda: s.status("dup2"))
        _raises(AlreadyExists, lambda: write_blob(s, "dup3", b"exists"))


@case
def case_labels_update(factory: StoreFactory) -> None:
    with _store(factory) as s:
        digest = _put(s, b"labelled", {"a": "1", "b": "2"})
        info = s.info(digest)

        def labels(*paths: str, **new: str) -> dict[str, str]:
            return dict(s.update(Info(digest, 0, info.created, info.updated, new),
                                 *paths).labels)

        assert labels("labels.c", c="3") == {"a": "1", "b": "2", "c": "3"}
        assert labels("labels.a", a="10", b="ignored") == {"a": "10", "b": "2", "c": "3"}
        assert labels("labels.b") == {"a": "10", "c": "3"}  # missing value deletes
        assert labels("labels.c", c="") == {"a": "10"}  # empty value deletes
        assert labels("labels.zzz") == {"a": "10"}  # deleting a missing label is fine
        assert labels("labels", x="1") == {"x": "1"}  # replace all
        assert labels(y="2") == {"y": "2"}  # no paths: replace all
        assert labels("labels.dotted.key/x", **{"dotted.key/x": "v"}) == {
            "y": "2", "dotted.key/x": "v"}
        assert dict(s.info(digest).labels) == {"y": "2", "dotted.key/x": "v"}
        assert s.info(digest).updated >= info.updated
        assert s.info(digest).size == len(b"labelled")  # size is not updatable
        _raises(InvalidArgument, lambda: labels("size"))
        _raises(InvalidArgument, lambda: labels("digest"))
        _raises(InvalidArgument, lambda: labels("labels.big", big="x" * 4096))
        missing = sha256_digest(b"missing")
        _raises(NotFound, lambda: s.update(Info(missing, 0, info.created, info.updated, {})))
        w = s.writer("toolarge")
        w.write(b"t")
        _raises(InvalidArgument, lambda: w.commit(1, "", labels={"k" * 4000: "v" * 97}))
        w.commit(1, "", labels={"k" * 4000: "v" * 96})  # exactly 4096 is fine
        w.close()


@case
def case_set_labels(factory: StoreFactory) -> None:
    """set_labels merges: the labels named change, the others stay; an empty value
    deletes; labels that have their value already are not written again."""
    with _store(factory) as s:
        digest = write_blob(s, "r", b"merge", labels={"keep": "1", "old": "x"})
        info = set_labels(s, digest, {"new": "2", "old": ""})
        assert dict(info.labels) == {"keep": "1", "new": "2"}
        assert dict(s.info(digest).labels) == {"keep": "1", "new": "2"}
        time.sleep(0.01)
        again = set_labels(s, digest, {"new": "2", "gone": ""})
        assert again.updated == info.updated and dict(again.labels) == dict(info.labels)


@case
def case_walk_filters(factory: StoreFactory) -> None:
    with _store(factory) as s:
        a = _put(s, b"a", {"kind": "layer", "containerd.io/gc.root": "x"})
        b = _put(s, b"bb", {"kind": "config"})
        c = _put(s, b"ccc")

        def walk(*f: str) -> set[str]:
            return {i.digest for i in s.walk(*f)}

        assert walk() == {a, b, c}
        assert walk(f"digest=={a}") == {a}
        assert walk("size==2") == {b}
        assert walk("size!=2") == {a, c}
        assert walk("labels.kind") == {a, b}
        assert walk("labels.kind==layer") == {a}
        assert walk('labels."kind"==config') == {b}
        assert walk('labels."containerd.io/gc.root"') == {a}
        assert walk("labels.kind~=^con") == {b}
        assert walk("labels.kind,size==1") == {a}  # comma is AND
        assert walk("size==1", "size==3") == {a, c}  # several filters OR
        assert walk("labels.nope") == set()
        def walk_list(flt: str) -> list[Info]:
            return list(s.walk(flt))

        for bad in ("size==", "==1", "labels.kind=x", "a,", '"open', "labels.k~=("):
            _raises(InvalidArgument, functools.partial(walk_list, bad))


@case
def case_delete(factory: StoreFactory) -> None:
    with _store(factory) as s:
        digest = _put(s, b"doomed")
        keep = _put(s, b"kept")
        s.delete(digest)
        _raises(NotFound, lambda: s.info(digest))
        _raises(NotFound, lambda: s.reader(digest))
        _raises(NotFound, lambda: s.read_at(digest, 0, 1))
        _raises(NotFound, lambda: s.delete(digest))
        assert [i.digest for i in s.walk()] == [keep]
        assert _put(s, b"doomed") == digest  # can be added again


@case
def case_abort(factory: StoreFactory) -> None:
    with _store(factory) as s:
        w = s.writer("abort-me")
        w.write(b"partial")
        w.close()
        s.abort("abort-me")
        _raises(NotFound, lambda: s.status("abort-me"))
        _raises(NotFound, lambda: s.abort("abort-me"))
        w2 = s.writer("abort-me")
        assert w2.offset == 0  # a fresh ingest
        w2.write(b"x")
        s.abort("abort-me")  # aborting a ref this client holds open
        _raises(FailedPrecondition, lambda: w2.write(b"y"))
        w2.close()
        _raises(NotFound, lambda: s.status("abort-me"))
        assert list(s.walk()) == []


@case
def case_status_and_list(factory: StoreFactory) -> None:
    with _store(factory) as s:
        assert s.list_statuses() == []
        _raises(NotFound, lambda: s.status("nothing"))
        digest = sha256_digest(b"12345")
        w1 = s.writer("layer-1", total=5, expected=digest)
        w1.write(b"123")
        w2 = s.writer("config-1")
        w2.write(b"{}")
        w2.close()
        st = s.status("layer-1")
        assert (st.ref, st.offset, st.total, st.expected) == ("layer-1", 3, 5, digest)
        assert st.updated_at >= st.started_at
        assert [x.ref for x in s.list_statuses()] == ["config-1", "layer-1"]
        assert [x.ref for x in s.list_statuses("ref~=^layer-")] == ["layer-1"]
        assert [x.ref for x in s.list_statuses("ref==config-1")] == ["config-1"]
        assert [x.ref for x in s.list_statuses(f"expected=={digest}")] == ["layer-1"]
        _raises(InvalidArgument, lambda: s.list_statuses("ref=="))
        w1.write(b"45")
        w1.commit(5, digest)
        w1.close()
        assert [x.ref for x in s.list_statuses()] == ["config-1"]


@case
def case_invalid_arguments(factory: StoreFactory) -> None:
    with _store(factory) as s:
        for bad in ("", "sha256:abc", "sha512:" + "0" * 128, "sha256:" + "A" * 64,
                    "md5:" + "0" * 32, "0" * 64):
            _raises(InvalidArgument, functools.partial(s.info, bad))
            _raises(InvalidArgument, functools.partial(s.delete, bad))
            _raises(InvalidArgument, functools.partial(s.reader, bad))
        _raises(InvalidArgument, lambda: s.writer(""))
        _raises(InvalidArgument, lambda: s.writer("r", expected="sha256:nope"))
        w = s.writer("r")
        w.write(b"x")
        _raises(InvalidArgument, lambda: w.commit(1, "nope"))
        _raises(InvalidArgument, lambda: w.truncate(5))
        w.close()


@case
def case_large_streaming_blob(factory: StoreFactory) -> None:
    mib = 1 << 20
    chunk = bytes(range(256)) * (mib // 256)
    count = 64
    h = hashlib.sha256()
    for _ in range(count):
        h.update(chunk)
    digest = f"sha256:{h.hexdigest()}"
    with _store(factory) as s:
        tracemalloc.start()
        try:
            w = s.writer("large", total=count * mib, expected=digest)
            for _ in range(count):
                w.write(chunk)
            w.commit(count * mib, digest)
            w.close()
            got = hashlib.sha256()
            with s.reader(digest) as r:
                while block := r.read(mib):
                    got.update(block)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert f"sha256:{got.hexdigest()}" == digest
        assert s.info(digest).size == count * mib
        assert peak < 16 * mib, f"peak traced memory {peak} bytes for a 64 MiB blob"


def _close_race(s: ContentStore, errors: list[BaseException]) -> None:
    """Close ``s`` on one thread while others close its writers or write on."""
    writers = [s.writer(f"race-{i}", total=1 << 20) for i in range(3)]
    for w in writers:
        w.write(b"x" * 10)
    writing = s.writer("race-writing", total=1 << 20)
    start = threading.Barrier(len(writers) + 2)

    def run(fn: Callable[[], object]) -> None:
        start.wait()
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    def keep_writing() -> None:
        with contextlib.suppress(FailedPrecondition):  # the store closed it: refused
            for _ in range(1000):
                writing.write(b"y")
        writing.close()

    threads = [threading.Thread(target=run, args=(w.close,)) for w in writers]
    threads.append(threading.Thread(target=run, args=(keep_writing,)))
    threads.append(threading.Thread(target=run, args=(s.close,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@case
def case_store_closes_while_writers_close_on_other_threads(factory: StoreFactory) -> None:
    """A server stopping closes its store while the calls it cancelled still close
    (or write to) their writers: every writer ends once, nothing raises but the
    refusal of a write to a closed writer, and the store's refs are all free again."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the race is run, not skipped
    errors: list[BaseException] = []
    try:
        for _ in range(40):
            _close_race(factory(), errors)
        assert not errors, f"{len(errors)} errors, the first: {errors[0]!r}"
        with _store(factory) as s:
            for i in range(3):
                s.writer(f"race-{i}").close()  # free: a closed writer released its ref
    finally:
        sys.setswitchinterval(previous)
