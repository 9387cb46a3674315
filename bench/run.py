#!/usr/bin/env python3
"""Run lamina's benchmarks against peers measured in the same run.

    python3 bench/run.py [--quick] [--only NAME[,NAME...]] [--json PATH]
                         [--before-commit REV]

Every benchmark alternates lamina and its peer on the same ext4 filesystem
(under /var/tmp, never tmpfs) and quotes the median of the per-pair ratios
(lamina/peer). The table goes to stdout, progress to stderr, and the full
results (with every sample) to bench/results/latest.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's directory must not be on sys.path: bench/grpc.py would shadow
# the grpc package. Import the modules as the package ``bench`` instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import (  # noqa: E402
    BENCH_BASE,
    CACHE,
    Ctx,
    Row,
    Skip,
    checkout_src,
    cleanup_tree,
    fmt,
    fs_type,
)

#: name -> module, in the order they run
BENCHMARKS: dict[str, str] = {
    "snapshots": "bench.snapshots",
    "mounts": "bench.mounts",
    "import": "bench.import_",
    "diff": "bench.diff",
    "rss": "bench.rss",
    "grpc": "bench.grpc",
    "serve-churn": "bench.serve_churn",
    "cri-churn": "bench.cri_churn",
    "userns": "bench.userns",
    "registry": "bench.registry",
    "erofs": "bench.erofs",
    "erofs-import": "bench.erofs_import",
    "erofs-pull": "bench.erofs_pull",
    "erofs-containers": "bench.erofs_containers",
    "startup": "bench.startup",
}

RESULTS = _HERE / "results" / "latest.json"


def _table(results: list[dict[str, Any]]) -> str:
    head = ["benchmark", "metric", "unit", "lamina", "peer", "lamina/peer", "target", "ok",
            "peer is / notes"]
    lines: list[list[str]] = []
    for res in results:
        if res["status"] != "ok":
            lines.append([res["name"], res["status"].upper(), "", "", "", "", "", "",
                          res["reason"]])
            continue
        for r in res["rows"]:
            ok = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
            notes = "; ".join(x for x in (r["peer_name"], r["note"]) if x)
            lines.append([res["name"], r["metric"], r["unit"], fmt(r["lamina"]), fmt(r["peer"]),
                          fmt(r["ratio"]), r["target"], ok, notes])
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head) - 1)]

    def render(cells: list[str]) -> str:
        parts = [c.ljust(w) for c, w in zip(cells, widths, strict=False)]
        return ("  ".join(parts) + "  " + cells[-1]).rstrip()

    sep = "  ".join("-" * w for w in widths) + "  " + "-" * 15
    return "\n".join([render(head), sep, *(render(x) for x in lines)])


def _versions() -> dict[str, str]:
    """Versions of lamina and of the peers, for the record."""
    out: dict[str, str] = {}
    for name, cmd in {"containerd": ["containerd", "--version"],
                      "ctr": ["ctr", "--version"], "mount": ["mount", "--version"],
                      "tar": ["tar", "--version"]}.items():
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
            out[name] = (proc.stdout.strip().splitlines() or [""])[0]
        except OSError:
            out[name] = "missing"
    try:
        from importlib.metadata import version

        out["lamina"] = version("lamina")
    except Exception:
        out["lamina"] = "unknown"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller runs (~2 minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHMARKS)}")
    ap.add_argument("--json", default=str(RESULTS), help="where to write the results JSON")
    ap.add_argument("--before-commit", metavar="REV", default="",
                    help="also measure the lamina of commit REV (its src tree, extracted with "
                         "git archive into the scratch dir) where a benchmark compares "
                         "versions (import, snapshots)")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if os.geteuid() != 0:
        print("warning: not root; most benchmarks need root and will be skipped",
              file=sys.stderr)

    BENCH_BASE.mkdir(parents=True, exist_ok=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    fstype = fs_type(BENCH_BASE)
    if fstype in ("tmpfs", "ramfs"):
        print(f"error: {BENCH_BASE} is {fstype}; benchmarks must run on a disk filesystem "
              "(set LAMINA_BENCH_DIR)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lamina-bench-", dir=BENCH_BASE))
    ctx = Ctx(quick=args.quick, work=work)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        if args.before_commit:
            try:
                ctx.before, ctx.before_rev = checkout_src(args.before_commit, work / "before")
            except Skip as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"== before: lamina of {ctx.before_rev} from {ctx.before}", file=sys.stderr)
        for name in names:
            print(f"== {name}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            res: dict[str, Any] = {"name": name, "status": "ok", "reason": "", "rows": []}
            try:
                module = importlib.import_module(BENCHMARKS[name])
                rows: list[Row] = module.run(ctx)
                res["rows"] = [r.to_json() for r in rows]
            except Skip as exc:
                res.update(status="skipped", reason=str(exc))
            except Exception as exc:
                traceback.print_exc()
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                res.update(status="error", reason=f"{type(exc).__name__}: {first}"[:300])
            res["seconds"] = round(time.monotonic() - t0, 1)
            print(f"   {name}: {res['status']} in {res['seconds']}s"
                  + (f" ({res['reason']})" if res["reason"] else ""), file=sys.stderr,
                  flush=True)
            results.append(res)
    finally:
        cleanup_tree(work)

    total = time.monotonic() - started
    print(_table(results))
    print(f"\n{'quick' if args.quick else 'full'} run, {total:.0f}s, on {fstype} under "
          f"{BENCH_BASE}; ratios are medians of per-pair lamina/peer ratios")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "before_commit": ctx.before_rev,
        "seconds": round(total, 1),
        "command": " ".join(["python3", "bench/run.py", *(argv if argv is not None
                                                           else sys.argv[1:])]),
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "filesystem": fstype, "dir": str(BENCH_BASE)},
        "versions": _versions(),
        "benchmarks": results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results: {out}")
    return 0 if all(r["status"] != "error" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
