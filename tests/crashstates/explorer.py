"""Record a workload, then open every crash state it allows with lamina.

A workload is a list of steps, each a command run under strace on the same
root (the root as it was before the first step is taken as durable). A step
that exits 0 is *acknowledged*: every crash state after that point must still
show what the step did (its ``expect`` callback), and every state must open —
lamina sees a new boot id and repairs the root — and then pass ``check
--deep`` with no problem at all.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crashstates.materialise import differences, final_mtimes, write_tree
from crashstates.record import Recorder
from crashstates.states import CrashState, choose, explore, replay
from crashstates.trace import TraceError, parse, run_traced
from crashstates.tree import Op, Tree, scan

from lamina.check import check
from lamina.errors import LaminaError
from lamina.fsutil import remove_tree
from lamina.root import Root

__all__ = ["Outcome", "Recording", "Step", "explore_workload", "record_workload"]

#: What a restarted machine's boot id is, as far as the crash states know.
PREVIOUS_BOOT = "00000000-0000-4000-8000-crashstates0\n"

Expect = Callable[[Root], list[str]]


@dataclass(frozen=True)
class Step:
    label: str
    argv: Sequence[str]
    expect: Expect | None = None  # what must hold once the step was acknowledged


@dataclass
class Recording:
    root: Path
    base: Tree
    ops: list[Op]
    acks: list[int]
    mtimes: dict[int, int]
    steps: Sequence[Step]


@dataclass
class Outcome:
    workload: str
    candidates: int
    explored: int
    seed: int
    failures: list[tuple[CrashState, list[str]]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        sampled = (f", sampled with seed {self.seed}" if self.explored < self.candidates
                   else "")
        return (f"{self.workload}: {self.explored} of {self.candidates} crash states explored"
                f"{sampled}, {len(self.failures)} inconsistent ({self.seconds:.1f} s)")


def record_workload(root: Path, steps: Sequence[Step], work: Path, *,
                    env: dict[str, str] | None = None) -> Recording:
    """Run ``steps`` under strace on ``root``; the model of what they did."""
    root = Path(os.path.realpath(root))
    base, _ = scan(root)
    rec = Recorder(root, base.copy())
    acks = []
    for i, step in enumerate(steps):
        trace = work / f"trace-{i}.txt"
        argv = [a.replace("{root}", str(root)) for a in step.argv]
        r = run_traced(argv, trace, env=env)
        if r.returncode != 0:
            raise AssertionError(f"step {step.label!r} failed ({r.returncode}): {r.stderr}")
        rec.feed(parse(trace))
        acks.append(len(rec.ops))
    diffs = differences(rec.tree, root)
    if diffs:
        raise TraceError("the model does not match the disk after the workload: "
                         + "; ".join(diffs[:8]))
    return Recording(root, base, rec.ops, acks, final_mtimes(rec.tree, root), steps)


def open_state(path: Path, expectations: Sequence[Expect]) -> list[str]:
    """Restart ``path`` as lamina would after a power cut; what is wrong with it."""
    marker = path / "boot-id"
    if marker.exists():
        marker.write_text(PREVIOUS_BOOT)
    try:
        root = Root(path)
    except (LaminaError, sqlite3.Error, OSError) as exc:
        return [f"open: {type(exc).__name__}: {exc}"]
    try:
        report = check(root, deep=True)
        problems = [f"[{p.kind}] {p.message}" for p in report.problems]
        for e in expectations:
            problems += e(root)
        return problems
    except (LaminaError, sqlite3.Error, OSError) as exc:
        return [f"check: {type(exc).__name__}: {exc}"]
    finally:
        root.close()


def explore_workload(name: str, rec: Recording, scratch: Path, *, budget: int,
                     seed: int) -> Outcome:
    """Materialise and open the crash states of ``rec`` (at most ``budget``)."""
    start = time.monotonic()
    states = explore(rec.ops, rec.base, rec.acks)
    picked = choose(states, rec.acks, budget=budget, seed=seed)
    out = Outcome(name, len(states), len(picked), seed)
    for n, state in enumerate(picked):
        dest = scratch / f"state-{n}"
        tree = replay(rec.ops, rec.base, state)
        write_tree(tree, dest, rec.mtimes)
        expectations = [s.expect for s in rec.steps[: state.acked] if s.expect is not None]
        try:
            problems = open_state(dest, expectations)
        finally:
            with contextlib.suppress(OSError):
                remove_tree(dest)
        if problems:
            out.failures.append((state, problems))
    out.seconds = time.monotonic() - start
    return out
