"""Registries that misbehave: each case ends in a clear error in bounded time, or recovers.

After every failure nothing is committed but resumable ingests, no image is
registered, and ``lamina check`` finds the root consistent.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from bad_registry import MT_CONFIG, MT_INDEX, MT_MANIFEST, Handler, State, serving, sha

from lamina.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from lamina.images.fetch import ingest_ref
from lamina.images.pull import PullResult, pull
from lamina.metadata.check import check
from lamina.metadata.images import ImageStore
from lamina.metadata.root import Root
from lamina.remotes.auth import Unauthorized
from lamina.remotes.registry import Registry
from lamina.remotes.session import RetryPolicy
from lamina.remotes.transport import Transport, TransportError
from lamina.util.progress import Progress

REPO = "bad/app"


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> list[imagefactory.Layer]:
    work = tmp_path_factory.mktemp("layers")
    return [imagefactory.layer_from_entries(
        [imagefactory.File(f"data{i}", imagefactory._pseudo_random(1 << 20, f"{i}".encode()))],
        work) for i in range(2)]


@pytest.fixture
def state(layers: list[imagefactory.Layer]) -> State:
    st = State()
    blobs = [st.add_blob(lyr.read_blob()) for lyr in layers]
    config = json.dumps({"architecture": imagefactory.host_arch(), "os": "linux",
                         "rootfs": {"type": "layers",
                                    "diff_ids": [lyr.diff_id for lyr in layers]}}).encode()
    cdigest = st.add_blob(config)
    st.add_manifest(REPO, ["1"], MT_MANIFEST, {
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": len(config)},
        "layers": [{"mediaType": lyr.media_type, "digest": d, "size": lyr.size}
                   for lyr, d in zip(layers, blobs, strict=True)]})
    return st


@pytest.fixture
def host(state: State) -> Iterator[str]:
    with serving(state) as h:
        yield h


def do_pull(host: str, root: Path, ref: str = f"{REPO}:1", **kw: object) -> PullResult:
    transport = Transport(timeout=5, stall_time=1.0, stall_rate=4096)
    with Registry(retry=RetryPolicy(attempts=3, base=0.05, max_wait=3),
                  transport=transport) as reg, _root(root) as r:
        return pull(reg, f"{host}/{ref}", root=r, **kw)  # type: ignore[arg-type]


class _root:
    def __init__(self, path: Path) -> None:
        self.r = Root(path)

    def __enter__(self) -> Root:
        return self.r

    def __exit__(self, *exc: object) -> None:
        self.r.close()


def assert_clean(root: Path, host: str, *, ingests: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """No image, only the named ingests, and a consistent root."""
    with _root(root) as r:
        images = ImageStore(r.metadata_path)
        assert [i.name for i in images.list()] == []
        images.close()
        assert {s.ref for s in r.content().list_statuses()} == ingests
        report = check(r)
        assert report.ok, report.problems


def layer_path(state: State, i: int) -> str:
    digest = [d for d in state.blobs if len(state.blobs[d]) > 4096][i]
    return f"/v2/{REPO}/blobs/{digest}"


def truncate(h: Handler, data: bytes, at: int) -> None:
    """Promise the whole blob, send ``at`` bytes, hang up."""
    h.send_response(200)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data[:at])
    h.wfile.flush()
    h.close_connection = True


def test_honest(require_root: None, state: State, host: str, tmp_root: Path) -> None:
    result = do_pull(host, tmp_root)
    assert result.fetched == 2 and result.unpacked is not None
    assert result.unpacked.extracted == 2


def test_digest_mismatch(require_root: None, state: State, host: str, tmp_root: Path) -> None:
    path = layer_path(state, 1)
    digest = path.rsplit("/", 1)[1]
    good = state.blobs[digest]
    bad = bytes([good[0] ^ 1]) + good[1:]
    state.hooks[path] = lambda h: (h.send(200, bad), True)[1]
    with pytest.raises(FailedPrecondition, match=f"blob {digest}: the registry sent .* hashing"):
        do_pull(host, tmp_root)
    assert_clean(tmp_root, host)  # the bad ingest is thrown away, not kept for a resume
    with _root(tmp_root) as r, pytest.raises(NotFound):
        r.content().info(digest)


def test_truncated_resumes_with_range(require_root: None, state: State, host: str,
                                      tmp_root: Path) -> None:
    path = layer_path(state, 0)
    data = state.blobs[path.rsplit("/", 1)[1]]
    calls = []

    def hook(h: Handler) -> bool:
        calls.append(h.headers.get("Range"))
        if len(calls) == 1:
            truncate(h, data, len(data) // 2)
            return True
        return False

    state.hooks[path] = hook
    result = do_pull(host, tmp_root)
    assert result.fetched == 2
    assert calls[0] is None and calls[1] == f"bytes={len(data) // 2}-"


def test_truncated_forever_then_rerun(require_root: None, state: State, host: str,
                                      tmp_root: Path) -> None:
    """A pull that gives up keeps the partial blob; the next one asks only for the rest."""
    path = layer_path(state, 1)
    digest = path.rsplit("/", 1)[1]
    data = state.blobs[digest]
    served = []

    def hook(h: Handler) -> bool:
        start = int((h.headers.get("Range") or "bytes=0-")[6:-1])
        served.append(start)
        end = min(len(data), start + 100_000)
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        h.wfile.write(data[start:end])
        h.close_connection = True
        return True

    state.hooks[path] = hook
    with pytest.raises(TransportError, match=rf"^{host}: blob {digest}: body cut short "
                                             rf"\(\d+ bytes never came\); gave up after 3 "
                                             f"attempts at 300000 of {len(data)} bytes$"):
        do_pull(host, tmp_root)
    assert served == [0, 100_000, 200_000]
    assert_clean(tmp_root, host, ingests={ingest_ref(digest)})
    del state.hooks[path]
    ranges = []
    state.hooks[path] = lambda h: (ranges.append(h.headers.get("Range")), False)[1]
    assert do_pull(host, tmp_root).fetched == 1  # the other layer came the first time
    assert ranges == ["bytes=300000-"]


def test_bad_content_range(require_root: None, state: State, host: str, tmp_root: Path) -> None:
    """A 206 for another range than asked is not trusted: the blob is asked for whole."""
    path = layer_path(state, 0)
    data = state.blobs[path.rsplit("/", 1)[1]]
    calls = []

    def hook(h: Handler) -> bool:
        calls.append(h.headers.get("Range"))
        if len(calls) == 1:
            truncate(h, data, 4096)
            return True
        if len(calls) == 2:
            h.send(206, data, {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"})
            return True
        return False

    state.hooks[path] = hook
    assert do_pull(host, tmp_root).fetched == 2
    assert calls == [None, "bytes=4096-", None]


def test_content_length_lie(require_root: None, state: State, host: str,
                            tmp_root: Path) -> None:
    path = layer_path(state, 0)
    data = state.blobs[path.rsplit("/", 1)[1]]
    state.hooks[path] = lambda h: (h.send(200, data + b"x" * 10), True)[1]
    with pytest.raises(FailedPrecondition, match=f"Content-Length {len(data) + 10} where "
                                                 f"{len(data)} bytes are due"):
        do_pull(host, tmp_root)
    assert_clean(tmp_root, host, ingests={ingest_ref(path.rsplit("/", 1)[1])})


def test_huge_manifest(require_root: None, state: State, host: str, tmp_root: Path) -> None:
    path = f"/v2/{REPO}/manifests/1"
    state.hooks[path] = lambda h: (h.send(200, b"", {"Content-Type": MT_MANIFEST},
                                          length=100 << 20), True)[1]
    with pytest.raises(InvalidArgument, match="larger than the 4194304 allowed"):
        do_pull(host, tmp_root)

    def endless(h: Handler) -> bool:  # no HEAD; GET streams 100 MB without a length
        if h.command == "HEAD":
            h.send(405)
            return True
        h.send_response(200)
        h.send_header("Content-Type", MT_MANIFEST)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(1600):
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass
        h.close_connection = True
        return True

    state.hooks[path] = endless
    with pytest.raises(InvalidArgument, match="larger than the 4194304 bytes allowed"):
        do_pull(host, tmp_root)
    assert_clean(tmp_root, host)


def test_index_loops(require_root: None, state: State, host: str, tmp_root: Path) -> None:
    # an index naming a child whose bytes are the index itself: caught by the digest check
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_INDEX, "digest": "sha256:" + "1" * 64, "size": 0}]}
    body = json.dumps(index).encode()
    index["manifests"][0]["size"] = len(body)  # type: ignore[index]
    body = json.dumps(index).encode()
    state.add_manifest(REPO, ["self"], MT_INDEX, body)
    state.manifests[f"{REPO}/sha256:{'1' * 64}"] = (MT_INDEX, body)
    with pytest.raises(FailedPrecondition, match="sends 247 bytes for a document of 245"):
        do_pull(host, tmp_root, "bad/app:self")
    index["manifests"][0]["size"] = len(body)  # type: ignore[index]
    body = json.dumps(index).encode()
    state.add_manifest(REPO, ["self"], MT_INDEX, body)
    state.manifests[f"{REPO}/sha256:{'1' * 64}"] = (MT_INDEX, body)
    with pytest.raises(FailedPrecondition, match="hashing to"):
        do_pull(host, tmp_root, "bad/app:self")
    # indexes nested deeper than 8: refused
    child = next(v for k, v in state.manifests.items() if k == f"{REPO}/1")[1]
    desc = {"mediaType": MT_MANIFEST, "digest": sha(child), "size": len(child),
            "platform": {"os": "linux", "architecture": imagefactory.host_arch()}}
    for _ in range(10):
        doc = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX,
                          "manifests": [desc]}).encode()
        state.add_manifest(REPO, [], MT_INDEX, doc)
        desc = {"mediaType": MT_INDEX, "digest": sha(doc), "size": len(doc)}
    state.add_manifest(REPO, ["deep"], MT_INDEX, doc)
    with pytest.raises(InvalidArgument, match="nest more than 8 deep"):
        do_pull(host, tmp_root, "bad/app:deep")
    assert_clean(tmp_root, host)


def test_redirect_loop(require_root: None, state: State, host: str, tmp_root: Path) -> None:
    path = layer_path(state, 0)
    state.hooks[path] = lambda h: (h.send(307, b"", {"Location": path}), True)[1]
    with pytest.raises(Unavailable, match="more than 5 redirects"):
        do_pull(host, tmp_root)
    assert len(state.requests("GET", path)) == 6


def test_unauthorized_forever(require_root: None, state: State, host: str,
                              tmp_root: Path) -> None:
    state.tokens = set()
    path = f"/v2/{REPO}/manifests/1"
    state.hooks[path] = lambda h: (h.send(401, b"", {
        "WWW-Authenticate": f'Bearer realm="http://{host}/token",service="x"'}), True)[1]
    with pytest.raises(Unauthorized, match="unauthorized with the credentials and token"):
        do_pull(host, tmp_root)
    assert len(state.requests("HEAD", path)) == 2
    assert_clean(tmp_root, host)


def test_token_renewed_and_not_leaked(require_root: None, state: State, host: str,
                                      tmp_root: Path) -> None:
    """Tokens are per repository scope, renewed on a 401 mid-pull, and never sent to the
    host a redirect names."""
    state.tokens = set()
    storage = State()
    with serving(storage) as other:
        second = layer_path(state, 1)
        data = state.blobs[second.rsplit("/", 1)[1]]
        storage.hooks["/storage"] = lambda h: (h.send(200, data), True)[1]
        state.hooks[second] = lambda h: (h.send(307, b"", {
            "Location": f"http://{other}/storage"}), True)[1]

        config = next(d for d, b in state.blobs.items() if len(b) < 4096)

        def expire(h: Handler) -> bool:  # every token expires once the config is out
            assert state.tokens is not None
            h.send(200, state.blobs[config])
            state.tokens.clear()
            return True

        state.hooks[f"/v2/{REPO}/blobs/{config}"] = expire
        result = do_pull(host, tmp_root)
    assert result.fetched == 2
    token_requests = state.requests("GET", "/token")
    assert len(token_requests) == 2, "\n".join(
        f"{r.method} {r.path[:60]} {r.headers.get('Authorization')}" for r in state.log)
    assert "scope=repository%3Abad%2Fapp%3Apull" in token_requests[0].path
    [redirected] = storage.requests("GET", "/storage")
    assert "Authorization" not in redirected.headers
    assert all("Authorization" in r.headers for r in state.requests(prefix="/v2/bad")[1:])


def test_retry_after(require_root: None, state: State, host: str, tmp_root: Path) -> None:
    path = layer_path(state, 0)
    calls = []

    def busy(h: Handler) -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            h.send(429, b"slow down", {"Retry-After": "1"})
            return True
        return False

    state.hooks[path] = busy
    assert do_pull(host, tmp_root).fetched == 2
    # a lower bound, which a loaded machine only makes easier: Retry-After was honoured
    assert len(calls) == 2 and calls[1] - calls[0] >= 0.95


def test_server_errors_bounded(require_root: None, state: State, host: str,
                               tmp_root: Path) -> None:
    path = layer_path(state, 1)
    state.hooks[path] = lambda h: (h.send(503, b"down"), True)[1]
    with pytest.raises(Unavailable, match=f"{host}: GET .*: 503 Service Unavailable "
                                          r"\(after 3 attempts\)"):
        do_pull(host, tmp_root)
    assert len(state.requests("GET", path)) == 3


def test_dripping_server(require_root: None, state: State, host: str, tmp_root: Path) -> None:
    path = layer_path(state, 0)
    data = state.blobs[path.rsplit("/", 1)[1]]

    def drip(h: Handler) -> bool:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        try:
            for i in range(30):
                h.wfile.write(data[i:i + 1])
                h.wfile.flush()
                time.sleep(0.4)
        except OSError:
            pass
        h.close_connection = True
        return True

    state.hooks[path] = drip
    with pytest.raises(TransportError, match="stalled"):
        do_pull(host, tmp_root)


class _Recorder(Progress):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int, str]] = []

    def event(self, phase: str, item: str, *, done: int = 0, total: int = 0,
              status: str = "") -> None:
        self.events.append((phase, item, done, status))


def test_unpack_follows_the_download(require_root: None, state: State, host: str,
                                     tmp_root: Path) -> None:
    """A layer's extraction starts while its bytes still arrive, and ends after they did."""
    path = layer_path(state, 0)
    digest = path.rsplit("/", 1)[1]
    data = state.blobs[digest]

    def slow(h: Handler) -> bool:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        for i in range(0, len(data), 128 << 10):
            h.wfile.write(data[i:i + (128 << 10)])
            h.wfile.flush()
            time.sleep(0.1)
        return True

    state.hooks[path] = slow
    rec = _Recorder()
    do_pull(host, tmp_root, progress=rec)
    first_unpack = next(i for i, e in enumerate(rec.events)
                        if e[:2] == ("unpack", digest) and e[2] > 0)
    fetched = next(i for i, e in enumerate(rec.events)
                   if e[:2] == ("fetch", digest) and e[3] == "done")
    unpacked = next(i for i, e in enumerate(rec.events)
                    if e[:2] == ("unpack", digest) and e[3] == "done")
    assert first_unpack < fetched < unpacked
    assert rec.events[first_unpack][2] < len(data)


