"""nerdctl's top-level words (issue 20), run as ``lamina`` processes: ``pull``,
``push``, ``rmi`` and ``ps [-a] [-q]`` are ``image pull``, ``image push``,
``image rm`` and ``container ls``, and each imports only its own command module."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user, require_tools
from test_containers_cli import cleanup_tasks
from test_startup_imports import modules_after

LAMINA = [sys.executable, "-m", "lamina"]
IDLE = "trap 'exit 0' TERM; while true; do sleep 0.1; done"


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LAMINA_DEBUG", "LAMINA_CONFIG")}
    return subprocess.run([*LAMINA, "--root", str(root), *args], capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture
def root(tmp_root: Path) -> Path:
    """A root holding demo:1, an image of sh and sleep."""
    require_root_user()
    w = tmp_root / "w"
    rootfs = f.minimal_rootfs(w / "rootfs", ("sh", "sleep"))
    f.build_oci_layout(w / "layout", [f.layer_from_dir(rootfs, w / "blobs")], ref_name="demo:1")
    done = lamina(tmp_root / "root", "image", "import", "-q", str(w / "layout"))
    assert done.returncode == 0, done.stderr
    return tmp_root / "root"


def test_rmi_is_image_rm(root: Path) -> None:
    missing, long = lamina(root, "rmi", "demo:2"), lamina(root, "image", "rm", "demo:2")
    assert missing.returncode == long.returncode == 3
    assert missing.stderr == long.stderr
    done = lamina(root, "rmi", "demo:1")
    assert done.returncode == 0, done.stderr
    assert "demo:1" not in lamina(root, "image", "ls").stdout


def test_pull_and_push_are_image_pull_and_push(tmp_path: Path) -> None:
    # nothing listens on 127.0.0.1:9: both say so as the image commands do
    for verb in ("pull", "push"):
        args = (verb, "127.0.0.1:9/app:1") if verb == "pull" else (verb, "app:1")
        short = lamina(tmp_path / "r", *args)
        long = lamina(tmp_path / "r", "image", *args)
        assert short.returncode == long.returncode != 0
        assert short.stderr == long.stderr
    assert lamina(tmp_path / "r", "pull", "--help").stdout.startswith("usage: lamina image pull")


def test_a_mistyped_verb_is_suggested(tmp_path: Path) -> None:
    done = lamina(tmp_path / "r", "pul", "x")
    assert done.returncode == 2
    assert "did you mean 'pull'?" in done.stderr


@pytest.fixture
def containers(root: Path) -> Iterator[Path]:
    require_tools("runc")
    try:
        assert lamina(root, "container", "create", "demo:1", "up", "sh", "-c", IDLE
                      ).returncode == 0
        assert lamina(root, "task", "start", "-d", "up").returncode == 0
        assert lamina(root, "container", "create", "demo:1", "idle").returncode == 0
        yield root
    finally:
        assert not cleanup_tasks(root)


def test_ps_lists_running_containers_and_a_all(containers: Path) -> None:
    shown = lamina(containers, "ps")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["CONTAINER", "IMAGE", "TASK", "REVISION"]
    assert [line.split()[0] for line in lines[1:]] == ["up"]
    assert sorted(lamina(containers, "ps", "-a", "-q").stdout.split()) == ["idle", "up"]
    assert sorted(lamina(containers, "ps", "-aq").stdout.split()) == ["idle", "up"]
    assert lamina(containers, "ps", "-q").stdout.split() == ["up"]
    assert lamina(containers, "ps", "--all").stdout == lamina(containers, "container", "ls").stdout


@pytest.mark.parametrize(("words", "module"), [
    (("rmi", "x:1"), "image"), (("ps",), "container"), (("pull", "-h"), "image"),
])
def test_a_verb_imports_only_its_command_module(tmp_path: Path, words: tuple[str, ...],
                                                 module: str) -> None:
    others = {"container", "snapshot", "content", "task", "run", "serve", "gc"} - {module}
    loaded = {m.removeprefix("lamina.cli.") for m in modules_after(tmp_path / "r", *words, ok=False)
              if m.startswith("lamina.cli.")}
    assert module in loaded
    assert not loaded & others
