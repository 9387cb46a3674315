"""lamina's Content gRPC API: the content conformance suite through RemoteContentStore,
and the Write stream as containerd's client drives it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from lamina.api.client import RemoteContentStore, connect
from lamina.api.content import ContentService
from lamina.api.gen.containerd.services.content.v1 import content_pb2 as cpb
from lamina.api.gen.containerd.services.content.v1 import content_pb2_grpc as cpb_grpc
from lamina.api.server import Server
from lamina.content import ContentStore, sha256_digest
from lamina.content.local import LocalContentStore
from lamina.content.testsuite import CASES
from lamina.errors import AlreadyExists, NotFound
from lamina.metadata.root import Root


def _no_snapshotter(name: str) -> object:
    raise NotFound(f"no snapshotter {name!r}")


@pytest.fixture
def content_server(tmp_path: Path) -> Iterator[tuple[Server, LocalContentStore]]:
    sockdir = Path(tempfile.mkdtemp(prefix="lamina-content-", dir="/tmp"))
    local = LocalContentStore(tmp_path / "content")

    def add(server: grpc.Server) -> None:
        cpb_grpc.add_ContentServicer_to_server(  # type: ignore[no-untyped-call]
            ContentService(lambda: local), server
        )

    server = Server(
        str(sockdir / "c.sock"),
        _no_snapshotter,  # type: ignore[arg-type]
        extra_services=add,
        on_close=local.close,
    )
    server.start()
    try:
        yield server, local
    finally:
        server.stop(grace=1)
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_content_conformance_remote(
    case: object, content_server: tuple[Server, LocalContentStore]
) -> None:
    server, _ = content_server
    assert isinstance(RemoteContentStore(server.address), ContentStore)
    case(lambda: RemoteContentStore(server.address))  # type: ignore[operator]


def test_remote_and_local_see_the_same_blobs(
    content_server: tuple[Server, LocalContentStore],
) -> None:
    server, local = content_server
    with RemoteContentStore(server.address) as remote:
        data = b"shared" * 1000
        w = remote.writer("r", total=len(data))
        w.write(data)
        w.commit(len(data), sha256_digest(data), labels={"a": "b"})
        w.close()
        assert local.info(sha256_digest(data)).size == len(data)
        assert dict(local.info(sha256_digest(data)).labels) == {"a": "b"}


def test_write_stream_like_containerd(content_server: tuple[Server, LocalContentStore]) -> None:
    """STAT first, WRITEs with running offsets, COMMIT with total/expected; one
    response per request; an offset-0 write after a partial one restarts the ingest."""
    server, local = content_server
    data = b"0123456789" * 1000
    digest = sha256_digest(data)
    with connect(server.address) as channel:
        stub = cpb_grpc.ContentStub(channel)  # type: ignore[no-untyped-call]
        reqs = [
            cpb.WriteContentRequest(
                action=cpb.STAT, ref="pull-1", total=len(data), expected=digest
            ),
            cpb.WriteContentRequest(action=cpb.WRITE, ref="pull-1", offset=0, data=b"junk"),
            cpb.WriteContentRequest(action=cpb.WRITE, ref="pull-1", offset=0, data=data[:4000]),
            cpb.WriteContentRequest(action=cpb.WRITE, ref="pull-1", offset=4000, data=data[4000:]),
            cpb.WriteContentRequest(
                action=cpb.COMMIT,
                ref="pull-1",
                offset=len(data),
                total=len(data),
                expected=digest,
                labels={"x": "y"},
            ),
        ]
        resps = list(stub.Write(iter(reqs)))
        assert [r.action for r in resps] == [cpb.STAT, cpb.WRITE, cpb.WRITE, cpb.WRITE, cpb.COMMIT]
        assert [r.offset for r in resps] == [0, 4, 4000, len(data), len(data)]
        assert resps[0].total == len(data) and resps[0].HasField("started_at")
        assert resps[-1].digest == digest
        assert dict(local.info(digest).labels) == {"x": "y"}
        # reading back in chunks, with offset and size
        got = b"".join(r.data for r in stub.Read(cpb.ReadContentRequest(digest=digest)))
        assert got == data
        part = list(stub.Read(cpb.ReadContentRequest(digest=digest, offset=10, size=5)))
        assert [(r.offset, r.data) for r in part] == [(10, data[10:15])]
        # a known digest is AlreadyExists at the first message
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.Write(
                    iter([cpb.WriteContentRequest(action=cpb.STAT, ref="again", expected=digest)])
                )
            )
        assert err.value.code() is grpc.StatusCode.ALREADY_EXISTS


def test_root_server_serves_content(tmp_path: Path) -> None:
    sockdir = Path(tempfile.mkdtemp(prefix="lamina-content-", dir="/tmp"))
    root = Root(tmp_path / "root")
    server = Server.for_root(root, str(sockdir / "r.sock"))
    server.start()
    try:
        with RemoteContentStore(server.address) as store:
            w = store.writer("x")
            w.write(b"abc")
            w.commit(3, sha256_digest(b"abc"))
            w.close()
            with pytest.raises(AlreadyExists):
                store.writer("y", expected=sha256_digest(b"abc"))
    finally:
        server.stop(grace=1)
        shutil.rmtree(sockdir, ignore_errors=True)
    # the store was closed with the server; the blob is on the root
    root = Root(tmp_path / "root")
    try:
        assert root.content().info(sha256_digest(b"abc")).size == 3
    finally:
        root.close()
