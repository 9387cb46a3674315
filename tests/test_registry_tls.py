"""HTTPS with a CA of the test's own, hosts.toml (ca, skip_verify, mirrors), platforms."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from bad_registry import State, serving
from registry_peer import Registry as Peer
from registry_peer import running_registry

from lamina.errors import NotFound, Unavailable
from lamina.images.pull import pull
from lamina.images.push import push
from lamina.images.service import ImageService
from lamina.metadata.root import Root
from lamina.remotes.registry import Registry


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=lamina test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
             "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=d)
    return d


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry"),
                          tls=(certs / "server.pem", certs / "server.key")) as reg:
        yield reg


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> imagefactory.ImageRef:
    work = tmp_path_factory.mktemp("image")
    layer = imagefactory.layer_from_entries(
        [imagefactory.File("etc/hello", b"over tls\n")], work / "blobs")
    return imagefactory.build_oci_layout(work / "oci", [layer], ref_name="tls")


def _hosts(tmp: Path, namespace: str, text: str) -> Path:
    """A hosts directory with ``hosts.toml`` for ``namespace`` (host:port, as containerd
    names it: ``host_port_``)."""
    d = tmp / "certs.d"
    host, port = namespace.rsplit(":", 1)
    ns = d / f"{host}_{port}_"
    ns.mkdir(parents=True, exist_ok=True)
    (ns / "hosts.toml").write_text(text)
    return d


def test_tls_with_hosts_toml(require_root: None, peer: Peer, certs: Path,
                             image: imagefactory.ImageRef, tmp_root: Path) -> None:
    name = f"{peer.host}/secure/app:1"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                    "--dest-tls-verify=false", image.oci_ref,
                    f"docker://{name}"], check=True, capture_output=True, timeout=120)
    # loopback defaults to plain HTTP: the TLS registry needs a hosts.toml saying https
    plain = _hosts(tmp_root / "a", peer.host, f'server = "https://{peer.host}"\n')
    with Registry(hosts_dirs=[plain]) as reg, pytest.raises(
            Unavailable, match=f"{peer.host}: TLS verification failed"):
        pull(reg, name, root=Root(tmp_root / "r1"))
    trusted = _hosts(tmp_root / "b", peer.host,
                     f'server = "https://{peer.host}"\nca = "{certs / "ca.pem"}"\n')
    with Registry(hosts_dirs=[trusted]) as reg:
        result = pull(reg, name, root=Root(tmp_root / "r2"))
    assert result.fetched == 1
    skipping = _hosts(tmp_root / "c", peer.host,
                      f'server = "https://{peer.host}"\nskip_verify = true\n')
    with Registry(hosts_dirs=[skipping]) as reg:
        assert pull(reg, name, root=Root(tmp_root / "r3")).fetched == 1


def test_mirror_pulls_server_resolves(require_root: None, peer: Peer, certs: Path,
                                      image: imagefactory.ImageRef, tmp_root: Path) -> None:
    """A pull-only mirror serves the blobs (asked with ?ns=); the server resolves the tag."""
    name = f"{peer.host}/mirrored/app:1"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                    "--dest-tls-verify=false", image.oci_ref, f"docker://{name}"],
                   check=True, capture_output=True, timeout=120)
    mirror = State()
    for lyr in image.layers:
        mirror.add_blob(lyr.read_blob())
    mirror.add_blob(image.blob_path(image.config_digest).read_bytes())
    manifest = image.blob_path(image.manifest_digest).read_bytes()
    mirror.add_manifest("mirrored/app", [], "application/vnd.oci.image.manifest.v1+json",
                        manifest)
    with serving(mirror) as mhost:
        hosts = _hosts(tmp_root, peer.host,
                       f'server = "https://{peer.host}"\nca = "{certs / "ca.pem"}"\n'
                       f'[host."http://{mhost}"]\n  capabilities = ["pull"]\n')
        with Registry(hosts_dirs=[hosts]) as reg:
            pull(reg, name, root=Root(tmp_root / "root"))
    got = mirror.requests("GET", "/v2/mirrored/app/")
    assert {r.path.split("?")[0].rsplit("/", 1)[1] for r in got} == {
        image.manifest_digest, image.config_digest, *(lyr.digest for lyr in image.layers)}
    assert all(r.path.endswith(f"?ns={peer.host.replace(':', '%3A')}") for r in got)
    assert not mirror.requests("HEAD")  # never asked to resolve


@pytest.fixture(scope="module")
def plain_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("plain")) as reg:
        yield reg


def test_platforms(require_root: None, plain_peer: Peer, tmp_root: Path,
                   tmp_path: Path) -> None:
    """An index of two platforms: the host's by default, --platform, --all-platforms."""
    host_arch = imagefactory.host_arch()
    other_arch = "arm64" if host_arch != "arm64" else "amd64"
    layout = tmp_path / "oci"
    refs = {}
    for arch in (host_arch, other_arch):
        layer = imagefactory.layer_from_entries(
            [imagefactory.File("arch", arch.encode())], tmp_path / "blobs")
        refs[arch] = imagefactory.build_oci_layout(
            layout, [layer], ref_name=arch,
            config=imagefactory.ImageConfig(architecture=arch))
    src = Root(tmp_root / "src")
    svc = ImageService(src)
    svc.import_(layout, unpack=False, index_name="multi")
    svc.close()
    name = f"{plain_peer.host}/multi/app:1"
    with Registry() as reg:
        push(reg, "multi", name, root=src)
        default = Root(tmp_root / "default")
        result = pull(reg, name, root=default)
        assert result.unpacked is not None
        content = default.content()
        content.info(refs[host_arch].config_digest)
        with pytest.raises(NotFound):
            content.info(refs[other_arch].config_digest)
        with pytest.raises(NotFound, match="pull with --all-platforms"):
            push(reg, name, f"{plain_peer.host}/again/app:1", root=default)
        chosen = Root(tmp_root / "chosen")
        result = pull(reg, name, root=chosen, platforms=[f"linux/{other_arch}"])
        assert [d.digest for d in result.manifests] == [refs[other_arch].manifest_digest]
        every = Root(tmp_root / "all")
        result = pull(reg, name, root=every, all_platforms=True)
        assert {d.digest for d in result.manifests} == {r.manifest_digest
                                                       for r in refs.values()}
        assert result.unpacked is not None  # the host's
        with pytest.raises(NotFound, match="no manifest for linux/s390x"):
            pull(reg, name, root=Root(tmp_root / "none"), platforms=["linux/s390x"])
    out = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{name}"],
        capture_output=True, text=True, check=True, timeout=60).stdout)
    assert len(out["manifests"]) == 2


