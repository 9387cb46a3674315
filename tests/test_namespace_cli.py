"""``lamina -n NAMESPACE`` (issue 20), as ctr and nerdctl users type it: lamina's own
objects are in namespace default; another namespace lists the snapshots containerd
keeps in it (keys ``<namespace>/<n>/...``), read-only, and refuses every command on
lamina's own images, containers, leases and content in one NotImplemented line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_root_user

from lamina.metadata.root import Root
from lamina.owners import CONTAINERD

LAMINA = [sys.executable, "-m", "lamina"]
K8S = {"k8s.io/1/base", "k8s.io/2/ctr"}


def lamina(root: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("LAMINA_DEBUG", "LAMINA_NAMESPACE", "CONTAINERD_NAMESPACE")}
    return subprocess.run([*LAMINA, "--root", str(root), *args], capture_output=True,
                          text=True, timeout=120, env={**clean, **(env or {})},
                          stdin=subprocess.DEVNULL, check=False)


def keys(done: subprocess.CompletedProcess[str]) -> set[str]:
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.fixture
def shared(tmp_root: Path) -> Path:
    """A root holding lamina's snapshot ``mine`` and containerd's in two namespaces."""
    require_root_user()
    root = Root(tmp_root / "root")
    try:
        sn = root.snapshotter("native")
        sn.prepare("mine-work", "")
        sn.commit("mine", "mine-work")
        theirs = sn.scoped(CONTAINERD)  # type: ignore[attr-defined]
        theirs.prepare("k8s.io/0/work", "")
        theirs.commit("k8s.io/1/base", "k8s.io/0/work")
        theirs.prepare("k8s.io/2/ctr", "k8s.io/1/base")
        theirs.prepare("default/3/other", "")
    finally:
        root.close()
    return tmp_root / "root"


def test_a_namespace_lists_containerds_snapshots_there(shared: Path) -> None:
    everything = {"mine", "k8s.io/1/base", "k8s.io/2/ctr", "default/3/other"}
    ls = ("--snapshotter", "native", "snapshot", "ls", "-q")
    assert keys(lamina(shared, *ls)) == everything  # lamina's default: as before
    assert keys(lamina(shared, "-n", "default", *ls)) == everything
    assert keys(lamina(shared, "-n", "k8s.io", *ls)) == K8S
    assert keys(lamina(shared, "--namespace", "k8s.io", *ls)) == K8S
    assert keys(lamina(shared, *ls, env={"LAMINA_NAMESPACE": "k8s.io"})) == K8S
    assert keys(lamina(shared, *ls, env={"CONTAINERD_NAMESPACE": "k8s.io"})) == K8S
    assert keys(lamina(shared, "-n", "default", *ls,
                       env={"CONTAINERD_NAMESPACE": "k8s.io"})) == everything
    assert keys(lamina(shared, "-n", "moby", *ls)) == set()
    listed = json.loads(lamina(shared, "-n", "k8s.io", "--snapshotter", "native",
                               "snapshot", "ls", "--json").stdout)
    assert {i["owner"] for i in listed} == {"containerd:k8s.io"}
    info = lamina(shared, "-n", "k8s.io", "--snapshotter", "native", "snapshot", "info",
                  "k8s.io/1/base")
    assert info.returncode == 0 and json.loads(info.stdout)["name"] == "k8s.io/1/base"


def one_line(done: subprocess.CompletedProcess[str], code: int, start: str) -> str:
    assert done.returncode == code, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(start), done.stderr
    return done.stderr


def test_a_namespace_is_read_only_and_holds_nothing_of_lamina(shared: Path) -> None:
    sn = ("-n", "k8s.io", "--snapshotter", "native", "snapshot")
    one_line(lamina(shared, *sn, "rm", "k8s.io/2/ctr"), 5, "lamina: FailedPrecondition: ")
    one_line(lamina(shared, *sn, "prepare", "k8s.io/9/new", "k8s.io/1/base"), 5,
             "lamina: FailedPrecondition: ")
    one_line(lamina(shared, *sn, "info", "mine"), 3, "lamina: NotFound: ")
    for command in (["image", "ls"], ["container", "ls"], ["lease", "ls"], ["content", "ls"],
                    ["gc"]):
        line = one_line(lamina(shared, "-n", "k8s.io", *command), 8,
                        "lamina: NotImplemented: ")
        assert "namespace 'default' only" in line
    assert keys(lamina(shared, "--snapshotter", "native", "snapshot", "ls", "-q")) >= K8S
    one_line(lamina(shared, "-n", "k8s/io", "image", "ls"), 6, "lamina: InvalidArgument: ")
