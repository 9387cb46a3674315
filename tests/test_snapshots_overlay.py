"""The snapshot conformance suite against OverlaySnapshotter (real overlayfs mounts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.snapshots import testsuite
from lamina.snapshots.overlay import OverlaySnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.mark.parametrize("case", testsuite.params())
def test_overlay(case: testsuite.Case, tmp_path: Path) -> None:
    testsuite.run(case, OverlaySnapshotter, tmp_path)
