"""hosts.toml, credentials and challenges: the registry configuration lamina reads."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from lamina.errors import InvalidArgument
from lamina.remotes.auth import Credentials, DockerConfig, parse_challenges, parse_user
from lamina.remotes.hosts import endpoints_for, is_loopback


def test_defaults() -> None:
    [hub] = endpoints_for("docker.io")
    assert hub.url("/library/alpine/manifests/latest") == \
        "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
    [plain] = endpoints_for("registry.example.com:5000", plain_http=True)
    assert (plain.scheme, plain.host, plain.api_root) == ("http", "registry.example.com:5000",
                                                          "/v2")
    assert endpoints_for("registry.example.com")[0].scheme == "https"
    for host in ("localhost:5000", "127.0.0.1:5000", "127.1.2.3", "[::1]:5000"):
        assert is_loopback(host) and endpoints_for(host)[0].scheme == "http", host
    assert not is_loopback("10.0.0.1:5000")


def test_hosts_toml(tmp_path: Path) -> None:
    ns = tmp_path / "myregistry.io_5000_"
    ns.mkdir()
    (ns / "hosts.toml").write_text('''
server = "https://upstream.example.com"
capabilities = ["pull", "resolve", "push"]

[host."https://mirror.example.com"]
  capabilities = ["pull"]
  ca = "mirror-ca.pem"
  skip_verify = false
  [host."https://mirror.example.com".header]
    x-custom = ["a", "b"]

[host."http://private.example:8080/us"]
  capabilities = ["pull", "resolve"]
  client = [["/etc/c.cert", "/etc/c.key"], "both.pem"]
  skip_verify = true

[host."https://odd.example/api/v2/upstream"]
  override_path = true
''')
    mirror, private, odd, server = endpoints_for("myregistry.io:5000", hosts_dirs=[tmp_path])
    assert mirror.capabilities == {"pull"} and mirror.ca == (str(ns / "mirror-ca.pem"),)
    assert dict(mirror.headers) == {"x-custom": ("a", "b")}
    assert mirror.url("/app/blobs/sha256:x") == \
        "https://mirror.example.com/v2/app/blobs/sha256:x?ns=myregistry.io%3A5000"
    assert private.scheme == "http" and private.api_root == "/us/v2" and private.skip_verify
    assert private.client == (("/etc/c.cert", "/etc/c.key"), (str(ns / "both.pem"), ""))
    assert odd.url("/app/manifests/1").startswith("https://odd.example/api/v2/upstream/app/")
    assert server.host == "upstream.example.com" and server.namespace == ""
    assert server.capabilities == {"pull", "resolve", "push"}
    assert [e.can("resolve") for e in (mirror, private, odd, server)] == [
        False, True, True, True]


def test_hosts_lookup_order(tmp_path: Path) -> None:
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_text('server = "https://fallback.example"\n')
    assert endpoints_for("other.example", hosts_dirs=[tmp_path])[0].host == "fallback.example"
    (tmp_path / "reg.example:5000").mkdir()
    (tmp_path / "reg.example:5000" / "hosts.toml").write_text(
        '[host."https://m.example"]\n')
    got = endpoints_for("reg.example:5000", hosts_dirs=[tmp_path])
    assert [e.host for e in got] == ["m.example", "reg.example:5000"]
    # a namespace directory without hosts.toml: docker's certificate files
    certs = tmp_path / "certs.example"
    certs.mkdir()
    (certs / "ca.crt").write_text("x")
    (certs / "client.cert").write_text("x")
    (certs / "client.key").write_text("x")
    [ep] = endpoints_for("certs.example", hosts_dirs=[tmp_path])
    assert ep.ca == (str(certs / "ca.crt"),)
    assert ep.client == ((str(certs / "client.cert"), str(certs / "client.key")),)


@pytest.mark.parametrize("text", [
    'server = 5\n', '[host."ftp://x"]\n', 'capabilities = ["fly"]\n', 'ca = 3\n',
    'client = [[1, 2]]\n', '[host."https://x"]\nheader = 4\n', 'not toml',
])
def test_hosts_toml_invalid(tmp_path: Path, text: str) -> None:
    (tmp_path / "bad.example").mkdir()
    (tmp_path / "bad.example" / "hosts.toml").write_text(text)
    with pytest.raises(InvalidArgument):
        endpoints_for("bad.example", hosts_dirs=[tmp_path])


def test_challenges() -> None:
    [c] = parse_challenges(['Bearer realm="https://auth.example/token",'
                            'service="registry.example",scope="repository:a/b:pull,push"'])
    assert c.scheme == "bearer"
    assert dict(c.params) == {"realm": "https://auth.example/token",
                              "service": "registry.example",
                              "scope": "repository:a/b:pull,push"}
    basic, bearer = parse_challenges(['Basic realm="x \\"y\\""',
                                      'Bearer realm=https://t.example/'])
    assert basic.scheme == "basic" and basic.params["realm"] == 'x "y"'
    assert bearer.params["realm"] == "https://t.example/"


def test_docker_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    cfg = DockerConfig()
    assert cfg.get("reg.example") is None
    where = cfg.store("reg.example", Credentials("me", "pa:ss"))
    assert where == str(tmp_path / "docker" / "config.json")
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o600
    doc = json.loads(Path(where).read_text())
    assert base64.b64decode(doc["auths"]["reg.example"]["auth"]) == b"me:pa:ss"
    assert cfg.get("reg.example") == Credentials("me", "pa:ss")
    cfg.store("docker.io", Credentials("hub", "x"))
    assert "https://index.docker.io/v1/" in json.loads(Path(where).read_text())["auths"]
    assert cfg.get("docker.io") == Credentials("hub", "x")
    assert cfg.erase("reg.example") and not cfg.erase("reg.example")
    assert cfg.get("reg.example") is None


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """credHelpers run ``docker-credential-<name> get`` with the server on stdin."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread server\n[ "$1" = get ] || exit 1\n'
                      'if [ "$server" = helped.example ]; then\n'
                      '  echo \'{"Username":"hu","Secret":"hs"}\'\n'
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    (tmp_path / "config.json").write_text(json.dumps(
        {"credHelpers": {"helped.example": "fake", "other.example": "fake"}}))
    cfg = DockerConfig(tmp_path / "config.json")
    assert cfg.get("helped.example") == Credentials("hu", "hs")
    assert cfg.get("other.example") is None


def test_parse_user() -> None:
    assert parse_user("a:b:c") == Credentials("a", "b:c")
    assert parse_user("a", ask=lambda prompt: "typed") == Credentials("a", "typed")
    with pytest.raises(InvalidArgument, match="no password"):
        parse_user("a")
    with pytest.raises(InvalidArgument, match="empty user"):
        parse_user(":x")
