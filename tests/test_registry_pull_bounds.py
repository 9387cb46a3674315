"""A pull's work, disk and file descriptors are bounded, whatever the registry sends.

Small documents that would make a pull fetch tens of thousands of manifests,
nested indexes that repeat a child, blobs that announce more than the disk
holds or a disk that fills while downloading, and images with more layers
than the process may open descriptors: each ends in a correct result or one
line of error, in bounded time, with ``lamina check`` consistent afterwards.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from bad_registry import MT_CONFIG, MT_INDEX, MT_MANIFEST, Handler, State, serving, sha
from conftest import small_tmpfs

from lamina.errors import NotFound, ResourceExhausted
from lamina.images.fetch import ingest_ref
from lamina.images.pull import PullResult, pull
from lamina.metadata.check import check
from lamina.metadata.images import ImageStore
from lamina.metadata.root import Root
from lamina.oci.limits import MAX_DESCRIPTORS, MAX_DOCUMENT_BYTES
from lamina.remotes.registry import Registry
from lamina.remotes.session import RetryPolicy
from lamina.remotes.transport import Transport

REPO = "bounds/app"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ARCH = imagefactory.host_arch()


def tiny_layer(i: int, name: str = "f") -> tuple[bytes, str]:
    """A gzip layer holding one small file ``name`` (content ``i``): blob, DiffID."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = f"{i}\n".encode()
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha(tar_bytes)


def add_image(st: State, tags: list[str], layers: list[tuple[bytes, str]]) -> dict[str, object]:
    """An image of ``layers`` on ``st``; its manifest's descriptor (with the host platform)."""
    config = json.dumps({"architecture": ARCH, "os": "linux",
                         "rootfs": {"type": "layers",
                                    "diff_ids": [d for _, d in layers]}}).encode()
    cdigest = st.add_blob(config)
    doc = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": len(config)},
        "layers": [{"mediaType": LAYER, "digest": st.add_blob(b), "size": len(b)}
                   for b, _ in layers]}).encode()
    digest = st.add_manifest(REPO, tags, MT_MANIFEST, doc)
    return {"mediaType": MT_MANIFEST, "digest": digest, "size": len(doc),
            "platform": {"os": "linux", "architecture": ARCH}}


def add_index(st: State, tags: list[str], children: list[dict[str, object]]) -> dict[str, object]:
    doc = json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX,
                      "manifests": children}).encode()
    digest = st.add_manifest(REPO, tags, MT_INDEX, doc)
    return {"mediaType": MT_INDEX, "digest": digest, "size": len(doc)}


def fake_manifest(i: int, *, size: int = 500, platform: bool = False) -> dict[str, object]:
    """A descriptor of a manifest the registry does not have (fetching it is a 404)."""
    desc: dict[str, object] = {"mediaType": MT_MANIFEST, "size": size,
                               "digest": "sha256:" + f"{i:064x}"}
    if platform:
        desc["platform"] = {"os": "linux", "architecture": f"arch{i}"}
    return desc


@pytest.fixture
def state() -> State:
    return State()


@pytest.fixture
def host(state: State) -> Iterator[str]:
    with serving(state) as h:
        yield h


def do_pull(host: str, root: Path, ref: str, **kw: object) -> PullResult:
    transport = Transport(timeout=10, stall_time=2.0, stall_rate=4096)
    with Registry(retry=RetryPolicy(attempts=2, base=0.05, max_wait=1),
                  transport=transport) as reg:
        r = Root(root)
        try:
            return pull(reg, f"{host}/{REPO}:{ref}", root=r, **kw)  # type: ignore[arg-type]
        finally:
            r.close()


def assert_consistent(root: Path, *, images: int = 0, ingests: int | None = 0) -> None:
    """``images`` images, ``ingests`` ingests (None: any, resumable ones), ``check`` clean."""
    r = Root(root)
    try:
        store = ImageStore(r.metadata_path)
        assert len(store.list()) == images
        store.close()
        assert ingests is None or len(r.content().list_statuses()) == ingests
        report = check(r)
        assert report.ok, report.problems
    finally:
        r.close()


