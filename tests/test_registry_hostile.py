"""A hostile registry: whatever it sends, a pull ends in bounded time with one clean line.

Each case makes one repository of a misbehaving registry (``bad_registry``,
hooks per repository) misbehave in one way, with, where a redirect or a token
server needs one, a second host (another port: another origin). A case asserts

- the outcome: a correct result, or one line of the right error class;
- that it ended: the pull runs in a thread joined with a generous deadline,
  and only the client's own deadlines (set short here: a second or two) can
  make it end that soon — nothing in the test sleeps or measures time;
- where credentials went: the registry's user and password (or its tokens)
  never reach the other host, unless the registry itself named that host as
  its token realm;
- that nothing was written outside the root, no image registered after a
  failure, and ``check`` finds the root consistent.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagefactory
import pytest
from bad_registry import (
    MT_CONFIG,
    MT_MANIFEST,
    Handler,
    State,
    read_head,
    serving,
    serving_raw,
    sha,
)

from lamina.errors import FailedPrecondition, InvalidArgument, LaminaError, Unavailable
from lamina.images.pull import pull
from lamina.images.push import push
from lamina.metadata.check import check
from lamina.metadata.images import ImageStore
from lamina.metadata.root import Root
from lamina.oci.reference import parse_reference
from lamina.remotes.auth import Authorizer, Credentials, DockerConfig, Unauthorized
from lamina.remotes.hosts import Endpoint
from lamina.remotes.referrers import list_referrers
from lamina.remotes.registry import Registry
from lamina.remotes.session import RetryPolicy, Session
from lamina.remotes.transport import TLSConfig, Transport, TransportError

USER, SECRET = "alice", "s3cret-Pa55"
BASIC = "Basic " + base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
HARD_LIMIT = 60.0  # seconds a case may take before the test calls it a hang (never reached)
DEEP = b"[" * 200_000 + b"]" * 200_000


@dataclass
class Env:
    reg: State  # the registry
    other: State  # another origin: a redirect target, a token server, blob storage
    host: str = ""
    other_host: str = ""
    config: str = ""  # the image's config digest
    layer: str = ""  # its layer's digest
    manifest: str = ""  # its manifest's digest

    def url(self, path: str) -> str:
        return f"http://{self.other_host}{path}"


@pytest.fixture(scope="module")
def layer(tmp_path_factory: pytest.TempPathFactory) -> imagefactory.Layer:
    work = tmp_path_factory.mktemp("hostile-layer")
    return imagefactory.layer_from_entries([imagefactory.File("hello", b"hello\n")], work)


def add_image(state: State, repo: str, layer: imagefactory.Layer) -> tuple[str, str, str]:
    """One honest image, ``<repo>:1``; its config, layer and manifest digests."""
    ldigest = state.add_blob(layer.read_blob())
    config = json.dumps({"architecture": imagefactory.host_arch(), "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}).encode()
    cdigest = state.add_blob(config)
    mdigest = state.add_manifest(repo, ["1"], MT_MANIFEST, {
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": len(config)},
        "layers": [{"mediaType": layer.media_type, "digest": ldigest, "size": layer.size}]})
    return cdigest, ldigest, mdigest


@pytest.fixture
def env(layer: imagefactory.Layer) -> Iterator[Env]:
    e = Env(State(), State())
    e.config, e.layer, e.manifest = add_image(e.reg, "r", layer)
    with serving(e.reg) as host, serving(e.other) as other_host:
        e.host, e.other_host = host, other_host
        yield e


# ------------------------------------------------------------ building hooks


def is_get(h: Handler, kind: str) -> bool:
    return h.command == "GET" and f"/{kind}/" in h.path


def response(status: int, headers: list[tuple[str, str]], body: bytes = b"",
             reason: str = "X") -> bytes:
    """A whole HTTP/1.1 response as bytes (so a hook can send what no server would)."""
    head = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
    for k, v in headers:
        head += f"{k}: {v}\r\n".encode("latin-1")
    return head + b"\r\n" + body


def redirect_blobs(location: Callable[[Env, Handler], str]) -> Callable[[Env, str], None]:
    """Every blob GET of the case's repository answered by a 307 to ``location``."""
    def arrange(e: Env, repo: str) -> None:
        def hook(h: Handler) -> bool:
            if not is_get(h, "blobs"):
                return False
            return h.raw(response(307, [("Location", location(e, h)),
                                        ("Content-Length", "0")]))
        e.reg.repos[repo] = hook
    return arrange


def on_registry(kind: str, hook: Callable[[Handler], bool], *,
                methods: tuple[str, ...] = ("GET",)) -> Callable[[Env, str], None]:
    """``hook`` answers the registry's ``kind`` requests (manifests, blobs) of the repo."""
    def arrange(e: Env, repo: str) -> None:
        e.reg.repos[repo] = lambda h: h.command in methods and f"/{kind}/" in h.path and \
            hook(h)
    return arrange


