"""Checkpoints travel through a registry: checkpoint + push on one root, pull + restore on
another, and the process goes on counting from where it was dumped."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_peer import Registry as Peer
from registry_peer import http_get, running_registry, second_host
from test_containers_checkpoint import (
    V1,
    Cli,
    assert_resumed,
    checkpoint,
    cli,
    dumped_count,
    layout,
    restore,
    start_counter,
)

__all__ = ["cli", "layout"]  # fixtures used here


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


def test_checkpoint_moves_through_registry(cli: Cli, peer: Peer, tmp_root: Path) -> None:
    ref = f"{peer.host}/checkpoints/mover:1"
    start_counter(cli, "mover", above=20)
    digest, _ = checkpoint(cli, "--exit", "mover", ref)
    dumped = dumped_count(cli, "mover")
    pushed = cli("image", "push", ref)
    assert digest in pushed.stdout
    status, _ = http_get(peer.host, f"/v2/checkpoints/mover/manifests/{digest}",
                         accept="application/vnd.oci.image.index.v1+json")
    assert status == 200

    other = tmp_root / "other"
    pulled = cli("image", "pull", ref, root=other)
    assert digest in pulled.stdout
    pid, _ = restore(cli, ref, "moved", root=other)
    assert pid > 0
    assert_resumed(cli, "moved", dumped, root=other)
    names = sorted(i["name"] for i in cli.json("image", "ls", "--json", root=other))
    assert names == sorted([ref, V1])  # the container's image registered from the index
    cli("container", "rm", "--force", "moved", root=other)
    cli("container", "rm", "--force", "mover")


def test_second_host_in_a_network_namespace(cli: Cli, tmp_root: Path,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """The pulling "host" lives in its own network namespace and reaches the registry over
    a veth pair (not loopback: --plain-http)."""
    with second_host() as (ns, host_ip, _), running_registry(
            tmp_path_factory.mktemp("veth-registry"), addr=host_ip) as reg:
        ref = f"{reg.host}/checkpoints/far:1"
        start_counter(cli, "far", above=20)
        digest, _ = checkpoint(cli, "--exit", "far", ref)
        dumped = dumped_count(cli, "far")
        cli("image", "push", "--plain-http", ref)
        other = tmp_root / "far-host"
        pulled = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "lamina", "--root", str(other),
             "image", "pull", "--plain-http", ref],
            capture_output=True, text=True, timeout=120, check=False)
        assert pulled.returncode == 0, pulled.stderr
        assert digest in pulled.stdout
        # this namespace cannot reach the registry on loopback: the veth carried it
        unreachable = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "lamina", "--root", str(other),
             "image", "pull", f"127.0.0.1:{reg.port}/checkpoints/far:1"],
            capture_output=True, text=True, timeout=120, check=False)
        assert unreachable.returncode == 7 and "Connection refused" in unreachable.stderr
    cli.roots.append(other)
    restore(cli, ref, "near", root=other)
    assert_resumed(cli, "near", dumped, root=other)
    cli("container", "rm", "--force", "near", root=other)
    cli("container", "rm", "--force", "far")
