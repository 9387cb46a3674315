"""Which children of an index a platform wants, decided before anything is fetched.

An index lists manifests (or nested indexes), each with an optional
``platform``. For each wanted platform the *first* child whose platform
matches is taken (``os`` and ``architecture`` equal; ``variant`` too when the
wanted platform names one) — one child per platform, as containerd's
``LimitManifests(…, 1)`` keeps only the best match. A child without a
platform is taken only when no child matches and it is the index's only
manifest: an index listing several manifests without a platform says nothing
about which one is the image, and guessing would fetch (or run) an arbitrary
one; such an index is NotFound for a platform, and can be pulled with every
platform or by a child's digest. Children that are not manifests or indexes
(a checkpoint's blobs) are not a platform's: they are always kept.

A single manifest names its platform in its config (``os``, ``architecture``,
``variant``); asked for platforms explicitly, :func:`require_config_platform`
refuses one for another platform with NotFound, as containerd's "no match for
platform in manifest" does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lamina.errors import InvalidArgument, NotFound
from lamina.oci.types import INDEX_TYPES, MANIFEST_TYPES, Descriptor

__all__ = ["matches", "parse_platform", "require_config_platform", "select_children"]


def parse_platform(text: str) -> dict[str, str]:
    """``os/arch[/variant]`` (``linux/arm64/v8``) as an OCI platform object."""
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise InvalidArgument(f"invalid platform {text!r}: want os/arch[/variant]")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def matches(platform: Mapping[str, Any] | None, want: Mapping[str, str]) -> bool:
    """Whether a descriptor's ``platform`` is ``want`` (``os/arch[/variant]``)."""
    if not platform:
        return False
    if platform.get("os") != want["os"] or \
            platform.get("architecture") != want["architecture"]:
        return False
    return "variant" not in want or platform.get("variant") == want["variant"]


def _name(want: Mapping[str, str]) -> str:
    return "/".join(want[k] for k in ("os", "architecture", "variant") if k in want)


def require_config_platform(config: Mapping[str, Any], wanted: Sequence[Mapping[str, str]],
                            *, where: str) -> None:
    """NotFound unless the image ``config`` (a manifest's) is for one of ``wanted``;
    a config naming no variant claims none, so any variant of its architecture takes it."""
    own = {k: v for k in ("os", "architecture", "variant")
           if isinstance(v := config.get(k), str) and v}
    if any(matches(own, want if "variant" in own else
                   {k: v for k, v in want.items() if k != "variant"}) for want in wanted):
        return
    plats = ", ".join(_name(w) for w in wanted)
    raise NotFound(f"{where}: no match for platform in manifest: it is for "
                   f"{_name(own) or 'no platform'}, not {plats}")


def select_children(children: Sequence[Descriptor], wanted: Sequence[Mapping[str, str]],
                    *, where: str) -> list[Descriptor]:
    """The children of index ``where`` to follow for ``wanted`` (see the module docs).

    NotFound (naming the platforms) when the index lists images but none for them."""
    images = [c for c in children if c.media_type in MANIFEST_TYPES | INDEX_TYPES]
    chosen: dict[str, Descriptor] = {}
    for want in wanted:
        best = next((c for c in images if matches(c.platform, want)), None)
        if best is not None:
            chosen.setdefault(best.digest, best)
    if not chosen and len(images) == 1 and not images[0].platform:
        chosen[images[0].digest] = images[0]
    if images and not chosen:
        plats = ", ".join(_name(w) for w in wanted)
        unnamed = sum(1 for c in images if not c.platform)
        detail = f" ({unnamed} manifests without a platform)" if unnamed > 1 else ""
        raise NotFound(f"{where}: no manifest for {plats}{detail}")
    out = list(chosen.values())  # in the order of ``wanted``
    seen = set(chosen)
    for c in children:
        if c.media_type not in MANIFEST_TYPES | INDEX_TYPES and c.digest not in seen:
            seen.add(c.digest)
            out.append(c)
    return out
