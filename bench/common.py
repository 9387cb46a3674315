"""What every benchmark module shares: results, paired timing, temp roots, tools.

A benchmark module exposes ``NAME`` and ``run(ctx) -> list[Row]``; it raises
:class:`Skip` when a piece it needs is missing. Measurements against a peer
are *paired*: lamina and the peer run alternately on the same filesystem and
the ratio quoted is the median of the per-pair ratios.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH_BASE = Path(os.environ.get("LAMINA_BENCH_DIR", "/var/tmp"))
CACHE = Path(os.environ.get("LAMINA_BENCH_CACHE", "/var/tmp/lamina-bench-cache"))


class Skip(Exception):
    """The benchmark cannot run here; the message says why."""


@dataclass
class Row:
    """One line of the results table.

    ``ratio`` is lamina/peer (the median of per-pair ratios when paired);
    ``target`` is a human-readable goal and ``ok`` whether it was met.
    """

    metric: str
    unit: str
    lamina: float | None
    peer: float | None = None
    peer_name: str = ""
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    note: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "unit": self.unit,
            "lamina": self.lamina,
            "peer": self.peer,
            "peer_name": self.peer_name,
            "ratio": self.ratio,
            "target": self.target,
            "ok": self.ok,
            "note": self.note,
            "samples": self.samples,
        }


@dataclass
class Ctx:
    """Run-wide settings handed to every benchmark."""

    quick: bool
    work: Path  # this run's scratch directory (ext4, under /var/tmp)
    cache: Path = CACHE
    #: ``--before-commit REV``: an earlier lamina's ``src`` (see :func:`checkout_src`)
    #: for the benchmarks that measure it beside the working tree's, and its label
    before: Path | None = None
    before_rev: str = ""
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr))

    def pick(self, default: int, quick: int) -> int:
        return quick if self.quick else default

    @contextlib.contextmanager
    def tempdir(self, prefix: str) -> Iterator[Path]:
        """A fresh directory under this run's scratch dir; unmounted and removed after."""
        d = Path(tempfile.mkdtemp(prefix=prefix, dir=self.work))
        try:
            yield d
        finally:
            cleanup_tree(d)


# --------------------------------------------------------------------------- timing


@dataclass
class Paired:
    """Samples of lamina and its peer taken alternately."""

    lamina: list[float]
    peer: list[float]

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.lamina, self.peer, strict=True) if b > 0]

    @property
    def median_ratio(self) -> float | None:
        r = self.ratios
        return statistics.median(r) if r else None

    def row(self, metric: str, unit: str, peer_name: str, *, target: str = "",
            limit: float | None = None, higher_is_better: bool = False,
            note: str = "") -> Row:
        ratio = self.median_ratio
        ok: bool | None = None
        if limit is not None and ratio is not None:
            ok = ratio >= limit if higher_is_better else ratio <= limit
        return Row(metric=metric, unit=unit, lamina=statistics.median(self.lamina),
                   peer=statistics.median(self.peer), peer_name=peer_name, ratio=ratio,
                   target=target, ok=ok, note=note,
                   samples={"lamina": self.lamina, "peer": self.peer})


def paired(lamina: Callable[[int], float], peer: Callable[[int], float], n: int) -> Paired:
    """Call ``lamina(i)`` and ``peer(i)`` ``n`` times each, alternating who goes first.

    Each callable returns its own measurement (seconds, or a rate).
    """
    out = Paired([], [])
    for i in range(n):
        if i % 2 == 0:
            a = lamina(i)
            b = peer(i)
        else:
            b = peer(i)
            a = lamina(i)
        out.lamina.append(a)
        out.peer.append(b)
    return out


def rotated(fns: dict[str, Callable[[int], float]], n: int) -> dict[str, list[float]]:
    """``n`` rounds calling every one of ``fns`` once, the order rotated each round
    (so no variant always runs first or last). Returns each one's samples."""
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for i in range(n):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(fns[name](i))
    return out


