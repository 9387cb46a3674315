"""lamina's Snapshots gRPC API in-process: the conformance suite through
RemoteSnapshotter, direct calls, wire details, and error class round trips."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest

from lamina.api.client import RemoteSnapshotter, connect
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2 as spb
from lamina.api.gen.containerd.services.snapshots.v1 import snapshots_pb2_grpc as spb_grpc
from lamina.api.server import Server
from lamina.api.snapshots import root_resolver
from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LaminaError,
    NotFound,
    NotImplementedErr,
    Unavailable,
)
from lamina.metadata.root import Root
from lamina.mounts.mount import Mount
from lamina.snapshots import Capability, Info, Kind, Snapshotter, Usage, testsuite
from lamina.snapshots.native import NativeSnapshotter
from lamina.snapshots.overlay import OverlaySnapshotter

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="snapshotters need root")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for sockets (sun_path is limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="lamina-api-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


# -- the conformance suite through the API -------------------------------------


class _Registry:
    """Snapshotters served by name; each suite case registers its own."""

    def __init__(self) -> None:
        self.snapshotters: dict[str, Snapshotter] = {}
        self.lock = threading.Lock()

    def resolve(self, name: str) -> Snapshotter:
        with self.lock:
            try:
                return self.snapshotters[name]
            except KeyError:
                raise NotFound(f"no snapshotter {name!r}") from None


class _CaseRemote(RemoteSnapshotter):
    """A RemoteSnapshotter that also closes the served local snapshotter."""

    def __init__(self, address: str, name: str, local: Snapshotter, reg: _Registry) -> None:
        super().__init__(address, name)
        self._local, self._reg = local, reg

    def close(self) -> None:
        super().close()
        with self._reg.lock:
            self._reg.snapshotters.pop(self.snapshotter, None)
        self._local.close()


@pytest.fixture(scope="module")
def suite_server() -> Iterator[tuple[Server, _Registry]]:
    reg = _Registry()
    d = tempfile.mkdtemp(prefix="lamina-suite-", dir="/tmp")
    server = Server(os.path.join(d, "s.sock"), reg.resolve, max_workers=8)
    server.start()
    try:
        yield server, reg
    finally:
        server.stop(grace=1)
        shutil.rmtree(d, ignore_errors=True)


LOCAL: dict[str, Callable[[Path], Snapshotter]] = {
    "overlay": OverlaySnapshotter,
    "native": NativeSnapshotter,
}


@needs_root
@pytest.mark.parametrize("kind", sorted(LOCAL))
@pytest.mark.parametrize("case", testsuite.params())
def test_conformance_remote(
    case: testsuite.Case,
    kind: str,
    tmp_path: Path,
    suite_server: tuple[Server, _Registry],
) -> None:
    server, reg = suite_server

    def factory(root: Path) -> Snapshotter:
        local = LOCAL[kind](root)
        name = f"{kind}:{root}"
        with reg.lock:
            reg.snapshotters[name] = local
        return _CaseRemote(server.address, name, local, reg)

    testsuite.run(case, factory, tmp_path)


# -- direct tests against a Root ----------------------------------------------


@pytest.fixture
def served(tmp_path: Path, sockdir: Path) -> Iterator[tuple[Server, RemoteSnapshotter]]:
    root = Root(tmp_path / "root")
    server = Server.for_root(root, str(sockdir / "l.sock"))
    server.start()
    sn = RemoteSnapshotter(server.address, "lamina")  # a proxy-plugin name: the default
    try:
        yield server, sn
    finally:
        sn.close()
        server.stop(grace=1)


@needs_root
def test_remote_is_a_snapshotter(served: tuple[Server, RemoteSnapshotter]) -> None:
    _, sn = served
    assert isinstance(sn, Snapshotter)
    assert Capability.OVERLAY in sn.capabilities  # default snapshotter: overlay


@needs_root
def test_prepare_commit_stat_walk_update_remove(
    served: tuple[Server, RemoteSnapshotter],
) -> None:
    _, sn = served
    key = "default/12/extract-123 sha256:abc"  # containerd-style key: opaque
    mounts = sn.prepare(key, "", labels={"a": "1"})
    assert mounts and all(isinstance(m, Mount) for m in mounts)
    assert sn.mounts(key) == mounts
    info = sn.stat(key)
    assert (info.kind, info.name, info.parent, dict(info.labels)) == (
        Kind.ACTIVE,
        key,
        "",
        {"a": "1"},
    )
    assert info.created is not None and info.created.tzinfo is not None
    name = "default/13/sha256:" + "0" * 64
    sn.commit(name, key, labels={"b": "2"})
    expected_error(NotFound, sn.stat, key)
    committed = sn.stat(name)
    assert (committed.kind, dict(committed.labels)) == (Kind.COMMITTED, {"b": "2"})
    assert isinstance(sn.usage(name), Usage)

    sn.view("v", name)
    sn.prepare("c", name)
    assert {i.name: i.kind for i in sn.walk()} == {
        name: Kind.COMMITTED,
        "v": Kind.VIEW,
        "c": Kind.ACTIVE,
    }
    assert [i.name for i in sn.walk("kind==view")] == ["v"]
    assert sorted(i.name for i in sn.walk("kind==view", "kind==active")) == ["c", "v"]
    expected_error(InvalidArgument, lambda: list(sn.walk("kind==")))

    up = sn.update(Info(kind=Kind.COMMITTED, name=name, labels={"x": "y"}), "labels.x")
    assert dict(up.labels) == {"b": "2", "x": "y"}
    assert up.updated is not None and committed.updated is not None
    assert up.updated >= committed.updated
    up = sn.update(Info(kind=Kind.COMMITTED, name=name, labels={"only": "1"}))
    assert dict(up.labels) == {"only": "1"}  # no mask: all labels replaced
    up = sn.update(Info(kind=Kind.COMMITTED, name=name, labels={}), "labels.only")
    assert dict(up.labels) == {}
    expected_error(InvalidArgument, sn.update, Info(kind=Kind.COMMITTED, name=name), "parent")

    expected_error(FailedPrecondition, sn.remove, name)  # has children
    expected_error(FailedPrecondition, sn.mounts, name)  # committed
    expected_error(AlreadyExists, sn.prepare, "v", name)
    expected_error(NotFound, sn.prepare, "x", "no-such-parent")
    for k in ("v", "c", name):
        sn.remove(k)
    assert list(sn.walk()) == []
    sn.cleanup()


def expected_error(cls: type[LaminaError], fn: Callable[..., Any], *args: Any) -> LaminaError:
    with pytest.raises(cls) as exc_info:
        fn(*args)
    assert type(exc_info.value) is cls, f"{type(exc_info.value).__name__} is not {cls.__name__}"
    return exc_info.value


@needs_root
def test_wire_kinds_timestamps_and_commit_parent(
    served: tuple[Server, RemoteSnapshotter],
) -> None:
    """containerd's Kind numbers, Timestamps, and CommitSnapshotRequest.parent (5)."""
    server, _ = served
    with connect(server.address) as channel:
        stub = spb_grpc.SnapshotsStub(channel)  # type: ignore[no-untyped-call]
        stub.Prepare(spb.PrepareSnapshotRequest(snapshotter="overlay", key="a"))
        stub.View(spb.ViewSnapshotRequest(snapshotter="overlay", key="base-view"))
        info = stub.Stat(spb.StatSnapshotRequest(snapshotter="overlay", key="a")).info
        assert info.kind == spb.ACTIVE == 2
        assert info.HasField("created_at") and info.created_at.seconds > 0
        view = stub.Stat(spb.StatSnapshotRequest(snapshotter="overlay", key="base-view")).info
        assert view.kind == spb.VIEW == 1
        # parent naming the snapshot's own parent ("") is a plain commit
        stub.Commit(spb.CommitSnapshotRequest(snapshotter="overlay", name="A", key="a"))
        info = stub.Stat(spb.StatSnapshotRequest(snapshotter="overlay", key="A")).info
        assert info.kind == spb.COMMITTED == 3
        stub.Prepare(spb.PrepareSnapshotRequest(snapshotter="overlay", key="b", parent="A"))
        stub.Commit(spb.CommitSnapshotRequest(snapshotter="overlay", name="B", key="b", parent="A"))
        stub.Prepare(spb.PrepareSnapshotRequest(snapshotter="overlay", key="c", parent="B"))
        with pytest.raises(grpc.RpcError) as err:
            stub.Commit(
                spb.CommitSnapshotRequest(snapshotter="overlay", name="C", key="c", parent="A")
            )
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        # List streams every snapshot, in batches
        for i in range(250):
            stub.Prepare(spb.PrepareSnapshotRequest(snapshotter="overlay", key=f"many-{i}"))
        responses = list(stub.List(spb.ListSnapshotsRequest(snapshotter="overlay")))
        assert len(responses) >= 3
        assert sum(len(r.info) for r in responses) == 250 + 4
        # an empty update mask replaces labels; "labels.k" sets one
        req = spb.UpdateSnapshotRequest(
            snapshotter="overlay", info=spb.Info(name="A", labels={"k": "v", "j": "w"})
        )
        assert dict(stub.Update(req).info.labels) == {"k": "v", "j": "w"}
        req = spb.UpdateSnapshotRequest(
            snapshotter="overlay", info=spb.Info(name="A", labels={"j": ""})
        )
        req.update_mask.paths.append("labels.j")
        assert dict(stub.Update(req).info.labels) == {"k": "v"}
        usage = stub.Usage(spb.UsageRequest(snapshotter="overlay", key="A"))
        assert usage.size >= 0 and usage.inodes >= 1


