"""The skip policy (tests/conftest.py): in CI a skip fails unless the allowlist names
it with its reason, a skip of the whole module too; outside CI a skip stays a skip;
xfail is strict (pyproject.toml). Each case runs a real pytest on a small file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CASES = textwrap.dedent(
    """
    import pytest

    def test_passes():
        assert True

    def test_skips_imperatively():
        pytest.skip("a tool is not installed")

    @pytest.mark.skipif(True, reason="a marker says so")
    def test_skips_by_marker():
        pass

    def test_allowed():
        pytest.skip("cannot run in CI: allowed")

    def test_allowed_id_but_other_reason():
        pytest.skip("some other reason")

    @pytest.mark.xfail(reason="known")
    def test_xfail_that_passes():
        assert True

    @pytest.mark.xfail(reason="known")
    def test_xfail_that_fails():
        assert False
    """
)
ALLOW = textwrap.dedent(
    """
    # a comment
    *::test_allowed | cannot run in CI: * | the reason CI cannot run it
    *::test_allowed_id_but_other_reason | cannot run in CI: * | only that reason
    """
)


def _run(tmp_path: Path, *args: str, ci: str | None,
         cases: str = CASES) -> dict[str, str]:
    """Outcome of each test of ``cases`` run under the repository's pytest settings
    and conftest: "passed", "failed", "skipped" (xfail counts as skipped in JUnit)."""
    (tmp_path / "test_cases.py").write_text(cases)
    (tmp_path / "allow.txt").write_text(ALLOW)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = f"{REPO / 'tests'}{os.pathsep}{REPO / 'src'}"
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"),
         "--rootdir", str(tmp_path), "-p", "conftest", "-p", "no:cacheprovider",
         "--skip-allowlist", str(tmp_path / "allow.txt"), f"--junitxml={junit}",
         *args, str(tmp_path / "test_cases.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
        stdin=subprocess.DEVNULL)
    assert junit.exists(), proc.stdout + proc.stderr
    outcomes: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        outcome = ("failed" if tags & {"failure", "error"} else
                   "skipped" if "skipped" in tags else "passed")
        outcomes[case.get("name", "?")] = outcome
    return outcomes


def test_ci_fails_every_skip_the_allowlist_does_not_name(tmp_path: Path) -> None:
    assert _run(tmp_path, ci="true") == {
        "test_passes": "passed",
        "test_skips_imperatively": "failed",
        "test_skips_by_marker": "failed",
        "test_allowed": "skipped",
        "test_allowed_id_but_other_reason": "failed",
        "test_xfail_that_passes": "failed",  # strict
        "test_xfail_that_fails": "skipped",  # an xfail, not a skip
    }


@pytest.mark.parametrize(("ci", "args"), [(None, ()), ("false", ()), ("", ())])
def test_outside_ci_a_skip_stays_a_skip(tmp_path: Path, ci: str | None,
                                        args: tuple[str, ...]) -> None:
    got = _run(tmp_path, *args, ci=ci)
    assert got["test_skips_imperatively"] == "skipped"
    assert got["test_skips_by_marker"] == "skipped"
    assert got["test_xfail_that_passes"] == "failed"  # strict everywhere


def test_no_skips_option_outside_ci(tmp_path: Path) -> None:
    got = _run(tmp_path, "--no-skips", ci=None)
    assert got["test_skips_imperatively"] == "failed"
    assert got["test_allowed"] == "skipped"


def test_ci_fails_a_module_that_skips_itself(tmp_path: Path) -> None:
    cases = 'import pytest\npytest.skip("all of it", allow_module_level=True)\n' \
            "def test_never():\n    pass\n"
    got = _run(tmp_path, ci="1", cases=cases)
    assert "failed" in got.values(), got


def test_the_allowlist_entries_are_well_formed_and_say_why() -> None:
    from conftest import ALLOWLIST, read_allowlist

    entries = read_allowlist(ALLOWLIST)
    assert len(entries) <= 10, "the allowlist is meant to stay short"
    for e in entries:
        assert len(e.why.split()) >= 5, f"{e.nodeid}: say why it cannot run in CI"


def test_xfail_is_strict_in_the_project_settings() -> None:
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert settings["tool"]["pytest"]["ini_options"]["xfail_strict"] is True


def test_tmp_root_on_tmpfs_gets_a_disk_instead_of_a_skip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$LAMINA_TEST_TMP`` on tmpfs: the roots land on an ext4 image mounted there
    for the session (and unmounted after it), not in a skip."""
    from conftest import _fs_type, mounts_under, require_root_user

    require_root_user()
    shm = Path("/dev/shm")
    assert _fs_type(shm) == "tmpfs"
    base = Path(subprocess.check_output(["mktemp", "-d", "-p", str(shm)], text=True).strip())
    cases = textwrap.dedent(
        """
        import conftest

        def test_root_is_on_a_disk(tmp_root):
            assert conftest._fs_type(tmp_root) == "ext4"
            (tmp_root / "f").write_text("x")
        """
    )
    monkeypatch.setenv("LAMINA_TEST_TMP", str(base))
    try:
        got = _run(tmp_path, ci="true", cases=cases)
    finally:
        leftover = mounts_under(base)
        subprocess.run(["rm", "-rf", str(base)], check=False)
    assert got == {"test_root_is_on_a_disk": "passed"}
    assert leftover == []
