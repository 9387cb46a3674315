"""The snapshot conformance suite against NativeSnapshotter (copies, bind mounts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lamina.snapshots import testsuite
from lamina.snapshots.native import NativeSnapshotter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.mark.parametrize("case", testsuite.params())
def test_native(case: testsuite.Case, tmp_path: Path) -> None:
    testsuite.run(case, NativeSnapshotter, tmp_path)
