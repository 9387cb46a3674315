"""A container's options: what its task runs, as whom and where, the bind mounts, its
user namespace.

Options are chosen when a container is created and kept on its record, in
``spec.annotations["lamina.io/options"]``, so that every runtime spec
generated for it (a start, an upgrade's restart) and every checkpoint of it
sees the same ones::

    {"args": ["sh", "-c", "..."] | null,   # replaces the image's Cmd
     "env": ["K=V", ...],
     "mounts": [{"source": "/abs", "destination": "/abs", "readonly": false}, ...],
     "userns": {"uids": ["0:HOST:SIZE"], "gids": ["0:HOST:SIZE"]},  # optional
     "cwd": "/abs",                 # optional, replaces the image's WorkingDir
     "user": "UID[:GID]" | "NAME[:GROUP]"}   # optional, replaces the image's User

A user name is looked up in the image's own ``/etc/passwd`` (and ``/etc/group``)
each time a runtime spec is generated, as the image's User is.

A container with ``userns`` runs in a user namespace of its own with those
mappings, and its root filesystem is mounted ID-mapped (:mod:`lamina.mounts.idmap`):
the image's layers show their own owners inside and are never chowned.

Revisions, tasks and checkpoints all read options; this module is the one
place that knows their shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from lamina.containers.runtime import BindMount
from lamina.errors import InvalidArgument
from lamina.labels import OPTIONS_ANNOTATION
from lamina.metadata.containers import Container
from lamina.mounts.idmap import UserNamespace

__all__ = [
    "bind_mounts", "make_options", "options_of", "options_spec", "parse_options", "userns_of",
    "with_spec",
]


def make_options(
    *,
    args: Sequence[str] | None = None,
    env: Sequence[str] = (),
    mounts: Sequence[BindMount] = (),
    userns: UserNamespace | None = None,
    cwd: str | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """The options record a container keeps (see the module docs)."""
    for item in env:
        if not item.partition("=")[0]:
            raise InvalidArgument(f"invalid environment entry {item!r} (want KEY=VALUE)")
    if cwd is not None and not cwd.startswith("/"):
        raise InvalidArgument(f"working directory must be an absolute path: {cwd!r}")
    if user is not None:
        name, colon, group = user.partition(":")
        if not name or (colon and not group) or ":" in group:
            raise InvalidArgument(f"invalid user {user!r} (want UID[:GID] or NAME[:GROUP])")
    extra: dict[str, Any] = {} if userns is None else {"userns": userns.to_json()}
    if cwd is not None:
        extra["cwd"] = cwd
    if user is not None:
        extra["user"] = user
    return {
        **extra,
        "args": list(args) if args else None,
        "env": list(env),
        "mounts": [
            {"source": m.source, "destination": m.destination, "readonly": m.readonly}
            for m in mounts
        ],
    }


def parse_options(obj: object, what: str) -> dict[str, Any]:
    """An options record read from outside this root (a checkpoint's config),
    checked and made again with :func:`make_options`: InvalidArgument naming
    ``what`` unless it has the shape above."""
    if obj is None:
        return make_options()
    if not isinstance(obj, Mapping):
        raise InvalidArgument(f"{what}: its options are not an object")

    def strings(key: str) -> list[str]:
        value = obj.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{what}: its option {key!r} is not a list of strings")
        return value

    def text(key: str) -> str | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidArgument(f"{what}: its option {key!r} is not a string")
        return value

    raw_mounts = obj.get("mounts") or []
    if not isinstance(raw_mounts, list) or not all(isinstance(m, Mapping) for m in raw_mounts):
        raise InvalidArgument(f"{what}: its option 'mounts' is not a list of objects")
    mounts = []
    for m in raw_mounts:
        source, destination = m.get("source"), m.get("destination")
        readonly = m.get("readonly", False)
        if not isinstance(source, str) or not isinstance(destination, str) \
                or not isinstance(readonly, bool):
            raise InvalidArgument(f"{what}: a bind mount of its options is not "
                                  "{source, destination, readonly}")
        mounts.append(BindMount(source=source, destination=destination, readonly=readonly))
    args = obj.get("args")
    options = make_options(args=None if args is None else strings("args"), env=strings("env"),
                           mounts=mounts, userns=userns_of(obj), cwd=text("cwd"),
                           user=text("user"))
    network = text("network")  # its values are the network module's to judge, when used
    if network is not None:
        options["network"] = network
    return options


def options_spec(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The spec a new container's record starts with: its options, no runtime spec yet."""
    return {"annotations": {OPTIONS_ANNOTATION: dict(options or {})}}


def options_of(container: Container) -> dict[str, Any]:
    """The options kept on ``container``'s record."""
    annotations = container.spec.get("annotations") or {}
    return dict(annotations.get(OPTIONS_ANNOTATION) or {})


def with_spec(container: Container, spec: Mapping[str, Any]) -> Container:
    """``container`` with ``spec`` as its runtime spec, its options kept."""
    full = dict(spec)
    full["annotations"] = {**(spec.get("annotations") or {}),
                           OPTIONS_ANNOTATION: options_of(container)}
    return replace(container, spec=full)


def userns_of(options: Mapping[str, Any]) -> UserNamespace | None:
    """The user namespace an options record asks for (None: the host's)."""
    obj = options.get("userns")
    if not obj:
        return None
    try:
        return UserNamespace.from_json(obj)
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidArgument(f"bad userns option {obj!r}") from exc


def bind_mounts(options: Mapping[str, Any]) -> list[BindMount]:
    """The bind mounts of an options record."""
    return [BindMount(source=str(m["source"]), destination=str(m["destination"]),
                      readonly=bool(m.get("readonly", False)))
            for m in options.get("mounts") or []]