def pair(samples: dict[str, list[float]], a: str, b: str) -> Paired:
    """The samples of ``a`` against those of ``b`` (taken in the same rounds)."""
    return Paired(samples[a], samples[b])


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_cmd(cmd: Sequence[str], *, cwd: str | Path | None = None, stdout: Any = None,
            env: dict[str, str] | None = None, check: bool = True,
            timeout: float = 600, stdin: Any = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd``; on failure raise RuntimeError with its output's tail."""
    proc = subprocess.run(
        list(cmd), cwd=cwd, stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, timeout=timeout, check=False,
    )
    if check and proc.returncode != 0:
        out = proc.stdout.decode(errors="replace")[-1500:] if proc.stdout else ""
        err = proc.stderr.decode(errors="replace")[-1500:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{out}\n{err}")
    return proc


def time_cmd(cmd: Sequence[str], **kw: Any) -> float:
    t0 = time.perf_counter()
    run_cmd(cmd, **kw)
    return time.perf_counter() - t0


def lamina_cli() -> list[str]:
    """How to invoke the lamina CLI: the console script installed beside this
    interpreter (not a version-manager shim on PATH, such as pyenv's, which
    adds a shell and a second exec to every call), else ``python -m lamina.cli``."""
    beside = Path(sys.executable).parent / "lamina"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    return [sys.executable, "-m", "lamina"]


# --------------------------------------------------------------------------- variants
#
# Some figures compare lamina with itself: the working tree against an earlier
# commit (``--before-commit REV``), or with SQLite's ``synchronous=NORMAL``
# instead of the ``FULL`` lamina uses. Both run as subprocesses of this
# interpreter with an environment that says which lamina to import.

#: run the lamina CLI with every database connection switched to synchronous=NORMAL
#: after it opened (lamina sets FULL; this measures what FULL costs)
_NORMAL_CLI = (
    "import sys, lamina.util.db as d\n"
    "_init = d.Database.__init__\n"
    "def init(self, *a, **k):\n"
    "    _init(self, *a, **k)\n"
    "    self.conn.execute('PRAGMA synchronous=NORMAL')\n"
    "d.Database.__init__ = init\n"
    "from lamina.cli import main\n"
    "sys.exit(main())\n"
)


def lamina_variant(src: Path | None = None, *,
                   normal: bool = False) -> tuple[list[str], dict[str, str]]:
    """The command and environment running the lamina CLI: the installed one, or
    the one in ``src`` (an earlier commit's, :func:`checkout_src`); ``normal``
    switches its databases to synchronous=NORMAL. ``$LAMINA_NO_SYNC`` is dropped."""
    env = {k: v for k, v in os.environ.items() if k != "LAMINA_NO_SYNC"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    if normal:
        return [sys.executable, "-c", _NORMAL_CLI], env
    if src is not None:
        return [sys.executable, "-m", "lamina"], env
    return lamina_cli(), env


def checkout_src(rev: str, into: Path) -> tuple[Path, str]:
    """Extract commit ``rev``'s ``src`` tree into ``into`` (``git archive``, no
    worktree: nothing in the repository changes). Returns the ``src`` path and
    the commit's short name; :class:`Skip` when ``rev`` names no commit."""
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "--verify",
                           f"{rev}^{{commit}}"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Skip(f"--before-commit {rev}: not a commit of {REPO}")
    short = proc.stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", short, "src"],
                               stdout=subprocess.PIPE)
    try:
        run_cmd(["tar", "-x", "-C", str(into)], stdin=archive.stdout)
    finally:
        if archive.stdout is not None:
            archive.stdout.close()
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {short} src failed")
    src = into / "src"
    # compiled once here, so the first timed run of that lamina does not pay for it
    run_cmd([sys.executable, "-m", "compileall", "-q", str(src)])
    probe = subprocess.run([sys.executable, "-c", "import lamina; print(lamina.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True,
                           text=True, check=False)
    if not probe.stdout.strip().startswith(str(src)):
        raise RuntimeError(f"lamina from {src} does not import first: {probe.stdout}{probe.stderr}")
    return src, short


def lamina_has_command(*words: str) -> bool:
    """Whether ``lamina WORDS... --help`` works (the command is implemented)."""
    proc = subprocess.run([*lamina_cli(), *words, "--help"], stdin=subprocess.DEVNULL,
                          capture_output=True, check=False, timeout=60)
    return proc.returncode == 0


def ensure_tools(tools: dict[str, str]) -> None:
    """Make sure each command in ``tools`` (command -> Debian package) exists.

    Missing ones are installed with apt-get when running as root (waiting for
    the dpkg lock of a concurrent install); :class:`Skip` when that fails.
    """
    missing = sorted({pkg for tool, pkg in tools.items() if not _have(tool)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise Skip(f"missing packages {missing} (not root, cannot apt-get install)")
    log = CACHE / "apt-install.log"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        proc = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends",
             "-o", "DPkg::Lock::Timeout=600", *missing],
            stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=900)
    still = sorted(tool for tool in tools if not _have(tool))
    if proc.returncode != 0 or still:
        raise Skip(f"apt-get install {' '.join(missing)} failed (exit {proc.returncode}, "
                   f"see {log}); missing {still}")


def _have(tool: str) -> bool:
    return shutil.which(tool) is not None or os.access(tool, os.X_OK)


def drop_caches() -> None:
    """Write back dirty pages so one run's writeback does not bill the next."""
    os.sync()


# --------------------------------------------------------------------------- cleanup

_libc = ctypes.CDLL(None, use_errno=True)
_MNT_DETACH = 2


def mounts_under(root: Path) -> list[str]:
    prefix = os.path.realpath(root)
    found: list[str] = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == prefix or mp.startswith(prefix + "/"):
                found.append(mp)
    return found


def unmount_under(root: Path) -> None:
    """Detach every mount at or below ``root``, deepest first."""
    for mp in sorted(mounts_under(root), key=lambda p: p.count("/"), reverse=True):
        _libc.umount2(mp.encode(), _MNT_DETACH)


def unmount_quietly(target: Path) -> None:
    """Unmount everything stacked on ``target`` (nothing mounted is fine)."""
    for _ in range(1000):
        if _libc.umount2(os.fspath(target).encode(), 0) != 0:
            return


def cleanup_tree(root: Path) -> None:
    if not os.path.lexists(root):
        return
    unmount_under(root)
    shutil.rmtree(root, ignore_errors=True)
    if os.path.lexists(root):  # e.g. immutable files: try once more, loudly
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


@contextlib.contextmanager
def scratch_filesystem(ctx: Ctx, kind: str) -> Iterator[Path]:
    """A fresh filesystem under the work directory for one benchmark's rounds:
    ``tmpfs`` (3 GiB), or a journaled ext4 on a loop-mounted 4 GiB file
    (``mkfs.ext4`` defaults: ordered journal). Detached and removed afterwards,
    with whatever was mounted below it."""
    where = ctx.work / f"fs-{kind}"
    where.mkdir()
    backing = ctx.work / f"fs-{kind}.img"
    try:
        if kind == "tmpfs":
            run_cmd(["mount", "-t", "tmpfs", "-o", "size=3g", "tmpfs", str(where)])
        else:
            with open(backing, "wb") as img:
                img.truncate(4 << 30)
            run_cmd(["mkfs.ext4", "-q", "-F", str(backing)])
            run_cmd(["mount", "-o", "loop", str(backing), str(where)])
        yield where
    finally:
        cleanup_tree(where)  # detaches it and what is below (erofs layers, overlays)
        backing.unlink(missing_ok=True)


def lamina_round(base: Path, snapshotter: str, words: Sequence[str], *,
                 after: Callable[[Path], object] | None = None) -> Callable[[int], float]:
    """Round ``i``: ``lamina --root base/lamina-<snapshotter>-<i> --snapshotter
    <snapshotter> <words>`` timed on a synced machine (``after`` looks at the root
    before it is removed)."""
    def one(i: int) -> float:
        root = base / f"lamina-{snapshotter}-{i}"
        try:
            os.sync()
            dt = time_cmd([*lamina_cli(), "--root", str(root), "--snapshotter", snapshotter,
                           *words])
            if after is not None:
                after(root)
            return dt
        finally:
            cleanup_tree(root)
    return one


def fs_type(path: Path) -> str:
    proc = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip()


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2e}"


def tests_module(name: str) -> Any:
    """The tests' helper module ``tests/<name>.py``, for benchmarks that build the same
    images or nodes the tests do; Skip when it is not there."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise Skip(f"tests/{name}.py is missing ({exc})") from exc


def imagefactory() -> Any:
    """The tests' image builder (tests/imagefactory.py)."""
    return tests_module("imagefactory")
