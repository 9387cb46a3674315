"""containerd's Images service on ``lamina serve`` (lamina.api.images), and the image
commands through ``--address``: the same output as on the local root."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import imagefactory as f
import pytest
from conftest import require_root_user, tmp_base
from google.protobuf import field_mask_pb2

from lamina.api.client import connect
from lamina.api.gen.containerd.services.images.v1 import images_pb2 as impb
from lamina.api.gen.containerd.services.images.v1 import images_pb2_grpc as impb_grpc
from lamina.api.gen.containerd.types import descriptor_pb2
from lamina.api.images import MAX_NAME, RemoteImageStore
from lamina.api.owner import CALL_METADATA
from lamina.api.server import check_address
from lamina.errors import AlreadyExists, NotFound
from lamina.labels import MAX_LABEL_SIZE
from lamina.metadata.images import Image
from lamina.oci.types import Descriptor

LAMINA = [sys.executable, "-c", "import sys; from lamina.cli import main; sys.exit(main())"]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DIGEST = "sha256:" + "a" * 64


class Served:
    """A root with demo:1 imported, served by a ``lamina serve`` process."""

    def __init__(self, root: Path, sock: Path, work: Path) -> None:
        self.root, self.sock, self.work = root, sock, work

    def local(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run("--root", str(self.root), *args)

    def remote(self, *args: str) -> subprocess.CompletedProcess[str]:
        # a root that does not exist: nothing may fall back to it
        return _run("--root", str(self.work / "no-root"), "--address", str(self.sock), *args)

    def import_image(self, name: str, payload: bytes) -> None:
        w = Path(tempfile.mkdtemp(dir=self.work))
        layer = f.layer_from_entries([f.File("data", payload)], w)
        f.build_oci_layout(w / "layout", [layer], ref_name=name)
        done = self.local("image", "import", "-q", str(w / "layout"))
        assert done.returncode == 0, done.stderr


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAMINA, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)


def _wait_listening(sock: Path, proc: subprocess.Popen[str]) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            check_address(str(sock))
        except AlreadyExists:
            return
        time.sleep(0.05)
    raise AssertionError(f"lamina serve did not listen on {sock}")


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    require_root_user()
    work = Path(tempfile.mkdtemp(prefix="images-api-", dir=tmp_base()))
    sockdir = Path(tempfile.mkdtemp(prefix="images-api-", dir="/tmp"))
    s = Served(work / "root", sockdir / "lamina.sock", work)
    s.import_image("demo:1", b"demo")
    proc = subprocess.Popen([*LAMINA, "--root", str(s.root), "serve", "--address", str(s.sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(s.sock, proc)
        yield s
    finally:
        proc.terminate()  # our own child, by its pid
        proc.wait(timeout=60)
        shutil.rmtree(sockdir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def store(served: Served) -> Iterator[RemoteImageStore]:
    remote = RemoteImageStore(str(served.sock), timeout=30)
    yield remote
    remote.close()


def _aged(table: str) -> str:
    """``table`` with its ages (``12 seconds ago``) blanked and its columns' padding
    squeezed: the two commands run seconds apart."""
    aged = re.sub(r"\b\d+ (second|minute|hour)s? ago\b", "AGO", table)
    return re.sub(r"(?m)(\S)  +", r"\1  ", aged)


@pytest.mark.parametrize("args", [
    ["image", "ls"],
    ["image", "ls", "--digests", "--no-trunc"],
    ["image", "ls", "--names", "-f", "reference=demo"],
    ["image", "ls", "-q"],
    ["image", "ls", "--json"],
    ["image", "inspect", "demo:1"],
    ["image", "inspect", "--mode", "native", "docker.io/library/demo:1"],
], ids=" ".join)
def test_image_commands_read_through_the_server_as_locally(
        served: Served, args: list[str]) -> None:
    local, remote = served.local(*args), served.remote(*args)
    assert local.returncode == 0, local.stderr
    assert (remote.returncode, remote.stderr) == (0, "")
    assert _aged(remote.stdout) == _aged(local.stdout)
    assert remote.stdout.strip()
    assert not (served.work / "no-root").exists()


def test_tag_and_rm_through_the_server(served: Served) -> None:
    done = served.remote("image", "tag", "demo:1", "demo:tagged")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("demo:tagged\tsha256:")
    native = [json.loads(served.local("image", "inspect", "--mode", "native", n).stdout)[0]
              for n in ("demo:1", "demo:tagged")]
    # the target, platform included, is the source's
    assert native[1]["Image"]["Target"] == native[0]["Image"]["Target"]
    assert native[1]["Image"]["Target"].get("platform")

    done = served.remote("image", "rm", "demo:tagged", "nope:1")
    assert done.returncode == 3
    assert done.stderr == "lamina: NotFound: image 'nope:1' does not exist\n"
    assert done.stdout == "demo:tagged\n"
    assert "demo:tagged" not in served.local("image", "ls", "--names", "-q").stdout


def test_rm_sync_through_the_server_collects_there(served: Served) -> None:
    served.import_image("gone:1", b"only this image holds this layer")
    target = json.loads(served.local("image", "inspect", "gone:1").stdout)[0]["Id"]
    assert target in served.local("content", "ls", "-q").stdout
    done = served.remote("image", "rm", "--sync", "gone:1")
    assert (done.returncode, done.stdout, done.stderr) == (0, "gone:1\n", "")
    # collected before the answer, as a local rm --sync does: its blobs are gone
    assert target not in served.local("content", "ls", "-q").stdout
    assert "demo:1" in served.local("image", "ls", "--names", "-q").stdout


def test_the_client_round_trips_records(store: RemoteImageStore) -> None:
    demo = store.get("docker.io/library/demo:1")  # any spelling
    assert demo.name == "demo:1" and demo.created is not None
    made = store.create(Image(name="api:1", target=demo.target, labels={"a": "1"}))
    try:
        assert (made.target, made.labels) == (demo.target, {"a": "1"})
        with pytest.raises(AlreadyExists):
            store.create(Image(name="api:1", target=demo.target))
        changed = store.update(Image(name="api:1", target=demo.target, labels={"b": "2"}),
                               "labels.b")
        assert changed.labels == {"a": "1", "b": "2"}
        assert changed.created == made.created
        assert [i.name for i in store.list("labels.b==2")] == ["api:1"]
        assert [i.name for i in store.list(f"target.digest=={demo.target.digest},name~=^api")
                ] == ["api:1"]
        moved = store.update(Image(name="api:1", target=Descriptor(MANIFEST, DIGEST, 7)),
                             "target")
        assert (moved.target.digest, moved.labels) == (DIGEST, changed.labels)
    finally:
        store.delete("api:1")
    with pytest.raises(NotFound):
        store.get("api:1")


def _descriptor(**fields: object) -> descriptor_pb2.Descriptor:
    base: dict[str, object] = {"media_type": MANIFEST, "digest": DIGEST, "size": 7}
    return descriptor_pb2.Descriptor(**{**base, **fields})  # type: ignore[arg-type]


HOSTILE = {
    "empty name": ("Create", impb.CreateImageRequest(image=impb.Image(target=_descriptor()))),
    "long name": ("Create", impb.CreateImageRequest(
        image=impb.Image(name="x" * (MAX_NAME + 1), target=_descriptor()))),
    "huge label": ("Create", impb.CreateImageRequest(image=impb.Image(
        name="h:1", target=_descriptor(), labels={"k": "v" * MAX_LABEL_SIZE}))),
    "empty label key": ("Create", impb.CreateImageRequest(image=impb.Image(
        name="h:1", target=_descriptor(), labels={"": "v"}))),
    "bad digest": ("Create", impb.CreateImageRequest(
        image=impb.Image(name="h:1", target=_descriptor(digest="sha256:../../etc")))),
    "no target": ("Create", impb.CreateImageRequest(image=impb.Image(name="h:1"))),
    "no media type": ("Create", impb.CreateImageRequest(
        image=impb.Image(name="h:1", target=_descriptor(media_type="")))),
    "size zero": ("Create", impb.CreateImageRequest(
        image=impb.Image(name="h:1", target=_descriptor(size=0)))),
    "platform not an object": ("Create", impb.CreateImageRequest(
        image=impb.Image(name="h:1", target=_descriptor(lamina_platform_json="[1]")))),
    "huge platform": ("Create", impb.CreateImageRequest(image=impb.Image(
        name="h:1", target=_descriptor(lamina_platform_json=json.dumps({"os": "x" * 9000}))))),
    "get empty name": ("Get", impb.GetImageRequest(name="")),
    "delete empty name": ("Delete", impb.DeleteImageRequest(name="", sync=True)),
    "bad filter": ("List", impb.ListImagesRequest(filters=["name==a,,"])),
    "unknown field": ("Update", impb.UpdateImageRequest(
        image=impb.Image(name="demo:1", target=_descriptor()),
        update_mask=field_mask_pb2.FieldMask(paths=["created_at"]))),
    "update bad target": ("Update", impb.UpdateImageRequest(
        image=impb.Image(name="demo:1", target=_descriptor(digest="md5:x")),
        update_mask=field_mask_pb2.FieldMask(paths=["target"]))),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_requests_are_invalid_argument(served: Served, case: str) -> None:
    method, request = HOSTILE[case]
    with connect(str(served.sock)) as channel:
        call = getattr(impb_grpc.ImagesStub(channel), method)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=CALL_METADATA, timeout=30)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "h:1" not in served.local("image", "ls", "--names", "-q").stdout


def test_other_clients_read_only_in_namespace_default(
        served: Served, store: RemoteImageStore) -> None:
    image = impb.Image(name="foreign:1", target=_descriptor())
    with connect(str(served.sock)) as channel:
        stub = impb_grpc.ImagesStub(channel)  # type: ignore[no-untyped-call]
        names = [i.name for i in stub.List(impb.ListImagesRequest(), timeout=30).images]
        assert "demo:1" in names  # no lamina-owner metadata: containerd's API, reading
        with pytest.raises(grpc.RpcError) as err:
            stub.Create(impb.CreateImageRequest(image=image), timeout=30)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            stub.Delete(impb.DeleteImageRequest(name="demo:1"), timeout=30)
        assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        other = (("containerd-namespace", "k8s.io"),)
        assert not stub.List(impb.ListImagesRequest(), metadata=other, timeout=30).images
        with pytest.raises(grpc.RpcError) as err:
            stub.Get(impb.GetImageRequest(name="demo:1"), metadata=other, timeout=30)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
    assert store.get("demo:1").name == "demo:1"


def test_ctr_lists_the_images(served: Served) -> None:
    if shutil.which("ctr") is None:
        pytest.skip("containerd's ctr is not installed")
    done = subprocess.run(["ctr", "--address", str(served.sock), "--namespace", "default",
                           "images", "ls", "-q"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "demo:1" in done.stdout.split()
    done = subprocess.run(["ctr", "--address", str(served.sock), "--namespace", "other",
                           "images", "ls", "-q"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stdout) == (0, "")
    # ctr removes nothing of lamina's: its calls are not lamina's client's
    done = subprocess.run(["ctr", "--address", str(served.sock), "images", "rm", "demo:1"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "demo:1" in served.local("image", "ls", "--names", "-q").stdout
