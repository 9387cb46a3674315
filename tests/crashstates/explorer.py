"""Record a workload, then open every crash state it allows with lamina.

A workload is a list of steps, each a command run under strace on the same
root (the root as it was before the first step is taken as durable). A step
that exits 0 is *acknowledged*: every crash state after that point must still
show what the steps did (the ``expect`` callback of the last acknowledged step
says all that must hold by then); as the power cut left it, before any repair,
no state's metadata may name what its files lack (the metadata may be behind
the disk, never ahead); and every state must open —
lamina sees a new boot id and repairs the root — and then pass ``check
--deep`` with no problem at all.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from crashstates.materialise import differences, final_mtimes, write_tree
from crashstates.record import Recorder
from crashstates.states import CrashState, choose, explore, replay
from crashstates.trace import TraceError, parse, run_traced
from crashstates.tree import Create, Op, Rename, Tree, scan
from lamina.errors import LaminaError
from lamina.fs.files import remove_tree
from lamina.metadata.check import check
from lamina.metadata.recover import RecoveredRoot as Root
from lamina.metadata.workdirs import interrupted, root_work_dirs
from lamina.problems import ProblemType

__all__ = ["Outcome", "Recording", "Step", "explore_workload", "record_workload"]

#: What a restarted machine's boot id is, as far as the crash states know.
PREVIOUS_BOOT = "00000000-0000-4000-8000-crashstates0\n"

Expect = Callable[[Root], list[str]]

BLOBS = ["content", "blobs", "sha256"]

#: How many inconsistent states ``keep`` keeps per workload.
KEPT = 5


@dataclass(frozen=True)
class Step:
    label: str
    argv: Sequence[str]
    expect: Expect | None = None  # all that must hold once the step was acknowledged


@dataclass
class Recording:
    root: Path
    base: Tree
    ops: list[Op]
    acks: list[int]
    mtimes: dict[int, int]
    steps: Sequence[Step]
    deleted_blobs: frozenset[str]  # digests the workload removed from the content store


@dataclass
class Outcome:
    workload: str
    candidates: int
    explored: int
    seed: int
    failures: list[tuple[CrashState, list[str]]] = field(default_factory=list)
    seconds: float = 0.0
    through_cli: int = 0

    def summary(self) -> str:
        sampled = (f", sampled with seed {self.seed}" if self.explored < self.candidates
                   else "")
        return (f"{self.workload}: {self.explored} of {self.candidates} crash states explored"
                f"{sampled} ({self.through_cli} through the CLI), {len(self.failures)} "
                f"inconsistent ({self.seconds:.1f} s)")


def record_workload(root: Path, steps: Sequence[Step], work: Path, *,
                    env: dict[str, str] | None = None,
                    tolerated: Sequence[str] = ()) -> Recording:
    """Run ``steps`` under strace on ``root``; the model of what they did.

    The model must match the disk afterwards, except at ``tolerated`` paths
    (relative): what processes outside the trace change (a running container
    through its overlay mount, the task monitor), which the crash states then
    show as they were before the workload."""
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
    diffs = differences(rec.tree, root, tolerated=tolerated)
    if diffs:
        raise TraceError("the model does not match the disk after the workload: "
                         + "; ".join(diffs[:8]))
    return Recording(root, base, rec.ops, acks, final_mtimes(rec.tree, root), steps,
                     (_blobs(base) | _blobs_made(rec.ops, rec.tree)) - _blobs(rec.tree))


def _blobs(tree: Tree) -> frozenset[str]:
    d = tree.lookup(BLOBS)
    if d is None:
        return frozenset()
    return frozenset(f"sha256:{name}" for name in tree.children[d])


def _blobs_made(ops: Sequence[Op], tree: Tree) -> frozenset[str]:
    """Blobs the workload put in place (renamed or created in the blob directory)."""
    d = tree.lookup(BLOBS)
    names = {op.dname for op in ops if isinstance(op, Rename) and op.ddir == d}
    names |= {op.name for op in ops if isinstance(op, Create) and op.dir == d}
    return frozenset(f"sha256:{n}" for n in names if not n.startswith("."))


#: What check finds when the metadata is *ahead* of the disk: it names something
#: that is not there (or not whole). Leftovers (orphans, temporary files) are the
#: metadata being behind, which the README allows and repair removes.
AHEAD = frozenset({
    ProblemType.CONTENT_MISSING, ProblemType.CONTENT_CORRUPT,
    ProblemType.SNAPSHOT_MISSING_DIRECTORY, ProblemType.LAYER_CHANGED,
    ProblemType.IMAGE, ProblemType.CONTAINER,
})


def ahead_of_disk(path: Path, *, deleting: frozenset[str] = frozenset()) -> list[str]:
    """What ``path``'s metadata claims and its files lack, as the power cut left it
    (opened without the restart repair, checked without repairing).

    A blob the workload deletes (``deleting``) may be missing while its row is
    not: the content store unlinks the file inside the transaction that deletes
    the row, so that no commit of the same digest can slip in between and lose
    its new file; the restart repair drops such a row."""
    try:
        root = Root(path, recover=False)
    except (LaminaError, sqlite3.Error, OSError) as exc:
        return [f"open without repair: {type(exc).__name__}: {exc}"]
    try:
        report = check(root, deep=True)
    except (LaminaError, sqlite3.Error, OSError) as exc:
        return [f"check without repair: {type(exc).__name__}: {exc}"]
    finally:
        root.close()
    return [f"metadata ahead of the disk: [{p.kind}] {p.message}"
            for p in report.problems if p.kind in AHEAD
            and not (p.kind == ProblemType.CONTENT_MISSING and p.subject in deleting)]


def open_state(path: Path, expectations: Sequence[Expect], *,
               cli: Sequence[str] | None = None) -> list[str]:
    """Restart ``path`` as lamina would after a power cut; what is wrong with it.
    With ``cli`` (the command that runs lamina), the first open and the check go
    through ``lamina --root PATH check --deep``, which must exit 0."""
    marker = path / "boot-id"
    if marker.exists():
        marker.write_text(PREVIOUS_BOOT)
    if cli is not None:
        proc = subprocess.run([*cli, "--root", str(path), "check", "--deep"],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            return [f"lamina check --deep: exit {proc.returncode}: "
                    f"{(proc.stdout + proc.stderr).strip()}"]
    try:
        root = Root(path)
    except (LaminaError, sqlite3.Error, OSError) as exc:
        return [f"open: {type(exc).__name__}: {exc}"]
    try:
        report = check(root, deep=True)
        problems = [f"[{p.kind}] {p.message}" for p in report.problems]
        # what the CLI's check adds: work directories of interrupted checkpoints
        base, lock = root_work_dirs(root.path)
        problems += [f"[checkpoint.interrupted] {left.path}"
                     for left in interrupted(base, lock=lock)]
        for e in expectations:
            problems += e(root)
        return problems
    except (LaminaError, sqlite3.Error, OSError) as exc:
        return [f"check: {type(exc).__name__}: {exc}"]
    finally:
        root.close()


def explore_workload(name: str, rec: Recording, scratch: Path, *, budget: int,
                     seed: int, cli: Sequence[str], keep: Path | None = None,
                     ahead: bool = True, all_through_cli: bool = False) -> Outcome:
    """Materialise and open the crash states of ``rec`` (at most ``budget``); the
    durable-only state at each acknowledgement is opened through the CLI (``cli``),
    the rest through the library (or every state through the CLI, with
    ``all_through_cli``: what only the CLI's check looks at, such as interrupted
    checkpoints, is then checked everywhere). With ``ahead``, each state is first checked as
    the power cut left it: its metadata must not be ahead of its files. The first
    few inconsistent states are kept below ``keep`` (as written, before lamina
    opened them) when it is given."""
    start = time.monotonic()
    states = explore(rec.ops, rec.base, rec.acks)
    picked = choose(states, rec.acks, budget=budget, seed=seed)
    out = Outcome(name, len(states), len(picked), seed)
    for n, state in enumerate(picked):
        dest = scratch / f"state-{n}"
        tree = replay(rec.ops, rec.base, state)
        write_tree(tree, dest, rec.mtimes)
        # the last acknowledged step's expectation says all that must hold by then
        expectations = [s.expect for s in rec.steps[: state.acked] if s.expect is not None][-1:]
        try:
            through_cli = all_through_cli or (state.why == "durable only"
                                              and state.point in rec.acks)
            problems = ahead_of_disk(dest, deleting=rec.deleted_blobs) if ahead else []
            problems += open_state(dest, expectations, cli=cli if through_cli else None)
            out.through_cli += through_cli
        finally:
            with contextlib.suppress(OSError):
                remove_tree(dest)
        if problems:
            out.failures.append((state, problems))
            if keep is not None and len(out.failures) <= KEPT:
                kept = keep / f"{name.replace(' ', '_').replace('/', '_')}-{n}"
                write_tree(tree, kept, rec.mtimes)
                (kept.parent / f"{kept.name}.txt").write_text(
                    state.describe() + "\n" + "\n".join(problems) + "\n")
    out.seconds = time.monotonic() - start
    return out
