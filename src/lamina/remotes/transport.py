"""HTTP/1.1 for registries, on the standard library's ``http.client``.

Connections are kept per (scheme, host, TLS settings) and reused once a
response has been read to its end. TLS uses the system CAs, plus the CA files
and client certificates an endpoint's ``hosts.toml`` names, or no
verification at all with ``skip_verify``.

Failure model: every phase of a request has a deadline, kept by one
watchdog thread per transport that shuts the socket down when it passes, so
no server can hold a request forever however it drips its bytes:

- connecting (TCP, the proxy's ``CONNECT``, the TLS handshake): ``timeout``;
- sending a request body: each block of 1 MiB within ``timeout``;
- the response head (status line and headers, any number of ``100
  Continue`` before them): ``header_timeout`` from the request's end;
- each read of a body: ``timeout``; a whole document read with
  :meth:`Response.read_all` (manifests, tokens): ``document_timeout``;
- a body that *stalls* — less than ``stall_rate`` bytes per second over
  ``stall_time`` seconds — is given up, so a blob cannot be dripped either.

A connection that cannot be made, is reset, misses a deadline, ends a body
early (fewer bytes than Content-Length), stalls, or speaks broken HTTP (a
header line over 64 KiB, more than 100 headers, bad chunked encoding) raises
:class:`TransportError` (Unavailable); the callers above decide whether to
retry. Proxies: ``http://`` ones, from the environment (``HTTP_PROXY``,
``HTTPS_PROXY``, ``NO_PROXY``; never for loopback hosts) or given per host;
HTTPS goes through a ``CONNECT`` tunnel, so TLS and its name check stay end
to end. Redirects (GET and HEAD only) are followed at most
``max_redirects`` times, only to ``http(s)`` URLs that parse (an unusable
``Location`` is Unavailable); the ``Authorization`` header goes only to the
scheme and host that were asked, never to another one a redirect names (blob
storage), nor from ``https`` down to ``http`` on the same host.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import IO

from lamina.errors import InvalidArgument, Unavailable
from lamina.errors import printable as _printable
from lamina.util.closing import Closing
from lamina.util.deadlines import Deadlines

__all__ = ["Response", "TLSConfig", "Transport", "TransportError", "printable", "proxy_for",
           "split_url"]

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_Key = tuple[str, str, "TLSConfig", str]  # scheme, host, TLS, proxy URL ("" = direct)
_SEND_BLOCK = 1 << 20  # bytes per send of a streamed request body
_DRAIN_TIME = 1.0  # seconds to read the rest of a short error body before closing instead
Body = bytes | Callable[[], IO[bytes]] | None


def proxy_for(scheme: str, netloc: str) -> str:
    """The environment's proxy for ``scheme://netloc`` (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``NO_PROXY``, either case), or "". Loopback hosts never go through one (as Go's
    ``ProxyFromEnvironment``, which containerd uses)."""
    from lamina.remotes.hosts import is_loopback

    if is_loopback(netloc):
        return ""
    import urllib.request  # not for loopback registries: ~2 ms of their pulls (startup)

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


class TransportError(Unavailable, shown_as_base=True):
    """The network failed us (refused, reset, timed out, stalled, cut short)."""


class ConnectionRefused(TransportError, shown_as_base=True):
    """Nothing listens at the address: asking again at once would be refused too."""


def printable(text: str, limit: int = 200) -> str:
    """``text`` as one line for an error message: control characters escaped, cut short."""
    out = _printable(text)
    return out if len(out) <= limit else out[:limit] + "…"


def split_url(url: str, what: str, *,
              error: type[Exception] = InvalidArgument) -> urllib.parse.SplitResult:
    """``url`` split, when it is a usable ``http(s)`` URL; else ``error`` saying why.

    Usable: printable ASCII, a scheme of http or https, a host, a numeric port."""
    if not url.isascii() or not url.isprintable() or " " in url:
        raise error(f"{what} {printable(url)!r}: not a plain ASCII URL")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (ValueError for a non-numeric or out-of-range port)
    except ValueError as exc:
        raise error(f"{what} {url!r}: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise error(f"{what} {url!r}: not an http(s) URL")
    return parts


_ABSURD = 1 << 63  # a number too long for int(): more than anything anyway


def _content_length(text: str) -> int | None:
    """A Content-Length value (ASCII digits only), or None."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    return int(text) if len(text) <= 4000 else _ABSURD


class _Deadlines(Deadlines):
    """The transport's deadlines: one that passes shuts its connection's socket down."""

    @contextlib.contextmanager
    def limit(self, conn: http.client.HTTPConnection, seconds: float,
              message: str) -> Iterator[None]:
        """Run the body within ``seconds``; a TransportError(``message``) when it could not."""
        token = self.arm(functools.partial(_shut, conn), seconds)
        try:
            yield
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if self.disarm(token):
                raise TransportError(message) from exc
            raise
        except BaseException:
            self.disarm(token)
            raise
        if self.disarm(token):
            raise TransportError(message)


def _shut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:  # the base class's shutdown: an SSL socket's keeps its state
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


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


