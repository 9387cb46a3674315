"""``lamina image ls`` and ``image inspect`` read like nerdctl's, as a person and a script
see them: ``lamina`` runs as a process, piped and on pseudo-terminals of 80 and 120
columns (no line wider than the terminal, every column where its header is)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import imagefactory as f
import pytest
from registry_peer import Registry as Peer
from registry_peer import running_registry, skopeo_push
from test_progress_tty import in_pty

from lamina.cli.common import human_size
from lamina.images.graph import put_document
from lamina.metadata.images import Image
from lamina.metadata.root import Root
from lamina.oci.types import Descriptor, MediaType

LAMINA = [sys.executable, "-m", "lamina"]
LONG = "registry.example.com:5000/" + "/".join(["team"] * 12) + "/server:v1.2.3-beta"
HEADER = ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "PLATFORM", "SIZE"]


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LAMINA_DEBUG", "COLUMNS")}
    return subprocess.run([*LAMINA, "--root", str(root), *args], capture_output=True,
                          text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
                          check=False)


def ok(root: Path, *args: str) -> str:
    done = lamina(root, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> f.ImageRef:
    """A one-layer image with a label in its config, named twice in its layout."""
    work = tmp_path_factory.mktemp("image-ls")
    layer = f.layer_from_entries([f.File("data.bin", os.urandom(300_000))], work / "blobs")
    config = f.ImageConfig(labels={"org.example/team": "core"})
    f.build_oci_layout(work / "oci", [layer], config=config, ref_name="demo:1")
    return f.build_oci_layout(work / "oci", [layer], config=config, ref_name=LONG)


@pytest.fixture
def root(require_root: None, tmp_root: Path, image: f.ImageRef) -> Path:
    ok(tmp_root, "image", "import", "-q", "--no-unpack", str(image.layout))
    return tmp_root


def digest_of(root: Path, name: str) -> str:
    [found] = [i["target"]["digest"] for i in json.loads(ok(root, "image", "ls", "--json"))
               if i["name"] == name]
    return str(found)


def test_the_columns_of_nerdctl(root: Path, image: f.ImageRef) -> None:
    """Piped: docker's columns, a long name in full, the IDs of the digests, the age, the
    platform and the size of the image (its layer blob, not the 400-byte manifest)."""
    lines = ok(root, "image", "ls").splitlines()
    assert [c.strip() for c in re.split(r"\s{2,}", lines[0])] == HEADER, lines
    rows = {r.split()[0]: r.split() for r in lines[1:]}
    assert set(rows) == {"demo", LONG.rpartition(":")[0]}, lines
    demo = rows["demo"]
    assert demo[1] == "1" and demo[2] == digest_of(root, "demo:1").split(":")[1][:12], demo
    assert re.fullmatch(r"\d+ seconds? ago", " ".join(demo[3:6])), demo
    assert demo[6] == f"linux/{f.host_arch()}", demo
    assert " ".join(demo[7:]) == human_size(image.layers[0].size), demo
    assert rows[LONG.rpartition(":")[0]][1] == "v1.2.3-beta"
    _aligned(lines)


def test_size_is_the_unpacked_size_once_unpacked(root: Path, image: f.ImageRef) -> None:
    ok(root, "image", "unpack", "demo:1")
    [usage] = json.loads(ok(root, "snapshot", "usage", "--json", image.layers[0].diff_id))
    assert usage["size"] != image.layers[0].size
    row = next(r for r in ok(root, "image", "ls").splitlines() if r.startswith("demo "))
    assert row.endswith(f"  {human_size(usage['size'])}"), row


def _aligned(lines: list[str]) -> None:
    """Every column of every row starts where its header starts."""
    starts = [lines[0].index(h) for h in HEADER[1:]]
    for line in lines[1:]:
        for at in starts:
            assert line[at - 2:at] == "  " and line[at] != " ", (at, lines)


@pytest.mark.parametrize("cols", [80, 120])
def test_fits_the_terminal(root: Path, cols: int) -> None:
    code, output = in_pty(["--root", str(root), "image", "ls"], cols=cols)
    assert code == 0, output
    lines = output.replace("\r\n", "\n").splitlines()
    assert all(len(t) < cols for t in lines), lines
    assert [c.strip() for c in re.split(r"\s{2,}", lines[0])] == HEADER, lines
    _aligned(lines)
    [long] = [t for t in lines if "v1.2.3-beta" in t]
    repo = long.split()[0]
    assert "\u2026" in repo and repo.startswith("regist") and repo.endswith("server"), long
    assert any(t.startswith("demo  ") for t in lines), lines  # short names stay whole


def test_an_empty_root_opens_no_store_to_list(require_root: None, tmp_root: Path) -> None:
    """Listing no images opens neither the content store nor the snapshotter (start-up
    time: bench/startup.py); an unknown snapshotter is refused all the same."""
    assert ok(tmp_root, "image", "ls").split() == [*HEADER[:2], "IMAGE", "ID", *HEADER[3:]]
    assert ok(tmp_root, "image", "ls", "--json") == "[]\n"
    assert not (tmp_root / "content").exists() and not (tmp_root / "snapshots").exists()
    done = lamina(tmp_root, "--snapshotter", "nosuch", "image", "ls")
    assert done.returncode == 6 and "unknown snapshotter 'nosuch'" in done.stderr


def test_quiet_digests_names(root: Path) -> None:
    ids = ok(root, "image", "ls", "-q").split()
    assert sorted(ids) == sorted(digest_of(root, n).split(":")[1][:12] for n in ("demo:1", LONG))
    assert sorted(ok(root, "images", "-q", "--names").split()) == sorted(["demo:1", LONG])
    assert ok(root, "image", "ls", "-q", "--no-trunc").split()[0].startswith("sha256:")
    lines = ok(root, "image", "ls", "--digests").splitlines()
    assert lines[0].split()[:3] == ["REPOSITORY", "TAG", "DIGEST"], lines
    assert digest_of(root, "demo:1") in next(t for t in lines if t.startswith("demo "))
    named = ok(root, "image", "ls", "--names").splitlines()
    assert named[0].split()[0] == "NAME" and any(t.startswith(LONG + "  ") for t in named)


def test_json_is_unchanged(root: Path) -> None:
    listed = json.loads(ok(root, "image", "ls", "--json"))
    assert {tuple(sorted(i)) for i in listed} == {
        ("created", "labels", "name", "target", "updated")}


def _names(root: Path, *filters: str) -> list[str]:
    args = [a for flt in filters for a in ("-f", flt)]
    return sorted(ok(root, "image", "ls", "-q", "--names", *args).split())


def test_filters(root: Path, image: f.ImageRef) -> None:
    time.sleep(0.01)
    later = "docker.io/library/later@" + digest_of(root, "demo:1")
    labelled = "docker.io/library/labelled:2"  # found as labelled:2 too
    ok(root, "image", "tag", "demo:1", later)
    ok(root, "image", "tag", "demo:1", labelled)
    assert _names(root, "reference=demo") == ["demo:1"]  # a repository: every tag
    assert _names(root, "reference=d*:1") == ["demo:1"]
    assert _names(root, "reference=docker.io/library/demo") == ["demo:1"]  # any spelling
    assert _names(root, "reference=registry.example.com:5000/*") == []  # * keeps to a part
    assert _names(root, "reference=demo", "reference=labelled") == ["demo:1", labelled]
    assert _names(root, "dangling=true") == [later]
    ok(root, "image", "tag", "demo:1", "bare")  # bare:latest, not dangling
    assert _names(root, "reference=bare:latest", "dangling=false") == ["bare"]
    assert later not in _names(root, "dangling=false")
    assert "demo:1" in _names(root, "before=labelled:2")
    assert _names(root, "since=demo:1", "reference=labelled:*") == [labelled]
    assert _names(root, "label=no.such/label") == []
    assert _names(root, "reference=demo", "label=no.such/label=x") == []


@pytest.mark.parametrize(("flt", "code", "words"), [
    ("bogus=1", 6, "unknown image filter 'bogus'"),
    ("reference", 6, "expected reference=VALUE"),
    ("dangling=maybe", 6, "expected true or false"),
    ("before=no/such:image", 3, "no/such:image"),
])
def test_a_bad_filter_is_one_line(root: Path, flt: str, code: int, words: str) -> None:
    done = lamina(root, "image", "ls", "-f", flt)
    assert done.returncode == code and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lamina: "), done.stderr
    assert words in done.stderr, done.stderr


def test_inspect(root: Path, image: f.ImageRef) -> None:
    [one] = json.loads(ok(root, "image", "inspect", "demo:1"))
    assert one["Id"] == digest_of(root, "demo:1")
    assert one["RepoTags"] == ["demo:1"] and one["RepoDigests"] == [f"demo@{one['Id']}"]
    assert one["Os"] == "linux" and one["Architecture"]
    assert one["RootFS"] == {"Type": "layers", "Layers": [image.layers[0].diff_id]}
    assert one["Config"]["Labels"] == {"org.example/team": "core"}
    assert one["Size"] == image.layers[0].size  # not unpacked: the blob's size
    assert one["Created"] == image.config["created"]
    two = json.loads(ok(root, "image", "inspect", "demo:1", LONG))
    assert [t["RepoTags"] for t in two] == [["demo:1"], [LONG]]
    [native] = json.loads(ok(root, "image", "inspect", "--mode", "native", "demo:1"))
    assert native["Image"]["Name"] == "demo:1"
    assert native["ImageConfig"]["rootfs"]["diff_ids"] == [image.layers[0].diff_id]
    assert native["Manifest"]["layers"][0]["digest"] == image.layers[0].digest
    missing = lamina(root, "image", "inspect", "demo:1", "no/such:image")
    assert missing.returncode == 3 and missing.stderr.count("\n") == 1, missing
    assert missing.stderr.startswith("lamina: NotFound: "), missing.stderr


# ------------------------------------------------------------------ pull and unpack


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Peer, f.ImageRef]]:
    """``one``: a layer; ``two``: that layer and another."""
    work = tmp_path_factory.mktemp("pull-summary")
    base = f.layer_from_entries([f.File("base.bin", os.urandom(50_000))], work / "blobs")
    top = f.layer_from_entries([f.File("top.bin", os.urandom(50_000))], work / "blobs")
    one = f.build_oci_layout(work / "oci", [base], ref_name="one")
    two = f.build_oci_layout(work / "oci", [base, top], ref_name="two")
    with running_registry(work / "registry") as reg:
        skopeo_push(one.oci_ref, f"{reg.host}/summary/one:1")
        skopeo_push(two.oci_ref, f"{reg.host}/summary/two:1")
        yield reg, two


def test_pull_and_unpack_summaries(require_root: None, tmp_root: Path,
                                   peer: tuple[Peer, f.ImageRef]) -> None:
    """The result lines count in the singular when they should; a layer that was there
    already is counted present, and a config this pull fetched is not."""
    reg, _ = peer
    first = ok(tmp_root, "image", "pull", "-q", "--no-unpack", f"{reg.host}/summary/one:1")
    assert "\t(1 blob fetched, 0 present)" in first, first  # the config is a document
    again = ok(tmp_root, "image", "pull", "-q", "--no-unpack", f"{reg.host}/summary/two:1")
    assert "\t(1 blob fetched, 1 present)" in again, again
    unpacked = ok(tmp_root, "image", "unpack", f"{reg.host}/summary/one:1")
    assert unpacked.rstrip().endswith("(1 layer extracted, 0 reused)"), unpacked
    unpacked = ok(tmp_root, "image", "unpack", f"{reg.host}/summary/two:1")
    assert unpacked.rstrip().endswith("(1 layer extracted, 1 reused)"), unpacked


def test_push_summary_counts_one_referrer(require_root: None, tmp_root: Path,
                                         peer: tuple[Peer, f.ImageRef]) -> None:
    reg, _ = peer
    ref = f"{reg.host}/summary/one:1"
    ok(tmp_root, "image", "pull", "-q", "--no-unpack", ref)
    [pulled] = json.loads(ok(tmp_root, "image", "ls", "--json"))
    root = Root(tmp_root)
    try:  # an artifact whose subject is the image: it travels with the push
        content = root.content()
        blob = put_document(content, b"{}")
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
            "artifactType": "application/vnd.lamina.test.note",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": blob,
                       "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": blob,
                        "size": 2}],
            "subject": pulled["target"]}).encode()
        target = Descriptor(MediaType.OCI_MANIFEST, put_document(content, manifest),
                            len(manifest))
        root.images().put(Image(name="note", target=target))
    finally:
        root.close()
    pushed = ok(tmp_root, "image", "push", "-q", ref, f"{reg.host}/summary/noted:1")
    assert pushed.rstrip().endswith(", 1 referrer)"), pushed


def test_a_hostile_config_cannot_drive_the_terminal_through_the_listing(
        require_root: None, tmp_root: Path, tmp_path: Path) -> None:
    # the PLATFORM column is the config's os/architecture/variant, any string an
    # image's author wrote: image ls printed its control sequences to the terminal
    layer = f.layer_from_entries([f.File("x", b"x\n")], tmp_path / "blobs")
    f.build_oci_layout(tmp_path / "oci", [layer], ref_name="test/plat:1",
                       config=f.ImageConfig(architecture="amd64\x1b]0;owned\x07\x1b[2J"))
    ok(tmp_root, "image", "import", "-q", str(tmp_path / "oci"))
    shown = ok(tmp_root, "image", "ls")
    assert shown.replace("\n", "").isprintable(), repr(shown)
    assert "linux/amd64\\x1b]0;owned\\x07\\x1b[2J" in shown, shown  # told, escaped
