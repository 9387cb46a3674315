"""The filters of ``image ls``: docker's and nerdctl's ``--filter KEY=VALUE``.

* ``reference=PATTERN``: the name matches a glob whose ``*``, ``?`` and
  ``[…]`` stay within one ``/``-separated part (docker's ``path.Match``); the
  repository alone matches too, so ``reference=app`` finds every tag of
  ``app``, and so does every spelling of the name
  (:func:`lamina.oci.reference.spellings`: ``docker.io/library/alpine:3`` is
  ``alpine:3``);
* ``before=REF`` / ``since=REF``: recorded here before / after image ``REF``;
* ``label=KEY`` / ``label=KEY=VALUE``: the image record has that label (with
  that value), in containerd's selector semantics (:mod:`lamina.util.filters`);
* ``dangling=true|false``: only a digest names the image (``app@sha256:…``), or
  not: lamina keeps no image without a name, so this is the nearest to docker's
  untagged images.

Several ``reference`` filters match when any does; every other filter must
match. An unknown key or a malformed value is InvalidArgument.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from datetime import datetime

from lamina.errors import InvalidArgument
from lamina.metadata.images import Image
from lamina.oci.reference import spellings, split_name

__all__ = ["KEYS", "ImageFilter", "parse_filters"]

KEYS = ("before", "dangling", "label", "reference", "since")

_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}

ImageFilter = Callable[[Image], bool]


def _glob(pattern: str, name: str) -> bool:
    want, have = pattern.split("/"), name.split("/")
    return len(want) == len(have) and all(
        fnmatch.fnmatchcase(h, w) for w, h in zip(want, have, strict=True))


def _candidates(name: str) -> list[str]:
    """What a reference pattern is matched with: every spelling of ``name`` and the
    repository of each."""
    out = spellings(name)
    return [*out, *(split_name(s)[0] for s in out)]


def _created(image: Image) -> datetime:
    return image.created or datetime.min


def parse_filters(texts: Sequence[str], *, lookup: Callable[[str], Image]) -> ImageFilter:
    """One test for ``texts`` (``KEY=VALUE`` each); ``lookup`` finds the image that
    ``before`` and ``since`` name (NotFound when it does not exist)."""
    references: list[str] = []
    tests: list[ImageFilter] = []
    for text in texts:
        key, eq, value = text.partition("=")
        if key not in KEYS:
            raise InvalidArgument(f"unknown image filter {key!r} in {text!r} "
                                  f"(known: {', '.join(KEYS)})")
        if not eq or (not value and key != "label"):
            raise InvalidArgument(f"image filter {text!r}: expected {key}=VALUE")
        if key == "reference":
            references.append(value)
        elif key in ("before", "since"):
            tests.append(_when(key, _created(lookup(value))))
        elif key == "label":
            tests.append(_label(text, value))
        else:
            tests.append(_dangling(text, value))
    if references:
        tests.append(lambda i: any(_glob(p, s) for p in references
                                   for s in _candidates(i.name)))
    return lambda image: all(t(image) for t in tests)


def _when(key: str, mark: datetime) -> ImageFilter:
    if key == "before":
        return lambda i: _created(i) < mark
    return lambda i: _created(i) > mark


def _dangling(text: str, value: str) -> ImageFilter:
    wanted = _BOOLEANS.get(value.lower())
    if wanted is None:
        raise InvalidArgument(f"image filter {text!r}: expected true or false")
    return lambda i: (split_name(i.name)[1] == "") == wanted


def _label(text: str, value: str) -> ImageFilter:
    name, eq, wanted = value.partition("=")
    if not name:
        raise InvalidArgument(f"image filter {text!r}: expected label=KEY[=VALUE]")
    from lamina.util.filters import Selector, make_lookup  # for a label filter only

    selector = Selector(("labels", name), "==" if eq else None, wanted)
    return lambda i: selector(make_lookup({}, dict(i.labels)))
