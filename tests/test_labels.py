"""containerd's label update rule, shared by the snapshot, content and image stores."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidArgument
from lamina.labels import MAX_LABEL_SIZE, update_labels

CURRENT = {"a": "1", "b": "2"}


@pytest.mark.parametrize(("new", "paths", "expected"), [
    ({"c": "3", "d": ""}, [], {"c": "3"}),  # no paths: replace, empty values dropped
    ({"c": "3"}, ["labels"], {"c": "3"}),
    ({"a": "9", "c": "3"}, ["labels.a"], {"a": "9", "b": "2"}),  # only the named key
    ({}, ["labels.a"], {"b": "2"}),  # absent in new: deleted
    ({"b": ""}, ["labels.b", "labels.zz"], {"a": "1"}),  # empty: deleted; unknown: no-op
    ({"x": "1"}, ["labels.a", "labels"], {"x": "1"}),
])
def test_update_rule(new: dict[str, str], paths: list[str], expected: dict[str, str]) -> None:
    assert update_labels(CURRENT, new, paths, what="thing") == expected
    assert CURRENT == {"a": "1", "b": "2"}  # the caller's mapping is not changed


@pytest.mark.parametrize("path", ["name", "labels.", "labelsx", "parent", ""])
def test_other_paths_are_invalid(path: str) -> None:
    with pytest.raises(InvalidArgument, match=f"cannot update field '{path}' of thing"):
        update_labels(CURRENT, {}, [path], what="thing")


def test_result_is_validated() -> None:
    with pytest.raises(InvalidArgument, match="limit"):
        update_labels({}, {"k": "v" * MAX_LABEL_SIZE}, ["labels.k"], what="thing")
