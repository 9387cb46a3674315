"""`lamina snapshot ...` end to end, through lamina.cli.main, on a tmp_path root."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lamina.cli import main
from lamina.cli.snapshot import tree_lines
from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from lamina.mounts.mount import is_mountpoint, unmount_all
from lamina.snapshots import Info, Kind

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


class CLI:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str], snapshotter: str) -> None:
        self.root, self.capsys, self.snapshotter = root, capsys, snapshotter

    def __call__(self, *args: str, code: int = 0) -> str:
        self.capsys.readouterr()
        argv = ["--root", str(self.root), "--snapshotter", self.snapshotter, *args]
        rc = main(argv)
        out, err = self.capsys.readouterr()
        assert rc == code, f"lamina {' '.join(args)}: exit {rc}, want {code}\n{out}{err}"
        self.err = err
        return out


@pytest.fixture(params=["overlay", "native"])
def cli(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> CLI:
    return CLI(tmp_path / "root", capsys, str(request.param))


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    t = tmp_path / "target"
    t.mkdir()
    yield t
    unmount_all(t)


def test_full_flow(cli: CLI, target: Path) -> None:
    assert cli("snapshot", "prepare", "--label", "stage=build", "base") == ""
    assert cli("snapshot", "mount", str(target), "base") == ""
    assert is_mountpoint(target)
    (target / "hello").write_text("hello\n")
    (target / "dir").mkdir()
    assert cli("snapshot", "unmount", str(target)) == ""
    assert not is_mountpoint(target)
    assert not (target / "hello").exists()

    assert cli("snapshot", "commit", "--label", "layer=1", "c1", "base") == ""
    cli("snapshot", "info", "base", code=NotFound.exit_code)

    out = cli("snapshots", "view", "--target", "/mnt/x", "v1", "c1")
    assert out.startswith("mount -t "), out
    assert "/mnt/x" in out
    lines = cli("snapshot", "mounts", str(target), "v1").splitlines()
    assert lines and all(line.startswith("mount -t ") for line in lines), lines
    assert all(str(target) in line for line in lines)
    mounts_json = json.loads(cli("snapshot", "mounts", "--json", str(target), "v1"))
    assert mounts_json[0]["type"] and mounts_json[0]["source"]

    cli("snapshot", "mount", str(target), "v1")
    assert (target / "hello").read_text() == "hello\n"
    with pytest.raises(OSError) as refused:
        (target / "new").write_text("x")
    assert refused.value.errno == errno.EROFS  # a view is mounted read-only
    cli("snapshot", "unmount", str(target))

    created = json.loads(cli("snapshot", "prepare", "--mounts", "a1", "c1"))
    assert isinstance(created, list) and created[0]["type"]

    out = cli("snapshot", "ls")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["KEY", "PARENT", "KIND", "OWNER"]  # the owner: lamina.owners
    assert sorted(rows[1:]) == [["a1", "c1", "active", "lamina"], ["c1", "committed", "lamina"],
                                ["v1", "c1", "view", "lamina"]]

    listed = json.loads(cli("snapshot", "ls", "--json"))
    assert {i["name"]: i["kind"] for i in listed} == {
        "a1": "active", "c1": "committed", "v1": "view"
    }
    assert cli("snapshot", "ls", "-q", "kind==view", "name==a1").split() == ["a1", "v1"]

    assert cli("snapshot", "tree").splitlines() == ["c1", " \\_ a1 (active)", " \\_ v1 (view)"]

    info = json.loads(cli("snapshot", "info", "c1"))
    assert info["kind"] == "committed" and info["parent"] == "" and info["name"] == "c1"
    assert info["labels"] == {"layer": "1"}
    assert info["created"] and info["updated"]

    usage = cli("snapshot", "usage", "-b", "c1").splitlines()
    assert usage[0].split() == ["KEY", "SIZE", "INODES"]
    key, size, inodes = usage[1].split()
    assert key == "c1" and int(size) > 0 and int(inodes) >= 3  # root, hello, dir
    all_usage = json.loads(cli("snapshot", "usage", "--json"))
    assert sorted(u["key"] for u in all_usage) == ["a1", "c1", "v1"]
    assert "B" in cli("snapshot", "usage", "c1")  # human-readable by default

    assert cli("snapshot", "label", "c1", "a=1", "b=2").splitlines() == ["a=1", "b=2", "layer=1"]
    assert cli("snapshot", "label", "c1", "a=", "layer").splitlines() == ["b=2"]
    assert cli("snapshot", "label", "c1").splitlines() == ["b=2"]
    assert json.loads(cli("snapshot", "label", "--json", "c1")) == {"b": "2"}

    cli("snapshot", "rm", "c1", code=FailedPrecondition.exit_code)
    assert "FailedPrecondition" in cli.err
    assert cli("snapshot", "rm", "a1", "v1", "c1") == ""
    assert cli("snapshot", "ls", "--json").strip() == "[]"
    assert cli("snapshot", "cleanup") == ""
    assert cli("snapshot", "tree") == ""


def test_error_exits(cli: CLI) -> None:
    cli("snapshot", "info", "missing", code=NotFound.exit_code)
    assert cli.err.startswith("lamina: NotFound: "), cli.err
    assert len(cli.err.strip().splitlines()) == 1
    cli("snapshot", "prepare", "k", "missing-parent", code=NotFound.exit_code)
    cli("snapshot", "rm", "missing", code=NotFound.exit_code)
    cli("snapshot", "usage", "missing", code=NotFound.exit_code)
    cli("snapshot", "mounts", "/tmp", "missing", code=NotFound.exit_code)

    cli("snapshot", "prepare", "k")
    cli("snapshot", "prepare", "k", code=AlreadyExists.exit_code)
    assert cli.err.startswith("lamina: AlreadyExists: ")
    cli("snapshot", "view", "k", code=AlreadyExists.exit_code)
    cli("snapshot", "prepare", "k2", "k", code=InvalidArgument.exit_code)
    cli("snapshot", "commit", "c", "k")
    cli("snapshot", "commit", "c2", "c", code=FailedPrecondition.exit_code)
    cli("snapshot", "mounts", "/tmp", "c", code=FailedPrecondition.exit_code)
    cli("snapshot", "view", "v", "c")
    cli("snapshot", "commit", "c3", "v", code=FailedPrecondition.exit_code)

    cli("snapshot", "prepare", "--label", "novalue", "k3", code=InvalidArgument.exit_code)
    cli("snapshot", "label", "c", "=v", code=InvalidArgument.exit_code)
    cli("snapshot", "label", "c", "k=" + "v" * 5000, code=InvalidArgument.exit_code)
    cli("snapshot", "ls", 'labels."unterminated', code=InvalidArgument.exit_code)
    assert cli("snapshot", "ls", "-q").split() == ["c", "v"]


def test_tree_lines() -> None:
    infos = [
        Info(Kind.COMMITTED, "base"),
        Info(Kind.COMMITTED, "mid", "base"),
        Info(Kind.ACTIVE, "top", "mid"),
        Info(Kind.VIEW, "view", "base"),
        Info(Kind.ACTIVE, "alone"),
    ]
    assert tree_lines(infos) == [
        "alone (active)",
        "base",
        " \\_ mid",
        "   \\_ top (active)",
        " \\_ view (view)",
    ]


def test_keys_and_labels_are_shown_escaped(cli: CLI) -> None:
    # keys and labels are any text a client (containerd, through serve) chose: shown
    # raw, control sequences in them drove the terminal of whoever listed them
    key, label = "k\x1b]0;owned\x07", "v\x1b[2J"
    cli("snapshot", "prepare", key, "")
    cli("snapshot", "label", key, f"x={label}")
    escaped = "k\\x1b]0;owned\\x07"
    for args, told in ((("snapshot", "ls"), escaped), (("snapshot", "ls", "-q"), escaped),
                       (("snapshot", "tree"), escaped), (("snapshot", "label", key),
                                                         "x=v\\x1b[2J")):
        out = cli(*args)
        assert out.replace("\n", "").isprintable() and told in out, (args, out)
    cli("snapshot", "rm", key)
