"""HTTP/1.1 for registries, on the standard library's ``http.client``.

Connections are kept per (scheme, host, TLS settings) and reused once a
response has been read to its end. TLS uses the system CAs, plus the CA files
and client certificates an endpoint's ``hosts.toml`` names, or no
verification at all with ``skip_verify``.

Failure model: a connection that cannot be made, is reset, times out, ends a
body early (fewer bytes than Content-Length) or *stalls* — delivers less than
``stall_rate`` bytes per second over ``stall_time`` seconds, so a server that
drips a byte now and then cannot hold a pull forever — raises
:class:`TransportError` (Unavailable); the callers above decide whether to
retry. Proxies: ``http://`` ones, from the environment (``HTTP_PROXY``,
``HTTPS_PROXY``, ``NO_PROXY``; never for loopback hosts) or given per host;
HTTPS goes through a ``CONNECT`` tunnel, so TLS and its name check stay end
to end. Redirects (GET and HEAD only) are followed at most
``max_redirects`` times; the ``Authorization`` header goes only to the host
that was asked, never to the one a redirect names (blob storage).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import IO

from lamina.errors import InvalidArgument, Unavailable

__all__ = ["Response", "TLSConfig", "Transport", "TransportError", "proxy_for"]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_Key = tuple[str, str, "TLSConfig", str]  # scheme, host, TLS, proxy URL ("" = direct)
_SEND_BLOCK = 1 << 20  # bytes per send of a streamed request body
Body = bytes | Callable[[], IO[bytes]] | None


def proxy_for(scheme: str, netloc: str) -> str:
    """The environment's proxy for ``scheme://netloc`` (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``NO_PROXY``, either case), or "". Loopback hosts never go through one (as Go's
    ``ProxyFromEnvironment``, which containerd uses)."""
    from lamina.remotes.hosts import is_loopback

    if is_loopback(netloc):
        return ""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme, "")
    if not url or _bypassed(netloc, proxies.get("no", "")):
        return ""
    if "://" not in url:
        url = f"http://{url}"
    if urllib.parse.urlsplit(url).scheme != "http":
        raise InvalidArgument(f"proxy {url!r}: only http:// proxies are supported")
    return url


def _bypassed(netloc: str, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` (``*``, or names, ``.domains`` and ``name:port``) covers it."""
    host = netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*" or entry == netloc.lower():
            return True
        name = entry.lstrip(".")
        if host.lower() == name or host.lower().endswith(f".{name}"):
            return True
    return False


def _proxy_auth(proxy: str) -> dict[str, str]:
    """``Proxy-Authorization`` for the credentials in a proxy URL (none: {})."""
    parts = urllib.parse.urlsplit(proxy)
    if parts.username is None:
        return {}
    raw = f"{urllib.parse.unquote(parts.username)}:" \
          f"{urllib.parse.unquote(parts.password or '')}".encode()
    return {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode()}


class TransportError(Unavailable):
    """The network failed us (refused, reset, timed out, stalled, cut short)."""


@dataclass(frozen=True)
class TLSConfig:
    """How to verify a server, and which certificate to present to it."""

    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    skip_verify: bool = False

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        if self.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            for ca in self.ca:
                ctx.load_verify_locations(cafile=ca)
            for cert, key in self.client:
                ctx.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"TLS material: {exc}") from exc
        return ctx


