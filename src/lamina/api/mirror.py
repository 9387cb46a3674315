"""Nodes share layers: a root's content store served read-only as an OCI registry mirror.

``lamina serve --registry-mirror ADDR:PORT`` runs a :class:`RegistryMirror`
beside the gRPC server. Other nodes list it in their ``hosts.toml`` (for
containerd or lamina) ahead of the registry::

    server = "https://registry.example.com"
    [host."http://10.0.0.2:5050"]
      capabilities = ["pull", "resolve"]

and pull what it holds from it; a 404 (or an unreachable mirror) sends them on
to the next host. What is answered is :mod:`lamina.api.distribution`'s:
committed blobs and manifests by digest, never an ingest, never a tag or a
listing, no writes. Content is addressed by its digest and the puller
verifies it. Looking a blob up never writes to the store.

A mirror mirrors registries. Of the CLI's blobs only those a pull fetched are
served (labelled ``containerd.io/distribution.source.<registry>``): what the
CLI made or imported on this node — a checkpoint's memory dump and rw layer,
an imported archive, an ingest — is as unknown as an absent blob, whoever asks
for its digest. containerd's blobs are all served: containerd keeps their
labels in its own metadata (a content proxy is told none), and on a node its
content is what CRI pulled.

Bounds, so that no peer can hold the node: at most ``max_connections``
connections at once (the next one is answered 503 with ``Retry-After`` and
closed); a request head must arrive whole within ``timeout`` seconds and fit
in 16 KiB; a response write that makes no progress for ``timeout`` seconds
closes the connection. One event loop thread serves every connection, so a
slow client stalls only itself; store lookups and disk reads run on a small
thread pool. A blob is streamed in 256 KiB chunks (memory stays flat
whatever its size). Plain HTTP by default, TLS with a certificate and key.

Failure model: the mirror keeps no state. A blob deleted while it is being
sent is sent whole (its file stays open); one deleted before is a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Self

from lamina.api.distribution import API_VERSION, Answer, answer, error_answer
from lamina.errors import AlreadyExists, InvalidArgument, NotFound
from lamina.labels import DISTRIBUTION_SOURCE
from lamina.owners import CLI, OWNERS

if TYPE_CHECKING:
    from lamina.content.local import LocalContentStore

__all__ = ["MirrorLimits", "RegistryMirror", "mirror_of", "parse_listen", "tls_context"]

log = logging.getLogger("lamina.mirror")

CHUNK = 256 << 10
MAX_HEAD = 16 << 10
_REASONS = {200: "OK", 206: "Partial Content", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 416: "Range Not Satisfiable",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True)
class MirrorLimits:
    max_connections: int = 64
    timeout: float = 30.0
    """Seconds for a whole request head, and for any response write to progress."""
    workers: int = 4
    """Threads for store lookups and disk reads."""


def parse_listen(address: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (every interface) as (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"registry mirror address {address!r}: want HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server TLS context from a PEM certificate (chain) and its key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"registry mirror TLS: {cert}, {key}: {exc}") from exc
    return ctx


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]

    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.1":
            return "close" not in conn
        return "keep-alive" in conn

    def has_body(self) -> bool:
        return self.headers.get("content-length", "0").strip() not in ("", "0") or \
            "transfer-encoding" in self.headers


def _parse_head(head: bytes) -> _Request | None:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    if not lines[0].isprintable():  # a control character has no place in a request line
        return None  # (and would reach the log as it is)
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return _Request(parts[0], parts[1], parts[2], headers)


class RegistryMirror:
    """Serves ``store`` read-only over the OCI distribution API (see the module docs)."""

    def __init__(self, store: LocalContentStore, host: str, port: int, *,
                 tls: ssl.SSLContext | None = None, limits: MirrorLimits | None = None,
                 owns_store: bool = False) -> None:
        self._views = [(store.scoped(owner), owner == CLI) for owner in OWNERS]
        self._store = store
        self._owns_store = owns_store
        self._host, self._port = host, port
        self._tls = tls
        self.limits = limits or MirrorLimits()
        self._loop = asyncio.new_event_loop()
        self._pool = futures.ThreadPoolExecutor(self.limits.workers,
                                                thread_name_prefix="lamina-mirror")
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.active = 0
        self.sent_bytes = 0
        """Bytes of content (blobs, manifests) sent so far, error documents aside."""

    # ----------------------------------------------------------- life cycle

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) bound; the port is known once started (port 0 picks one)."""
        return self._host, self._port

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="lamina-mirror", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._bind(), self._loop).result()
        except BaseException:
            self.close()
            raise

    async def _bind(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._connection, self._host, self._port, ssl=self._tls, limit=MAX_HEAD,
                ssl_handshake_timeout=self.limits.timeout if self._tls else None)
        except OSError as exc:
            cls = AlreadyExists if exc.errno == errno.EADDRINUSE else InvalidArgument
            raise cls(f"registry mirror: cannot listen on {self._host}:{self._port}: "
                      f"{exc.strerror}") from exc
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("registry mirror on %s://%s:%d", "https" if self._tls else "http",
                 self._host, self._port)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.limits.timeout)

    def close(self) -> None:
        """Stop listening, cut open connections, release the store if it is ours."""
        if self._thread is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._thread = None
        if not self._loop.is_closed():
            self._loop.close()
        self._pool.shutdown(wait=True)
        if self._owns_store:
            self._store.close()
            self._owns_store = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------- lookups

    def _open_blob(self, digest: str) -> BinaryIO:
        # each owner's own view: the CLI's would take a reference to what only
        # containerd holds (a write), an owner's view only reads
        for view, pulled_only in self._views:
            try:
                if not pulled_only or any(key.startswith(DISTRIBUTION_SOURCE)
                                          for key in view.info(digest).labels):
                    return view.reader(digest)
            except NotFound:
                continue
        raise NotFound(f"content {digest} not found")  # or the CLI's own: not pulled

    def _answer(self, req: _Request) -> Answer:
        try:
            return answer(req.method, req.target, self._open_blob,
                          range_header=req.headers.get("range", ""))
        except Exception:
            log.exception("registry mirror: %s %s", req.method, req.target)
            return error_answer(500, "UNKNOWN", "internal error", close=True)

    # --------------------------------------------------------- connections

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.active += 1
        try:
            if self.active > self.limits.max_connections:
                await self._send(writer, "GET", error_answer(
                    503, "TOOMANYREQUESTS", "too many connections", close=True,
                    headers=[("Retry-After", "1")]))
                return
            writer.transport.set_write_buffer_limits(high=CHUNK)
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.CancelledError):
            # the peer went or stalled (or the mirror stops): drop what is still
            # buffered for it, a plain close would wait to send it
            writer.transport.abort()
        finally:
            self.active -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _one_request(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; whether the connection may serve another."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.limits.timeout)
        except asyncio.LimitOverrunError:
            await self._send(writer, "GET", error_answer(431, "UNSUPPORTED",
                                                         "request head too large", close=True))
            return False
        except asyncio.IncompleteReadError:
            return False
        req = _parse_head(head)
        if req is None:
            await self._send(writer, "GET", error_answer(400, "UNSUPPORTED",
                                                         "malformed request", close=True))
            return False
        ans = await self._loop.run_in_executor(self._pool, self._answer, req)
        # a request body is never read: the connection cannot carry another request
        keep = req.keep_alive() and not req.has_body() and not ans.close
        log.debug("%s %s -> %d", req.method, req.target, ans.status)
        await self._send(writer, req.method, ans, keep_alive=keep)
        return keep

    async def _send(self, writer: asyncio.StreamWriter, method: str, ans: Answer, *,
                    keep_alive: bool = False) -> None:
        try:
            lines = [f"HTTP/1.1 {ans.status} {_REASONS.get(ans.status, '')}",
                     "{}: {}".format(*API_VERSION), *(f"{k}: {v}" for k, v in ans.headers),
                     f"Content-Length: {ans.content_length}",
                     f"Connection: {'keep-alive' if keep_alive else 'close'}", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            if method != "HEAD":
                if ans.blob is not None:
                    await self._stream(writer, ans.blob, ans.offset, ans.length)
                else:
                    writer.write(ans.body)
                    if ans.status < 300:
                        self.sent_bytes += len(ans.body)
            await asyncio.wait_for(writer.drain(), self.limits.timeout)
        finally:
            ans.release()

    async def _stream(self, writer: asyncio.StreamWriter, blob: BinaryIO, offset: int,
                      length: int) -> None:
        fd = blob.fileno()
        for pos, n in _chunks(offset, length):
            data = await self._loop.run_in_executor(self._pool, os.pread, fd, n, pos)
            if len(data) != n:  # a committed blob never shrinks; a broken disk might
                raise ConnectionAbortedError(f"short read at {pos}")
            writer.write(data)
            self.sent_bytes += n
            await asyncio.wait_for(writer.drain(), self.limits.timeout)


def _chunks(offset: int, length: int) -> Iterator[tuple[int, int]]:
    end = offset + length
    while offset < end:
        n = min(CHUNK, end - offset)
        yield offset, n
        offset += n


def mirror_of(content_dir: str | os.PathLike[str], address: str, *,
             cert: str = "", key: str = "", limits: MirrorLimits | None = None
             ) -> RegistryMirror:
    """A mirror of the content store in directory ``content_dir``, with a store of its own."""
    from lamina.content.local import LocalContentStore

    host, port = parse_listen(address)
    if bool(cert) != bool(key):
        raise InvalidArgument("registry mirror TLS needs both a certificate and a key")
    tls = tls_context(cert, key) if cert else None
    return RegistryMirror(LocalContentStore(content_dir), host, port, tls=tls,
                          limits=limits, owns_store=True)