def manifest_gets(state: State, *but: object) -> list[str]:
    """The manifests and indexes fetched by digest, but ``but``'s (the resolved index's)."""
    gets = [r.path.rsplit("/", 1)[1]
            for r in state.requests("GET", f"/v2/{REPO}/manifests/sha256:")]
    return [d for d in gets if d not in but]


# --------------------------------------------------------------------------- work


def test_platformless_children_are_not_fetched(require_root: None, state: State, host: str,
                                               tmp_root: Path) -> None:
    """20,000 manifests without a platform beside the host's: only the host's is fetched
    (each of the others was fetched, one by one, before)."""
    image = add_image(state, [], [tiny_layer(0)])
    others = [fake_manifest(i) for i in range(1, 20_001)]
    index = add_index(state, ["many"], [*others[:10_000], image, *others[10_000:]])
    result = do_pull(host, tmp_root, "many", unpack=False)
    assert [d.digest for d in result.manifests] == [image["digest"]]
    assert manifest_gets(state, index["digest"]) == [image["digest"]]
    assert_consistent(tmp_root, images=1)


def test_only_platformless_children_are_ambiguous(require_root: None, state: State,
                                                  host: str, tmp_root: Path) -> None:
    """Several manifests without a platform and none for the host: which one is the image
    is not said, so none is guessed (every one was pulled before); --all-platforms takes
    them all. A single one without a platform is the image."""
    a = add_image(state, [], [tiny_layer(1)])
    b = add_image(state, [], [tiny_layer(2)])
    for d in (a, b):
        del d["platform"]
    two = add_index(state, ["two"], [a, b])
    add_index(state, ["one"], [a])
    with pytest.raises(NotFound, match=rf"no manifest for linux/{ARCH} "
                                       r"\(2 manifests without a platform\)$"):
        do_pull(host, tmp_root, "two", unpack=False)
    assert manifest_gets(state, two["digest"]) == []
    assert_consistent(tmp_root)
    assert len(do_pull(host, tmp_root, "two", unpack=False, all_platforms=True)
               .manifests) == 2
    assert do_pull(host, tmp_root, "one").unpacked is not None


