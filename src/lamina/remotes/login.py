"""Checking credentials before they are saved (``lamina login``).

``GET /v2/`` is the registry's "do you speak the API, and who may?" call.
Without credentials it answers 200 (open) or 401 with a challenge; for
Basic the credentials are then sent as they are, for Bearer a token is
asked for with them (no repository scope). Either failing is
:class:`~.auth.Unauthorized`; a registry that needs no login says so.
"""

from __future__ import annotations

from lamina.errors import Unavailable
from lamina.remotes.auth import Authorizer, Credentials, Unauthorized
from lamina.remotes.hosts import endpoints_for
from lamina.remotes.registry import Registry
from lamina.remotes.session import Session

__all__ = ["check_login"]


def check_login(registry: Registry, server: str, creds: Credentials) -> None:
    """Unauthorized unless ``creds`` are accepted by ``server`` (host[:port])."""
    server = server.removeprefix("https://").removeprefix("http://").rstrip("/")
    if server in ("index.docker.io", "registry-1.docker.io"):
        server = "docker.io"
    endpoints = [e for e in endpoints_for(server, hosts_dirs=registry.hosts_dirs,
                                          plain_http=registry.plain_http) if not e.namespace]
    authorizer = Authorizer(registry.transport, user=creds, user_host="")
    session = Session(server, "", endpoints=endpoints, transport=registry.transport,
                      authorizer=authorizer, retry=registry.retry)
    ep = endpoints[-1]
    resp = session.send(ep, "GET", ep.url("/"), scope="")
    resp.close()
    if resp.status == 401:
        raise Unauthorized(f"{server}: login failed for {creds.username}")
    if resp.status != 200:
        raise Unavailable(f"{server}: GET /v2/: {resp.status} {resp.reason}")
