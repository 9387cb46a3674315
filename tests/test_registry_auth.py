"""Credentials against the real registry: htpasswd basic auth, login/logout, --user."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from registry_peer import Registry as Peer
from registry_peer import running_registry, skopeo_push

from lamina.remotes.auth import Unauthorized

USER, PASSWORD = "alice", "s3cret:pw"


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry"),
                          htpasswd=(USER, PASSWORD)) as reg:
        yield reg


@pytest.fixture(scope="module")
def pushed(peer: Peer, tmp_path_factory: pytest.TempPathFactory) -> str:
    work = tmp_path_factory.mktemp("image")
    layer = imagefactory.layer_from_entries(
        [imagefactory.File("hello", b"hello\n")], work / "blobs")
    image = imagefactory.build_oci_layout(work / "oci", [layer], ref_name="a")
    name = f"{peer.host}/private/app:1"
    skopeo_push(image.oci_ref, name, creds=f"{USER}:{PASSWORD}")
    return name


def lamina(root: Path, *args: str, env: dict[str, str], stdin: str = "") \
        -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          input=stdin, env={**os.environ, **env})


def test_basic_auth(require_root: None, peer: Peer, pushed: str, tmp_root: Path) -> None:
    env = {"DOCKER_CONFIG": str(tmp_root / "docker")}
    anon = lamina(tmp_root, "image", "pull", pushed, env=env)
    assert anon.returncode == Unauthorized.exit_code
    assert anon.stderr == (f"lamina: Unauthorized: {peer.host}: the registry wants a user "
                           "name and password (lamina login, or --user)\n")
    wrong = lamina(tmp_root, "image", "pull", "--user", f"{USER}:nope", pushed, env=env)
    assert wrong.returncode == Unauthorized.exit_code
    assert "unauthorized" in wrong.stderr and wrong.stderr.count("\n") == 1
    ok = lamina(tmp_root, "image", "pull", "--user", f"{USER}:{PASSWORD}", pushed, env=env)
    assert ok.returncode == 0, ok.stderr

    bad = lamina(tmp_root, "login", "-U", USER, "--password-stdin", peer.host, env=env,
                 stdin="wrong\n")
    assert bad.returncode == Unauthorized.exit_code, bad.stderr
    assert not (tmp_root / "docker" / "config.json").exists()
    good = lamina(tmp_root, "login", "-U", USER, "--password-stdin", peer.host, env=env,
                  stdin=f"{PASSWORD}\n")
    assert good.returncode == 0, good.stderr
    assert (tmp_root / "docker" / "config.json").stat().st_mode & 0o077 == 0
    lamina(tmp_root, "image", "rm", pushed, env=env)
    again = lamina(tmp_root, "image", "pull", pushed, env=env)
    assert again.returncode == 0, again.stderr
    out = lamina(tmp_root, "logout", peer.host, env=env)
    assert out.returncode == 0 and "Removed" in out.stdout
    after = lamina(tmp_root, "image", "pull", pushed, env=env)
    assert after.returncode == Unauthorized.exit_code