def require_basic(e: Env, repo: str) -> None:
    """The repository wants the user's Basic credentials (then its other hooks run)."""
    inner = e.reg.repos.get(repo)

    def hook(h: Handler) -> bool:
        if h.headers.get("Authorization") != BASIC:
            h.send(401, b"{}", {"WWW-Authenticate": 'Basic realm="bad-registry"'})
            return True
        return inner(h) if inner else False
    e.reg.repos[repo] = hook


def token_server(state: State, body: bytes | Callable[[], bytes], *,
                 path: str = "/token") -> None:
    """``path`` on ``state`` answers 200 with ``body`` (a token response)."""
    def hook(h: Handler) -> bool:
        h.send(200, body() if callable(body) else body, {"Content-Type": "application/json"})
        return True
    state.hooks[path] = hook


def bearer_registry(token_body: bytes) -> Callable[[Env, str], None]:
    """The repository wants a Bearer token from the registry's own ``/token``, which
    answers ``token_body``; the token it then presents is never accepted."""
    def arrange(e: Env, repo: str) -> None:
        def hook(h: Handler) -> bool:
            h.send(401, b"{}", {"WWW-Authenticate":
                                f'Bearer realm="http://{e.host}/token",service="s"'})
            return True
        e.reg.repos[repo] = hook
        token_server(e.reg, token_body)
    return arrange


def challenge(value: str) -> Callable[[Env, str], None]:
    """Every request of the repository answered 401 with ``WWW-Authenticate: value``."""
    def arrange(e: Env, repo: str) -> None:
        def hook(h: Handler) -> bool:
            return h.raw(response(401, [("WWW-Authenticate", value.format(other=e.other_host,
                                                                         host=e.host)),
                                        ("Content-Length", "0")]))
        e.reg.repos[repo] = hook
    return arrange


def manifest_get(data: bytes, headers: list[tuple[str, str]] | None = None,
                 *, length: bool = True) -> Callable[[Env, str], None]:
    """The manifest is resolved honestly (HEAD) but its GET answers ``data``."""
    def hook(h: Handler) -> bool:
        hdrs = [("Content-Type", MT_MANIFEST), *(headers or [])]
        if length:
            hdrs.append(("Content-Length", str(len(data))))
        return h.raw(response(200, hdrs, data))
    return on_registry("manifests", hook)


def tag_document(data: bytes) -> Callable[[Env, str], None]:
    """The tag resolves by GET only (HEAD: 405) to ``data``, served honestly."""
    def hook(h: Handler) -> bool:
        if h.command == "HEAD":
            h.send(405)
            return True
        h.send(200, data, {"Content-Type": MT_MANIFEST, "Docker-Content-Digest": sha(data)})
        return True
    return on_registry("manifests", hook, methods=("GET", "HEAD"))


def drip_head(head: bytes, *, repeat: bool = False) -> Callable[[Env, str], None]:
    """Manifest requests get ``head`` a byte at a time (for ever with ``repeat``)."""
    return on_registry("manifests", lambda h: h.drip(head, pause=0.01, repeat=repeat),
                       methods=("GET", "HEAD"))


def status_forever(status: int, headers: list[tuple[str, str]],
                   reason: str = "X") -> Callable[[Env, str], None]:
    return on_registry("manifests", lambda h: h.raw(response(
        status, [*headers, ("Content-Length", "0")], reason=reason), close=False),
        methods=("GET", "HEAD"))


def other_401_bearer(e: Env) -> None:
    """The other host wants a Bearer token from its own realm, which gives one."""
    def blob(h: Handler) -> bool:
        h.send(401, b"{}", {"WWW-Authenticate":
                            f'Bearer realm="http://{e.other_host}/token",service="x"'})
        return True
    e.other.repos["r"] = blob
    token_server(e.other, json.dumps({"token": "other-token"}).encode())


def both(*steps: Callable[[Env, str], None]) -> Callable[[Env, str], None]:
    def arrange(e: Env, repo: str) -> None:
        for step in steps:
            step(e, repo)
    return arrange


def with_other(fn: Callable[[Env], None]) -> Callable[[Env, str], None]:
    return lambda e, _repo: fn(e)


def other_answers(data: bytes) -> Callable[[Env, str], None]:
    """Every request the other host gets for the repository is answered ``data``."""
    def arrange(e: Env, repo: str) -> None:
        e.other.repos[repo] = lambda h: h.raw(data)
    return arrange


