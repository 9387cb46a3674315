"""Blobs from a registry into the content store: streamed, resumable, verified.

:func:`fetch_blob` writes a blob through the ingest ``pull-<digest>``. A pull
that was killed left that ingest behind; the next one resumes it with
``Range: bytes=<offset>-`` and accepts only a ``206`` whose ``Content-Range``
is exactly ``bytes <offset>-<size-1>/<size>`` (or ``/*``). Any other answer is
asked again without a range, and the first ``offset`` bytes of the full body
are compared (by digest) with what the ingest holds before the rest is
appended; a registry whose blob changed under us is an error. A connection
dropped mid-body resumes the same way, up to the retry policy's attempts.

Bytes are checked while they stream: never more than the descriptor's size,
and the digest before the commit. A blob whose bytes do not match is
aborted (its ingest thrown away), so nothing wrong is ever committed or
resumed; one that fails for any other reason keeps its ingest for the next
try.

:class:`Transfer` lets a consumer read a blob *while* it downloads: it reads
the ingest's data file as it grows (its descriptor stays valid when the
commit renames the file into ``blobs/``) and sees the end only once the blob
is committed — so what it applied is exactly the verified content, or it
gets the download's error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lamina.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from lamina.oci.types import Descriptor
from lamina.remotes.session import Session
from lamina.remotes.transport import Response, TransportError
from lamina.util.progress import Progress

if TYPE_CHECKING:
    from lamina.content import ContentStore, Writer

__all__ = ["Cancelled", "Transfer", "fetch_blob", "ingest_ref"]

CHUNK = 1 << 20
_RANGE = re.compile(r"bytes (\d{1,18})-(\d{1,18})/(\d{1,18}|\*)", re.ASCII)
LOCK_WAIT = 600.0


class Cancelled(Unavailable):
    """The pull this download belongs to failed elsewhere."""


def ingest_ref(digest: str) -> str:
    return f"pull-{digest}"


class Transfer:
    """The state of one blob's download, shared with a consumer (see the module docs)."""

    def __init__(self, desc: Descriptor, data_path: Path | None = None) -> None:
        self.desc = desc
        self.data_path = data_path
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


class TailReader:
    """Reads a blob from its ingest while it downloads; EOF only once it is committed."""

    def __init__(self, transfer: Transfer, cancel: threading.Event) -> None:
        assert transfer.data_path is not None
        self._t = transfer
        self._cancel = cancel
        self._fd = os.open(transfer.data_path, os.O_RDONLY | os.O_CLOEXEC)
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
            data = os.pread(self._fd, min(n, limit), self._pos)
            if data:
                self._pos += len(data)
                return data
            self._t.wait(self._pos)

    def readinto(self, b: bytearray | memoryview) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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


def _content_range_ok(resp: Response, offset: int, size: int) -> bool:
    m = _RANGE.fullmatch(resp.header("Content-Range").strip())
    return bool(m and int(m.group(1)) == offset and int(m.group(2)) == size - 1
                and m.group(3) in ("*", str(size)))


def _skip_prefix(resp: Response, offset: int, writer: Writer, desc: Descriptor,
                 content: ContentStore, ref: str) -> None:
    """Read the first ``offset`` bytes of a full body; they must be what the ingest holds."""
    h = hashlib.sha256()
    left = offset
    while left:
        chunk = resp.read(min(CHUNK, left))
        if not chunk:
            raise TransportError(f"{resp.host}: body ended before the resumed offset")
        h.update(chunk)
        left -= len(chunk)
    if f"sha256:{h.hexdigest()}" != writer.digest():
        writer.close()
        with contextlib.suppress(NotFound, Unavailable):
            content.abort(ref)
        raise FailedPrecondition(f"{resp.host}: blob {desc.digest} changed between "
                                 "attempts (its first bytes differ); fetch it again")


