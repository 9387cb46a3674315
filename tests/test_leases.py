"""Leases: the manager, lease resources, and ``lamina lease``."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from lamina.cli import main
from lamina.errors import AlreadyExists, InvalidArgument, NotFound
from lamina.metadata.leases import LeasedContent, LeaseManager, parse_duration
from lamina.metadata.root import Root


def test_create_list_get_delete(tmp_path: Path) -> None:
    m = LeaseManager(tmp_path / "metadata.db")
    a = m.create("a", labels={"purpose": "x"})
    b = m.create(expire=None)
    assert a.id == "a" and a.labels == {"purpose": "x"} and a.active()
    assert a.expires is not None and a.expires - a.created == timedelta(hours=1)
    assert b.id.startswith("lease-") and b.expires is None and b.active()
    assert [x.id for x in m.list()] == ["a", b.id]
    assert m.get("a") == a
    with pytest.raises(AlreadyExists):
        m.create("a")
    m.delete("a")
    with pytest.raises(NotFound):
        m.delete("a")
    with pytest.raises(NotFound):
        m.get("a")
    assert [x.id for x in m.list()] == [b.id]
    m.close()


@pytest.mark.parametrize("bad", ["", "has space", "a/b", "-x", "x-", "a..b", "x" * 77])
def test_invalid_ids(tmp_path: Path, bad: str) -> None:
    m = LeaseManager(tmp_path / "metadata.db")
    if bad == "":  # empty means "generate one"
        assert m.create(bad).id.startswith("lease-")
    else:
        with pytest.raises(InvalidArgument):
            m.create(bad)
    with pytest.raises(InvalidArgument):
        m.create("neg", expire=timedelta(seconds=-1))
    m.close()


def test_expiry_and_protection(tmp_path: Path) -> None:
    m = LeaseManager(tmp_path / "metadata.db")
    assert m.protected_since() is None
    gone = m.create("gone", expire=timedelta(0))
    assert not gone.active()
    assert m.protected_since() is None  # an expired lease protects nothing
    live = m.create("live")
    assert m.protected_since() == live.created
    assert [x.id for x in m.active()] == ["live"]
    m.add_resource("gone", "content", "sha256:" + "1" * 64)
    m.add_resource("live", "content", "sha256:" + "2" * 64)
    m.add_resource("live", "snapshot:overlay", "key")
    m.add_resource("live", "snapshot:overlay", "key")  # once
    assert m.active_resources() == [("content", "sha256:" + "2" * 64),
                                     ("snapshot:overlay", "key")]
    assert m.expire_old() == 1
    assert m.resources("gone") == []
    with pytest.raises(NotFound):
        m.add_resource("gone", "content", "sha256:" + "3" * 64)
    with pytest.raises(InvalidArgument):
        m.add_resource("live", "blob", "x")
    m.delete("live")
    assert m.active_resources() == []
    m.close()


def test_held_removes_its_lease_even_on_error(tmp_path: Path) -> None:
    m = LeaseManager(tmp_path / "metadata.db")
    with pytest.raises(RuntimeError), m.held(purpose="work") as lease:
        assert m.get(lease.id).labels == {"lamina.io/purpose": "work"}
        raise RuntimeError("boom")
    assert m.list() == []
    m.close()


def test_leased_content_records_what_it_is_asked_about(tmp_path: Path) -> None:
    root = Root(tmp_path / "root")
    store = root.content()
    old = store.add(b"already stored").digest
    m = LeaseManager(root.metadata_path)
    lease = m.create("work")
    leased = LeasedContent(store, m, lease.id)
    assert leased.info(old).digest == old
    w = leased.writer("ref-1")
    w.write(b"already stored")
    with pytest.raises(AlreadyExists):
        w.commit(0, "")
    w.close()
    w = leased.writer("ref-2")
    w.write(b"new")
    new = w.digest()
    w.commit(3, new)
    w.close()
    assert dict(m.resources(lease.id)).keys() == {"content"}
    assert {i for _, i in m.resources(lease.id)} == {old, new}
    m.close()
    root.close()


def test_parse_duration() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("10m") == timedelta(minutes=10)
    assert parse_duration("2h") == timedelta(hours=2)
    assert parse_duration("1d") == timedelta(days=1)
    assert parse_duration("15") == timedelta(seconds=15)
    with pytest.raises(InvalidArgument):
        parse_duration("soon")


def _cli(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    code, out, _ = _cli(capsys, root, "lease", "create", "--id", "mine", "--expire", "10m",
                        "--label", "a=b", "--label", "containerd.io/gc.root=1")
    assert (code, out.strip()) == (0, "mine")
    code, out, _ = _cli(capsys, root, "lease", "create", "--expire", "never")
    assert code == 0
    other = out.strip()
    code, out, _ = _cli(capsys, root, "lease", "ls", "--json")
    leases = json.loads(out)
    assert code == 0 and [x["id"] for x in leases] == ["mine", other]
    assert leases[0]["labels"] == {"a": "b", "containerd.io/gc.root": "1"}
    assert leases[0]["active"] and leases[1]["expires"] is None
    code, out, _ = _cli(capsys, root, "lease", "ls")
    assert code == 0 and "mine" in out and "never" in out
    assert _cli(capsys, root, "lease", "ls", "-q")[1].split() == ["mine", other]
    # errors and their exit codes
    code, _, err = _cli(capsys, root, "lease", "create", "--id", "mine")
    assert code == AlreadyExists.exit_code and "AlreadyExists" in err
    assert _cli(capsys, root, "lease", "create", "--expire", "soon")[0] == 6
    assert _cli(capsys, root, "lease", "create", "--label", "novalue")[0] == 6
    assert _cli(capsys, root, "lease", "create", "--id", "bad id")[0] == 6
    code, out, err = _cli(capsys, root, "lease", "rm", "mine", "nope", other)
    assert code == NotFound.exit_code and "nope" in err
    assert out.split() == ["mine", other]
    assert json.loads(_cli(capsys, root, "lease", "ls", "--json")[1]) == []
    # rm --sync collects what the lease protected
    _cli(capsys, root, "lease", "create", "--id", "held")
    r = Root(root)
    digest = r.content().add(b"protected while held").digest
    r.close()
    assert _cli(capsys, root, "gc", "--json")[0] == 0
    r = Root(root)
    assert [i.digest for i in r.content().walk()] == [digest]
    r.close()
    assert _cli(capsys, root, "lease", "rm", "--sync", "held")[0] == 0
    r = Root(root)
    assert list(r.content().walk()) == []
    r.close()
