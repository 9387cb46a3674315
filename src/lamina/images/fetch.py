"""Blobs from a registry into the content store: resumable ingests, followed while they grow.

:func:`fetch_blob` copies a :class:`~lamina.remotes.fetcher.BlobReader` into
the ingest ``pull-<digest>`` (:func:`ingest_ref`). A pull that was killed left
that ingest behind; the next one resumes it, asking the registry only for the
bytes it lacks (the reader checks what comes back against what the ingest
holds). A blob whose bytes do not match
(:class:`~lamina.remotes.fetcher.BlobMismatch`) has its ingest thrown away,
so nothing wrong is ever committed or resumed; one that fails for any other
reason keeps its ingest for the next try.

:class:`Transfer` lets a consumer read a blob *while* it downloads: a
:class:`TailReader` reads the ingest as it grows (through a reader the
content store hands out, :meth:`lamina.content.Local.follow`) and sees the
end only once the blob is committed — so what it applied is exactly the
verified content, or it gets the download's error.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, BinaryIO

from lamina.errors import AlreadyExists, NotFound, Unavailable
from lamina.oci.types import Descriptor
from lamina.remotes.fetcher import CHUNK, BlobMismatch, Cancelled, Fetcher
from lamina.util.progress import Progress
from lamina.util.rawio import RawReader

if TYPE_CHECKING:
    from lamina.content import ContentStore, Writer

__all__ = ["LOCK_WAIT", "TailReader", "Transfer", "fetch_blob", "ingest_ref"]

#: How long a download waits for another process's download of the same blob.
LOCK_WAIT = 600.0


def ingest_ref(digest: str) -> str:
    """The ingest a pull writes blob ``digest`` through (the same in every pull)."""
    return f"pull-{digest}"


class Transfer:
    """The state of one blob's download, shared with a consumer (see the module docs)."""

    def __init__(self, desc: Descriptor) -> None:
        self.desc = desc
        self.opened = False  # the ingest is open: its bytes can be followed
        self.offset = 0
        self.done = False
        self.error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, offset: int) -> None:
        with self._cond:
            self.offset = offset
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self.done = True
            self.error = error
            self._cond.notify_all()

    def wait(self, pos: int, timeout: float = 1.0) -> None:
        """Until more than ``pos`` bytes are there, or the download ended."""
        with self._cond:
            if self.offset <= pos and not self.done:
                self._cond.wait(timeout)


class TailReader(RawReader):
    """Reads a blob while it downloads, from ``following`` (a reader on its ingest
    that returns what is there so far); EOF only once it is committed."""

    def __init__(self, transfer: Transfer, cancel: threading.Event,
                 following: BinaryIO) -> None:
        super().__init__()
        self._t = transfer
        self._cancel = cancel
        self._f: BinaryIO | None = following
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = CHUNK
        while True:
            if self._t.error is not None:
                raise self._t.error
            if self._cancel.is_set():
                raise Cancelled("the pull was cancelled")
            limit = self._t.desc.size - self._pos
            if limit <= 0:
                self._t.wait(self._pos)
                if self._t.done:
                    if self._t.error is not None:
                        raise self._t.error
                    return b""
                continue
            assert self._f is not None
            data = self._f.read(min(n, limit))
            if data:
                self._pos += len(data)
                return data
            self._t.wait(self._pos)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        super().close()


def _open_writer(content: ContentStore, ref: str, desc: Descriptor,
                 cancel: threading.Event) -> Writer | None:
    """The ingest's writer, or None when the blob turned up committed meanwhile."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            return content.writer(ref, total=desc.size, expected=desc.digest)
        except AlreadyExists:
            return None
        except Unavailable:  # another pull holds the ingest: wait for it
            if time.monotonic() > deadline:
                raise
            if cancel.wait(0.2):
                raise Cancelled("the pull was cancelled") from None
            with contextlib.suppress(NotFound):
                content.info(desc.digest)
                return None


def fetch_blob(fetcher: Fetcher, desc: Descriptor, content: ContentStore, *,
               labels: Mapping[str, str] | None = None, progress: Progress | None = None,
               transfer: Transfer | None = None,
               cancel: threading.Event | None = None) -> bool:
    """Download blob ``desc`` into ``content`` through the ingest :func:`ingest_ref`;
    False when it was there already. ``transfer.opened`` says when the ingest is
    open (for a :class:`TailReader`)."""
    progress = progress or Progress()
    cancel = cancel or threading.Event()
    transfer = transfer or Transfer(desc)
    ref = ingest_ref(desc.digest)
    try:
        writer = _open_writer(content, ref, desc, cancel)
        if writer is None:
            progress.event("fetch", desc.digest, done=desc.size, total=desc.size,
                           status="exists")
            transfer.finish()
            return False
        try:
            transfer.opened = True
            _copy(fetcher, desc, content, writer, ref, progress, transfer, cancel, labels)
        finally:
            writer.close()
    except BaseException as exc:
        transfer.finish(exc)
        raise
    transfer.finish()
    progress.event("fetch", desc.digest, done=desc.size, total=desc.size, status="done")
    return True


def _copy(fetcher: Fetcher, desc: Descriptor, content: ContentStore, writer: Writer,
          ref: str, progress: Progress, transfer: Transfer, cancel: threading.Event,
          labels: Mapping[str, str] | None) -> None:
    """The rest of the blob into ``writer``, committed once the reader verified it."""
    size = desc.size
    if writer.offset > size:
        writer.truncate(0)
    transfer.advance(writer.offset)
    try:
        with fetcher.fetch(desc, offset=writer.offset, held=writer.digest, progress=progress,
                           cancel=cancel) as blob:
            while chunk := blob.read(CHUNK):
                writer.write(chunk)
                transfer.advance(writer.offset)
                progress.event("fetch", desc.digest, done=writer.offset, total=size)
    except BlobMismatch:
        writer.close()
        with contextlib.suppress(NotFound, Unavailable):
            content.abort(ref)
        raise
    with contextlib.suppress(AlreadyExists):
        writer.commit(size, desc.digest, labels=labels)