def test_proxies(require_root: None, peer: Peer, certs: Path, image: imagefactory.ImageRef,
                 tmp_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hosts.toml ``proxy``: plain HTTP asked with absolute URLs (and the proxy's
    credentials), HTTPS through CONNECT with TLS checked end to end."""
    from bad_registry import Logged, serving_proxy

    from lamina.remotes.transport import proxy_for

    name = f"{peer.host}/proxied/app:1"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                    "--dest-tls-verify=false", image.oci_ref, f"docker://{name}"],
                   check=True, capture_output=True, timeout=120)
    log: list[Logged] = []
    honest = State()
    for lyr in image.layers:
        honest.add_blob(lyr.read_blob())
    honest.add_blob(image.blob_path(image.config_digest).read_bytes())
    honest.add_manifest("plain/app", ["1"], "application/vnd.oci.image.manifest.v1+json",
                        image.blob_path(image.manifest_digest).read_bytes())
    with serving_proxy(log) as proxy, serving(honest) as plain:
        hosts = _hosts(tmp_root / "h1", plain,
                       f'[host."http://{plain}"]\n  proxy = "http://me:pw@{proxy}"\n')
        hosts = _hosts(tmp_root / "h1", peer.host,
                       f'server = "https://{peer.host}"\nca = "{certs / "ca.pem"}"\n'
                       f'proxy = "http://{proxy}"\n')
        with Registry(hosts_dirs=[hosts]) as reg:
            assert pull(reg, f"{plain}/plain/app:1", root=Root(tmp_root / "r1")).fetched == 1
            assert pull(reg, name, root=Root(tmp_root / "r2")).fetched == 1
    via_plain = [r for r in log if r.path.startswith(f"http://{plain}/v2/plain/app/")]
    assert via_plain and all(r.headers.get("Proxy-Authorization") == "Basic bWU6cHc="
                             for r in via_plain)
    assert any(r.method == "CONNECT" and r.path == peer.host for r in log)
    assert len(honest.requests()) == len(via_plain)  # every request went through it
    # the environment's proxies: loopback never, NO_PROXY honoured
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", ".internal.example,other.example:5000")
    assert proxy_for("https", "registry.example.com") == "http://proxy.example:3128"
    assert proxy_for("https", "r.internal.example:443") == ""
    assert proxy_for("https", "other.example:5000") == ""
    assert proxy_for("https", "other.example:5001") == "http://proxy.example:3128"
    assert proxy_for("https", "127.0.0.1:5000") == ""
    assert proxy_for("http", "registry.example.com") == ""
