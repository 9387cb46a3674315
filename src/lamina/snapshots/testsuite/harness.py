"""The harness: the case registry, the runner, and the helpers a case is written with."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError
from lamina.labels import GC_ROOT
from lamina.mounts.mount import Mount, temp_mount, unmount_all
from lamina.snapshots import Capability, Info, Kind, Snapshotter
from lamina.snapshots.testsuite.fstest import (
    Applier,
    assert_same_tree,
    mount_points_under,
    reference_dir,
)

if TYPE_CHECKING:
    from _pytest.mark.structures import ParameterSet

__all__ = [
    "CASES",
    "LABELS",
    "Case",
    "CaseFn",
    "Factory",
    "Skip",
    "case",
    "check_snapshots",
    "commit_empty",
    "create_snapshot",
    "environment",
    "expect_error",
    "get",
    "mounted",
    "params",
    "require",
    "run",
    "same_tree",
    "timestamp",
    "unique",
]

CaseFn = Callable[[Snapshotter, Path], None]
Factory = Callable[[Path], Snapshotter]


class Skip(Exception):
    """Raised by a case that does not apply to this snapshotter (a missing capability)."""


@dataclass(frozen=True)
class Case:
    """One conformance check: ``fn(sn, work)`` with a fresh snapshotter and work dir."""

    name: str
    fn: CaseFn
    slow: bool = False
    doc: str = ""

    def __call__(self, sn: Snapshotter, work: Path) -> None:
        self.fn(sn, work)

    def __repr__(self) -> str:
        return f"Case({self.name})"


CASES: list[Case] = []
"""Every registered case, in registration order."""


def case(name: str, *, slow: bool = False) -> Callable[[CaseFn], CaseFn]:
    """Register the decorated function as the case ``name``."""

    def register(fn: CaseFn) -> CaseFn:
        if any(c.name == name for c in CASES):
            raise ValueError(f"duplicate snapshotter test case {name!r}")
        CASES.append(Case(name, fn, slow, (fn.__doc__ or "").strip()))
        return fn

    return register


def get(name: str) -> Case:
    """The registered case called ``name``."""
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


def require(sn: Snapshotter, *caps: Capability) -> None:
    """Skip the current case unless ``sn`` declares every capability in ``caps``."""
    missing = [c.value for c in caps if c not in sn.capabilities]
    if missing:
        raise Skip(f"snapshotter lacks capability {', '.join(missing)}")


# -- running -----------------------------------------------------------------


@contextlib.contextmanager
def environment(factory: Factory, base: Path) -> Iterator[tuple[Snapshotter, Path]]:
    """``base/root`` for a new snapshotter, ``base/work`` for the case.

    Afterwards whatever is still mounted below ``base`` is unmounted and the
    snapshotter is closed.
    """
    root, work = base / "root", base / "work"
    root.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    sn = factory(root)
    try:
        yield sn, work
    finally:
        try:
            for point in mount_points_under(base):
                unmount_all(point)
        finally:
            sn.close()


def run(c: Case, factory: Factory, base: Path) -> None:
    """Run case ``c`` on ``factory(base / "root")``; a :class:`Skip` becomes pytest.skip."""
    with environment(factory, base) as (sn, work):
        try:
            c(sn, work)
        except Skip as exc:
            import pytest

            pytest.skip(str(exc))


def params(*, exclude: tuple[str, ...] = ()) -> list[ParameterSet]:
    """``pytest.param`` per case (id = case name; slow cases marked ``slow``)."""
    import pytest

    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
        for c in CASES
        if c.name not in exclude
    ]


# -- helpers for cases -------------------------------------------------------

LABELS: dict[str, str] = {GC_ROOT: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
"""Labels most cases put on what they create (as containerd's suite does)."""

_seq = itertools.count(1)


def unique(prefix: str) -> str:
    """A key no other call returns in this process."""
    return f"{prefix}-{os.getpid()}-{next(_seq)}"


@contextlib.contextmanager
def mounted(mounts: list[Mount], work: Path) -> Iterator[Path]:
    """Mount ``mounts`` on a temporary directory below ``work``."""
    if not mounts:
        raise AssertionError("snapshotter returned no mounts")
    with temp_mount(mounts, base=work) as target:
        yield Path(target)


def same_tree(sn: Snapshotter, actual: Path, expected: Path) -> None:
    """Compare trees; hard-link groups only when the snapshotter keeps them."""
    assert_same_tree(actual, expected, hardlinks=Capability.HARDLINKS in sn.capabilities)


def expect_error(
    exc_type: type[LaminaError], fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> LaminaError:
    """Call ``fn``; AssertionError unless it raises ``exc_type``. Iterators are drained."""
    what = f"{getattr(fn, '__name__', fn)}{args!r}"
    if len(what) > 300:
        what = what[:300] + "..."
    try:
        result = fn(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    except exc_type as exc:
        return exc
    except LaminaError as exc:
        raise AssertionError(
            f"{what}: expected {exc_type.__name__}, got {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(f"{what}: expected {exc_type.__name__}, it succeeded")


def timestamp(dt: datetime | None, what: str = "time") -> float:
    """POSIX seconds of ``dt`` (naive means UTC); AssertionError when missing."""
    if dt is None:
        raise AssertionError(f"{what} is not set")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def check_info(
    info: Info, *, name: str, kind: Kind, parent: str, labels: dict[str, str] | None = None
) -> None:
    """AssertionError unless ``info`` has these fields."""
    got = (info.name, info.kind, info.parent)
    want = (name, kind, parent)
    if got != want:
        raise AssertionError(f"info (name, kind, parent): got {got!r}, want {want!r}")
    if labels is not None and dict(info.labels) != labels:
        raise AssertionError(f"{name}: labels {dict(info.labels)!r}, want {labels!r}")


def same_info(a: Info, b: Info) -> None:
    """AssertionError unless the two infos agree on every field."""
    fa = (a.kind, a.name, a.parent, dict(a.labels), a.created, a.updated)
    fb = (b.kind, b.name, b.parent, dict(b.labels), b.created, b.updated)
    if fa != fb:
        raise AssertionError(f"infos differ:\n  {fa!r}\n  {fb!r}")


def commit_empty(
    sn: Snapshotter,
    name: str,
    parent: str = "",
    *,
    key: str | None = None,
    labels: Mapping[str, str] = LABELS,
) -> str:
    """Commit ``name`` on ``parent`` with nothing written: prepare the active
    snapshot ``key`` (``<name>-a`` unless given) and commit it, both with ``labels``."""
    key = f"{name}-a" if key is None else key
    sn.prepare(key, parent, labels=labels)
    sn.commit(name, key, labels=labels)
    return name


def create_snapshot(
    sn: Snapshotter, parent: str, work: Path, applier: Applier, *, flat: Path | None = None
) -> str:
    """Commit a new snapshot on ``parent`` with ``applier`` applied; return its name.

    With ``flat`` (a reference directory holding the parent's content), the
    active mount is compared with it before and after applying, and
    ``applier`` is applied to ``flat`` too.
    """
    name = unique("layer")
    key = f"{name}-prepare"
    with mounted(sn.prepare(key, parent, labels=LABELS), work) as root:
        if flat is not None:
            same_tree(sn, root, flat)
            applier(flat)
        applier(root)
        if flat is not None:
            same_tree(sn, root, flat)
    sn.commit(name, key, labels=LABELS)
    return name


def check_view(sn: Snapshotter, work: Path, name: str, expected: Path) -> None:
    """Mount a view of committed ``name`` and compare it with ``expected``."""
    view = f"{name}-view"
    mounts = sn.view(view, name, labels=LABELS)
    try:
        with mounted(mounts, work) as root:
            same_tree(sn, root, expected)
    finally:
        sn.remove(view)


def check_snapshots(sn: Snapshotter, work: Path, *appliers: Applier) -> list[str]:
    """A chain of snapshots, one per applier, each checked against a flat directory.

    Returns the committed names, bottom first.
    """
    if any(a.chowns for a in appliers):
        require(sn, Capability.CHOWN)
    flat = reference_dir(work)
    names: list[str] = []
    parent = ""
    for a in appliers:
        parent = create_snapshot(sn, parent, work, a, flat=flat)
        check_view(sn, work, parent, flat)
        names.append(parent)
    return names


def now() -> float:
    return time.time()