def _bounce_back(e: Env) -> None:
    """The other host redirects /bounce/<path> back to the registry."""
    def hook(h: Handler) -> bool:
        path = h.path.split("?", 1)[0].removeprefix("/bounce")
        return h.raw(response(307, [("Location", f"http://{e.host}{path}?back=1"),
                                    ("Content-Length", "0")]))
    for digest in e.reg.blobs:
        e.other.hooks[f"/bounce/v2/r/blobs/{digest}"] = hook


def _token_redirected(e: Env) -> None:
    """The registry's realm is its own /token, which redirects to the other host's."""
    _share_tokens(e, realm_host=e.host)
    e.reg.hooks["/token"] = lambda h: h.raw(response(
        302, [("Location", f"http://{e.other_host}/token"), ("Content-Length", "0")]))


def _serve_blobs_from(e: Env) -> None:
    """The other host serves the registry's blobs (as blob storage would), openly."""
    def hook(h: Handler) -> bool:
        digest = h.path.split("?", 1)[0].rsplit("/", 1)[1]
        h.send(200, e.reg.blobs[digest])
        return True
    e.other.repos["r"] = hook


def _share_tokens(e: Env, *, realm_host: str = "") -> None:
    """Bearer tokens required by the registry, issued by the other host's /token
    (reached through ``realm_host``'s realm when given)."""
    tokens: set[str] = set()
    e.reg.tokens = e.other.tokens = tokens
    e.reg.realm = f"http://{realm_host or e.other_host}/token"


def _token_dripped(e: Env) -> None:
    e.reg.hooks["/token"] = lambda h: h.drip(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 10_000)


def _slow_loris(h: Handler) -> bool:
    """The tag resolves by GET only, to a document dripped just fast enough not to stall."""
    if h.command == "HEAD":
        h.send(405)
        return True
    return h.raw(response(200, [("Content-Type", MT_MANIFEST), ("Content-Length", "1000000")]),
                 close=False) and h.drip(b" " * 1_000_000, pause=0.0001)


