"""Start-up: how long ``lamina --version`` and ``lamina image ls`` on an empty root take.

Every command a user or a script runs pays lamina's start-up (the interpreter,
then the modules the command imports) before it does any work. Each command
runs N times warm (after three unmeasured runs), alternating with its peer:
``ctr --version``, and ``ctr images ls`` on a private containerd of its own
(``python3 -c pass``, the interpreter's floor, when containerd is missing);
with ``--before-commit REV``, also against REV's lamina (both ``python -m lamina``).
The floor is measured beside them, and ``python -X importtime`` says which of
``image ls``'s imports cost most (the rows ``import: MODULE``, cumulative ms,
the median of five runs). Target: each lamina command under 80 ms (median).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import Ctx, Row, Skip, lamina_cli, lamina_variant, paired, time_cmd
from bench.peer import containerd, require_containerd

NAME = "startup"
TARGET_S = 0.080
WARMUP = 3
TOP_IMPORTS = 12
#: what the interpreter imports before any command runs (the floor has them too)
_INTERPRETER = frozenset({"site", "encodings", "runpy", "_frozen_importlib_external",
                          "zipimport", "io", "_signal", "encodings.utf_8", "lamina"})

_IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\| ( *)(\S+)$")


def _warm(cmd: Sequence[str], env: dict[str, str] | None = None) -> Callable[[int], float]:
    """A timer of ``cmd``, after a few unmeasured runs (the page cache holds it all)."""
    for _ in range(WARMUP):
        time_cmd(cmd, env=env)
    return lambda _i: time_cmd(cmd, env=env)


def import_costs(cmd: Sequence[str], runs: int = 5) -> list[tuple[str, float]]:
    """What ``cmd`` (``-m lamina ...``) imports, by cumulative milliseconds (median of
    ``runs``), costliest first: each module it imports itself (the interpreter's own
    start-up aside) and what those import directly (``parent/child``)."""
    per_module: dict[str, list[float]] = {}
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True,
                              text=True, check=True, timeout=60)
        children: list[tuple[str, float]] = []
        for line in proc.stderr.splitlines():
            m = _IMPORT_LINE.match(line)
            if m is None:
                continue
            depth, name, ms = len(m.group(3)) // 2, m.group(4), int(m.group(2)) / 1000
            if depth == 1:
                children.append((name, ms))  # importtime prints a module after its imports
            elif depth == 0:
                if name not in _INTERPRETER:
                    per_module.setdefault(name, []).append(ms)
                    for child, child_ms in children:
                        per_module.setdefault(f"{name}/{child}", []).append(child_ms)
                children = []
    costs = [(name, statistics.median(ms)) for name, ms in per_module.items()]
    return sorted(costs, key=lambda c: -c[1])


def _row(metric: str, lamina: Callable[[int], float], peer: Callable[[int], float],
         peer_name: str, n: int, *, target: bool = True) -> Row:
    samples = paired(lamina, peer, n)
    row = samples.row(metric, "s", peer_name)
    if target:
        row.target = f"lamina < {TARGET_S * 1000:.0f} ms"
        row.ok = statistics.median(samples.lamina) < TARGET_S
    return row


def _before_rows(ctx: Ctx, root: Path, n: int) -> list[Row]:
    """``--before-commit REV``: this lamina against REV's, both ``python -m lamina``."""
    assert ctx.before is not None
    now_cmd, now_env = [sys.executable, "-m", "lamina"], None
    then_cmd, then_env = lamina_variant(ctx.before)
    rows = []
    for metric, words in (("--version", ["--version"]),
                          ("image ls", ["--root", str(root), "image", "ls"])):
        rows.append(_row(f"lamina {metric} (python -m, this tree)",
                         _warm([*now_cmd, *words], now_env),
                         _warm([*then_cmd, *words], then_env),
                         f"lamina of {ctx.before_rev}", n, target=False))
    return rows


def _compiled() -> None:
    """Write the installed lamina's bytecode, as a user's first run would: with
    ``$PYTHONDONTWRITEBYTECODE`` (a test shell's) every run of a recently edited
    module compiles it again, which no user pays for."""
    probe = subprocess.run([sys.executable, "-c", "import lamina, os; "
                            "print(os.path.dirname(lamina.__file__))"],
                           capture_output=True, text=True, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", probe.stdout.strip()],
                   check=True, capture_output=True)


def run(ctx: Ctx) -> list[Row]:
    n = ctx.pick(31, 11)
    _compiled()
    lamina = lamina_cli()
    floor = [sys.executable, "-c", "pass"]
    rows: list[Row] = []
    with ctx.tempdir("startup-") as d:
        root = d / "root"
        ls = [*lamina, "--root", str(root), "image", "ls"]
        subprocess.run(ls, check=True, capture_output=True)  # the root exists, empty
        ctx.log(f"   {n} runs each, warm")
        rows.append(_row("lamina --version", _warm([*lamina, "--version"]),
                         _warm(["ctr", "--version"]), "ctr --version", n))
        try:
            require_containerd()
        except Skip as exc:  # compare with the interpreter alone
            ctx.log(f"   no containerd ({exc}): image ls is compared with the floor")
            rows.append(_row("lamina image ls (empty root)", _warm(ls), _warm(floor),
                             "python3 -c pass", n))
        else:
            with containerd(d / "containerd") as c:
                rows.append(_row("lamina image ls (empty root)", _warm(ls),
                                 _warm(c.ctr("images", "ls")),
                                 "ctr images ls (own containerd, empty)", n))
        rows.append(_row("python3 -c pass (the floor)", _warm(floor), _warm(["ctr", "--version"]),
                         "ctr --version", n, target=False))
        if ctx.before is not None:
            rows += _before_rows(ctx, root, n)
        costs = import_costs(["-m", "lamina", "--root", str(root), "image", "ls"])
    total = sum(ms for name, ms in costs if "/" not in name)
    ctx.log(f"   image ls imports {total:.1f} ms; the costliest:")
    for name, ms in costs[:TOP_IMPORTS]:
        ctx.log(f"     {ms:7.1f} ms  {name}")
        rows.append(Row(metric=f"import: {name}", unit="ms", lamina=round(ms, 2),
                        note="python -X importtime, cumulative, image ls"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - by hand
    """``python3 -m bench.startup``: the import costs of ``image ls`` on a fresh root."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        args = ["-m", "lamina", "--root", str(Path(d) / "root"), "image", "ls"]
        subprocess.run([sys.executable, *args], check=True, capture_output=True)
        for name, ms in import_costs(args)[:TOP_IMPORTS * 2]:
            print(f"{ms:7.1f} ms  {name}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