def test_unknown_snapshotter_name_uses_default(tmp_path: Path) -> None:
    root = Root(tmp_path)
    resolve = root_resolver(root, "native")
    try:
        assert resolve("lamina") is resolve("native") is resolve("")
        assert resolve("overlay") is not resolve("native")
    finally:
        root.close()


# -- error classes travel unchanged -------------------------------------------


class _Raising:
    """A snapshotter whose every call raises the error it is told to."""

    def __init__(self) -> None:
        self.error: BaseException = NotFound("x")

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset()

    def _raise(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    stat = update = usage = mounts = remove = cleanup = _raise

    def prepare(
        self, key: str, parent: str = "", *, labels: Mapping[str, str] | None = None
    ) -> Any:
        raise self.error

    view = prepare

    def commit(self, name: str, key: str, *, labels: Mapping[str, str] | None = None) -> None:
        raise self.error

    def walk(self, *filters: str) -> Iterator[Info]:
        yield Info(kind=Kind.ACTIVE, name="first")
        raise self.error

    def close(self) -> None:
        pass


@pytest.fixture
def raising(sockdir: Path) -> Iterator[tuple[_Raising, RemoteSnapshotter]]:
    fake = _Raising()
    server = Server(str(sockdir / "r.sock"), lambda name: fake)
    server.start()
    sn = RemoteSnapshotter(server.address, "any")
    try:
        yield fake, sn
    finally:
        sn.close()
        server.stop(grace=1)


ERRORS = [
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    NotImplementedErr,
    Internal,
]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_error_round_trip(
    cls: type[LaminaError], raising: tuple[_Raising, RemoteSnapshotter]
) -> None:
    fake, sn = raising
    fake.error = cls(f"boom: {cls.__name__} über")
    calls: list[Callable[[], Any]] = [
        lambda: sn.stat("k"),
        lambda: sn.usage("k"),
        lambda: sn.mounts("k"),
        lambda: sn.prepare("k", "p", labels={"a": "b"}),
        lambda: sn.view("k"),
        lambda: sn.commit("n", "k"),
        lambda: sn.remove("k"),
        lambda: sn.update(Info(kind=Kind.ACTIVE, name="k")),
        sn.cleanup,
    ]
    for call in calls:
        err = expected_error(cls, call)
        assert err.message == f"boom: {cls.__name__} über"
    # a streaming call that fails midway raises the same class
    expected_error(cls, lambda: list(sn.walk()))


def test_unexpected_exception_is_internal(raising: tuple[_Raising, RemoteSnapshotter]) -> None:
    fake, sn = raising
    fake.error = RuntimeError("not a lamina error")
    err = expected_error(Internal, sn.stat, "k")
    assert "RuntimeError" in err.message and "not a lamina error" in err.message


def test_no_server_is_unavailable(sockdir: Path) -> None:
    sn = RemoteSnapshotter(str(sockdir / "nobody.sock"), "overlay", timeout=5)
    try:
        expected_error(Unavailable, sn.stat, "k")
    finally:
        sn.close()
    sn.close()  # twice is fine
