"""The content store: immutable blobs addressed by digest (containerd's content service).

A blob enters the store through an *ingest*, named by a client-chosen
``ref`` (any non-empty string, e.g. ``"layer-sha256:abcd..."``), and becomes
visible only when it is committed under its digest.

The ingest lifecycle
--------------------
1. **Open** a writer: ``w = store.writer(ref, total=size, expected=digest)``.
   ``total`` (0 = unknown) caps how much may be written; ``expected`` lets the
   store say AlreadyExists right away when it has the blob. A ref is held by
   one live writer at a time: opening a ref that another writer holds (in this
   process or any other) is Unavailable.
2. **Write** bytes: ``w.write(chunk)`` appends at ``w.offset``. ``w.digest()``
   is the digest of everything written so far, ``w.status()`` the progress.
3. **Commit**: ``w.commit(size, expected, labels=...)``. The data is made
   durable and checked: a ``size`` other than 0 must equal the bytes written,
   an ``expected`` other than ``""`` must equal their digest. On a mismatch
   the commit is FailedPrecondition and *nothing* is committed; the ingest is
   kept, so the client can ``truncate`` and rewrite, or ``abort``. When the
   store already has the digest the commit is AlreadyExists (and the ingest is
   dropped: the content is there). Otherwise the blob appears atomically, with
   ``labels``, and the writer is finished.
4. **Or stop early**: ``w.close()`` releases the ref but keeps the ingest.
   Opening a writer with the same ref later *resumes* it at its offset (check
   ``w.offset``, skip that much of the source). ``store.abort(ref)`` throws an
   ingest away; ``store.status(ref)`` and ``store.list_statuses()`` show the
   ingests in progress.

:func:`write_blob` does all of that for a stream, including resuming.
:func:`set_labels` sets (or merges in) some labels of a blob, leaving the others.

Blobs are read with :meth:`ContentStore.reader` (a seekable binary file) or
:meth:`ContentStore.read_at`; their metadata is :class:`Info`, whose labels
change through :meth:`ContentStore.update` with the same field-path rules as
snapshots. :meth:`ContentStore.walk` and :meth:`ContentStore.list_statuses`
take containerd filters (see :mod:`lamina.util.filters`): blobs have the fields
``digest``, ``size`` and ``labels.<key>``; ingests ``ref``, ``expected``,
``offset`` and ``total``.

Optional powers are small interfaces a store may implement, checked by
capability (``isinstance``), never by class: :class:`Local` (a store on this
machine's filesystem: where its bytes land, and a reader that follows an
ingest as it is written), :class:`BatchDelete` (many blobs dropped in one
transaction: garbage collection's sweep) and :class:`Checker` (metadata
against disk, and the repair of what crashes leave).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import IO, BinaryIO, Protocol, runtime_checkable

from lamina.content.digest import (
    Digest,
    HashingReader,
    HashingWriter,
    parse_digest,
    sha256_digest,
    validate_digest,
)
from lamina.labels import MAX_LABEL_SIZE, validate_labels
from lamina.problems import Problem

__all__ = [
    "MAX_LABEL_SIZE",
    "BatchDelete",
    "Checker",
    "CleanupReport",
    "ContentStore",
    "Digest",
    "HashingReader",
    "HashingWriter",
    "Info",
    "Local",
    "Status",
    "Writer",
    "parse_digest",
    "set_labels",
    "sha256_digest",
    "validate_digest",
    "validate_labels",
    "write_blob",
]


COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Info:
    """What the store records about a committed blob."""

    digest: str
    size: int
    created: datetime
    updated: datetime
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Status:
    """Progress of one ingest."""

    ref: str
    offset: int
    total: int
    expected: str
    started_at: datetime
    updated_at: datetime


@runtime_checkable
class Writer(Protocol):
    """An open ingest (see the module docs). Not safe to share between threads."""

    @property
    def offset(self) -> int:
        """Bytes written so far (including those of a resumed ingest)."""
        ...

    def write(self, data: bytes) -> int:
        """Append ``data``; returns ``len(data)``. Past ``total`` is FailedPrecondition."""
        ...

    def digest(self) -> str:
        """Digest of the bytes written so far."""
        ...

    def status(self) -> Status:
        """Progress of this ingest."""
        ...

    def commit(
        self, size: int, expected: str, *, labels: Mapping[str, str] | None = None
    ) -> None:
        """Verify (``size`` 0 and ``expected`` "" skip a check) and commit the blob."""
        ...

    def truncate(self, size: int) -> None:
        """Cut the ingest back to ``size`` bytes (at most :attr:`offset`)."""
        ...

    def close(self) -> None:
        """Release the ref, keeping the ingest for a later resume. Idempotent."""
        ...


@runtime_checkable
class ContentStore(Protocol):
    """Blobs addressed by digest, and the ingests that create them."""

    def info(self, digest: str) -> Info:
        """Info of a committed blob; NotFound when missing."""
        ...

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change labels of blob ``info.digest``; returns the new Info.

        No fieldpaths, or ``labels``, replaces all labels with ``info.labels``;
        ``labels.<k>`` sets label ``k`` to ``info.labels[k]``, or deletes it
        when that is empty or missing. Other paths are InvalidArgument.
        """
        ...

    def walk(self, *filters: str) -> Iterator[Info]:
        """Every blob matching any of ``filters`` (all blobs when none)."""
        ...

    def delete(self, digest: str) -> None:
        """Remove a committed blob; NotFound when missing."""
        ...

    def reader(self, digest: str) -> BinaryIO:
        """A seekable binary file on the blob; the caller closes it."""
        ...

    def read_at(self, digest: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer at the end of the blob)."""
        ...

    def writer(self, ref: str, *, total: int = 0, expected: str = "") -> Writer:
        """Open (or resume) the ingest ``ref``; see the module docs."""
        ...

    def status(self, ref: str) -> Status:
        """Progress of ingest ``ref``; NotFound when there is none."""
        ...

    def list_statuses(self, *filters: str) -> list[Status]:
        """Every ingest matching any of ``filters``, sorted by ref."""
        ...

    def abort(self, ref: str) -> None:
        """Throw ingest ``ref`` away; NotFound when there is none."""
        ...

    def close(self) -> None:
        """Release resources (and the refs of open writers); idempotent."""
        ...


def write_blob(
    store: ContentStore,
    ref: str,
    data: bytes | IO[bytes],
    *,
    total: int = 0,
    expected: str = "",
    labels: Mapping[str, str] | None = None,
) -> str:
    """Ingest ``data`` under ``ref`` and commit it; returns the digest.

    Resumes an earlier ingest of ``ref``: a seekable source (whose position 0
    is the blob's first byte) is sought to the ingest's offset; a non-seekable
    one makes the ingest start over. Raises AlreadyExists when the store has
    the blob (the caller may treat that as success); on any other failure the
    ingest is left for a retry.
    """
    stream: IO[bytes] = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    if isinstance(data, bytes | bytearray) and not total:
        total = len(data)
    w = store.writer(ref, total=total, expected=expected)
    try:
        if w.offset:
            seekable = False
            try:
                seekable = stream.seekable()
            except (AttributeError, OSError):
                seekable = False
            if seekable:
                stream.seek(w.offset)
            else:
                w.truncate(0)
        while True:
            chunk = stream.read(COPY_CHUNK)
            if not chunk:
                break
            w.write(chunk)
        digest = w.digest()
        w.commit(total, expected, labels=labels)
        return digest
    finally:
        w.close()


def set_labels(store: ContentStore, digest: str, labels: Mapping[str, str], *,
               info: Info | None = None) -> Info:
    """Set ``labels`` on blob ``digest``, keeping its other labels (an empty value
    deletes that label); returns its Info. Labels that already have their value
    are not written again (nothing is, when all have). ``info``: the blob's Info,
    when the caller has just read it."""
    info = info if info is not None and info.digest == digest else store.info(digest)
    changed = {k: v for k, v in labels.items() if info.labels.get(k, "") != v
               or (not v and k in info.labels)}
    if not changed:
        return info
    return store.update(replace(info, labels={**info.labels, **changed}),
                        *(f"labels.{k}" for k in changed))


@runtime_checkable
class Local(Protocol):
    """A store on this machine's filesystem."""

    @property
    def path(self) -> Path:
        """A directory on the filesystem that holds the blobs and ingests (for free
        space checks)."""
        ...

    def follow(self, ref: str) -> BinaryIO:
        """A reader on ingest ``ref``'s bytes as they are written: a read returns what
        is there (``b""`` at the current end, more may come), and the reader keeps
        reading the same bytes once the ingest is committed. NotFound when there is
        no such ingest. Knowing when the writer is done is the caller's business."""
        ...


@runtime_checkable
class BatchDelete(Protocol):
    """Many blobs can be deleted in one transaction."""

    def delete_many(self, digests: Sequence[str]) -> None:
        """:meth:`ContentStore.delete` of each of ``digests``, in one transaction
        whose blobs are made gone with one sync of their directory; a digest the
        acting owner does not hold is passed over."""
        ...


@dataclass
class CleanupReport:
    """What :meth:`Checker.cleanup` did."""

    removed_temp: list[str] = field(default_factory=list)
    removed_ingests: list[str] = field(default_factory=list)
    restored_rows: list[str] = field(default_factory=list)
    removed_rows: list[str] = field(default_factory=list)
    removed_blobs: list[str] = field(default_factory=list)
    given_to_cli: list[str] = field(default_factory=list)  # rows nobody held


@runtime_checkable
class Checker(Protocol):
    """Metadata and disk can be compared, and what a crash left repaired."""

    def check(self, *, rehash: bool = True) -> list[Problem]:
        """Every disagreement between metadata and disk; with ``rehash`` every blob
        is re-hashed, else only found. Takes no reference (a check is not a use)."""
        ...

    def cleanup(self) -> CleanupReport:
        """Repair what crashes leave behind; what was done."""
        ...
