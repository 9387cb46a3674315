"""A format migration killed at each of its crash points is finished by the next open.

Both fixtures (tests/fixtures/README.md) are opened by ``lamina image ls`` with
``LAMINA_CRASH_AFTER=N`` for N = 1, 2, ... until the open completes: a lamina 0.1
root (format 1, migrated through 2 to the current format) and a root the CLI and
containerd shared before owners were recorded (format 2). After each kill the user
just runs lamina again: the migration must finish, the format file must say the
current format, ``check`` must be consistent and the root must hold what it held.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_root_user

from lamina.metadata.formats import FORMAT, FORMAT_FILE

FIXTURES = Path(__file__).parent / "fixtures"
MAX_POINTS = 50


def _lamina(root: Path, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def _held(root: Path) -> dict[str, object]:
    """What a user sees of the root: images, snapshots with owners, blobs."""
    images = json.loads(_lamina(root, "image", "ls", "--json").stdout)
    snaps = json.loads(_lamina(root, "snapshot", "ls", "--json").stdout)
    blobs = json.loads(_lamina(root, "content", "ls", "--json").stdout)
    return {"images": sorted(i["name"] for i in images),
            "snapshots": sorted((s["name"], s["owner"]) for s in snaps),
            "blobs": sorted(b["digest"] for b in blobs)}


@pytest.mark.parametrize("fixture", ["root-format1.tar.gz", "root-format2-shared.tar.gz"])
def test_a_killed_migration_is_finished_by_the_next_open(tmp_path: Path, fixture: str) -> None:
    require_root_user()
    template = tmp_path / "template"
    template.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xpzf", str(FIXTURES / fixture), "-C",
                    str(template)], check=True)
    reference = tmp_path / "reference"
    shutil.copytree(template, reference, symlinks=True)
    assert _lamina(reference, "image", "ls").returncode == 0
    expected = _held(reference)
    assert expected["images"] and expected["blobs"]
    points: list[str] = []
    for n in range(1, MAX_POINTS + 1):
        root = tmp_path / f"n{n}"
        shutil.copytree(template, root, symlinks=True)
        log = tmp_path / f"n{n}.log"
        first = _lamina(root, "image", "ls",
                        env={"LAMINA_CRASH_AFTER": str(n), "LAMINA_CRASH_LOG": str(log)})
        if first.returncode == 0:
            shutil.rmtree(root)
            break
        assert first.returncode == -9, (n, first.stderr)
        points.append(log.read_text().split()[1])
        again = _lamina(root, "image", "ls")
        assert again.returncode == 0, (n, points[-1], again.stderr)
        assert json.loads((root / FORMAT_FILE).read_text()) == {"format": FORMAT}
        assert _held(root) == expected, (n, points[-1])
        check = _lamina(root, "check")
        assert check.stdout.strip() == "consistent", (n, points[-1], check.stdout)
        shutil.rmtree(root)
    else:
        pytest.fail(f"opening {fixture} passed more than {MAX_POINTS} crash points")
    print(f"\n{fixture}: {len(points)} kill points: {', '.join(points)}")
    assert "format.step-done" in points and "format.written" in points
    assert any(p.startswith("format.3.") for p in points)