def test_killed_pull_resumes(require_root: None, state: State, host: str,
                             tmp_root: Path) -> None:
    """A pull SIGKILLed after about half the bytes: the re-run transfers the rest only."""
    total = sum(len(b) for b in state.blobs.values() if len(b) > 4096)
    state.throttle = (32 << 10, 0.02)
    proc = subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(tmp_root),
                             "image", "pull", f"{host}/{REPO}:1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while state.served < total // 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    first = state.served
    assert total // 2 <= first < total
    state.throttle = None
    state.served = 0
    before = len(state.log)
    rerun = subprocess.run([sys.executable, "-m", "lamina", "--root", str(tmp_root), "image",
                            "pull", f"{host}/{REPO}:1"], capture_output=True, text=True,
                           timeout=120, check=False)
    assert rerun.returncode == 0, rerun.stderr
    # what was missing, plus what sat in socket buffers when the client died
    assert state.served <= 0.6 * total
    assert any(r.headers.get("Range") for r in state.log[before:])
    with _root(tmp_root) as r:
        assert r.content().list_statuses() == []
        # what the kill interrupted (a staging directory) is recovered, as after any crash
        report = check(r)
        assert all("directory unknown to the metadata" in p.message for p in report.problems)
        assert check(r, repair=True).ok and check(r).ok


