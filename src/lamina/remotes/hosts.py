"""Which endpoints serve a registry, and how to talk to each (containerd's ``hosts.toml``).

For a registry host namespace such as ``myregistry.io:5000`` the first
configuration directory that has one of

    <dir>/myregistry.io_5000_/hosts.toml
    <dir>/myregistry.io:5000/hosts.toml
    <dir>/_default/hosts.toml

is read. Its ``[host."<url>"]`` tables are tried first, in file order, and the
``server`` (default: the namespace itself; ``registry-1.docker.io`` for
``docker.io``) last. Each endpoint has ``capabilities`` (``pull``,
``resolve``, ``push``; all three by default), ``ca`` (a path or a list),
``client`` (a path, a list of paths, or a list of ``[cert, key]`` pairs),
``skip_verify``, ``override_path`` (the URL path is the API root, instead of
``<path>/v2``), ``proxy`` (an ``http://`` proxy for that host, instead of the
environment's ``HTTP(S)_PROXY``/``NO_PROXY``) and ``[header]``. Relative paths are relative to the
``hosts.toml``. A namespace directory without ``hosts.toml`` is read the
docker way: ``*.crt`` are CA certificates, ``*.cert`` + ``*.key`` client
certificates.

lamina's directory is ``/etc/lamina/certs.d``; containerd's
``/etc/containerd/certs.d`` is read when asked for. ``plain_http`` makes the
default endpoint ``http://``; loopback registries (``localhost``,
``127.0.0.0/8``, ``::1``) are plain HTTP by default too.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lamina.errors import InvalidArgument

__all__ = [
    "ALL_CAPABILITIES",
    "CONTAINERD_HOSTS_DIR",
    "LAMINA_HOSTS_DIR",
    "Endpoint",
    "endpoints_for",
    "is_loopback",
]

LAMINA_HOSTS_DIR = Path("/etc/lamina/certs.d")
CONTAINERD_HOSTS_DIR = Path("/etc/containerd/certs.d")
ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})
_DOCKER_HUB_SERVER = "https://registry-1.docker.io"


@dataclass(frozen=True)
class Endpoint:
    """One place to send a registry's requests: ``<scheme>://<host><api_root>/...``."""

    scheme: str
    host: str
    api_root: str = "/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    skip_verify: bool = False
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    namespace: str = ""
    """The registry namespace this endpoint mirrors ("" when it is that registry)."""
    proxy: str | None = None
    """An ``http://`` proxy for this endpoint; None: the environment's (``HTTPS_PROXY``...)."""

    def url(self, suffix: str, query: Sequence[tuple[str, str]] = ()) -> str:
        """The URL of API path ``suffix`` (``/<repo>/manifests/<ref>`` ...)."""
        params = list(query)
        if self.namespace:
            params.append(("ns", self.namespace))
        qs = f"?{urllib.parse.urlencode(params)}" if params else ""
        return f"{self.scheme}://{self.host}{self.api_root}{suffix}{qs}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


def is_loopback(host: str) -> bool:
    """Whether ``host`` (``name[:port]``) is this machine's loopback."""
    name = host
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _namespace_dirs(namespace: str) -> list[str]:
    out = []
    if ":" in namespace and not namespace.startswith("["):
        name, _, port = namespace.rpartition(":")
        out.append(f"{name}_{port}_")
    out += [namespace, "_default"]
    return out