class Response(Closing):
    """A response whose body is read in pieces; return it with :meth:`close`."""

    def __init__(self, transport: Transport, key: _Key,
                 conn: http.client.HTTPConnection, raw: http.client.HTTPResponse,
                 url: str) -> None:
        self._transport, self._key, self._conn, self._raw = transport, key, conn, raw
        self.status = raw.status
        self.reason = printable(raw.reason or "", 100)
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

    @property
    def content_length(self) -> int | None:
        """The Content-Length header's value, None when absent or not a number."""
        return _content_length(self.header("Content-Length"))

    def read(self, n: int = 1 << 20, *, deadline: float | None = None) -> bytes:
        """Up to ``n`` bytes (b"" at the end); TransportError on a failure or a stall.

        One read waits at most the transport's ``timeout``, or until the
        monotonic ``deadline`` when that comes first."""
        t = self._transport
        seconds, why = t.timeout, f"no data for {t.timeout:g}s"
        if deadline is not None and deadline - time.monotonic() < seconds:
            seconds = max(deadline - time.monotonic(), 0.0)
            why = f"the response did not end within {t.document_timeout:g}s"
        try:
            with t._deadlines.limit(self._conn, seconds, f"{self.host}: {why}"):
                data = self._raw.read1(n)
        except TransportError:
            self._fail()
            raise
        except (OSError, http.client.HTTPException, ValueError) as exc:
            self._fail()
            raise TransportError(f"{self.host}: connection lost while reading: "
                                 f"{printable(str(exc)) or type(exc).__name__}") from exc
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
        length = self.content_length
        if length is not None and length > limit:
            self.close()
            raise InvalidArgument(f"{self.host}: response of {length} bytes is larger than "
                                  f"the {limit} allowed")
        deadline = time.monotonic() + self._transport.document_timeout
        parts, got = [], 0
        while chunk := self.read(min(1 << 20, limit + 1 - got), deadline=deadline):
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
                # a short unread body (an error document): drain it (briefly), keep the conn
                with self._transport._deadlines.limit(self._conn, _DRAIN_TIME, "drain"):
                    raw.read()
            reusable = (raw.isclosed() or raw.length == 0) and not raw.will_close
        except (OSError, http.client.HTTPException, ValueError, TransportError):
            reusable = False  # (TransportError: the drain took too long)
        if reusable:
            raw.close()
            self._transport._release(self._key, self._conn)
        else:
            with contextlib.suppress(Exception):
                self._conn.close()



class Transport:
    """Pooled HTTP connections (thread-safe: each request takes a connection of its own)."""

    def __init__(self, *, timeout: float = 30.0, header_timeout: float = 60.0,
                 document_timeout: float = 120.0, stall_time: float = 30.0,
                 stall_rate: float = 1024.0, max_redirects: int = 5,
                 user_agent: str = "lamina/0.1") -> None:
        for name, value in (("timeout", timeout), ("header_timeout", header_timeout),
                            ("document_timeout", document_timeout),
                            ("stall_time", stall_time)):
            if not value > 0:
                raise InvalidArgument(f"transport {name} must be positive, not {value!r}")
        if max_redirects < 0:
            raise InvalidArgument(f"max_redirects must be 0 or more, not {max_redirects}")
        self.timeout = timeout
        self.header_timeout = header_timeout
        self.document_timeout = document_timeout
        self.stall_time = stall_time
        self.stall_rate = stall_rate
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._contexts: dict[TLSConfig, ssl.SSLContext] = {}
        self._lock = threading.Lock()
        self._deadlines = _Deadlines()

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
        parts = split_url(url, "cannot request")
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
                if conn.sock is None:
                    with self._deadlines.limit(conn, self.timeout, f"{parts.netloc}: could "
                                               f"not connect within {self.timeout:g}s"):
                        conn.connect()
                conn.request(method, target, body=payload,
                             headers={"User-Agent": self.user_agent, **extra, **headers})
                with self._deadlines.limit(conn, self.header_timeout,
                                           f"{parts.netloc}: {method}: no complete response "
                                           f"head within {self.header_timeout:g}s"):
                    raw = conn.getresponse()
            except TransportError:
                conn.close()
                raise
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 0 and isinstance(
                        exc, (http.client.RemoteDisconnected, BrokenPipeError,
                              ConnectionResetError)):
                    continue
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise Unavailable(f"{parts.netloc}: TLS verification failed: "
                                      f"{exc.verify_message}") from exc
                what = "timed out" if isinstance(exc, socket.timeout) else \
                    printable(str(exc)) or type(exc).__name__
                failed = ConnectionRefused if isinstance(exc, ConnectionRefusedError) \
                    else TransportError
                raise failed(f"{parts.netloc}: {method} failed: {what}") from exc
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
        first = urllib.parse.urlsplit(url)
        origin = first.netloc
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
            try:
                joined = urllib.parse.urljoin(url, location)
            except ValueError:
                joined = location
            parts = split_url(joined, f"{resp.host}: redirect to", error=Unavailable)
            url = joined
            if (parts.scheme, parts.netloc) != (first.scheme, origin):
                # credentials stay with the scheme and host they were meant for
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            if parts.netloc != origin:
                tls, proxy = TLSConfig(), None
            else:
                tls, proxy = origin_tls, origin_proxy
        raise Unavailable(f"{origin}: more than {self.max_redirects} redirects "
                          f"(last to {url})")
