"""The conformance suite every :class:`~lamina.snapshots.Snapshotter` must pass.

Each case is a plain function ``case(sn, work) -> None`` registered with the
:func:`~lamina.snapshots.testsuite.harness.case` decorator into :data:`CASES`; it
gets a fresh snapshotter and an empty work directory (for mount points and
reference trees), performs real mounts, and raises ``AssertionError`` (or a
:class:`~lamina.errors.LaminaError`) on failure and :class:`Skip` when a
capability it needs is missing. Cases branch on
:attr:`Snapshotter.capabilities`, never on a snapshotter's name.

An implementation's test file is a small adapter::

    import pytest
    from pathlib import Path
    from lamina.snapshots import testsuite
    from lamina.snapshots.overlay import OverlaySnapshotter

    @pytest.mark.parametrize("case", testsuite.params())
    def test_overlay(case: testsuite.Case, tmp_path: Path) -> None:
        testsuite.run(case, OverlaySnapshotter, tmp_path)

:func:`run` builds ``tmp_path/root`` (handed to the factory) and
``tmp_path/work``, runs the case, unmounts anything left mounted below
``tmp_path`` and closes the snapshotter. For a snapshotter that needs more
set-up (a server, say), make the factory do it, or use :func:`environment`
directly in a fixture. :func:`params` marks slow cases ``slow``.

A case is written with the helpers of :mod:`lamina.snapshots.testsuite.harness`
(:func:`~lamina.snapshots.testsuite.harness.case`, ``check_snapshots``,
``expect_error``, ``mounted``, ``require``...); this package exports what an
adapter needs. Filesystem expectations are written with the small language of
:mod:`lamina.snapshots.testsuite.fstest` (``CreateFile``, ``CreateDir``,
``Remove``, ``Rename``, ``Chown``, ``Link``, ``Symlink``...), applied both to
the mounted snapshot and to a plain directory whose tree must then be equal.
"""

from __future__ import annotations

from lamina.snapshots.testsuite import cases_fs, cases_meta
from lamina.snapshots.testsuite.harness import (
    CASES,
    Case,
    CaseFn,
    Factory,
    Skip,
    environment,
    get,
    params,
    run,
)

__all__ = ["CASES", "Case", "CaseFn", "Factory", "Skip", "cases_fs", "cases_meta",
           "environment", "get", "params", "run"]
