"""Registry credentials and the authorization flow.

**Where credentials come from**, first match wins, for the endpoint's host
and then for the registry it serves: the ``--user user[:password]`` given
for this command; docker's ``config.json`` (``$DOCKER_CONFIG`` or
``~/.docker``): a ``credHelpers`` entry for the host, else the
``credsStore``, each asked through ``docker-credential-<name> get``, else
``auths`` (``auth`` = base64 of ``user:password``; docker.io is stored under
``https://index.docker.io/v1/``).

**How they are used** (the distribution token specification): a request
goes out without credentials; a ``401`` carries ``WWW-Authenticate``. For
``Basic`` the credentials are sent as they are. For ``Bearer realm=...,
service=...`` a token is fetched from the realm with ``service`` and one
``scope`` per repository and action (``repository:team/app:pull,push``),
presenting the credentials (Basic) when there are any, and cached per host
and scope until it expires (``expires_in``, at most a day). A 401 on a
request that carried a token fetched *for it* is final: :class:`Unauthorized`.
A 401 later (a token that expired mid-transfer) fetches a new one.

**Where credentials go**: only to the host they are configured for, and to
the token realm *that host* names in its own challenge (the session never
answers a challenge from a host a redirect led to). Not over plain HTTP to a
realm when the registry itself was asked over HTTPS. A token server's answer
is read as untrusted: at most 1 MiB, JSON nested at most
:data:`~lamina.util.jsondoc.MAX_DEPTH` deep, a token of visible ASCII only (it
becomes a header); anything else is :class:`Unauthorized`.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina.errors import FailedPrecondition, InvalidArgument, NotFound
from lamina.fs.files import atomic_write
from lamina.remotes.hosts import is_loopback
from lamina.remotes.transport import TLSConfig, Transport, printable, split_url
from lamina.util import jsondoc

__all__ = [
    "Authorizer",
    "Challenge",
    "Credentials",
    "DockerConfig",
    "Unauthorized",
    "parse_challenges",
    "parse_user",
]

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
MAX_TOKEN_RESPONSE = 1 << 20
MAX_TOKEN_LIFETIME = 24 * 3600
_DEFAULT_TOKEN_LIFETIME = 60
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what a header value may carry


class Unauthorized(FailedPrecondition):
    """The registry refused the credentials (or there were none and it wants some)."""


@dataclass(frozen=True)
class Credentials:
    username: str
    secret: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.secret}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def parse_user(text: str, *, ask: Any = None) -> Credentials:
    """``user[:password]``; without a password, ``ask(prompt)`` supplies it."""
    user, sep, password = text.partition(":")
    if not user:
        raise InvalidArgument("--user: empty user name")
    if not sep:
        if ask is None:
            raise InvalidArgument("--user: no password given")
        password = ask(f"password for {user}: ")
    return Credentials(user, password)


# --------------------------------------------------------------- challenges

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: Mapping[str, str] = field(default_factory=dict)


def parse_challenges(values: Sequence[str]) -> list[Challenge]:
    """The challenges of ``WWW-Authenticate`` header values (RFC 7235 auth-params)."""
    out = []
    for value in values:
        rest = value.strip()
        while rest:
            scheme, _, rest = rest.partition(" ")
            params: dict[str, str] = {}
            while True:
                m = _PARAM.match(rest)
                if not m:
                    break
                v = m.group(2)
                if v.startswith('"'):
                    v = re.sub(r"\\(.)", r"\1", v[1:-1])
                params[m.group(1).lower()] = v
                rest = rest[m.end():]
            out.append(Challenge(scheme.lower().rstrip(","), params))
            rest = rest.strip().lstrip(",").strip()
    return out


# ------------------------------------------------------- docker's config.json


def _config_dir() -> Path:
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path.home() / ".docker"


def _hub_keys(host: str) -> list[str]:
    if host in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        return [DOCKER_HUB_KEY, "docker.io", "index.docker.io", "registry-1.docker.io"]
    return [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/",
            f"http://{host}/v1/"]


class DockerConfig:
    """``config.json``: read credentials, store them (``login``), erase them (``logout``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path else _config_dir() / "config.json"

    def _load(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"{self.path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{self.path}: not a JSON object")
        return doc

    def _helper_for(self, doc: Mapping[str, Any], host: str) -> str:
        helpers = doc.get("credHelpers") or {}
        for key in _hub_keys(host):
            if isinstance(helpers, dict) and helpers.get(key):
                return str(helpers[key])
        return str(doc.get("credsStore") or "")

    @staticmethod
    def _helper(name: str, action: str, data: str) -> str:
        exe = shutil.which(f"docker-credential-{name}")
        if exe is None:
            raise NotFound(f"credential helper docker-credential-{name} is not installed")
        proc = subprocess.run([exe, action], input=data, capture_output=True, text=True,
                              timeout=60, check=False)
        if proc.returncode != 0:
            out = (proc.stdout.strip() or proc.stderr.strip())[:200]
            if "credentials not found" in out.lower():
                raise NotFound(out)
            raise FailedPrecondition(f"docker-credential-{name} {action}: {out}")
        return proc.stdout

    def get(self, host: str) -> Credentials | None:
        doc = self._load()
        helper = self._helper_for(doc, host)
        if helper:
            server = _hub_keys(host)[0]
            try:
                out = json.loads(self._helper(helper, "get", server))
            except NotFound:
                out = None
            except ValueError as exc:
                raise FailedPrecondition(f"docker-credential-{helper}: bad output") from exc
            if isinstance(out, dict) and out.get("Secret"):
                return Credentials(str(out.get("Username", "")), str(out["Secret"]))
        auths = doc.get("auths") or {}
        for key in _hub_keys(host):
            entry = auths.get(key) if isinstance(auths, dict) else None
            if not isinstance(entry, dict):
                continue
            if entry.get("identitytoken"):
                return Credentials("<token>", str(entry["identitytoken"]))
            if entry.get("auth"):
                try:
                    user, _, secret = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError) as exc:
                    raise InvalidArgument(f"{self.path}: bad auth for {key}") from exc
                return Credentials(user, secret)
        return None

    def store(self, host: str, creds: Credentials) -> str:
        """Save ``creds`` for ``host``; returns where (the file or the helper)."""
        doc = self._load()
        helper = self._helper_for(doc, host)
        server = _hub_keys(host)[0]
        if helper:
            self._helper(helper, "store", json.dumps(
                {"ServerURL": server, "Username": creds.username, "Secret": creds.secret}))
            return f"docker-credential-{helper}"
        auths = doc.setdefault("auths", {})
        raw = f"{creds.username}:{creds.secret}".encode()
        auths[server] = {"auth": base64.b64encode(raw).decode()}
        self._save(doc)
        return str(self.path)

    def erase(self, host: str) -> bool:
        """Forget the credentials of ``host``; whether there were any."""
        doc = self._load()
        helper = self._helper_for(doc, host)
        found = False
        if helper:
            try:
                self._helper(helper, "erase", _hub_keys(host)[0])
                found = True
            except NotFound:
                pass
        auths = doc.get("auths") or {}
        for key in _hub_keys(host):
            if isinstance(auths, dict) and key in auths:
                del auths[key]
                found = True
        if found and not helper:
            self._save(doc)
        return found

    def _save(self, doc: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, (json.dumps(doc, indent="\t") + "\n").encode(), mode=0o600)


