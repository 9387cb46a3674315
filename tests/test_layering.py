"""scripts/layering.py: the checker CI runs fails on an upward import, a
sideways one, a cycle and a package with no layer, and passes the real tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "layering.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=60)


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for name, text in {"lamina/__init__.py": "", **files}.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_the_checkout_goes_down_the_layers() -> None:
    result = run()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every import goes down, no cycles" in result.stdout


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    src = tree(tmp_path, {
        "lamina/errors.py": "",
        "lamina/fs/__init__.py": "",
        "lamina/fs/tree.py": "from lamina.errors import x\n",
        "lamina/content/__init__.py": "from lamina.fs import tree\n",
    })
    result = run("--src", str(src))
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(("files", "expected"), [
    ({"lamina/fs/__init__.py": "",
      "lamina/fs/tree.py": "def f():\n    from lamina.content import store\n",
      "lamina/content/__init__.py": "", "lamina/content/store.py": ""},
     "lamina.fs.tree imports lamina.content.store: upward (fs is below content)"),
    ({"lamina/content/__init__.py": "from lamina.erofs import image\n",
      "lamina/erofs/__init__.py": "", "lamina/erofs/image.py": ""},
     "lamina.content imports lamina.erofs.image: sideways"),
    ({"lamina/mounts/__init__.py": "", "lamina/mounts/a.py": "from lamina.mounts import b\n",
      "lamina/mounts/b.py": "from typing import TYPE_CHECKING\n"
                            "if TYPE_CHECKING:\n    from lamina.mounts.a import A\n"},
     "cycle: lamina.mounts.a -> lamina.mounts.b -> lamina.mounts.a"),
    ({"lamina/newthing/__init__.py": ""},
     "lamina.newthing: package 'newthing' has no layer"),
], ids=["upward", "sideways", "cycle-under-type-checking", "unknown-package"])
def test_a_bad_import_fails(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    result = run("--src", str(tree(tmp_path, files)))
    assert result.returncode == 1
    assert expected in result.stdout, result.stdout
