"""Nodes share layers: ``lamina serve --registry-mirror`` serves the content store
read-only over the OCI distribution API (lamina.api.mirror).

Unit-level HTTP tests drive an in-process mirror over loopback. The
end-to-end ones run three network namespaces on one bridge: a registry (R),
node A (a lamina root that pulled an image from R and serves it with
``lamina serve --registry-mirror``) and node B, whose ``hosts.toml`` lists A
ahead of R; B pulls (with lamina, and with containerd 1.6's ``ctr``) while R
is stopped, and fails with the usual one-line error once A is stopped too.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import imagefactory
import pytest
from conftest import require_tools
from containerd_peer import lamina_serve, private_containerd, short_dir
from registry_peer import running_registry, skopeo_push
from test_registry_tls import certs

from lamina.api.distribution import byte_range, manifest_type
from lamina.api.mirror import MirrorLimits, RegistryMirror, mirror_of, parse_listen
from lamina.content import write_blob
from lamina.content.local import LocalContentStore
from lamina.errors import AlreadyExists, InvalidArgument, Unavailable
from lamina.labels import DISTRIBUTION_SOURCE
from lamina.oci.types import MediaType

__all__ = ["certs"]  # a fixture used here


def sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


LAYER = os.urandom(16 << 20)  # more than loopback's socket buffers hold
CONFIG = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
OCI_MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
    "config": {"mediaType": MediaType.OCI_CONFIG, "digest": sha(CONFIG), "size": len(CONFIG)},
    "layers": [{"mediaType": MediaType.OCI_LAYER, "digest": sha(LAYER), "size": len(LAYER)}],
}).encode()
DOCKER_MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": MediaType.DOCKER_MANIFEST,
    "config": {"mediaType": MediaType.DOCKER_CONFIG, "digest": sha(CONFIG),
               "size": len(CONFIG)}, "layers": []}).encode()
BARE_INDEX = json.dumps({"schemaVersion": 2, "manifests": [
    {"mediaType": MediaType.OCI_MANIFEST, "digest": sha(OCI_MANIFEST),
     "size": len(OCI_MANIFEST)}]}).encode()
THEIRS = b"a blob only containerd holds"
INGESTING = b"half of a blob still being written"
#: what a pull labels the blobs it fetched with: the mirror serves only those
PULLED = {DISTRIBUTION_SOURCE + "registry.example": "app"}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalContentStore]:
    s = LocalContentStore(tmp_path / "content")
    for i, data in enumerate([LAYER, CONFIG, OCI_MANIFEST, DOCKER_MANIFEST, BARE_INDEX]):
        write_blob(s, f"ref-{i}", data, expected=sha(data), labels=PULLED)
    # containerd keeps its labels in its own metadata: its blobs come with none
    write_blob(s.scoped("containerd"), "theirs", THEIRS, expected=sha(THEIRS))
    w = s.writer("ingest", total=len(INGESTING), expected=sha(INGESTING))
    w.write(INGESTING[:10])
    w.close()
    yield s
    s.close()


@pytest.fixture
def mirror(store: LocalContentStore) -> Iterator[RegistryMirror]:
    with RegistryMirror(store, "127.0.0.1", 0,
                        limits=MirrorLimits(max_connections=4, timeout=2.0)) as m:
        yield m


def request(m: RegistryMirror, method: str, path: str,
            headers: dict[str, str] | None = None, body: bytes | None = None
            ) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection(*m.address, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def error_code(data: bytes) -> str:
    code: str = json.loads(data)["errors"][0]["code"]
    return code


def test_base(mirror: RegistryMirror) -> None:
    for method in ("GET", "HEAD"):
        resp, data = request(mirror, method, "/v2/")
        assert resp.status == 200
        assert resp.getheader("Docker-Distribution-API-Version") == "registry/2.0"
        assert data == (b"{}" if method == "GET" else b"")


def test_blob_get_and_head(mirror: RegistryMirror) -> None:
    path = f"/v2/library/app/blobs/{sha(LAYER)}?ns=registry.example:5000"
    resp, data = request(mirror, "GET", path)
    assert resp.status == 200 and data == LAYER
    assert resp.getheader("Content-Length") == str(len(LAYER))
    assert resp.getheader("Docker-Content-Digest") == sha(LAYER)
    assert resp.getheader("Content-Type") == "application/octet-stream"
    assert resp.getheader("Accept-Ranges") == "bytes"
    head, nothing = request(mirror, "HEAD", path)
    assert head.status == 200 and nothing == b""
    assert head.getheader("Content-Length") == str(len(LAYER))
    # any valid name: the digest is the address
    assert request(mirror, "GET", f"/v2/other/x_y.z/blobs/{sha(CONFIG)}")[1] == CONFIG


@pytest.mark.parametrize(("doc", "media_type"), [
    (OCI_MANIFEST, MediaType.OCI_MANIFEST), (DOCKER_MANIFEST, MediaType.DOCKER_MANIFEST),
    (BARE_INDEX, MediaType.OCI_INDEX)])
def test_manifest_by_digest(mirror: RegistryMirror, doc: bytes, media_type: str) -> None:
    for method in ("GET", "HEAD"):
        resp, data = request(mirror, method, f"/v2/app/manifests/{sha(doc)}")
        assert resp.status == 200
        assert data == (doc if method == "GET" else b"")
        assert resp.getheader("Content-Type") == media_type
        assert resp.getheader("Content-Length") == str(len(doc))
        assert resp.getheader("Docker-Content-Digest") == sha(doc)


def test_tags_and_non_manifests_are_unknown(mirror: RegistryMirror) -> None:
    """A tag is 404 MANIFEST_UNKNOWN (containerd and lamina go on to the next host);
    a blob that is not a manifest is no manifest."""
    for path in ("/v2/app/manifests/latest", f"/v2/app/manifests/{sha(LAYER)}",
                 f"/v2/app/manifests/{sha(CONFIG)}"):
        resp, data = request(mirror, "GET", path)
        assert (resp.status, error_code(data)) == (404, "MANIFEST_UNKNOWN"), path
        assert resp.getheader("Content-Type") == "application/json"


def test_ranges(mirror: RegistryMirror) -> None:
    path = f"/v2/app/blobs/{sha(LAYER)}"
    size = len(LAYER)
    for header, (start, end) in [("bytes=10-19", (10, 20)), ("bytes=-5", (size - 5, size)),
                                 (f"bytes={size - 3}-", (size - 3, size)),
                                 (f"bytes=100-{size + 50}", (100, size))]:
        resp, data = request(mirror, "GET", path, {"Range": header})
        assert resp.status == 206, header
        assert data == LAYER[start:end]
        assert resp.getheader("Content-Range") == f"bytes {start}-{end - 1}/{size}"
        assert resp.getheader("Content-Length") == str(end - start)
    resp, data = request(mirror, "GET", path, {"Range": f"bytes={size}-"})
    assert resp.status == 416 and resp.getheader("Content-Range") == f"bytes */{size}"
    for ignored in ("bytes=0-1,5-6", "items=1-2", "bytes=9-3"):
        resp, data = request(mirror, "GET", path, {"Range": ignored})
        assert resp.status == 200 and data == LAYER, ignored
    resp, data = request(mirror, "GET", f"/v2/app/manifests/{sha(OCI_MANIFEST)}",
                         {"Range": "bytes=0-9"})
    assert resp.status == 206 and data == OCI_MANIFEST[:10]


def test_byte_range() -> None:
    assert byte_range("bytes=0-", 10) == (0, 10)
    assert byte_range("bytes=-20", 10) == (0, 10)
    assert byte_range("bytes=", 10) is None


def test_manifest_type() -> None:
    assert manifest_type(CONFIG) is None
    assert manifest_type(b"[]") is None and manifest_type(b"\xff") is None
    assert manifest_type(json.dumps({"mediaType": MediaType.OCI_CONFIG}).encode()) is None


def test_unknown_and_ingests_are_not_served(mirror: RegistryMirror) -> None:
    for data in (b"never stored", INGESTING):
        resp, body = request(mirror, "GET", f"/v2/app/blobs/{sha(data)}")
        assert (resp.status, error_code(body)) == (404, "BLOB_UNKNOWN")
    resp, body = request(mirror, "GET", "/v2/app/blobs/sha512:" + "ab" * 64)
    assert resp.status == 404


def test_only_what_the_cli_pulled_is_served_of_its_own(store: LocalContentStore,
                                                       mirror: RegistryMirror) -> None:
    """A blob the CLI made or imported on the node (a checkpoint's memory dump, a rw
    layer, an ingest) has no distribution source label: a peer that knows its digest
    gets the 404 of an absent blob, for a blob and for a manifest."""
    dump = b"a checkpoint's memory: keys and all"
    local_manifest = json.dumps({"schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
                                 "config": {"mediaType": MediaType.OCI_CONFIG,
                                            "digest": sha(dump), "size": len(dump)},
                                 "layers": []}).encode()
    write_blob(store, "dump", dump, expected=sha(dump))
    write_blob(store, "local", local_manifest, expected=sha(local_manifest),
               labels={"containerd.io/gc.root": "x"})
    for kind, data, code in (("blobs", dump, "BLOB_UNKNOWN"),
                             ("manifests", local_manifest, "MANIFEST_UNKNOWN")):
        for method in ("GET", "HEAD"):
            resp, body = request(mirror, method, f"/v2/app/{kind}/{sha(data)}")
            assert resp.status == 404, (kind, method, resp.status)
            if method == "GET":
                assert error_code(body) == code
    # once a pull labels it (the same bytes fetched from a registry), it is served
    store.update(replace(store.info(sha(dump)), labels=PULLED), "labels")
    resp, body = request(mirror, "GET", f"/v2/app/blobs/{sha(dump)}")
    assert (resp.status, body) == (200, dump)


def test_containerd_blobs_served_without_a_reference(store: LocalContentStore,
                                                     mirror: RegistryMirror) -> None:
    before = store.holders()
    resp, data = request(mirror, "GET", f"/v2/app/blobs/{sha(THEIRS)}")
    assert resp.status == 200 and data == THEIRS
    assert store.holders() == before  # reading took no CLI reference


def test_writes_are_refused(store: LocalContentStore, mirror: RegistryMirror) -> None:
    before = sorted(i.digest for i in store.walk())
    for method, path in [("PUT", f"/v2/app/manifests/{sha(b'x')}"),
                         ("POST", "/v2/app/blobs/uploads/"),
                         ("PATCH", "/v2/app/blobs/uploads/1"),
                         ("DELETE", f"/v2/app/blobs/{sha(LAYER)}")]:
        resp, data = request(mirror, method, path, body=b"x")
        assert (resp.status, error_code(data)) == (405, "UNSUPPORTED"), method
        assert resp.getheader("Allow") == "GET, HEAD"
    assert sorted(i.digest for i in store.walk()) == before


def test_nothing_is_listed(mirror: RegistryMirror) -> None:
    for path in ("/v2/_catalog", "/v2/app/tags/list", "/v2/app/blobs/uploads/1",
                 f"/v2/app/referrers/{sha(LAYER)}", "/", "/v1/_ping"):
        resp, data = request(mirror, "GET", path)
        assert resp.status == 404, path
        assert "app" not in data.decode() or path.startswith("/v2/app")


def test_bad_names_and_traversal(mirror: RegistryMirror) -> None:
    d = sha(LAYER)
    for path in (f"/v2/App/blobs/{d}", f"/v2/../../etc/blobs/{d}", f"/v2/a//b/blobs/{d}",
                 f"/v2/%2e%2e/x/blobs/{d}", f"/v2/{'a' * 256}/blobs/{d}", f"/v2/-a/blobs/{d}"):
        resp, data = request(mirror, "GET", path)
        assert (resp.status, error_code(data)) == (400, "NAME_INVALID"), path
    for ref in ("sha256:..%2f..%2fetc", "sha256:" + "A" * 64, "sha256:%00", "sha256:abc"):
        resp, data = request(mirror, "GET", f"/v2/app/blobs/{ref}")
        assert resp.status in (400, 404), ref
    resp, data = request(mirror, "GET", "/v2/app/blobs/sha256:..%2f..%2fetc%2fpasswd")
    assert resp.status in (400, 404) and b"root:" not in data


def test_a_request_line_with_a_control_character_is_malformed(
        mirror: RegistryMirror, caplog: pytest.LogCaptureFixture) -> None:
    # HTTP has no control characters in a request line; a peer's went on to the
    # router, and to the log (debug, or with a failure) as it was, escape sequences
    # and all
    caplog.set_level(logging.DEBUG, logger="lamina")
    d = sha(LAYER)
    for line in (f"GET /v2/app/blobs/{d}\x1b]0;owned\x07 HTTP/1.1",
                 f"GET\x1b[2J /v2/app/blobs/{d} HTTP/1.1", "GET /v2/\x7f HTTP/1.1"):
        with raw(mirror) as s:
            s.sendall(line.encode() + b"\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):  # the answer closes the connection
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 400 ") and b"UNSUPPORTED" in answer, (line, answer)
    assert not any("\x1b" in r.getMessage() or "\x7f" in r.getMessage()
                   for r in caplog.records)


def raw(m: RegistryMirror) -> socket.socket:
    return socket.create_connection(m.address, timeout=10)


def test_slow_clients_do_not_block_others(mirror: RegistryMirror) -> None:
    """A client dribbling its request head, and one that asked for a blob and reads
    nothing, hold only themselves; each is cut after the 2 s timeout."""
    dribbler = raw(mirror)
    dribbler.sendall(b"GET /v2/ HTT")
    sleeper = socket.socket()
    sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    sleeper.connect(mirror.address)
    sleeper.sendall(f"GET /v2/a/blobs/{sha(LAYER)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    start = time.monotonic()
    resp, data = request(mirror, "GET", f"/v2/a/blobs/{sha(CONFIG)}")
    assert resp.status == 200 and data == CONFIG
    assert time.monotonic() - start < 1.0
    assert drain(dribbler) == 0  # closed by the mirror after the head timeout
    assert time.monotonic() - start < 4.5
    time.sleep(max(0.0, start + 3.5 - time.monotonic()))  # the sleeper reads nothing
    assert drain(sleeper) < len(LAYER)


def drain(s: socket.socket) -> int:
    """Read until the peer closes (or resets); how many bytes came."""
    s.settimeout(8)
    got = 0
    try:
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    finally:
        s.close()
    return got


def test_connection_limit(mirror: RegistryMirror) -> None:
    held = [raw(mirror) for _ in range(4)]
    time.sleep(0.2)
    resp, _ = request(mirror, "GET", "/v2/")
    assert resp.status == 503 and resp.getheader("Retry-After") == "1"
    for s in held:
        s.close()
    deadline = time.monotonic() + 5
    while mirror.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request(mirror, "GET", "/v2/")[0].status == 200


def test_keep_alive_and_bad_requests(mirror: RegistryMirror) -> None:
    conn = http.client.HTTPConnection(*mirror.address, timeout=10)
    for _ in range(3):  # one connection, several requests
        conn.request("GET", f"/v2/a/blobs/{sha(CONFIG)}")
        assert conn.getresponse().read() == CONFIG
    conn.close()
    s = raw(mirror)
    s.sendall(b"GARBAGE\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    s.close()
    s = raw(mirror)
    s.sendall(b"GET /v2/ HTTP/1.1\r\n" + b"X-Long: " + b"a" * (20 << 10) + b"\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    s.close()


def test_streams_with_flat_memory(tmp_path: Path) -> None:
    """A 256 MiB blob goes out in chunks: the process grows by far less than the blob."""
    big_size = 256 << 20
    with LocalContentStore(tmp_path / "big") as store:
        w = store.writer("big", total=big_size)
        h = hashlib.sha256()
        chunk = os.urandom(1 << 20)
        for _ in range(big_size >> 20):
            w.write(chunk)
            h.update(chunk)
        digest = f"sha256:{h.hexdigest()}"
        w.commit(big_size, digest, labels=PULLED)
        with RegistryMirror(store, "127.0.0.1", 0) as m:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            conn = http.client.HTTPConnection(*m.address, timeout=30)
            conn.request("GET", f"/v2/a/blobs/{digest}")
            resp = conn.getresponse()
            got = hashlib.sha256()
            while data := resp.read(1 << 16):
                got.update(data)
            conn.close()
            grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert f"sha256:{got.hexdigest()}" == digest
    assert grown_kib < 32 << 10, grown_kib


def test_tls(store: LocalContentStore, certs: Path) -> None:
    """With a certificate and key the mirror speaks HTTPS (what its CA verifies)."""
    import ssl

    with mirror_of(store.path, "127.0.0.1:0", cert=str(certs / "server.pem"),
                   key=str(certs / "server.key")) as m:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        conn = http.client.HTTPSConnection(*m.address, timeout=10, context=ctx)
        conn.request("GET", f"/v2/a/blobs/{sha(CONFIG)}")
        assert conn.getresponse().read() == CONFIG
        conn.close()
        with pytest.raises(http.client.RemoteDisconnected):
            request(m, "GET", "/v2/")  # plain HTTP to a TLS port: no answer
    with pytest.raises(InvalidArgument):
        mirror_of(store.path, "127.0.0.1:0", cert=str(certs / "server.pem"))


def test_address_in_use(store: LocalContentStore, mirror: RegistryMirror) -> None:
    host, port = mirror.address
    with pytest.raises(AlreadyExists, match="cannot listen on"):
        RegistryMirror(store, host, port).start()


def test_parse_listen() -> None:
    assert parse_listen("10.0.0.2:5050") == ("10.0.0.2", 5050)
    assert parse_listen(":5050") == ("0.0.0.0", 5050)
    assert parse_listen("[::1]:5050") == ("::1", 5050)
    for bad in ("10.0.0.2", "x:port", "x:70000"):
        with pytest.raises(InvalidArgument):
            parse_listen(bad)


# --------------------------------------------------------------- three nodes

SUBNET = "10.99.0"
R_IP, A_IP, B_IP = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3"
MIRROR = f"{A_IP}:5050"


@dataclass(frozen=True)
class Nodes:
    """Network namespaces: ``r`` holds the bridge and the registry; ``a``, ``b`` nodes."""

    r: str
    a: str
    b: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def three_nodes() -> Iterator[Nodes]:
    """R, A and B on one bridge (in R): private namespaces, nothing in this one."""
    require_tools("ip")
    tag = str(os.getpid() % 100000)
    nodes = Nodes(*(f"lamina-mirror-{tag}-{n}" for n in "rab"))
    made: list[str] = []
    try:
        for ns in (nodes.r, nodes.a, nodes.b):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", nodes.r, "link", "add", "br0", "type", "bridge")
        _ip("-n", nodes.r, "addr", "add", f"{R_IP}/24", "dev", "br0")
        _ip("-n", nodes.r, "link", "set", "br0", "up")
        for ns, addr, n in ((nodes.a, A_IP, "a"), (nodes.b, B_IP, "b")):
            node_end, bridge_end = f"lm{tag}{n}n", f"lm{tag}{n}r"
            _ip("link", "add", node_end, "type", "veth", "peer", "name", bridge_end)
            _ip("link", "set", node_end, "netns", ns)
            _ip("link", "set", bridge_end, "netns", nodes.r)
            _ip("-n", nodes.r, "link", "set", bridge_end, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", node_end)
            _ip("-n", ns, "link", "set", node_end, "up")
        yield nodes
    finally:
        for ns in made:  # the veth pairs go with their namespaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def lamina_in(ns: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "lamina",
                           "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300, check=False)


def hosts_dir(base: Path, registry: str, mirror: str) -> Path:
    """A hosts.toml (for lamina and containerd alike) listing ``mirror`` first."""
    d = base / "certs.d" / registry
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(
        f'server = "http://{registry}"\n\n'
        f'[host."http://{mirror}"]\n  capabilities = ["pull", "resolve"]\n')
    return base / "certs.d"


def blobs_of(root: Path) -> set[str]:
    with LocalContentStore(root / "content") as store:
        return {i.digest for i in store.walk()}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> imagefactory.ImageRef:
    work = tmp_path_factory.mktemp("mirror-image")
    layers = [imagefactory.minimal_layer(work / "blobs"), imagefactory.layer_from_entries(
        [imagefactory.Dir("srv"), imagefactory.File("srv/data", os.urandom(2 << 20))],
        work / "blobs", comment="data")]
    return imagefactory.build_oci_layout(work / "oci", layers, ref_name="app")


def test_nodes_share_layers(require_root: None, image: imagefactory.ImageRef,
                            tmp_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    wanted = {image.manifest_digest, image.config_digest, *(lyr.digest for lyr in image.layers)}
    root_a, root_b = tmp_root / "node-a", tmp_root / "node-b"
    with three_nodes() as net:
        with running_registry(tmp_path_factory.mktemp("registry-r"), addr=R_IP,
                              netns=net.r) as reg:
            tagged = f"{reg.host}/team/app:1"
            skopeo_push(image.oci_ref, tagged, netns=net.r)
            pulled = lamina_in(net.a, root_a, "image", "pull", "--plain-http", tagged)
            assert pulled.returncode == 0, pulled.stderr
        # the registry is gone: only node A has the image now
        assert blobs_of(root_a) >= wanted
        by_digest = f"{reg.host}/team/app@{image.manifest_digest}"
        certs = hosts_dir(tmp_root, reg.host, MIRROR)
        base, in_tmp = short_dir(tmp_root / "c")
        try:
            with lamina_serve(root_a, base / "a.sock", netns=net.a,
                              serve_options=("--registry-mirror", MIRROR)):
                got = lamina_in(net.b, root_b, "image", "pull", "--hosts-dir", str(certs),
                                by_digest)
                assert got.returncode == 0, got.stderr
                assert image.manifest_digest in got.stdout
                assert blobs_of(root_b) >= wanted  # each verified by its digest on the way
                listed = json.loads(lamina_in(net.b, root_b, "image", "ls", "--json").stdout)
                assert [i["target"]["digest"] for i in listed] == [image.manifest_digest]
                # a tag is not answered by the mirror (by digest only), and R is down:
                # that is the error, not the mirror's 404
                tag = lamina_in(net.b, tmp_root / "node-b2", "image", "pull", "--hosts-dir",
                                str(certs), tagged)
                assert tag.returncode == Unavailable.exit_code, tag.stderr
                assert f": {reg.host}: HEAD failed" in tag.stderr  # (a TransportError)
                assert tag.stderr.count("\n") == 1, tag.stderr
                ctr_pull_through_mirror(net, base, certs, by_digest, wanted)
        finally:
            if in_tmp:
                subprocess.run(["rm", "-rf", str(base)], check=False)
        # node A is stopped too: nobody has the image
        gone = lamina_in(net.b, tmp_root / "node-b3", "image", "pull", "--hosts-dir",
                         str(certs), by_digest)
        assert gone.returncode == Unavailable.exit_code, gone.stderr
        assert gone.stderr.startswith("lamina: Unavailable: ")
        assert gone.stderr.count("\n") == 1 and "Traceback" not in gone.stderr


def ctr_pull_through_mirror(net: Nodes, base: Path, certs: Path, ref: str,
                            wanted: set[str]) -> None:
    """containerd 1.6 (``ctr --hosts-dir``, fetching from node B's namespace) pulls
    from node A with the registry down."""
    with private_containerd(base / "ctrd") as ctrd:
        pulled = subprocess.run(
            ["ip", "netns", "exec", net.b, "ctr", "--address", ctrd.address, "--namespace",
             "mirror", "image", "pull", "--hosts-dir", str(certs), ref],
            capture_output=True, text=True, timeout=300, check=False)
        assert pulled.returncode == 0, pulled.stderr + pulled.stdout
        listed = subprocess.run(
            ["ctr", "--address", ctrd.address, "--namespace", "mirror", "content", "ls",
             "-q"], capture_output=True, text=True, timeout=60, check=True).stdout.split()
        assert set(listed) >= wanted
        subprocess.run(["ctr", "--address", ctrd.address, "--namespace", "mirror", "image",
                        "rm", "--sync", ref], capture_output=True, timeout=60, check=False)


def test_lamina_pull_falls_back_to_registry(require_root: None, image: imagefactory.ImageRef,
                                            tmp_root: Path,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """A mirror answering 404 (an empty node; a tag) sends lamina's and containerd's
    pulls on to the registry; a mirror holding the layers serves them while the
    registry resolves the tag."""
    layer_bytes = sum(lyr.size for lyr in image.layers)
    with running_registry(tmp_path_factory.mktemp("registry-fallback")) as reg:
        tagged = f"{reg.host}/team/app:1"
        skopeo_push(image.oci_ref, tagged)
        for node, source in (("first", tmp_root / "empty"), ("second", tmp_root / "first")):
            store = LocalContentStore(source / "content")
            with RegistryMirror(store, "127.0.0.1", 0) as m:
                host, port = m.address
                certs = hosts_dir(tmp_root / f"hosts-{node}", reg.host, f"{host}:{port}")
                got = subprocess.run([sys.executable, "-m", "lamina", "--root",
                                      str(tmp_root / node), "image", "pull", "--hosts-dir",
                                      str(certs), tagged],
                                     capture_output=True, text=True, timeout=300, check=False)
                assert got.returncode == 0, got.stderr
                sent = m.sent_bytes
            store.close()
            if node == "first":
                assert sent == 0  # everything came from the registry
            else:
                assert sent >= layer_bytes  # the layers came from the mirror
            assert blobs_of(tmp_root / node) >= {image.manifest_digest,
                                                 *(lyr.digest for lyr in image.layers)}
        # containerd 1.6 too goes on to the registry for the tag, and takes the
        # layers from the mirror
        base, in_tmp = short_dir(tmp_root / "c")
        try:
            with RegistryMirror(LocalContentStore(tmp_root / "first" / "content"), "127.0.0.1",
                                0, owns_store=True) as m, \
                    private_containerd(base / "ctrd") as ctrd:
                host, port = m.address
                certs = hosts_dir(tmp_root / "hosts-ctr", reg.host, f"{host}:{port}")
                ctrd.ctr("image", "pull", "--hosts-dir", str(certs), tagged)
                assert m.sent_bytes >= layer_bytes
        finally:
            if in_tmp:
                subprocess.run(["rm", "-rf", str(base)], check=False)
