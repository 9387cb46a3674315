"""``image pull --platform`` and a single manifest (issue 20): the manifest's config
names its platform, and one for another platform is refused in one NotFound line
(containerd's "no match for platform in manifest"), nothing recorded; the platform
it is for, or no --platform at all, pulls it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from registry_peer import Registry as Peer
from registry_peer import running_registry, skopeo_push

from lamina.errors import NotFound
from lamina.oci.platforms import require_config_platform


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def amd64(peer: Peer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A single manifest (no index) whose config says linux/amd64, on ``peer``."""
    work = tmp_path_factory.mktemp("image")
    image = imagefactory.build_oci_layout(
        work / "oci", [imagefactory.minimal_layer(work / "blobs")],
        config=imagefactory.ImageConfig(architecture="amd64"), ref_name="one")
    ref = f"{peer.host}/single/amd:1"
    skopeo_push(image.oci_ref, ref)
    return ref


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LAMINA_DEBUG"}
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env=env, stdin=subprocess.DEVNULL)


def listed(root: Path) -> list[str]:
    done = lamina(root, "image", "ls", "--json")
    assert done.returncode == 0, done.stderr
    return [i["name"] for i in json.loads(done.stdout)]


def test_a_manifest_for_another_platform_is_refused(require_root: None, amd64: str,
                                                    tmp_root: Path) -> None:
    done = lamina(tmp_root, "image", "pull", "--no-unpack", "--platform", "linux/arm64", amd64)
    assert done.returncode == NotFound.exit_code, done.stderr
    assert done.stderr == (f"lamina: NotFound: {amd64}: no match for platform in manifest: "
                           "it is for linux/amd64, not linux/arm64\n")
    assert listed(tmp_root) == []


@pytest.mark.parametrize("flags", [["--platform", "linux/amd64"],
                                   ["--platform", "linux/arm64", "--platform", "linux/amd64"],
                                   ["--all-platforms"], []])
def test_the_platform_it_is_for_pulls_it(require_root: None, amd64: str, tmp_root: Path,
                                         flags: list[str]) -> None:
    done = lamina(tmp_root, "image", "pull", "--no-unpack", *flags, amd64)
    assert done.returncode == 0, done.stderr
    assert listed(tmp_root) == [amd64]


def test_the_config_decides() -> None:
    want = [{"os": "linux", "architecture": "arm64", "variant": "v8"}]
    require_config_platform({"os": "linux", "architecture": "arm64", "variant": "v8"}, want,
                            where="x")
    require_config_platform({"os": "linux", "architecture": "arm64"}, want, where="x")
    with pytest.raises(NotFound, match="it is for linux/arm64/v7, not linux/arm64/v8"):
        require_config_platform({"os": "linux", "architecture": "arm64", "variant": "v7"},
                                want, where="x")
    with pytest.raises(NotFound, match="it is for no platform, not linux/arm64/v8"):
        require_config_platform({}, want, where="x")
