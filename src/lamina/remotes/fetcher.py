"""Blobs from a registry, as streams verified while they are read.

:meth:`Fetcher.fetch` returns a :class:`BlobReader` on blob ``desc`` from
``offset`` on (a caller resuming what it holds asks for the rest only):

* ``Range: bytes=<offset>-`` is asked for, and only a ``206`` whose
  ``Content-Range`` is exactly ``bytes <offset>-<size-1>/<size>`` (or ``/*``)
  is taken as the rest. Any other answer is asked again without a range, and
  the first ``offset`` bytes of the full body are compared (by digest) with
  what the caller holds before the rest is returned: a registry whose blob
  changed under the caller is :class:`BlobMismatch`.
* A ``Content-Length`` other than the bytes due, a body longer than the
  descriptor's size, a body that ends early: never more than ``size`` bytes
  are returned, and a connection dropped mid-body is asked again from where
  it stopped, up to the retry policy's attempts (the session has retried a
  request that failed outright already).
* The end of the stream is reported only once the whole blob hashes to the
  descriptor's digest (:class:`BlobMismatch` otherwise): the digest of what
  the caller holds (``held``: its first bytes plus all the stream returned;
  a resumed read cannot hash bytes it never saw), else of what the stream
  returned from byte 0.

Where the bytes go (the content store's resumable ingests) is the caller's
business: see :mod:`lamina.images.fetch`.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable

from lamina.errors import FailedPrecondition, NotFound, Unavailable
from lamina.oci.types import Descriptor
from lamina.remotes.session import Session
from lamina.remotes.transport import Response, TransportError
from lamina.util.closing import Closing
from lamina.util.progress import Progress

__all__ = ["CHUNK", "BlobMismatch", "BlobReader", "Cancelled", "Fetcher"]

CHUNK = 1 << 20
_RANGE = re.compile(r"bytes (\d{1,18})-(\d{1,18})/(\d{1,18}|\*)", re.ASCII)


class Cancelled(Unavailable):
    """The pull this download belongs to failed elsewhere."""


class BlobMismatch(FailedPrecondition):
    """The registry's bytes are not the blob's: what the caller holds of it is
    worth nothing (throw it away rather than resume it)."""


def _content_range_ok(resp: Response, offset: int, size: int) -> bool:
    m = _RANGE.fullmatch(resp.header("Content-Range").strip())
    return bool(m and int(m.group(1)) == offset and int(m.group(2)) == size - 1
                and m.group(3) in ("*", str(size)))


class BlobReader(Closing):
    """One blob's bytes from ``offset`` on (see the module docs); ``read`` returns
    at most what is left of the blob, ``b""`` once all of it was read and verified."""

    def __init__(self, session: Session, desc: Descriptor, offset: int, *,
                 held: Callable[[], str] | None, progress: Progress,
                 cancel: threading.Event) -> None:
        if offset and held is None:
            raise ValueError("a read from an offset needs what the caller holds")
        self.desc = desc
        self.host = session.namespace
        self._session = session
        self._pos = offset
        self._held = held
        self._hash = hashlib.sha256() if held is None else None
        self._progress = progress
        self._cancel = cancel
        self._resp: Response | None = None
        self._use_range = True
        self._failures = 0
        self._verified = False

    @property
    def offset(self) -> int:
        """Bytes of the blob before the next one ``read`` returns."""
        return self._pos

    def _digest(self) -> str:
        if self._held is not None:
            return self._held()
        assert self._hash is not None
        return f"sha256:{self._hash.hexdigest()}"

    def _open(self) -> Response:
        """The response whose body continues the blob at :attr:`offset`."""
        size, digest, session = self.desc.size, self.desc.digest, self._session
        while True:
            offset = self._pos
            headers = {"Range": f"bytes={offset}-"} if offset and self._use_range else {}
            if offset:
                self._progress.event("fetch", digest, done=offset, total=size,
                                     status="resuming")
            _, resp = session.request("pull", "GET", f"/{session.path}/blobs/{digest}",
                                      scope=session.scope("pull"), headers=headers)
            self.host = host = resp.host
            if resp.status == 404:
                resp.close()
                raise NotFound(f"{host}: {session.path}: blob {digest} not found")
            if resp.status == 206 and headers and _content_range_ok(resp, offset, size):
                want = size - offset
            elif resp.status == 206 and headers:
                resp.close()
                self._use_range = False  # a 206 for some other range: ask for the whole blob
                continue
            elif resp.status == 200:
                want = size
            else:
                resp.close()
                raise Unavailable(f"{host}: blob {digest}: unexpected "
                                  f"{resp.status} {resp.reason}")
            length = resp.content_length
            if length is not None and length != want:
                resp.close()
                raise FailedPrecondition(
                    f"{host}: blob {digest}: Content-Length {length} where "
                    f"{want} bytes are due (descriptor size {size})")
            self._resp = resp
            if resp.status == 200 and offset:
                self._skip_prefix(resp, offset)
            return resp

    def _skip_prefix(self, resp: Response, offset: int) -> None:
        """Read the first ``offset`` bytes of a full body: they must be what the caller holds."""
        h = hashlib.sha256()
        left = offset
        while left:
            chunk = resp.read(min(CHUNK, left))
            if not chunk:
                raise TransportError(f"{resp.host}: body ended before the resumed offset")
            h.update(chunk)
            left -= len(chunk)
        if f"sha256:{h.hexdigest()}" != self._digest():
            raise BlobMismatch(f"{resp.host}: blob {self.desc.digest} changed between "
                               "attempts (its first bytes differ); fetch it again")

    def _end(self) -> bytes:
        """At the blob's size: nothing more may come, and the whole must hash right."""
        if not self._verified:
            if self._resp is not None and self._resp.read(1):
                raise FailedPrecondition(f"{self.host}: blob {self.desc.digest}: more bytes "
                                         f"than its size {self.desc.size}")
            self.close()
            actual = self._digest()
            if actual != self.desc.digest:
                raise BlobMismatch(f"{self.host}: blob {self.desc.digest}: the registry sent "
                                   f"{self.desc.size} bytes hashing to {actual}")
            self._verified = True
        return b""

    def read(self, n: int = CHUNK) -> bytes:
        size = self.desc.size
        while True:
            try:
                if self._pos >= size:
                    return self._end()
                if self._cancel.is_set():
                    raise Cancelled("the pull was cancelled")
                resp = self._resp or self._open()
                chunk = resp.read(min(n if n > 0 else CHUNK, size - self._pos))
                if not chunk:
                    raise TransportError(f"{self.host}: body ended at {self._pos} of "
                                         f"{size} bytes")
            except TransportError as exc:
                self.close()
                self._failures += 1
                if self._failures >= self._session.retry.attempts:
                    detail = exc.message.removeprefix(f"{self.host}: ")
                    raise TransportError(
                        f"{self.host}: blob {self.desc.digest}: {detail}; gave up after "
                        f"{self._failures} attempts at {self._pos} of {size} bytes") from exc
                time.sleep(self._session.retry.delay(self._failures - 1))
                continue
            self._pos += len(chunk)
            if self._hash is not None:
                self._hash.update(chunk)
            return chunk

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None



class Fetcher:
    """Reads blobs of one repository (containerd's ``remotes.Fetcher``)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def fetch(self, desc: Descriptor, *, offset: int = 0, held: Callable[[], str] | None = None,
              progress: Progress | None = None,
              cancel: threading.Event | None = None) -> BlobReader:
        """Blob ``desc`` from byte ``offset`` on, verified as it is read (module docs).

        ``held()``: the digest of the bytes the caller holds (the first ``offset``,
        and then everything read); needed from an offset. ``cancel`` set: the
        next read is :class:`Cancelled`."""
        return BlobReader(self.session, desc, offset, held=held,
                          progress=progress or Progress(), cancel=cancel or threading.Event())
