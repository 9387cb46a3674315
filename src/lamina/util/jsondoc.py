"""JSON from outside (registries, archives, token servers), parsed with a depth bound.

``json.loads`` recurses once per level of nesting: a document of a million
``[`` raises ``RecursionError``, and one just under the interpreter's limit
parses but breaks the first recursive walk over it. :func:`loads` refuses
anything nested deeper than ``max_depth`` (the documents lamina reads are a
handful of levels deep) and anything that is not JSON, as one
:class:`~lamina.errors.InvalidArgument` naming what was being read.
"""

from __future__ import annotations

import json
from typing import Any

from lamina.errors import InvalidArgument

__all__ = ["MAX_DEPTH", "loads", "loads_object"]

MAX_DEPTH = 64


def _depth_ok(obj: Any, max_depth: int) -> bool:
    """Whether no container in ``obj`` sits deeper than ``max_depth`` (iterative)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def loads(data: bytes | str, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of ``data``; InvalidArgument when it is not JSON or nests too deep."""
    try:
        obj = json.loads(data)
    except RecursionError:
        obj = None
        deep = True
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{what}: not valid JSON: {exc}") from exc
    else:
        deep = not _depth_ok(obj, max_depth)
    if deep:
        raise InvalidArgument(f"{what}: JSON nested deeper than {max_depth} levels")
    return obj


def loads_object(data: bytes | str, what: str, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """As :func:`loads`, for a document that must be a JSON object."""
    obj = loads(data, what, max_depth=max_depth)
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{what}: expected a JSON object")
    return obj
