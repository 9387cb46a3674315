"""Behaviour specific to the local content store: layout, processes, crashes, cleanup."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import stat
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, cast

import pytest

from lamina.content import (
    HashingReader,
    HashingWriter,
    parse_digest,
    sha256_digest,
    validate_digest,
    write_blob,
)
from lamina.content.digest import Digest
from lamina.content.local import BlobCorrupt, LocalContentStore
from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalContentStore]:
    s = LocalContentStore(tmp_path / "content")
    yield s
    s.close()


def ingest_dir(s: LocalContentStore, ref: str) -> Path:
    return s.ingest_dir / hashlib.sha256(ref.encode()).hexdigest()


def test_layout_and_permissions(store: LocalContentStore) -> None:
    w = store.writer("my-ref", total=5)
    w.write(b"hello")
    d = ingest_dir(store, "my-ref")
    assert {"ref", "data", "total", "startedat", "updatedat", "lock"} <= set(os.listdir(d))
    assert (d / "ref").read_text() == "my-ref"
    assert (d / "total").read_text() == "5"
    w.commit(5, sha256_digest(b"hello"))
    w.close()
    assert not d.exists()
    blob = store.path / "blobs" / "sha256" / hashlib.sha256(b"hello").hexdigest()
    assert blob.read_bytes() == b"hello"
    assert stat.S_IMODE(blob.stat().st_mode) == 0o400
    assert (store.path / "metadata.db").exists()
    assert os.listdir(store.ingest_dir) == []


def test_resume_across_store_reopen(tmp_path: Path) -> None:
    s = LocalContentStore(tmp_path)
    w = s.writer("r", total=6)
    w.write(b"abc")
    s.close()  # closes the writer too
    with pytest.raises(FailedPrecondition):
        w.write(b"d")
    s2 = LocalContentStore(tmp_path)
    w2 = s2.writer("r")
    assert (w2.offset, w2.total, w2.digest()) == (3, 6, sha256_digest(b"abc"))
    w2.write(b"def")
    w2.commit(6, sha256_digest(b"abcdef"))
    s2.close()


def test_two_stores_same_process_lock(tmp_path: Path) -> None:
    a = LocalContentStore(tmp_path)
    b = LocalContentStore(tmp_path)
    w = a.writer("shared")
    with pytest.raises(Unavailable, match="locked"):
        b.writer("shared")
    with pytest.raises(Unavailable, match="locked"):
        b.abort("shared")  # not b's writer: cannot be aborted under it
    w.close()
    b.abort("shared")
    a.close()
    b.close()


def _hold_ref(path: str, ref: str, ready: multiprocessing.synchronize.Event,
              done: multiprocessing.synchronize.Event) -> None:
    s = LocalContentStore(path)
    w = s.writer(ref)
    w.write(b"from child")
    ready.set()
    done.wait(30)
    w.close()
    s.close()


def test_lock_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold_ref, args=(str(tmp_path), "xproc", ready, done))
    child.start()
    try:
        assert ready.wait(30)
        s = LocalContentStore(tmp_path)
        with pytest.raises(Unavailable) as exc:
            s.writer("xproc")
        msg = exc.value.message
        assert "locked" in msg and f"pid {child.pid}" in msg and "since" in msg
        assert s.status("xproc").offset == len(b"from child")
        done.set()
        child.join(30)
        assert child.exitcode == 0
        w = s.writer("xproc")  # released when the child closed it
        assert w.offset == len(b"from child")
        w.close()
        s.close()
    finally:
        done.set()
        child.join(30)


def test_ref_hash_collision_guard(store: LocalContentStore) -> None:
    store.writer("a").close()
    (ingest_dir(store, "a") / "ref").write_text("not-a")
    with pytest.raises(Internal, match="holds ref"):
        store.writer("a")


def test_add(store: LocalContentStore) -> None:
    info = store.add(b"payload", labels={"k": "v"})
    assert info.digest == sha256_digest(b"payload") and dict(info.labels) == {"k": "v"}
    with pytest.raises(AlreadyExists):
        store.add(b"payload")
    assert store.add(b"payload", exist_ok=True).digest == info.digest
    assert store.add(io.BytesIO(b"payload"), expected=info.digest, exist_ok=True) == info
    with pytest.raises(AlreadyExists):
        store.add(b"payload", expected=info.digest)
    with pytest.raises(FailedPrecondition):
        store.add(b"other", expected=sha256_digest(b"else"))  # mismatch: nothing added
    with pytest.raises(NotFound):
        store.info(sha256_digest(b"other"))
    assert store.list_statuses() == []  # the failed ingest was aborted
    streamed = store.add(io.BytesIO(b"s" * 3_000_000))
    assert streamed.size == 3_000_000


def test_write_blob_non_seekable_restarts(store: LocalContentStore) -> None:
    class Pipe:
        """A readable stream that cannot seek, like stdin on a pipe."""

        def __init__(self, data: bytes) -> None:
            self._b = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self._b.read(n)

        def seekable(self) -> bool:
            return False

    w = store.writer("pipe")
    w.write(b"garbage")
    w.close()
    data = b"real content"
    assert write_blob(store, "pipe", cast(IO[bytes], Pipe(data))) == sha256_digest(data)
    assert store.read_at(sha256_digest(data), 0, 100) == data


def test_verify(store: LocalContentStore) -> None:
    digest = store.add(b"good").digest
    assert store.verify(digest).size == 4
    blob = store.blob_path(digest)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"evil")
    with pytest.raises(BlobCorrupt, match="corrupt"):
        store.verify(digest)
    blob.unlink()
    with pytest.raises(NotFound):
        store.verify(digest)
    with pytest.raises(NotFound, match="missing"):
        store.reader(digest)


def test_cleanup(store: LocalContentStore) -> None:
    kept = store.add(b"kept", labels={"a": "b"}).digest
    # a row whose blob vanished
    lost = store.add(b"lost").digest
    store.blob_path(lost).unlink()
    # a blob with good content but no row (crash between rename and row insert)
    orphan = b"orphan"
    store.blob_path(sha256_digest(orphan)).write_bytes(orphan)
    # a blob whose content does not match its name, and a misnamed file
    bogus = store.blob_path(sha256_digest(b"claimed"))
    bogus.write_bytes(b"actual")
    (store.blobs_dir / "not-a-digest").write_bytes(b"?")
    # temp files and leftover deletions
    (store.blobs_dir / ".tmp-123").write_bytes(b"")
    (store.ingest_dir / ".del-abc").mkdir()
    # ingests: half-created (no ref), data already moved (no data), resumable, held
    half = ingest_dir(store, "half")
    half.mkdir()
    (half / "data").write_bytes(b"x")
    moved = store.writer("moved")
    moved.close()
    (ingest_dir(store, "moved") / "data").unlink()
    resumable = store.writer("resumable")
    resumable.write(b"r")
    resumable.close()
    held = store.writer("held")

    report = store.cleanup()
    assert report.restored_rows == [sha256_digest(orphan)]
    assert report.removed_rows == [lost]
    misnamed = store.blobs_dir / "not-a-digest"
    assert sorted(report.removed_blobs) == sorted([str(bogus), str(misnamed)])
    assert len(report.removed_temp) == 2
    assert sorted(report.removed_ingests) == sorted([half.name, "moved"])
    assert {i.digest for i in store.walk()} == {kept, sha256_digest(orphan)}
    assert store.verify(sha256_digest(orphan)).size == len(orphan)
    assert dict(store.info(kept).labels) == {"a": "b"}
    assert [s.ref for s in store.list_statuses()] == ["held", "resumable"]

    # old ingests go only when asked, and never a held one
    time.sleep(0.02)
    report = store.cleanup(ingest_max_age=timedelta(seconds=0))
    assert report.removed_ingests == ["resumable"]
    assert [s.ref for s in store.list_statuses()] == ["held"]
    held.close()
    assert store.cleanup() == type(report)()  # nothing left to do


def test_commit_replaces_orphan_blob(store: LocalContentStore) -> None:
    data = b"orphaned then committed"
    orphan = store.blob_path(sha256_digest(data))
    orphan.write_bytes(data)
    info = store.add(data, labels={"x": "y"})
    assert dict(info.labels) == {"x": "y"}
    assert store.verify(info.digest) == info


def test_labels_stored_as_json(store: LocalContentStore) -> None:
    import sqlite3

    digest = store.add(b"j", labels={"b": "2", "a": "1"}).digest
    conn = sqlite3.connect(store.path / "metadata.db")
    (labels,) = conn.execute(  # each owner its own labels (lamina.owners)
        "SELECT labels FROM blob_refs WHERE digest=? AND owner='lamina'", (digest,)
    ).fetchone()
    conn.close()
    assert json.loads(labels) == {"a": "1", "b": "2"}


def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    s = LocalContentStore(tmp_path)
    s.close()
    s.close()
    with pytest.raises(Unavailable):
        s.info(sha256_digest(b""))


def test_digest_helpers() -> None:
    d = sha256_digest(b"abc")
    assert d == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert parse_digest(d) == Digest("sha256", d[7:])
    assert str(parse_digest(d)) == d
    assert validate_digest(d) == d
    with pytest.raises(InvalidArgument, match="unsupported"):
        parse_digest("sha512:" + "0" * 128)
    with pytest.raises(InvalidArgument):
        parse_digest("sha256:" + "0" * 63)
    r = HashingReader(io.BytesIO(b"abcdef"))
    assert r.read(2) + r.read() == b"abcdef"
    assert (r.digest(), r.size) == (sha256_digest(b"abcdef"), 6)
    sink = io.BytesIO()
    hw = HashingWriter(sink)
    hw.write(b"abc")
    hw.write(b"def")
    assert (hw.digest(), hw.size, sink.getvalue()) == (sha256_digest(b"abcdef"), 6, b"abcdef")


def test_writer_context_manager(store: LocalContentStore) -> None:
    with store.writer("cm") as w:
        w.write(b"1")
    with store.writer("cm") as w:
        assert w.offset == 1


def test_a_commit_whose_transaction_fails_leaves_no_blob_file(
        store: LocalContentStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record's COMMIT fails after the data was renamed into blobs/ (a full
    disk: the WAL cannot grow). The file stayed, named by no record, and ``check``
    reported it until ``--repair``; now it goes with the failed commit."""
    import contextlib
    import sqlite3

    real = store._db.write

    @contextlib.contextmanager
    def full_at_commit() -> Iterator[object]:
        with real() as conn:
            yield conn
            raise sqlite3.OperationalError("database or disk is full")

    data = b"lost at commit"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    w = store.writer("full", total=len(data), expected=digest)
    w.write(data)
    monkeypatch.setattr(store._db, "write", full_at_commit)
    with pytest.raises(sqlite3.OperationalError):
        w.commit(len(data), digest)
    monkeypatch.undo()
    w.close()
    assert not store.blob_path(digest).exists()
    assert store.check() == []
    with pytest.raises(NotFound):
        store.info(digest)
