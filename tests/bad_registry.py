"""A registry that misbehaves on purpose (http.server in a thread), for what a real one won't do.

It serves one image honestly (``/v2/<repo>/manifests/<tag>``, blobs with
``Range``), and every request can be intercepted by a *hook* keyed by path:
``hooks[path](handler) -> bool`` answers the request itself (True) or lets
the honest answer go (False). ``repos[repository]`` hooks do the same for
every request under ``/v2/<repository>/`` (after the path hooks), so one
server can misbehave differently per repository. Every request is logged
with its headers.

Hooks that misbehave at the byte level write to ``handler.wfile`` through
:meth:`Handler.raw` and :meth:`Handler.drip`; endless misbehaviour stops
when the server does (``state.stopped``), so no thread outlives a test.
``state.realm``, when set, is the token realm the Bearer challenge names
(instead of the server's own ``/token``): a token server on another host
shares the ``tokens`` set.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


Hook = Callable[["Handler"], bool]


@dataclass
class Logged:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class State:
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # "repo/ref"
    hooks: dict[str, Hook] = field(default_factory=dict)
    log: list[Logged] = field(default_factory=list)
    tokens: set[str] | None = None  # when set: Bearer tokens required (issued at /token)
    issued: int = 0
    throttle: tuple[int, float] | None = None  # (chunk, seconds): blobs sent slowly
    served: int = 0  # blob bytes written
    lock: threading.Lock = field(default_factory=threading.Lock)
    repos: dict[str, Hook] = field(default_factory=dict)  # by repository, after ``hooks``
    realm: str = ""  # the Bearer challenge's realm ("" = http://<this host>/token)
    stopped: threading.Event = field(default_factory=threading.Event)

    def add_blob(self, data: bytes) -> str:
        d = sha(data)
        self.blobs[d] = data
        return d

    def add_manifest(self, repo: str, tags: list[str], media_type: str, doc: Any) -> str:
        data = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
        d = sha(data)
        for t in [*tags, d]:
            self.manifests[f"{repo}/{t}"] = (media_type, data)
        return d

    def requests(self, method: str = "", prefix: str = "") -> list[Logged]:
        with self.lock:
            return [r for r in self.log if (not method or r.method == method)
                    and r.path.startswith(prefix)]

    def authorizations(self) -> list[str]:
        """Every Authorization header this server received, in order."""
        with self.lock:
            return [v for r in self.log for k, v in r.headers.items()
                    if k.lower() == "authorization"]


_API_KINDS = ("/manifests/", "/blobs/", "/referrers/", "/tags/")


def repository_of(path: str) -> str:
    """``team/app`` of ``/v2/team/app/blobs/...`` ("" for a path outside a repository)."""
    if not path.startswith("/v2/"):
        return ""
    rest = path[len("/v2/"):]
    cuts = [rest.find(k) for k in _API_KINDS if rest.find(k) > 0]
    return rest[:min(cuts)] if cuts else ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def repo(self) -> str:
        """The repository this request is about ("" if none)."""
        return repository_of(self.path.split("?", 1)[0])

    def raw(self, data: bytes, *, close: bool = True) -> bool:
        """Write ``data`` as it is (a whole response, or part of one); False if the
        client has gone. ``close``: the connection ends after this request."""
        self.close_connection = self.close_connection or close
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        return True

    def drip(self, data: bytes, *, pause: float = 0.05, repeat: bool = False) -> bool:
        """Write ``data`` a byte at a time, ``pause`` seconds apart (for ever with
        ``repeat``), until the client goes or the server stops. Always True."""
        self.close_connection = True
        while True:
            for i in range(len(data)):
                if self.state.stopped.wait(pause) or not self.raw(data[i:i + 1]):
                    return True
            if not repeat:
                return True

    def hold(self) -> bool:
        """Answer nothing, keep the connection open until the server stops. True."""
        self.close_connection = True
        self.state.stopped.wait()
        return True

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
             *, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command == "HEAD":
            return
        step, pause = self.state.throttle or (len(body) or 1, 0.0)
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            if "/blobs/" in self.path:
                with self.state.lock:
                    self.state.served += len(body[i:i + step])
            if pause:
                self.wfile.flush()
                time.sleep(pause)

    def _route(self) -> None:
        path = self.path.split("?", 1)[0]
        with self.state.lock:
            self.state.log.append(Logged(self.command, self.path, dict(self.headers.items())))
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        if self.state.tokens is not None and path != "/token":
            auth = self.headers.get("Authorization", "")
            if auth.removeprefix("Bearer ") not in self.state.tokens:
                realm = self.state.realm or f"http://{self.headers.get('Host')}/token"
                self.send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {
                    "WWW-Authenticate": f'Bearer realm="{realm}",service="bad-registry"'})
                return
        if path == "/token" and self.state.tokens is not None:
            with self.state.lock:
                self.state.issued += 1
                token = f"tok-{self.state.issued}"
                self.state.tokens.add(token)
            self.send(200, json.dumps({"token": token, "expires_in": 300}).encode())
            return
        hook = self.state.hooks.get(path)
        if hook is not None and hook(self):
            return
        repo_hook = self.state.repos.get(repository_of(path))
        if repo_hook is not None and repo_hook(self):
            return
        if path == "/v2/":
            self.send(200, b"{}")
            return
        if "/manifests/" in path:
            repo, _, ref = path[len("/v2/"):].partition("/manifests/")
            found = self.state.manifests.get(f"{repo}/{ref}")
            if found is None:
                self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
                return
            mt, data = found
            self.send(200, data, {"Content-Type": mt, "Docker-Content-Digest": sha(data)})
            return
        if "/blobs/" in path:
            digest = path.rsplit("/", 1)[1]
            blob = self.state.blobs.get(digest)
            if blob is None:
                self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
                return
            data = blob
            rng = self.headers.get("Range", "")
            if rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[len("bytes="):-1])
                self.send(206, data[start:], {
                    "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
                return
            self.send(200, data, {"Docker-Content-Digest": digest})
            return
        self.send(404)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _route


@contextmanager
def serving(state: State) -> Iterator[str]:
    """Serve ``state`` on a free loopback port; yields ``127.0.0.1:<port>``."""
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.stopped.clear()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        state.stopped.set()  # endless hooks end
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------ below HTTP


@contextmanager
def serving_raw(handle: Callable[[socket.socket, threading.Event], None]) -> Iterator[str]:
    """A TCP server on a free loopback port that gives every connection to
    ``handle(sock, stopped)`` in a thread of its own, for what no HTTP server
    would send (a TLS handshake dripped, two schemes on one port). ``stopped``
    is set when the server ends; the socket is closed after ``handle``."""
    stopped = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)

    def serve_one(conn: socket.socket) -> None:
        with suppress(OSError), conn:
            handle(conn, stopped)

    def accept() -> None:
        while not stopped.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopped.set()
        thread.join(timeout=10)
        listener.close()


def read_head(sock: socket.socket, limit: int = 65536) -> bytes:
    """A request's head (up to the blank line), at most ``limit`` bytes."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


