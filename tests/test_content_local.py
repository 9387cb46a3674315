"""Run the content-store conformance cases against the local store."""

from __future__ import annotations

from pathlib import Path

import pytest

from lamina.content.local import LocalContentStore
from lamina.content.testsuite import CASES, Case


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_conformance(case: Case, tmp_path: Path) -> None:
    case(lambda: LocalContentStore(tmp_path / "content"))
