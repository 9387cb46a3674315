"""Labels: the one rule every store applies to them (containerd's)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lamina.errors import InvalidArgument

__all__ = ["MAX_LABEL_SIZE", "update_labels", "validate_labels"]

MAX_LABEL_SIZE = 4096
"""A label's key plus value may not exceed this many bytes (UTF-8)."""


def validate_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of ``labels``; InvalidArgument for non-string or empty keys, non-string
    values, or a key plus value over :data:`MAX_LABEL_SIZE` bytes."""
    out: dict[str, str] = {}
    for key, value in (labels or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidArgument(f"label {key!r}: keys and values must be strings")
        if not key:
            raise InvalidArgument("label key must not be empty")
        size = len(key.encode()) + len(value.encode())
        if size > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label {key[:64]!r}: key and value are {size} bytes, "
                f"more than the limit of {MAX_LABEL_SIZE}"
            )
        out[key] = value
    return out


def update_labels(current: Mapping[str, str], new: Mapping[str, str],
                  fieldpaths: Sequence[str], *, what: str) -> dict[str, str]:
    """The labels an update leaves on ``what`` (containerd's rule, for every store).

    No fieldpaths or ``labels``: ``new`` replaces them all. ``labels.<key>``:
    that key takes its value in ``new``, or goes when it is empty or absent
    there. Any other path is InvalidArgument. Empty values are never kept.
    """
    labels = dict(new) if not fieldpaths else dict(current)
    for path in fieldpaths:
        if path == "labels":
            labels = dict(new)
        elif path.startswith("labels.") and path != "labels.":
            key = path[len("labels."):]
            labels[key] = new.get(key, "")
        else:
            raise InvalidArgument(f"cannot update field {path!r} of {what}: "
                                  "only labels and labels.<key> can change")
    return validate_labels({k: v for k, v in labels.items() if v})