# --------------------------------------------------------------------------- a proxy


class ProxyHandler(BaseHTTPRequestHandler):
    """An HTTP proxy: absolute-URL requests forwarded, CONNECT tunnelled. Logs both."""

    protocol_version = "HTTP/1.1"
    log: list[Logged]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        self.log.append(Logged(self.command, self.path, dict(self.headers.items())))
        import http.client
        import urllib.parse

        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if not k.lower().startswith("proxy-")}
        conn = http.client.HTTPConnection(url.netloc, timeout=10)
        target = url.path + (f"?{url.query}" if url.query else "")
        conn.request(self.command, target, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else
                         resp.getheader("Content-Length") or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = _forward

    def do_CONNECT(self) -> None:
        import socket

        self.log.append(Logged("CONNECT", self.path, dict(self.headers.items())))
        host, _, port = self.path.rpartition(":")
        upstream = socket.create_connection((host, int(port)), timeout=10)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        client = self.connection

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    with suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        t = threading.Thread(target=pipe, args=(upstream, client), daemon=True)
        t.start()
        pipe(client, upstream)
        t.join(timeout=10)
        upstream.close()
        self.close_connection = True


@contextmanager
def serving_proxy(log: list[Logged]) -> Iterator[str]:
    """An HTTP proxy on a free loopback port, logging into ``log``; yields host:port."""
    handler = type("BoundProxy", (ProxyHandler,), {"log": log})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
