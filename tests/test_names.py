"""One image name, whatever its spelling (issue 20): ``demo:1`` and
``docker.io/library/demo:1`` are the same image for import, tag, rm, create,
export and the image store itself; a name is kept as it was first given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user

from lamina.errors import AlreadyExists, InvalidArgument, NotFound
from lamina.metadata.images import Image, ImageStore
from lamina.oci.reference import normalize_name, parse_reference, spellings
from lamina.oci.types import Descriptor, MediaType

LAMINA = [sys.executable, "-m", "lamina"]
FULL = "docker.io/library/demo:1"
DIGEST = "sha256:" + "a" * 64


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LAMINA_DEBUG"}
    return subprocess.run([*LAMINA, "--root", str(root), *args], capture_output=True,
                          text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
                          check=False)


def ok(root: Path, *args: str) -> str:
    done = lamina(root, *args)
    assert done.returncode == 0, f"lamina {' '.join(args)}: {done.stderr}"
    return done.stdout


def names(root: Path) -> list[str]:
    return [i["name"] for i in json.loads(ok(root, "image", "ls", "--json"))]


@pytest.mark.parametrize(("given", "normal"), [
    ("demo:1", FULL),
    ("demo", "docker.io/library/demo:latest"),
    ("team/app:2", "docker.io/team/app:2"),
    ("index.docker.io/demo:1", FULL),
    ("localhost:5000/app", "localhost:5000/app:latest"),
    (f"demo@{DIGEST}", f"docker.io/library/demo@{DIGEST}"),
    (f"demo:1@{DIGEST}", f"docker.io/library/demo:1@{DIGEST}"),
])
def test_normalize_name_reads_names_as_docker_does(given: str, normal: str) -> None:
    assert normalize_name(given) == normal
    assert spellings(given)[:2] == list(dict.fromkeys([given, normal]))
    assert {parse_reference(s) for s in spellings(given)} == {parse_reference(given)}
    assert given in spellings(normal)


def test_a_name_that_is_no_reference_is_only_itself() -> None:
    assert spellings("Not A Name") == ["Not A Name"]
    with pytest.raises(InvalidArgument):
        normalize_name("Not A Name")


def test_the_image_store_finds_a_record_by_any_spelling(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "meta.db")
    target = Descriptor(MediaType.OCI_MANIFEST, DIGEST, 10)
    other = Descriptor(MediaType.OCI_MANIFEST, "sha256:" + "b" * 64, 20)
    store.put(Image(name="demo:1", target=target))  # as an older root recorded it
    assert store.get(FULL).name == "demo:1"
    assert store.get("library/demo:1").name == "demo:1"
    with pytest.raises(AlreadyExists):
        store.create(Image(name=FULL, target=target))
    assert store.put(Image(name=FULL, target=other)).name == "demo:1"  # one record moves
    assert [(i.name, i.target.digest) for i in store.list()] == [("demo:1", other.digest)]
    store.delete(FULL)
    assert store.list() == []
    with pytest.raises(NotFound, match="demo:2"):
        store.get("demo:2")
    store.close()


def test_one_image_by_both_spellings_through_the_cli(tmp_root: Path) -> None:
    require_root_user()
    w = tmp_root / "w"
    w.mkdir()
    f.build_oci_layout(w / "layout", [f.minimal_layer(w)], ref_name="demo:1")
    f.build_oci_layout(w / "other", [f.minimal_layer(w), f.rich_layers(w)[0]],
                       ref_name="other:1")
    root = tmp_root / "root"
    ok(root, "image", "import", "-q", str(w / "layout"))
    ok(root, "image", "import", "-q", "--no-unpack", str(w / "other"))
    assert names(root) == ["demo:1", "other:1"]

    # tag: the full spelling finds the short record; tagging onto either spelling of
    # an existing name moves that one record, and a new name is kept as given
    ok(root, "image", "tag", FULL, "demo:2")
    ok(root, "image", "tag", "other:1", FULL)
    listed = json.loads(ok(root, "image", "ls", "--json"))
    assert [i["name"] for i in listed] == ["demo:1", "demo:2", "other:1"]
    by_name = {i["name"]: i["target"]["digest"] for i in listed}
    assert by_name["demo:1"] == by_name["other:1"] != by_name["demo:2"]
    ok(root, "image", "tag", "demo:2", "demo:1")  # back where it was

    # containers are created on either spelling
    ok(root, "container", "create", "demo:1", "short")
    ok(root, "container", "create", FULL, "full")
    ok(root, "container", "rm", "short", "full")
    # export finds it by the full spelling; rm by the full spelling removes the one record
    ok(root, "image", "export", str(w / "demo.tar"), FULL)
    ok(root, "image", "rm", FULL, "docker.io/library/demo:2")
    assert names(root) == ["other:1"]
    gone = lamina(root, "image", "rm", "demo:1")
    assert gone.returncode == 3 and gone.stderr.startswith("lamina: NotFound: ")