def test_concurrent_pulls_fetch_once(require_root: None, state: State, host: str,
                                     tmp_root: Path) -> None:
    """Two pulls of one image into one root at once: each blob crosses the network once."""
    total = sum(len(b) for b in state.blobs.values() if len(b) > 4096)
    state.throttle = (64 << 10, 0.01)
    procs = [subprocess.Popen([sys.executable, "-m", "lamina", "--root", str(tmp_root),
                               "image", "pull", f"{host}/{REPO}:1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert total <= state.served < total + (64 << 10)
    with _root(tmp_root) as r:
        assert check(r).ok


def test_mirror_gets_no_registry_credentials(require_root: None, state: State, host: str,
                                             tmp_root: Path, tmp_path: Path) -> None:
    """The registry's credentials (docker config) are not sent to a mirror; a mirror that
    wants credentials of its own is passed over for the registry."""
    import base64

    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"auths": {host: {
        "auth": base64.b64encode(b"alice:secret").decode()}}}))
    mirror = State()

    def basic(h: Handler) -> bool:
        h.send(401, b"", {"WWW-Authenticate": 'Basic realm="mirror"'})
        return True

    for digest in state.blobs:
        mirror.hooks[f"/v2/{REPO}/blobs/{digest}"] = basic
    with serving(mirror) as mhost:
        hosts = tmp_path / "certs.d" / f"{host.replace(':', '_')}_"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            f'server = "http://{host}"\n[host."http://{mhost}"]\n  capabilities = ["pull"]\n')
        from lamina.remotes.auth import DockerConfig

        with Registry(hosts_dirs=[tmp_path / "certs.d"], docker_config=DockerConfig(config),
                      retry=RetryPolicy(attempts=2, base=0.01)) as reg, _root(tmp_root) as r:
            result = pull(reg, f"{host}/{REPO}:1", root=r)
    assert result.fetched == 2
    asked = mirror.requests("GET")
    assert asked and not any("Authorization" in m.headers for m in asked)
