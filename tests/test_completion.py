"""``lamina completion bash`` (issue 20): the script, sourced in bash, completes lamina's
commands, verbs, options, option values and the names ``lamina ... ls -q`` lists."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user

LAMINA = [sys.executable, "-m", "lamina"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    done = subprocess.run([*LAMINA, "completion", "bash"], capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    path = tmp_path_factory.mktemp("completion") / "lamina.bash"
    path.write_text(done.stdout)
    # the script runs `lamina`: this checkout's, whatever PATH holds
    shim = path.parent / "bin" / "lamina"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {shlex.join(LAMINA)} \"$@\"\n")
    shim.chmod(0o755)
    return path


def complete(script: Path, line: str, cwd: Path | None = None) -> list[str]:
    """What TAB offers at the end of ``line`` (a trailing space starts a new word)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    program = (f"source {shlex.quote(str(script))}\n"
               f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
               f"COMP_CWORD={len(words) - 1}\n"
               "_lamina\n"
               'printf "%s\\n" "${COMPREPLY[@]}"\n')
    env = {**os.environ, "PATH": f"{script.parent / 'bin'}:{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True,
                          text=True, timeout=120, check=False, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return sorted(w for w in done.stdout.splitlines() if w)


def test_commands(script: Path) -> None:
    assert complete(script, "lamina im") == ["image", "images"]
    assert "completion" in complete(script, "lamina ")
    assert complete(script, "lamina --root /tmp/x --debug sn") == ["snapshot", "snapshots"]


def test_verbs_of_a_command_and_of_its_aliases(script: Path) -> None:
    offered = complete(script, "lamina image p")
    assert {"pull", "push"} <= set(offered)
    assert all(w.startswith("p") for w in offered)
    assert complete(script, "lamina images p") == offered
    assert complete(script, "lamina snapshot co") == ["commit"]


def test_options_of_the_verb_and_their_values(script: Path, tmp_path: Path) -> None:
    assert {"--label", "--target", "--mounts", "--help"} <= set(
        complete(script, "lamina snapshot prepare --"))
    assert "--snapshotter" in complete(script, "lamina --sn")
    assert {"overlay", "native"} <= set(complete(script, "lamina --snapshotter "))
    assert complete(script, "lamina config containerd --restrict-oom-score-adj f") == ["false"]
    # --opt=value: readline's words split at the = (and bash-completion's keep it whole)
    assert complete(script, "lamina --snapshotter = na") == ["native"]
    assert complete(script, "lamina --snapshotter=na") == ["native"]
    assert complete(script, "lamina --snapshotter = native sn") == ["snapshot", "snapshots"]
    (tmp_path / "layout.tar").touch()
    assert complete(script, "lamina image import lay", cwd=tmp_path) == ["layout.tar"]
    assert complete(script, "lamina --root la", cwd=tmp_path) == ["layout.tar"]
    # a value the option takes is not a verb: `--label image` stays in prepare
    assert complete(script, "lamina snapshot prepare --label image --mo") == ["--mounts"]


def test_names_come_from_ls_q(script: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for key in ("work", "wide"):
        done = subprocess.run([*LAMINA, "--root", str(root), "--snapshotter", "native",
                               "snapshot", "prepare", key], capture_output=True, text=True,
                              timeout=60, check=False, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
    line = f"lamina --root {root} --snapshotter native snapshot "
    assert complete(script, line + "info w") == ["wide", "work"]
    assert complete(script, line + "rm work wi") == ["wide"]  # KEY... repeats
    # the second positional of commit is a snapshot; the first is a new name
    assert complete(script, line + "commit ") == []
    assert complete(script, line + "commit base w") == ["wide", "work"]


def test_only_bash() -> None:
    done = subprocess.run([*LAMINA, "completion", "zsh"], capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def test_image_names_come_from_image_ls(script: Path, tmp_root: Path) -> None:
    require_root_user()
    work = tmp_root / "w"
    work.mkdir()
    f.build_oci_layout(work / "layout", [f.minimal_layer(work)], ref_name="demo:1")
    root = tmp_root / "root"
    done = subprocess.run([*LAMINA, "--root", str(root), "image", "import", "-q",
                           "--no-unpack", str(work / "layout")], capture_output=True,
                          text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    for line in ("image rm de", "run --rm -e A=1 de", "container create de"):
        assert complete(script, f"lamina --root {root} {line}") == ["demo:1"], line
    # the container's ID is a new name: nothing to offer
    assert complete(script, f"lamina --root {root} container create demo:1 ") == []
