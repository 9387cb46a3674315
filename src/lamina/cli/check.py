"""``lamina check``: verify the root's content, snapshots, images and containers."""

from __future__ import annotations

import argparse

from lamina.cli.app import App
from lamina.cli.common import add_examples
from lamina.errors import FailedPrecondition, printable
from lamina.metadata.check import CheckReport, check
from lamina.problems import Problem, ProblemType

__all__ = ["register"]


def _interrupted_checkpoints(app: App, report: CheckReport) -> None:
    """Add what a checkpoint or restore that died left (a work directory, a task it
    paused) to ``report``; with a repair, put it right."""
    from lamina.cli.container import services

    with services(app) as cps:
        found = [Problem(ProblemType.CHECKPOINT_INTERRUPTED, line.split(":", 1)[0], line)
                 for line in cps.interrupted()]
        if report.repair and found:
            report.repaired += cps.recover_interrupted()
            report.remaining += [Problem(ProblemType.CHECKPOINT_INTERRUPTED,
                                         line.split(":", 1)[0], line)
                                 for line in cps.interrupted()]
    report.problems += found


def _check(args: argparse.Namespace, app: App) -> int:
    report = check(app.store_root, repair=args.repair, deep=args.deep)
    _interrupted_checkpoints(app, report)
    code = 0 if report.ok else FailedPrecondition.exit_code
    if args.json:
        app.print_json(report.to_json())
        return code
    for p in report.problems:
        print(f"problem: [{p.kind}] {printable(p.message)}")
    for line in report.repaired:
        print(f"repaired: {printable(line)}")
    if report.repair:
        for p in report.remaining:
            print(f"remaining: [{p.kind}] {printable(p.message)}")
        for name in report.broken_images:
            print(f"broken image: {name} (import it again)")
    if report.ok:
        print("consistent" + (" after repair" if report.repair and report.problems else ""))
    else:
        left = len(report.remaining) if report.repair else len(report.problems)
        hint = "" if report.repair else " (run with --repair)"
        print(f"{left} problem(s){hint}")
    return code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", aliases=["fsck"],
                       help="verify content, snapshots, images and containers")
    p.add_argument("--repair", action="store_true",
                   help="delete corrupt blobs, clean up content and snapshots")
    p.add_argument("--deep", action="store_true",
                   help="also compare every unpacked layer's files with the tree "
                        "manifest recorded when it was unpacked (reads them all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_check)
    add_examples(
        p,
        ("look for problems; exit status 5 when there are some", "lamina check"),
        ("after a crash or a power cut: also read every unpacked file, and repair",
         "lamina check --deep --repair"),
    )
