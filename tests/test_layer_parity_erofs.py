"""The layer-parity corpus on the erofs snapshotter: the mounted tree of every case
equals overlay's entry by entry, and every rejection is the same line.

Two ways onto erofs: the unpacker (layers written as images from their tar
streams, or applied on a mounted snapshot when a layer needs its lowers), and
``lamina diff apply`` onto an active snapshot, whose commit turns the upper
directory into an image. Overlay's staged unpack is the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import treesum
from conftest import require_root_user
from test_archive_support import make_tar
from test_layer_parity import CASES, Case, Stack, _names, _tree_of, check_expect, run_mode

from lamina.errors import InvalidArgument
from lamina.metadata.root import Root


def _unpacked(stack: Stack) -> dict[str, Any] | str:
    before = _names(stack.root, "erofs")
    try:
        chain = stack.unpack("erofs")
    except InvalidArgument as exc:
        left = _names(stack.root, "erofs") - before - set(stack.chains[:-1])
        assert not left, f"erofs: the failed unpack left {left}"
        return exc.message
    return _tree_of(stack.root, "erofs", chain)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layer_parity_erofs(case: Case, tmp_root: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    require_root_user()
    root = Root(tmp_root / "r")
    try:
        stack = Stack(root, [make_tar(layer) for layer in [*case.base, case.layer]])
        results = {"staged": run_mode("staged", stack, tmp_root, capsys),
                   "erofs": _unpacked(stack),
                   "cli-erofs": run_mode("cli-erofs", stack, tmp_root, capsys)}
    finally:
        root.close()
    if case.reject is not None:
        assert len(set(map(str, results.values()))) == 1, results
        return
    ref = results["staged"]
    assert isinstance(ref, dict), ref
    for mode, got in results.items():
        assert isinstance(got, dict), f"{mode}: rejected: {got}"
        check_expect(case, got, mode)
        assert treesum.diff(ref, got) == [], f"{mode} differs from overlay"
