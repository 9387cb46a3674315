"""`lamina content ...` through lamina.cli.main, on a tmp_path root."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from lamina.cli import main
from lamina.content import sha256_digest
from lamina.errors import FailedPrecondition, InvalidArgument, NotFound


class CLI:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.capsys, self.monkeypatch = root, capsys, monkeypatch
        self.err = ""

    def __call__(self, *args: str, stdin: bytes = b"", code: int = 0) -> str:
        self.capsys.readouterr()
        self.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        rc = main(["--root", str(self.root), "content", *args])
        out, err = self.capsys.readouterr()
        assert rc == code, f"lamina content {' '.join(args)}: exit {rc}, want {code}\n{out}{err}"
        self.err = err
        return out


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> CLI:
    return CLI(tmp_path, capsys, monkeypatch)


def test_ingest_ls_get_rm(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"blob data\n" * 10
    digest = sha256_digest(data)
    out = cli("ingest", "--expected-size", str(len(data)), "--expected-digest", digest,
              "--label", "a=1", "--label", "b=two", "ref-1", stdin=data)
    assert out.strip() == digest
    # ingesting existing content succeeds and prints the digest
    assert cli("ingest", "again", stdin=data).strip() == digest
    assert cli("ingest", "--expected-digest", digest, "x", stdin=b"").strip() == digest
    assert json.loads(cli("active", "--json")) == []

    listing = cli("ls")
    assert listing.splitlines()[0].split() == ["DIGEST", "SIZE", "AGE", "OWNERS", "LABELS"]
    assert digest in listing and "a=1,b=two" in listing and "100 B" in listing
    [entry] = json.loads(cli("ls", "--json"))
    assert entry["digest"] == digest and entry["size"] == 100
    assert entry["labels"] == {"a": "1", "b": "two"}
    assert cli("ls", "-q", "labels.a==1").split() == [digest]
    assert cli("ls", "-q", "labels.a==2").split() == []
    assert cli("ls", "-q", "labels.a==2", "size==100").split() == [digest]

    assert cli("get", digest) == data.decode()
    binary = bytes(range(256)) * 5000
    bin_digest = cli("ingest", "bin", stdin=binary).strip()
    sink = io.BytesIO()
    wrapper = io.TextIOWrapper(sink)
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", wrapper)
        assert main(["--root", str(cli.root), "content", "get", bin_digest]) == 0
    assert sink.getvalue() == binary
    wrapper.detach()
    cli("rm", bin_digest)

    assert cli("rm", digest).strip() == digest
    assert cli("ls", "-q") == ""
    cli("get", digest, code=NotFound.exit_code)
    assert "NotFound" in cli.err


def test_label(cli: CLI) -> None:
    digest = cli("ingest", "--label", "keep=1", "--label", "drop=2", "r", stdin=b"x").strip()
    assert cli("label", digest, "new=3", "drop=").strip() == "keep=1,new=3"
    assert cli("label", digest).strip() == "keep=1,new=3"
    cli("label", digest, "novalue", code=InvalidArgument.exit_code)
    cli("label", sha256_digest(b"missing"), "a=b", code=NotFound.exit_code)
    cli("label", "sha256:bogus", "a=b", code=InvalidArgument.exit_code)


def test_bad_digest_keeps_ingest(cli: CLI) -> None:
    wrong = sha256_digest(b"something else")
    cli("ingest", "--expected-digest", wrong, "bad", stdin=b"content",
        code=FailedPrecondition.exit_code)
    assert "FailedPrecondition" in cli.err
    [st] = json.loads(cli("active", "--json"))
    assert (st["ref"], st["offset"], st["expected"]) == ("bad", 7, wrong)
    assert "bad" in cli("active") and "bad" in cli("active", "ref==bad")
    assert cli("active", "ref==other").splitlines()[1:] == []
    cli("ingest", "--expected-size", "3", "sized", stdin=b"toolong",
        code=FailedPrecondition.exit_code)
    cli("abort", "bad", "sized")
    assert json.loads(cli("active", "--json")) == []
    cli("abort", "bad", code=NotFound.exit_code)
    assert cli("ls", "-q") == ""


def test_rm_reports_missing(cli: CLI) -> None:
    digest = cli("ingest", "r", stdin=b"present").strip()
    missing = sha256_digest(b"absent")
    out = cli("rm", missing, digest, code=NotFound.exit_code)
    assert out.split() == [digest]
    assert missing in cli.err
    cli("rm", "nonsense", code=InvalidArgument.exit_code)


def test_ls_bad_filter(cli: CLI) -> None:
    cli("ls", "size==", code=InvalidArgument.exit_code)
    assert "filter" in cli.err