def test_all_platforms_is_bounded_before_fetching(require_root: None, state: State,
                                                  host: str, tmp_root: Path) -> None:
    wide = add_index(state, ["wide"], [fake_manifest(i, platform=True) for i in range(15_000)])
    with pytest.raises(ResourceExhausted, match=f"more than {MAX_DESCRIPTORS} descriptors"):
        do_pull(host, tmp_root, "wide", all_platforms=True, unpack=False)
    # few, but each announcing 4 MiB: more document bytes than a pull may fetch
    heavy = add_index(state, ["heavy"], [fake_manifest(i, size=4 << 20, platform=True)
                                 for i in range(MAX_DOCUMENT_BYTES // (4 << 20) + 1)])
    with pytest.raises(ResourceExhausted, match=f"more than {MAX_DOCUMENT_BYTES} bytes"):
        do_pull(host, tmp_root, "heavy", all_platforms=True, unpack=False)
    assert manifest_gets(state, wide["digest"], heavy["digest"]) == []
    assert_consistent(tmp_root)


def test_repeated_children_are_visited_once(require_root: None, state: State, host: str,
                                            tmp_root: Path) -> None:
    """Indexes listing one child 100 times, two levels deep: 10,000 paths, one manifest.
    The walk visits each descriptor once and the GC labels name each child once."""
    image = add_image(state, [], [tiny_layer(3)])
    inner = add_index(state, [], [image] * 100)
    inner["platform"] = {"os": "linux", "architecture": ARCH}
    outer = add_index(state, ["repeat"], [inner] * 100)
    for all_platforms in (False, True):
        result = do_pull(host, tmp_root, "repeat", all_platforms=all_platforms)
        assert [d.digest for d in result.manifests] == [image["digest"]]
        assert result.unpacked is not None
    r = Root(tmp_root)
    try:
        for desc, child in ((outer, inner), (inner, image)):
            labels = r.content().info(str(desc["digest"])).labels
            refs = {k: v for k, v in labels.items() if k.startswith("containerd.io/gc.ref.")}
            assert refs == {"containerd.io/gc.ref.content.m.0": child["digest"]}
    finally:
        r.close()
    assert_consistent(tmp_root, images=1)


def test_repeated_children_keep_their_first_place(require_root: None, state: State,
                                                  host: str, tmp_root: Path) -> None:
    a = add_image(state, [], [tiny_layer(4)])
    b = add_image(state, [], [tiny_layer(5)])
    b["platform"] = {"os": "linux", "architecture": "other"}
    mixed = add_index(state, ["mixed"], [a, b, a, b])
    result = do_pull(host, tmp_root, "mixed", all_platforms=True, unpack=False)
    assert [d.digest for d in result.manifests] == [a["digest"], b["digest"]]
    r = Root(tmp_root)
    try:
        labels = r.content().info(str(mixed["digest"])).labels
    finally:
        r.close()
    assert {k: v for k, v in labels.items() if k.startswith("containerd.io/gc.ref.")} == {
        "containerd.io/gc.ref.content.m.0": a["digest"],
        "containerd.io/gc.ref.content.m.1": b["digest"]}


# --------------------------------------------------------------------------- disk

@pytest.fixture
def small_root(tmp_path: Path) -> Iterator[Path]:
    """A lamina root on a 64 MiB tmpfs (reserve: 2 MiB), unmounted afterwards."""
    with small_tmpfs(tmp_path / "small", "64m") as mnt:
        yield mnt / "root"


def endless(h: Handler) -> bool:
    """A blob body that never ends (no length): zeros until the client hangs up."""
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunk = bytes(1 << 16)
    try:
        while True:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        pass
    h.close_connection = True
    return True


def test_blob_announcing_more_than_the_disk(require_root: None, state: State, host: str,
                                            small_root: Path) -> None:
    """A layer announcing 1 TiB, whose body never ends: refused before one byte is fetched
    (it filled the disk before: OSError: No space left on device)."""
    layer = "sha256:" + "ab" * 32
    config = json.dumps({"architecture": ARCH, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [layer]}}).encode()
    cdigest = state.add_blob(config)
    state.add_manifest(REPO, ["huge"], MT_MANIFEST, {
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": len(config)},
        "layers": [{"mediaType": LAYER, "digest": layer, "size": 1 << 40}]})
    state.hooks[f"/v2/{REPO}/blobs/{layer}"] = endless
    for unpack in (False, True):
        with pytest.raises(ResourceExhausted) as info:
            do_pull(host, small_root, "huge", unpack=unpack)
        assert info.value.message.startswith(f"{host}/{REPO}:huge: 1 blob(s) to fetch "
                                             f"announce {1 << 40} bytes")
        assert "\n" not in info.value.message
    assert state.requests("GET", f"/v2/{REPO}/blobs/{layer}") == []
    assert_consistent(small_root)


def test_disk_filling_while_downloading(require_root: None, state: State, host: str,
                                        small_root: Path) -> None:
    """The blob fits when the pull starts; something else then takes 30 MiB of the 64: the
    download stops at the reserve (ENOSPC before) and its partial ingest is deleted."""
    blob = imagefactory._pseudo_random(40 << 20, b"fill")
    digest = state.add_blob(blob)
    config = json.dumps({"architecture": ARCH, "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    cdigest = state.add_blob(config)
    state.add_manifest(REPO, ["fill"], MT_MANIFEST, {
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest, "size": len(blob)}]})
    filler = small_root.parent / "filler"

    def fill_then_serve(h: Handler) -> bool:
        filler.write_bytes(bytes(30 << 20))
        return False

    state.hooks[f"/v2/{REPO}/blobs/{digest}"] = fill_then_serve
    with pytest.raises(ResourceExhausted, match=rf"^store blob {digest}: \d+ bytes left on the "
                                                r"filesystem of .* \(lamina keeps 2097152 "
                                                r"free\)$"):
        do_pull(host, small_root, "fill", unpack=False)
    assert_consistent(small_root)  # no ingest left: it would resume into the same full disk
    filler.unlink()
    with pytest.raises(NotFound):
        r = Root(small_root)
        try:
            r.content().status(ingest_ref(digest))
        finally:
            r.close()


def test_unpack_of_stored_layers_checks_their_size_first(require_root: None, state: State,
                                                         host: str, small_root: Path) -> None:
    """Blobs pulled before (``--no-unpack``) announce their expanded size (gzip trailer):
    a layer that cannot fit is refused before extracting (it filled the disk to the
    reserve first, before)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("zeros")
        info.size = 100 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    layer = (gzip.compress(raw.getvalue(), compresslevel=1, mtime=0), sha(raw.getvalue()))
    add_image(state, ["big"], [layer])
    do_pull(host, small_root, "big", unpack=False)
    with pytest.raises(ResourceExhausted, match=r"^unpack: 1 layer\(s\) announce "
                                                rf"{len(raw.getvalue())} bytes, \d+ bytes are "
                                                "free on the filesystem of "):
        do_pull(host, small_root, "big")
    assert_consistent(small_root, images=1)
    r = Root(small_root)
    try:
        assert list(r.snapshotter("overlay").walk()) == []
    finally:
        r.close()


# --------------------------------------------------------------------------- descriptors

# The image had 1,500 layers under the common default of 1,024 descriptors;
# the property is more layers than descriptors, which 300 under 256 shows at a fifth
# of the cost (LAMINA_PULL_FULL=1 runs the issue's own figures: 1,500 under 1,024 on
# native; overlay stacks at most 500 layers, the kernel's limit, so 500 under 256).
# The layer that fails in the middle is two thirds up.
FULL = bool(os.environ.get("LAMINA_PULL_FULL"))
LAYERS = {"native": 1500 if FULL else 300, "overlay": 500 if FULL else 300}
NOFILE = {"native": 1024 if FULL else 256, "overlay": 256}


@pytest.fixture(scope="module")
def many_layers() -> list[tuple[bytes, str]]:
    # each layer rewrites the same file: the tree stays one file (native copies it per layer)
    return [tiny_layer(i) for i in range(max(LAYERS.values()))]


def lamina_nofile(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with RLIMIT_NOFILE at NOFILE[snapshotter] (fewer than its LAYERS);
    ``args`` start with ``--snapshotter NAME``."""
    nofile = NOFILE[args[1]]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=1200, check=False,
                          preexec_fn=limit)


@pytest.mark.slow
@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_more_layers_than_descriptors(require_root: None, state: State, host: str,
                                      tmp_root: Path, snapshotter: str,
                                      many_layers: list[tuple[bytes, str]]) -> None:
    """The blobs first, then the unpack: every layer is in hand at once, so extraction
    runs as far ahead of the in-order commits as it may (it held a lock and a staging
    directory for each: Too many open files, and orphan directories, before)."""
    add_image(state, ["tall"], many_layers[:LAYERS[snapshotter]])
    ref = f"{host}/{REPO}:tall"
    for args in (["--no-unpack"], []):
        proc = lamina_nofile(tmp_root, "--snapshotter", snapshotter, "image", "pull",
                             "--no-sync", *args, ref)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert_consistent(tmp_root, images=1)
    r = Root(tmp_root)
    try:
        assert sum(1 for _ in r.snapshotter(snapshotter).walk()) == LAYERS[snapshotter]
    finally:
        r.close()


@pytest.mark.slow
@pytest.mark.parametrize("snapshotter", ["overlay", "native"])
def test_more_layers_than_descriptors_failing_in_the_middle(
        require_root: None, state: State, host: str, tmp_root: Path, snapshotter: str,
        many_layers: list[tuple[bytes, str]]) -> None:
    """Layer ``bad`` is not what the config says: one line, the layers below it
    committed, nothing else left (no staging or removal directory), ``check`` clean."""
    layers = many_layers[:LAYERS[snapshotter]]
    bad = len(layers) * 2 // 3
    layers[bad] = (layers[bad][0], "sha256:" + "0" * 64)
    add_image(state, ["tall"], layers)
    ref = f"{host}/{REPO}:tall"
    proc = lamina_nofile(tmp_root, "--snapshotter", snapshotter, "image", "pull",
                         "--no-sync", "--no-unpack", ref)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = lamina_nofile(tmp_root, "--snapshotter", snapshotter, "image", "pull",
                         "--no-sync", ref)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("lamina: InvalidArgument: diff id mismatch: layer has "), lines
    assert lines[0].endswith(f"expected sha256:{'0' * 64}"), lines
    assert_consistent(tmp_root, images=1)
    r = Root(tmp_root)
    try:
        assert sum(1 for _ in r.snapshotter(snapshotter).walk()) == bad
    finally:
        r.close()