def _paths(value: Any, base: Path, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise InvalidArgument(f"{what}: expected a path or a list of paths")
    return tuple(str(base / v) for v in items)


def _client(value: Any, base: Path, what: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise InvalidArgument(f"{what}: expected a path, paths or [cert, key] pairs")
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append((str(base / item), ""))
        elif (isinstance(item, list) and len(item) in (1, 2)
              and all(isinstance(v, str) for v in item)):
            cert, key = item[0], item[1] if len(item) == 2 else ""
            pairs.append((str(base / cert), str(base / key) if key else ""))
        else:
            raise InvalidArgument(f"{what}: bad client certificate entry {item!r}")
    return tuple(pairs)


def _headers(value: Any, what: str) -> dict[str, tuple[str, ...]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: [header] must be a table")
    out = {}
    for k, v in value.items():
        vals = [v] if isinstance(v, str) else v
        if not isinstance(vals, list) or not all(isinstance(x, str) for x in vals):
            raise InvalidArgument(f"{what}: header {k!r} must be a string or strings")
        out[str(k)] = tuple(vals)
    return out


def _capabilities(value: Any, what: str) -> frozenset[str]:
    if value is None:
        return ALL_CAPABILITIES
    if not isinstance(value, list) or not all(v in ALL_CAPABILITIES for v in value):
        raise InvalidArgument(f"{what}: capabilities must be a list of pull, resolve, push")
    return frozenset(value)


def _proxy(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"{what}: proxy must be a URL string")
    parts = urllib.parse.urlsplit(value if "://" in value else f"http://{value}")
    if parts.scheme != "http" or not parts.hostname or parts.path.strip("/") or parts.query:
        raise InvalidArgument(f"{what}: proxy {value!r}: want http://host:port "
                              "(lamina speaks to http proxies only)")
    return parts.geturl()


def _endpoint(url: str, table: Mapping[str, Any], base: Path, mirror_of: str,
              what: str) -> Endpoint:
    """The endpoint of ``url``; ``mirror_of`` names the namespace it mirrors (or "")."""
    if "://" not in url:
        url = f"https://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument(f"{what}: bad host URL {url!r} (want http(s)://host[:port][/path])")
    path = parts.path.rstrip("/")
    if not table.get("override_path", False) and not path.endswith("/v2"):
        path += "/v2"
    return Endpoint(
        scheme=parts.scheme,
        host=parts.netloc,
        api_root=path,
        capabilities=_capabilities(table.get("capabilities"), what),
        ca=_paths(table.get("ca"), base, f"{what} ca"),
        client=_client(table.get("client"), base, f"{what} client"),
        skip_verify=bool(table.get("skip_verify", False)),
        headers=_headers(table.get("header"), what),
        namespace="" if parts.netloc == mirror_of else mirror_of,
        proxy=_proxy(table.get("proxy"), what),
    )


def _default_server(namespace: str, plain_http: bool) -> str:
    if namespace == "docker.io":
        return _DOCKER_HUB_SERVER
    scheme = "http" if plain_http or is_loopback(namespace) else "https"
    return f"{scheme}://{namespace}"


def _docker_certs(directory: Path) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The docker convention: ``*.crt`` CAs, ``*.cert`` with a matching ``*.key``."""
    files = sorted(directory.iterdir())
    ca = tuple(str(p) for p in files if p.suffix == ".crt")
    client = tuple((str(p), str(p.with_suffix(".key"))) for p in files
                   if p.suffix == ".cert" and p.with_suffix(".key").exists())
    return ca, client


def endpoints_for(namespace: str, *, hosts_dirs: Sequence[str | os.PathLike[str]] = (),
                  plain_http: bool = False) -> list[Endpoint]:
    """The endpoints for registry ``namespace`` in the order to try them (see module docs)."""
    for d in hosts_dirs:
        for name in _namespace_dirs(namespace):
            directory = Path(d) / name
            config = directory / "hosts.toml"
            if config.is_file():
                return _from_file(config, namespace, plain_http)
            if directory.is_dir() and name != "_default":
                ca, client = _docker_certs(directory)
                server = _default_server(namespace, plain_http)
                ep = _endpoint(server, {}, directory, "", str(directory))
                return [Endpoint(ep.scheme, ep.host, ep.api_root, ca=ca, client=client)]
    return [_endpoint(_default_server(namespace, plain_http), {}, Path("/"), "", namespace)]


def _from_file(config: Path, namespace: str, plain_http: bool) -> list[Endpoint]:
    import tomllib  # when there is a file: the image commands import this module

    try:
        doc = tomllib.loads(config.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"{config}: {exc}") from exc
    base = config.parent
    out = []
    hosts = doc.get("host") or {}
    if not isinstance(hosts, dict):
        raise InvalidArgument(f"{config}: [host] must be a table of tables")
    for url, table in hosts.items():
        if not isinstance(table, dict):
            raise InvalidArgument(f"{config}: host {url!r} must be a table")
        out.append(_endpoint(url, table, base, namespace, f"{config} host {url!r}"))
    server = doc.get("server")
    if server is not None and not isinstance(server, str):
        raise InvalidArgument(f"{config}: server must be a URL string")
    # the server stands for the namespace itself: no ?ns= for it
    out.append(_endpoint(server or _default_server(namespace, plain_http), doc, base, "",
                         f"{config} server"))
    return out