def _deep_config(e: Env, repo: str) -> None:
    """``repo``:1 is an image whose config (its digest right) is nested 200,000 deep."""
    config = e.reg.add_blob(DEEP)
    e.reg.add_manifest(repo, ["1"], MT_MANIFEST, {
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config, "size": len(DEEP)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": e.layer, "size": len(e.reg.blobs[e.layer])}]})


def _resume_with_giant_range(e: Env, repo: str) -> None:
    """The layer is cut off half way; asked again with Range, the registry answers a
    206 whose Content-Range has numbers of 5,000 digits."""
    data = e.reg.blobs[e.layer]

    def hook(h: Handler) -> bool:
        if not (is_get(h, "blobs") and e.layer in h.path):
            return False
        if h.headers.get("Range"):
            huge = "9" * 5000
            return h.raw(response(206, [("Content-Range", f"bytes {huge}-{huge}/{huge}"),
                                        ("Content-Length", "1")], b"x"))
        return h.raw(response(200, [("Content-Length", str(len(data)))],
                              data[:len(data) // 2]))
    e.reg.repos[repo] = hook


def on_layer(hook: Callable[[Handler, bytes], bool]) -> Callable[[Env, str], None]:
    """``hook(handler, layer bytes)`` answers the GETs of the image's layer."""
    def arrange(e: Env, repo: str) -> None:
        data = e.reg.blobs[e.layer]
        e.reg.repos[repo] = lambda h: is_get(h, "blobs") and e.layer in h.path and \
            hook(h, data)
    return arrange


def _redirect_with_dripped_body(e: Env, repo: str) -> None:
    """Blob GETs are redirected (to the same path with ``?ok=1``, answered honestly) by a
    307 whose 60,000-byte body comes a byte at a time."""
    def hook(h: Handler) -> bool:
        if not is_get(h, "blobs") or "?ok=1" in h.path:
            return False
        return h.raw(response(307, [("Location", h.path + "?ok=1"),
                                    ("Content-Length", "60000")]), close=False) and \
            h.drip(b"x" * 60000, pause=0.01)
    e.reg.repos[repo] = hook


def _layer_digest_with_newline(e: Env, repo: str) -> None:
    """``repo``:1's manifest names its layer's digest with a trailing newline."""
    config = next(d for d in e.reg.blobs if d not in (e.layer,))
    e.reg.add_manifest(repo, ["1"], MT_MANIFEST, {
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": config,
                   "size": len(e.reg.blobs[config])},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": e.layer + "\n", "size": len(e.reg.blobs[e.layer])}]})


def _endless_chunks(h: Handler) -> bool:
    while not h.state.stopped.is_set() and h.raw(b"10000\r\n" + b" " * 0x10000 + b"\r\n",
                                                 close=False):
        pass
    h.close_connection = True
    return True


# ------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Case:
    name: str
    arrange: Callable[[Env, str], None]
    outcome: type[LaminaError] | None  # None: the pull succeeds
    message: str = ""  # a regular expression the error's message matches
    creds: bool = False  # the pull runs with --user credentials for the registry
    creds_to_other: bool = False  # the registry names the other host as its realm
    reference: str = ""  # instead of <repo>:1
    action: str = "pull"  # or "referrers"


def _location(path: str) -> Callable[[Env, Handler], str]:
    return lambda e, h: path.format(other=e.other_host, host=e.host,
                                    path=h.path.split("?", 1)[0])


CASES = [
    # -- where credentials may go
    Case("redirect-to-401-bearer", both(redirect_blobs(_location("http://{other}{path}")),
                                        require_basic, with_other(other_401_bearer)),
         Unauthorized, r"redirected to asks for authorization", creds=True),
    Case("redirect-to-401-basic", both(
        redirect_blobs(_location("http://{other}{path}")), require_basic,
        other_answers(response(401, [("WWW-Authenticate", 'Basic realm="x"'),
                                     ("Content-Length", "0")]))),
         Unauthorized, r"credentials go only to", creds=True),
    Case("redirect-to-storage", both(redirect_blobs(_location("http://{other}{path}")),
                                     require_basic, with_other(_serve_blobs_from)),
         None, creds=True),
    Case("redirect-there-and-back", both(
        redirect_blobs(_location("http://{other}/bounce{path}")), require_basic,
        with_other(_bounce_back)),
         Unauthorized, r"unauthorized with the credentials", creds=True),
    Case("realm-on-other-host", with_other(_share_tokens),
         None, creds=True, creds_to_other=True),
    Case("token-redirected-elsewhere", with_other(_token_redirected), None, creds=True),
    Case("realm-file-scheme", challenge('Bearer realm="file:///etc/passwd"'),
         Unauthorized, r"not an http\(s\) URL", creds=True),
    Case("realm-broken-ipv6", challenge('Bearer realm="http://[::1/token"'),
         Unauthorized, r"token realm", creds=True),
    Case("realm-non-ascii", challenge('Bearer realm="http://{host}/t\xf6ken"'),
         Unauthorized, r"token realm", creds=True),
    Case("challenge-unterminated-quote", challenge('Bearer realm="http://{host}/token'),
         Unauthorized, "", creds=True),
    Case("challenge-unknown-scheme", challenge('Negotiate abc, NTLM'),
         Unauthorized, r"no Bearer or Basic challenge"),
    Case("challenge-crlf-in-message", challenge('Foo a="x\\\r\\\nb"'),
         Unauthorized, r"no Bearer or Basic challenge"),
    Case("basic-without-credentials", challenge('Basic realm="x"'),
         Unauthorized, r"wants a user name and password"),
    Case("no-challenge", challenge(""), Unauthorized, r"no Bearer or Basic challenge"),
    # -- token responses
    Case("token-crlf", bearer_registry(json.dumps({"token": "a\r\nX-Evil: 1"}).encode()),
         Unauthorized, r"characters a header cannot carry"),
    Case("token-non-latin1", bearer_registry(json.dumps({"token": "t\u20acken"}).encode()),
         Unauthorized, r"characters a header cannot carry"),
    Case("token-expires-10e400", bearer_registry(
        b'{"token": "tok", "expires_in": 1' + b"0" * 400 + b"}"),
         Unauthorized, r"unauthorized with the credentials and token"),
    Case("token-deep-json", bearer_registry(DEEP), Unauthorized, r"nested deeper than"),
    Case("token-not-json", bearer_registry(b"<html>"), Unauthorized, r"not valid JSON"),
    Case("token-giant", bearer_registry(b'{"token": "' + b"a" * (2 << 20) + b'"}'),
         Unauthorized, r"larger than"),
    Case("token-headers-dripped", both(bearer_registry(b""), with_other(_token_dripped)),
         Unavailable, r"no complete response head"),
    # -- hangs
    Case("headers-dripped", drip_head(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 60_000),
         Unavailable, r"no complete response head within"),
    Case("endless-100-continue", drip_head(b"HTTP/1.1 100 Continue\r\n\r\n", repeat=True),
         Unavailable, r"no complete response head within"),
    Case("silent", on_registry("manifests", lambda h: h.hold(), methods=("GET", "HEAD")),
         Unavailable, r"timed out|no complete response head"),
    Case("endless-trailers", on_registry("manifests", lambda h: h.raw(
        response(200, [("Transfer-Encoding", "chunked"), ("Content-Type", MT_MANIFEST)],
                 b"0\r\n"), close=False) and h.drip(b"X-T: a\r\n", pause=0.01, repeat=True)),
         Unavailable, r"no data for|did not end"),
    Case("document-slow-loris", on_registry("manifests", _slow_loris, methods=("GET", "HEAD")),
         Unavailable, r"did not end within|stalled"),
    Case("document-endless", on_registry("manifests", lambda h: h.raw(response(
        200, [("Content-Type", MT_MANIFEST), ("Transfer-Encoding", "chunked")]), close=False)
        and _endless_chunks(h)), InvalidArgument, r"larger than"),
    Case("redirect-loop", redirect_blobs(_location("{path}")),
         Unavailable, r"more than 4 redirects"),
    Case("redirect-chain", redirect_blobs(lambda e, h: f"{h.path.split('?')[0]}?n="
                                          f"{len(h.path)}"),
         Unavailable, r"more than 4 redirects"),
    Case("endless-429", status_forever(429, [("Retry-After", "1" + "0" * 400)]),
         Unavailable, r"429 X \(after 2 attempts\)"),
    Case("retry-after-superscript", status_forever(503, [("Retry-After", "\xb2")]),
         Unavailable, r"503"),
    Case("retry-after-negative", status_forever(503, [("Retry-After", "-100000")]),
         Unavailable, r"503"),
    Case("retry-after-far-date", status_forever(
        503, [("Retry-After", "Fri, 31 Dec 9999 23:59:59 GMT")]), Unavailable, r"503"),
    Case("reason-with-cr", status_forever(500, [], reason="Bad\rThing\x1b[31m"),
         Unavailable, r"500 Bad"),
    # -- what a redirect may name
    Case("redirect-body-dripped", _redirect_with_dripped_body, None),
    Case("redirect-file", redirect_blobs(_location("file:///etc/passwd")),
         Unavailable, r"redirect to 'file:///etc/passwd': not an http\(s\) URL"),
    Case("redirect-ftp", redirect_blobs(_location("ftp://{other}/x")),
         Unavailable, r"not an http\(s\) URL"),
    Case("location-port-not-a-number", redirect_blobs(_location("http://127.0.0.1:abc/x")),
         Unavailable, r"redirect to .*[Pp]ort"),
    Case("location-port-too-large", redirect_blobs(_location("http://127.0.0.1:99999/x")),
         Unavailable, r"redirect to .*[Pp]ort"),
    Case("location-broken-ipv6", redirect_blobs(_location("http://[::1/x")),
         Unavailable, r"redirect to .*IPv6"),
    Case("location-non-ascii", redirect_blobs(_location("http://{other}/\xe9\xff")),
         Unavailable, r"not a plain ASCII URL"),
    Case("location-empty", redirect_blobs(_location("")),
         Unavailable, r"redirect without a Location"),
    # -- HTTP framing
    Case("too-many-headers", manifest_get(b"{}", [(f"X-{i}", "a") for i in range(150)]),
         Unavailable, r"more than 100 headers"),
    Case("giant-header", manifest_get(b"{}", [("X-Big", "a" * 70_000)]),
         Unavailable, r"line"),
    Case("content-length-negative", manifest_get(b"{}", [("Content-Length", "-5")],
                                                 length=False),
         LaminaError, ""),
    Case("content-length-huge", manifest_get(b"{}", [("Content-Length", "9" * 30)],
                                             length=False),
         FailedPrecondition, r"sends 9+ bytes for a document"),
    Case("content-length-superscript", manifest_get(b"{}", [("Content-Length", "\xb2")],
                                                    length=False),
         LaminaError, ""),
    Case("content-length-5000-digits", manifest_get(b"{}", [("Content-Length", "9" * 5000)],
                                                    length=False),
         FailedPrecondition, r"sends \d+ bytes for a document"),
    Case("content-range-5000-digits", _resume_with_giant_range,
         Unavailable, r"gave up after 2 attempts"),
    Case("head-with-a-body", on_registry("manifests", lambda h: h.raw(response(
        200, [("Content-Type", MT_MANIFEST), ("Content-Length", "2")], b"{}junk"),
        close=False), methods=("HEAD",)), None),
    Case("status-999", status_forever(999, []), Unavailable, r"999"),
    Case("not-http", on_registry("manifests", lambda h: h.raw(b"SSH-2.0-OpenSSH\r\n"),
                                 methods=("GET", "HEAD")), Unavailable, r"failed"),
    Case("blob-headers-dripped", on_layer(lambda h, _: h.drip(
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 60_000)), Unavailable,
         r"no complete response head within"),
    Case("blob-stalls", on_layer(lambda h, data: h.raw(response(
        200, [("Content-Length", str(len(data)))]), close=False) and h.drip(data, pause=0.05)),
         Unavailable, r"stalled.*gave up after 2 attempts"),
    Case("blob-longer-than-descriptor", on_layer(lambda h, data: h.raw(response(
        200, [("Content-Length", str(len(data) + 100))], data + b"x" * 100))),
         FailedPrecondition, r"Content-Length \d+ where \d+ bytes are due"),
    Case("blob-endless", on_layer(lambda h, data: h.raw(response(
        200, [("Transfer-Encoding", "chunked")], b"%x\r\n" % len(data) + data + b"\r\n"),
        close=False) and _endless_chunks(h)),
         FailedPrecondition, r"more bytes than its size"),
    Case("blob-length-superscript", on_layer(lambda h, data: h.raw(response(
        200, [("Content-Length", "\xb2")], data))), None),
    Case("content-length-short", manifest_get(b"{}" * 10, [("Content-Length", "3")],
                                              length=False),
         FailedPrecondition, r"sends 3 bytes for a document"),
    Case("broken-chunked", manifest_get(b"zz\r\nabc\r\n0\r\n\r\n",
                                        [("Transfer-Encoding", "chunked")], length=False),
         Unavailable, r"connection lost while reading"),
    Case("negative-chunk", manifest_get(b"-5\r\nabc\r\n0\r\n\r\n",
                                        [("Transfer-Encoding", "chunked")], length=False),
         LaminaError, ""),
    Case("gzip-json", tag_document(gzip.compress(b'{"schemaVersion": 2}')),
         InvalidArgument, r"not valid JSON"),
    # -- documents
    Case("deep-manifest", tag_document(DEEP), InvalidArgument, r"nested deeper than"),
    Case("deep-manifest-object", tag_document(b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
         InvalidArgument, r"nested deeper than"),
    Case("deep-config", _deep_config, InvalidArgument, r"nested deeper than"),
    Case("layer-digest-newline", _layer_digest_with_newline, InvalidArgument,
         r"invalid digest"),
    Case("manifest-nested-65-levels", tag_document(
        b'{"schemaVersion":2,"config":' + b"[" * 65 + b"]" * 65 + b"}"),
         InvalidArgument, r"nested deeper than 64"),
    Case("digest-header-traversal", on_registry("manifests", lambda h: h.command == "HEAD"
                                                and h.raw(response(200, [
                                                    ("Content-Type", MT_MANIFEST),
                                                    ("Docker-Content-Digest",
                                                     "sha256:../../../../escaped"),
                                                    ("Content-Length", "2")]), close=False),
                                                methods=("HEAD",)),
         None),
    Case("tag-non-ascii", lambda e, repo: None, InvalidArgument, r"bad tag",
         reference="r:t\u00e9g"),
    Case("tag-non-ascii-digit", lambda e, repo: None, InvalidArgument, r"bad tag",
         reference="r:v\u0663"),
    Case("referrers-deep", on_registry("referrers", lambda h: h.raw(response(
        200, [("Content-Length", str(len(DEEP)))], DEEP), close=False)),
         InvalidArgument, r"nested deeper than", action="referrers"),
]


def _pull_or_list(e: Env, case: Case, repo: str, root: Path, config: Path) -> Any:
    transport = Transport(timeout=1.0, header_timeout=1.0, document_timeout=1.5,
                          stall_time=1.0, stall_rate=2048, max_redirects=4)
    retry = RetryPolicy(attempts=2, base=0.01, cap=0.05, max_wait=0.2)
    user = Credentials(USER, SECRET) if case.creds else None
    reference = f"{e.host}/{case.reference or f'{repo}:1'}"
    with Registry(retry=retry, transport=transport, user=user, user_host=e.host,
                  docker_config=DockerConfig(config)) as reg:
        if case.action == "referrers":
            return list_referrers(reg.session(parse_reference(reference)), e.manifest)
        r = Root(root)
        try:
            return pull(reg, reference, root=r, concurrency=2)
        finally:
            r.close()


def bounded(fn: Callable[[], Any]) -> Any:
    """``fn()``'s result or exception; fails the test if it never ends."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # the test inspects whatever it was
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(HARD_LIMIT)
    assert not t.is_alive(), "the request did not end (its deadlines failed)"
    return out.get("error", out.get("result"))


def run_case(e: Env, case: Case, repo: str, root: Path, config: Path) -> Any:
    """The pull's result or its exception; fails the test if it never ends."""
    return bounded(lambda: _pull_or_list(e, case, repo, root, config))


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if "root" not in p.relative_to(path).parts)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile(require_root: None, env: Env, tmp_root: Path, case: Case) -> None:
    repo = "r"
    case.arrange(env, repo)
    root, config = tmp_root / "inside" / "root", tmp_root / "docker-config.json"
    root.mkdir(parents=True)
    before = _tree(tmp_root)

    got = run_case(env, case, repo, root, config)

    # credentials: the registry's go to the registry (and a realm it named), nowhere else
    sent_basic = [r.path for r in env.other.requests()
                  if {k.lower(): v for k, v in r.headers.items()}.get("authorization") == BASIC]
    if case.creds_to_other:
        assert sent_basic and all(p.startswith("/token?") for p in sent_basic), sent_basic
    else:
        assert sent_basic == [], f"the registry's credentials went to {sent_basic}"
    assert not [a for a in env.other.authorizations() if a.startswith("Bearer tok-")]
    if case.outcome is None:
        assert not isinstance(got, BaseException), f"{type(got).__name__}: {got}"
    else:
        assert isinstance(got, case.outcome), f"{type(got).__name__}: {got}"
        text = str(got)
        assert text and text == text.strip() and len(text.splitlines()) == 1, repr(text)
        assert re.search(case.message, text), text
    # nothing outside the root; a consistent root; no image after a failure
    assert _tree(tmp_root) == before
    if any(root.iterdir()):
        r = Root(root)
        try:
            images = ImageStore(r.metadata_path)
            names = [i.name for i in images.list()]
            images.close()
            assert (names != []) == (case.outcome is None and case.action == "pull")
            report = check(r)
            assert report.ok, report.problems
        finally:
            r.close()



def test_every_case_named_once() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert os.sep not in "".join(names)


# ------------------------------------------------- below HTTP: TLS, proxies, schemes


def _drip_tls_record(sock: socket.socket, stopped: threading.Event) -> None:
    """A TLS record header promising 16 KiB, then its bytes one at a time."""
    read_head(sock, 1)
    for b in b"\x16\x03\x03\x40\x00" + b"\x00" * 16384:
        if stopped.wait(0.01):
            return
        sock.sendall(bytes([b]))


def _drip_connect_answer(sock: socket.socket, stopped: threading.Event) -> None:
    """A proxy that answers CONNECT with headers that never end."""
    read_head(sock)
    sock.sendall(b"HTTP/1.1 200 Connection established\r\n")
    while not stopped.wait(0.01):
        sock.sendall(b"X-More: a\r\n")


@pytest.mark.parametrize("server, via_proxy", [(_drip_tls_record, False),
                                               (_drip_connect_answer, True)],
                         ids=["tls-handshake-dripped", "proxy-connect-dripped"])
def test_connect_phase_has_a_deadline(server: Callable[[socket.socket, threading.Event], None],
                                      via_proxy: bool) -> None:
    transport = Transport(timeout=1.0, header_timeout=1.0)
    with serving_raw(server) as host:
        url = "https://registry.invalid:443/v2/" if via_proxy else f"https://{host}/v2/"
        got = bounded(lambda: transport.request("GET", url, proxy=f"http://{host}"
                                                if via_proxy else "",
                                                tls=TLSConfig(skip_verify=True)))
    transport.close()
    assert isinstance(got, TransportError), got
    assert re.fullmatch(r"\S+: could not connect within 1s", str(got)), got


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    work = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=127.0.0.1"],
                   cwd=work, check=True, capture_output=True, timeout=60)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(work / "cert.pem", work / "key.pem")
    return ctx


def test_no_credentials_down_from_https_to_http(server_cert: ssl.SSLContext) -> None:
    """One port speaking both schemes: https redirects to http on the same host:port,
    and the Authorization header does not follow it down."""
    heads: list[tuple[str, bytes]] = []

    def both_schemes(sock: socket.socket, stopped: threading.Event) -> None:
        tls = sock.recv(1, socket.MSG_PEEK) == b"\x16"
        if tls:
            sock = server_cert.wrap_socket(sock, server_side=True)
        heads.append(("https" if tls else "http", read_head(sock)))
        if tls:
            sock.sendall(response(302, [("Location", f"http://{host}/plain"),
                                        ("Content-Length", "0"), ("Connection", "close")]))
        else:
            sock.sendall(response(200, [("Content-Length", "2"), ("Connection", "close")],
                                  b"ok"))

    transport = Transport(timeout=5.0)
    with serving_raw(both_schemes) as host:
        got = bounded(lambda: transport.request(
            "GET", f"https://{host}/v2/", headers={"Authorization": "Bearer secret-token"},
            tls=TLSConfig(skip_verify=True), proxy=""))
        assert not isinstance(got, BaseException), got
        assert got.status == 200 and got.read_all(10) == b"ok"
    transport.close()
    assert [scheme for scheme, _ in heads] == ["https", "http"]
    assert b"secret-token" in heads[0][1]
    assert b"authorization" not in heads[1][1].lower()


def test_https_registry_credentials_never_to_a_plain_http_realm(
        server_cert: ssl.SSLContext, tmp_path: Path) -> None:
    """An HTTPS registry naming an http:// realm: its credentials are not sent in clear
    (the realm, a name that never resolves, is not even asked)."""
    def registry(sock: socket.socket, stopped: threading.Event) -> None:
        sock = server_cert.wrap_socket(sock, server_side=True)
        read_head(sock)
        sock.sendall(response(401, [
            ("WWW-Authenticate", 'Bearer realm="http://registry.invalid/token",service="x"'),
            ("Content-Length", "0"), ("Connection", "close")]))

    transport = Transport(timeout=5.0)
    with serving_raw(registry) as host:
        authorizer = Authorizer(transport, user=Credentials(USER, SECRET), user_host=host,
                                config=DockerConfig(tmp_path / "none.json"))
        session = Session(host, "r", endpoints=[Endpoint("https", host, skip_verify=True)],
                          transport=transport, authorizer=authorizer,
                          retry=RetryPolicy(attempts=1))
        got = bounded(lambda: session.request("pull", "GET", "/r/manifests/1",
                                              scope=session.scope()))
    transport.close()
    assert isinstance(got, Unauthorized), got
    assert re.fullmatch(r"\S+: token realm 'http://registry.invalid/token' is plain HTTP; "
                        r"the registry's credentials go only over HTTPS", str(got)), got


def test_upload_location_on_another_host_gets_no_credentials(env: Env, tmp_path: Path) -> None:
    """A push's upload Location may name another host: the registry's credentials
    (learnt from its own challenge) stay with the registry."""
    require_basic(env, "r")
    env.other.hooks["/upload"] = lambda h: h.raw(response(201, [("Content-Length", "0")]))
    transport = Transport(timeout=5.0)
    authorizer = Authorizer(transport, user=Credentials(USER, SECRET), user_host=env.host,
                            config=DockerConfig(tmp_path / "none.json"))
    session = Session(env.host, "r", endpoints=[Endpoint("http", env.host)],
                      transport=transport, authorizer=authorizer,
                      retry=RetryPolicy(attempts=1))
    scope = session.scope("pull,push")
    ep, resp = session.request("push", "GET", "/r/manifests/1", scope=scope)
    resp.close()
    assert resp.status == 200 and BASIC in env.reg.authorizations()
    resp = session.send(ep, "PUT", f"http://{env.other_host}/upload?digest=x", scope=scope,
                        body=b"data")
    resp.close()
    transport.close()
    assert resp.status == 201
    assert env.other.requests("PUT", "/upload") and env.other.authorizations() == []


def test_push_refused_with_a_multi_line_body_is_one_line(require_root: None, env: Env,
                                                         tmp_root: Path) -> None:
    """The registry's error document (CR, LF, escape sequences) is quoted on one line."""
    def refuse(h: Handler) -> bool:
        if h.command != "PUT":
            return False
        body = b"bad\r\nmanifest\x1b[31m\rX-Forged: 1"
        return h.raw(response(400, [("Content-Length", str(len(body)))], body))

    env.reg.repos["p"] = refuse
    transport = Transport(timeout=5.0)
    with Registry(retry=RetryPolicy(attempts=1), transport=transport,
                  docker_config=DockerConfig(tmp_root / "none.json")) as reg:
        r = Root(tmp_root / "root")
        try:
            pull(reg, f"{env.host}/r:1", root=r, unpack=False)
            got = bounded(lambda: push(reg, f"{env.host}/r:1", f"{env.host}/p:1", root=r))
        finally:
            r.close()
    assert isinstance(got, FailedPrecondition), got
    assert re.fullmatch(r"\S+: putting manifest sha256:[0-9a-f]{64}: 400 X bad manifest"
                        r"\\x1b\[31m X-Forged: 1", str(got)), str(got)


@pytest.mark.parametrize("name, exit_code, cls", [
    ("deep-manifest", 6, "InvalidArgument"),
    ("token-crlf", 5, "Unauthorized"),
    ("location-broken-ipv6", 7, "Unavailable"),
    ("tag-non-ascii", 6, "InvalidArgument"),
])
def test_cli_says_one_line(require_root: None, env: Env, tmp_root: Path, name: str,
                           exit_code: int, cls: str) -> None:
    """What a user sees: one line naming the class, and the class's exit code."""
    case = next(c for c in CASES if c.name == name)
    case.arrange(env, "r")
    ref = f"{env.host}/{case.reference or 'r:1'}"
    proc = subprocess.run([sys.executable, "-m", "lamina", "--root", str(tmp_root / "root"),
                           "image", "pull", ref], capture_output=True, text=True,
                          timeout=HARD_LIMIT, check=False,
                          env={**os.environ, "DOCKER_CONFIG": str(tmp_root / "docker")})
    assert proc.returncode == exit_code, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"lamina: {cls}: "), proc.stderr
    assert re.search(case.message, proc.stderr), proc.stderr
