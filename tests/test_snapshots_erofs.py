"""The snapshot conformance suite against ErofsSnapshotter (EROFS layer images, real mounts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.snapshots import testsuite
from lamina.snapshots.erofs import ErofsSnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.mark.parametrize("case", testsuite.params())
def test_erofs(case: testsuite.Case, tmp_path: Path) -> None:
    testsuite.run(case, ErofsSnapshotter, tmp_path)
