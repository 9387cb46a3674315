"""lamina.util.jsondoc: JSON from outside, with its nesting bounded."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidArgument
from lamina.util import jsondoc


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_nesting_up_to_the_bound_is_read() -> None:
    assert jsondoc.loads(nested(jsondoc.MAX_DEPTH), "doc") is not None
    assert jsondoc.loads(b'{"a": {"b": [1, {"c": null}]}}', "doc", max_depth=4) == \
        {"a": {"b": [1, {"c": None}]}}


@pytest.mark.parametrize("data", [nested(jsondoc.MAX_DEPTH + 1), nested(1_000_000),
                                  b'{"a":' * 100_000 + b"1" + b"}" * 100_000],
                         ids=["one-too-deep", "a-million-deep", "objects"])
def test_deeper_is_one_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"^manifest: JSON nested deeper than 64 levels$"):
        jsondoc.loads(data, "manifest")


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"[1,]"])
def test_not_json(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"^doc: not valid JSON"):
        jsondoc.loads(data, "doc")


def test_an_object_is_asked_for() -> None:
    with pytest.raises(InvalidArgument, match="expected a JSON object"):
        jsondoc.loads_object(b"[1]", "doc")
    assert jsondoc.loads_object(b'{"x": 1}', "doc") == {"x": 1}