def fetch_blob(session: Session, desc: Descriptor, content: ContentStore, *,
               labels: Mapping[str, str] | None = None, progress: Progress | None = None,
               transfer: Transfer | None = None, cancel: threading.Event | None = None,
               data_path: Callable[[str], Path] | None = None) -> bool:
    """Download blob ``desc`` into ``content``; False when it was there already.

    ``data_path(ref)`` names the ingest's data file, for a :class:`Transfer`
    consumer (set on ``transfer.data_path`` once the ingest is open).
    """
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
            if data_path is not None:
                transfer.data_path = data_path(ref)
            _download(session, desc, content, writer, ref, progress, transfer, cancel, labels)
        finally:
            writer.close()
    except BaseException as exc:
        transfer.finish(exc)
        raise
    transfer.finish()
    progress.event("fetch", desc.digest, done=desc.size, total=desc.size, status="done")
    return True


def _download(session: Session, desc: Descriptor, content: ContentStore, writer: Writer,
              ref: str, progress: Progress, transfer: Transfer, cancel: threading.Event,
              labels: Mapping[str, str] | None) -> None:
    size = desc.size
    if writer.offset > size:
        writer.truncate(0)
    transfer.advance(writer.offset)
    suffix = f"/{session.path}/blobs/{desc.digest}"
    scope = session.scope("pull")
    failures = 0
    use_range = True
    host = session.namespace
    while writer.offset < size:
        offset = writer.offset
        headers = {"Range": f"bytes={offset}-"} if offset and use_range else {}
        if offset:
            progress.event("fetch", desc.digest, done=offset, total=size, status="resuming")
        # (the session has retried a request that failed outright already)
        _, resp = session.request("pull", "GET", suffix, scope=scope, headers=headers)
        host = resp.host
        with resp:
            if resp.status == 404:
                raise NotFound(f"{host}: {session.path}: blob {desc.digest} not found")
            if resp.status == 206 and headers and _content_range_ok(resp, offset, size):
                want = size - offset
            elif resp.status == 206 and headers:
                use_range = False  # a 206 for some other range: ask for the whole blob
                continue
            elif resp.status == 200:
                want = size
            else:
                raise Unavailable(f"{host}: blob {desc.digest}: unexpected "
                                  f"{resp.status} {resp.reason}")
            length = resp.content_length
            if length is not None and length != want:
                raise FailedPrecondition(
                    f"{host}: blob {desc.digest}: Content-Length {length} where "
                    f"{want} bytes are due (descriptor size {size})")
            try:
                if resp.status == 200 and offset:
                    _skip_prefix(resp, offset, writer, desc, content, ref)
                while writer.offset < size:
                    if cancel.is_set():
                        raise Cancelled("the pull was cancelled")
                    chunk = resp.read(min(CHUNK, size - writer.offset))
                    if not chunk:
                        raise TransportError(f"{host}: body ended at {writer.offset} of "
                                             f"{size} bytes")
                    writer.write(chunk)
                    transfer.advance(writer.offset)
                    progress.event("fetch", desc.digest, done=writer.offset, total=size)
                if resp.read(1):
                    raise FailedPrecondition(f"{host}: blob {desc.digest}: more bytes "
                                             f"than its size {size}")
            except TransportError as exc:
                failures += 1
                if failures >= session.retry.attempts:
                    detail = exc.message.removeprefix(f"{host}: ")
                    raise TransportError(f"{host}: blob {desc.digest}: {detail}; gave up "
                                         f"after {failures} attempts at {writer.offset} of "
                                         f"{size} bytes") from exc
                time.sleep(session.retry.delay(failures - 1))
    actual = writer.digest()
    if actual != desc.digest:
        writer.close()
        with contextlib.suppress(NotFound, Unavailable):
            content.abort(ref)
        raise FailedPrecondition(f"{host}: blob {desc.digest}: the registry sent {size} bytes "
                                 f"hashing to {actual}")
    with contextlib.suppress(AlreadyExists):
        writer.commit(size, desc.digest, labels=labels)