# ------------------------------------------------------------- the authorizer


@dataclass
class _HostAuth:
    challenge: Challenge | None = None
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # scope -> token, expiry


class Authorizer:
    """Authorization headers per host and scope, learnt from challenges (thread-safe)."""

    def __init__(self, transport: Transport, *, user: Credentials | None = None,
                 user_host: str = "", config: DockerConfig | None = None) -> None:
        self.transport = transport
        self.user = user
        self.user_host = user_host
        self.config = config or DockerConfig()
        self._hosts: dict[str, _HostAuth] = {}
        self._creds: dict[str, Credentials | None] = {}
        self._lock = threading.Lock()
        self._fetching: dict[tuple[str, str], threading.Lock] = {}

    def credentials(self, host: str, namespace: str = "") -> Credentials | None:
        if self.user is not None and (not self.user_host or
                                      self.user_host in (host, namespace)):
            return self.user
        for name in (host, namespace):
            if not name:
                continue
            if name not in self._creds:
                self._creds[name] = self.config.get(name)
            if self._creds[name] is not None:
                return self._creds[name]
        return None

    def header(self, host: str, scope: str, namespace: str = "") -> str:
        """The Authorization header for a request to ``host`` needing ``scope`` ("" = none)."""
        with self._lock:
            state = self._hosts.get(host)
            if state is None or state.challenge is None:
                return ""
            if state.challenge.scheme == "basic":
                creds = self.credentials(host, namespace)
                return creds.basic() if creds else ""
            token = state.tokens.get(scope)
            if token and token[1] > time.monotonic():
                return f"Bearer {token[0]}"
        return ""

    def challenged(self, host: str, www_authenticate: Sequence[str], scope: str,
                   namespace: str = "", *, tls: TLSConfig | None = None,
                   sent: str = "", secure: bool = False) -> None:
        """Learn from a 401: remember the challenge, fetch a token for ``scope``.

        ``sent`` is the Authorization the refused request carried: when another
        thread has renewed the token since, that one is used, not a third.
        ``secure``: ``host`` was asked over HTTPS, so its credentials never go
        to a plain-HTTP realm (except on loopback).
        Unauthorized when the challenge cannot be answered (no credentials for
        Basic, a realm that refuses, a scheme lamina does not speak)."""
        with self._lock:
            fetching = self._fetching.setdefault((host, scope), threading.Lock())
        with fetching:  # one token fetch per host and scope at a time
            current = self.header(host, scope, namespace)
            if current and current != sent:
                return
            self._answer(host, www_authenticate, scope, namespace, tls, secure)

    def _answer(self, host: str, www_authenticate: Sequence[str], scope: str,
                namespace: str, tls: TLSConfig | None, secure: bool) -> None:
        challenges = parse_challenges(www_authenticate)
        chosen = next((c for c in challenges if c.scheme == "bearer"), None) or next(
            (c for c in challenges if c.scheme == "basic"), None)
        if chosen is None:
            raise Unauthorized(f"{host}: unauthorized, and no Bearer or Basic challenge "
                               f"({printable('; '.join(www_authenticate)) or 'none'})")
        with self._lock:
            state = self._hosts.setdefault(host, _HostAuth())
            state.challenge = chosen
        if chosen.scheme == "basic":
            if self.credentials(host, namespace) is None:
                raise Unauthorized(f"{host}: the registry wants a user name and password "
                                   "(lamina login, or --user)")
            return
        token, lifetime = self._fetch_token(host, chosen, scope, namespace, tls, secure)
        with self._lock:
            state.tokens[scope] = (token, time.monotonic() + max(lifetime - 5, 1))

    def _fetch_token(self, host: str, challenge: Challenge, scope: str, namespace: str,
                     tls: TLSConfig | None, secure: bool) -> tuple[str, int]:
        realm = challenge.params.get("realm", "")
        parts = split_url(realm, f"{host}: token realm", error=Unauthorized)
        query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query)]
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        query += [("scope", s) for s in scope.split(" ") if s]
        url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path,
                                       urllib.parse.urlencode(query), ""))
        headers = {"Accept": "application/json"}
        creds = self.credentials(host, namespace)
        if creds is not None:
            if secure and parts.scheme == "http" and not is_loopback(parts.netloc):
                raise Unauthorized(f"{host}: token realm {realm!r} is plain HTTP; the "
                                   "registry's credentials go only over HTTPS")
            headers["Authorization"] = creds.basic()
        same_host = parts.netloc == host
        with self.transport.request("GET", url, headers=headers,
                                    tls=tls if same_host else None) as resp:
            if resp.status != 200:
                who = f"as {creds.username}" if creds else "anonymously"
                raise Unauthorized(f"{host}: the token server {parts.netloc} refused "
                                   f"{scope or 'access'} {who} ({resp.status} {resp.reason})")
            try:
                body = resp.read_all(MAX_TOKEN_RESPONSE)
            except InvalidArgument as exc:
                raise Unauthorized(f"{host}: token server: {exc.message}") from exc
        try:
            doc = jsondoc.loads(body, f"{host}: token server response")
        except InvalidArgument as exc:
            raise Unauthorized(exc.message) from exc
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise Unauthorized(f"{host}: token server response has no token")
        if not _TOKEN.fullmatch(token):
            raise Unauthorized(f"{host}: token server sent a token with characters a "
                               "header cannot carry")
        lifetime = doc.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime <= 0:
            return token, _DEFAULT_TOKEN_LIFETIME
        return token, min(lifetime, MAX_TOKEN_LIFETIME)
