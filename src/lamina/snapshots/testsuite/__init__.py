"""The conformance suite every :class:`~lamina.snapshots.Snapshotter` must pass.

Each case is a plain function ``case(sn, work) -> None`` registered with the
:func:`case` decorator into :data:`CASES`; it gets a fresh snapshotter and an
empty work directory (for mount points and reference trees), performs real
mounts, and raises ``AssertionError`` (or a :class:`~lamina.errors.LaminaError`)
on failure and :class:`Skip` when a capability it needs is missing. Cases
branch on :attr:`Snapshotter.capabilities`, never on a snapshotter's name.

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

Filesystem expectations are written with the small language of
:mod:`lamina.snapshots.testsuite.fstest` (``CreateFile``, ``CreateDir``,
``Remove``, ``Rename``, ``Chown``, ``Link``, ``Symlink``...), applied both to
the mounted snapshot and to a plain directory whose tree must then be equal.
"""

from __future__ import annotations

from lamina.snapshots.testsuite import cases_fs, cases_meta
from lamina.snapshots.testsuite.core import (
    CASES,
    LABELS,
    Case,
    CaseFn,
    Factory,
    Skip,
    case,
    check_snapshots,
    create_snapshot,
    environment,
    expect_error,
    mounted,
    params,
    require,
    run,
    same_tree,
)

__all__ = [
    "CASES",
    "LABELS",
    "Case",
    "CaseFn",
    "Factory",
    "Skip",
    "case",
    "cases_fs",
    "cases_meta",
    "check_snapshots",
    "create_snapshot",
    "environment",
    "expect_error",
    "get",
    "mounted",
    "params",
    "require",
    "run",
    "same_tree",
]


def get(name: str) -> Case:
    """The registered case called ``name``."""
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)