class Response:
    """A response whose body is read in pieces; return it with :meth:`close`."""

    def __init__(self, transport: Transport, key: _Key,
                 conn: http.client.HTTPConnection, raw: http.client.HTTPResponse,
                 url: str) -> None:
        self._transport, self._key, self._conn, self._raw = transport, key, conn, raw
        self.status = raw.status
        self.reason = raw.reason
        self.headers: Message = raw.headers
        self.url = url
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._closed = False

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    def header(self, name: str, default: str = "") -> str:
        value = self.headers.get(name)
        return default if value is None else str(value)

    def read(self, n: int = 1 << 20) -> bytes:
        """Up to ``n`` bytes (b"" at the end); TransportError on a failure or a stall."""
        try:
            data = self._raw.read1(n)
        except (OSError, http.client.HTTPException) as exc:
            self._fail()
            raise TransportError(f"{self.host}: connection lost while reading: "
                                 f"{exc or type(exc).__name__}") from exc
        if not data and self._raw.length:  # the server closed before Content-Length
            self._fail()
            raise TransportError(f"{self.host}: body cut short "
                                 f"({self._raw.length} bytes never came)")
        self._window_bytes += len(data)
        now = time.monotonic()
        if now - self._window_start >= self._transport.stall_time:
            if self._window_bytes < self._transport.stall_rate * (now - self._window_start):
                self._fail()
                raise TransportError(
                    f"{self.host}: transfer stalled ({self._window_bytes} bytes in "
                    f"{now - self._window_start:.1f}s)")
            self._window_start, self._window_bytes = now, 0
        return data

    def read_all(self, limit: int) -> bytes:
        """The whole body, refusing one longer than ``limit`` bytes without reading it."""
        length = self.header("Content-Length")
        if length.isdigit() and int(length) > limit:
            self.close()
            raise InvalidArgument(f"{self.host}: response of {length} bytes is larger than "
                                  f"the {limit} allowed")
        parts, got = [], 0
        while chunk := self.read(min(1 << 20, limit + 1 - got)):
            parts.append(chunk)
            got += len(chunk)
            if got > limit:
                self.close()
                raise InvalidArgument(f"{self.host}: response larger than the {limit} "
                                      "bytes allowed")
        self.close()
        return b"".join(parts)

    def _fail(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self._conn.close()

    def close(self) -> None:
        """Release the connection: back to the pool when the body was read to its end."""
        if self._closed:
            return
        self._closed = True
        raw = self._raw
        try:
            if not raw.chunked and raw.length is not None and 0 < raw.length <= 65536:
                raw.read()  # a short unread body (an error document): drain, keep the conn
            reusable = (raw.isclosed() or raw.length == 0) and not raw.will_close
        except (OSError, http.client.HTTPException):
            reusable = False
        if reusable:
            raw.close()
            self._transport._release(self._key, self._conn)
        else:
            with contextlib.suppress(Exception):
                self._conn.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport:
    """Pooled HTTP connections (thread-safe: each request takes a connection of its own)."""

    def __init__(self, *, timeout: float = 30.0, stall_time: float = 30.0,
                 stall_rate: float = 1024.0, max_redirects: int = 5,
                 user_agent: str = "lamina/0.1") -> None:
        self.timeout = timeout
        self.stall_time = stall_time
        self.stall_rate = stall_rate
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._contexts: dict[TLSConfig, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def _connection(self, key: _Key) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
            scheme, host, tls, proxy = key
            if scheme == "https":
                ctx = self._contexts.get(tls)
                if ctx is None:
                    ctx = self._contexts[tls] = tls.context()
        # the socket timeout bounds every single wait; stalls are caught above it
        timeout = min(self.timeout, self.stall_time)
        via = host
        if proxy:
            parts = urllib.parse.urlsplit(proxy)
            via = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                via, timeout=timeout, context=ctx, blocksize=_SEND_BLOCK)
            if proxy:  # CONNECT through the proxy; TLS (and its name check) end to end
                conn.set_tunnel(host, headers=_proxy_auth(proxy))
            return conn
        return http.client.HTTPConnection(via, timeout=timeout, blocksize=_SEND_BLOCK)

    def _release(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for c in conns:
            c.close()

    def _once(self, method: str, url: str, headers: Mapping[str, str], body: Body,
              tls: TLSConfig, proxy: str | None) -> Response:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidArgument(f"cannot request {url!r}: not an http(s) URL")
        route = proxy_for(parts.scheme, parts.netloc) if proxy is None else proxy
        key = (parts.scheme, parts.netloc, tls if parts.scheme == "https" else TLSConfig(),
               route)
        target = parts.path or "/"
        if parts.query:
            target += f"?{parts.query}"
        if route and parts.scheme == "http":  # a plain-HTTP proxy is asked for the URL
            target = f"http://{parts.netloc}{target}"
        for attempt in (0, 1):  # a pooled connection the server closed meanwhile: once more
            conn = self._connection(key)
            reused = conn.sock is not None
            payload = body() if callable(body) else body
            extra = _proxy_auth(route) if route and parts.scheme == "http" else {}
            try:
                conn.request(method, target, body=payload,
                             headers={"User-Agent": self.user_agent, **extra, **headers})
                raw = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 0 and isinstance(
                        exc, (http.client.RemoteDisconnected, BrokenPipeError,
                              ConnectionResetError)):
                    continue
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise Unavailable(f"{parts.netloc}: TLS verification failed: "
                                      f"{exc.verify_message}") from exc
                what = "timed out" if isinstance(exc, socket.timeout) else str(exc) or \
                    type(exc).__name__
                raise TransportError(f"{parts.netloc}: {method} failed: {what}") from exc
            finally:
                if payload is not None and not isinstance(payload, bytes):
                    payload.close()
            return Response(self, key, conn, raw, url)
        raise AssertionError("unreachable")

    def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                body: Body = None, tls: TLSConfig | None = None,
                proxy: str | None = None) -> Response:
        """Send one request, following redirects for GET and HEAD (see the module docs).

        ``proxy``: an ``http://[user:password@]host:port`` proxy for this host
        (a hosts.toml ``proxy``), "" for none, None for the environment's."""
        headers = dict(headers or {})
        origin = urllib.parse.urlsplit(url).netloc
        origin_tls = tls = tls or TLSConfig()
        origin_proxy = proxy
        for _ in range(self.max_redirects + 1):
            resp = self._once(method, url, headers, body, tls, proxy)
            if resp.status not in REDIRECTS or method not in ("GET", "HEAD"):
                return resp
            location = resp.header("Location")
            resp.close()
            if not location:
                raise Unavailable(f"{resp.host}: redirect without a Location")
            url = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(url).netloc != origin:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                tls, proxy = TLSConfig(), None
            else:
                tls, proxy = origin_tls, origin_proxy
        raise Unavailable(f"{origin}: more than {self.max_redirects} redirects "
                          f"(last to {url})")
