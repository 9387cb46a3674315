"""One root, two owners, real containerd 1.6 (lamina.owners): the CLI and
containerd, through ``lamina serve`` (proxy snapshotter, and content store),
work on the same root, and neither side's collection removes what the other
still uses.

The scenario of the issue, as a user met it: the CLI imports an image and
makes a container that writes a file; containerd imports the same image and
runs ``ctr run --rm``; containerd's garbage collector runs; the CLI's
container starts again with its file; ``lamina gc`` runs; containerd runs
the image again; ``lamina check`` is clean. On overlay and on native, with
``lamina serve`` restarted between the steps, and with containerd first.
Then eight processes of both kinds for a minute.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import imagefactory as f
import pytest
from conftest import require_root_user, require_tools
from containerd_peer import (
    NAMESPACE,
    Containerd,
    Lamina,
    lamina_serve,
    private_containerd,
    short_dir,
)

pytestmark = [pytest.mark.slow]

IMG = "docker.io/lamina/shared:1"
KEEP = ["sh", "-c", "cat /kept 2>/dev/null; echo kept > /kept"]
# ctr run can lose a short-lived container's output (a known race of its FIFOs):
# containers run by ctr say what they found with their exit status instead
GREETED = ["sh", "-c", 'test "$(cat /etc/greeting)" = hello']
DEADLINE = 60.0
STRESS_SECONDS = 60.0


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_root_user()
    require_tools("containerd", "ctr", "runc")
    w = tmp_path_factory.mktemp("shared-image")
    greeting = f.layer_from_entries([f.Dir("etc"), f.File("etc/greeting", b"hello\n")], w)
    f.build_oci_layout(w / "layout", [f.minimal_layer(w), greeting], ref_name=IMG,
                       config=f.ImageConfig(cmd=["/bin/cat", "/etc/greeting"]))
    return f.as_tar(w / "layout", w / "image.tar")


class Shared:
    """``lamina serve`` (restartable) and a private containerd on one lamina root."""

    def __init__(self, workdir: Path, snapshotter: str) -> None:
        self.base, self._in_tmp = short_dir(workdir / "c")
        self.root = workdir / "root"
        self.sock = self.base / "lamina.sock"
        self.options = ("--snapshotter", snapshotter)
        self._serve: contextlib.AbstractContextManager[Lamina] | None = None
        self.ctrd: Containerd | None = None

    def start_serve(self) -> None:
        self._serve = lamina_serve(self.root, self.sock, options=self.options)
        self._serve.__enter__()

    def stop_serve(self) -> None:
        serve, self._serve = self._serve, None
        if serve is not None:
            serve.__exit__(None, None, None)  # asserts a clean exit

    def restart_serve(self) -> None:
        """Stop and start ``lamina serve``; back when containerd reaches it again."""
        self.stop_serve()
        self.start_serve()
        deadline = time.monotonic() + DEADLINE
        while self.ctr("snapshots", "--snapshotter", "lamina", "ls", check=False).returncode:
            assert time.monotonic() < deadline, "containerd did not reach lamina serve again"
            time.sleep(0.2)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``lamina --root ROOT --snapshotter S ARGS``, on the root directly."""
        done = subprocess.run(
            [sys.executable, "-m", "lamina", "--root", str(self.root), *self.options, *args],
            capture_output=True, text=True, timeout=300, check=False)
        if check:
            assert done.returncode == 0, f"lamina {' '.join(args)}: {done.stderr}"
        return done

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.ctrd is not None
        return self.ctrd.ctr(*args, check=check)

    def owned(self) -> dict[str, str]:
        """Every snapshot on the root, by key: its owner as ``snapshot ls`` says."""
        listed = json.loads(self.cli("snapshot", "ls", "--json").stdout)
        return {s["name"]: s.get("owner", "") for s in listed}

    def containerds(self) -> set[str]:
        """containerd's snapshots: its backend keys start with its namespace."""
        return {k for k in self.owned() if k.startswith(f"{NAMESPACE}/")}

    def wait_for(self, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE
        while not done():
            assert time.monotonic() < deadline, f"timed out ({DEADLINE}s) waiting until {what}"
            time.sleep(0.2)

    def cleanup(self) -> None:
        if self._in_tmp:
            shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def shared_root(workdir: Path, snapshotter: str, *, content: bool) -> Iterator[Shared]:
    s = Shared(workdir, snapshotter)
    try:
        s.start_serve()
        try:
            with private_containerd(s.base / "ctrd", proxy_snapshotter=str(s.sock),
                                    proxy_content=str(s.sock) if content else None) as ctrd:
                s.ctrd = ctrd
                yield s
            assert ctrd.proc.returncode == 0
        finally:
            s.stop_serve()
    finally:
        s.cleanup()


def _cli_side(s: Shared, tar: Path) -> None:
    s.cli("image", "import", str(tar))
    assert s.cli("run", "--name", "keep", IMG, *KEEP).stdout == ""  # writes /kept


def _containerd_side(s: Shared, tar: Path) -> None:
    s.ctr("images", "import", "--snapshotter", "lamina", str(tar))
    s.ctr("run", "--rm", "--snapshotter", "lamina", IMG, "demo", *GREETED)
    assert s.containerds(), s.owned()
    s.ctrd.collect_garbage()  # type: ignore[union-attr]  # containerd's GC, through serve


@pytest.mark.parametrize(("snapshotter", "content", "restart", "cli_first"), [
    ("overlay", True, False, True),
    ("native", True, False, True),
    ("overlay", True, True, True),
    ("native", False, True, False),
], ids=["overlay", "native", "overlay-serve-restarted", "native-containerd-first-restarted"])
def test_the_cli_and_containerd_share_a_root(tmp_root: Path, image_tar: Path, snapshotter: str,
                                             content: bool, restart: bool,
                                             cli_first: bool) -> None:
    with shared_root(tmp_root, snapshotter, content=content) as s:
        first, second = (_cli_side, _containerd_side) if cli_first else \
            (_containerd_side, _cli_side)
        first(s, image_tar)
        if restart:
            s.restart_serve()
        second(s, image_tar)
        if restart:
            s.restart_serve()
        s.ctrd.collect_garbage()  # type: ignore[union-attr]
        # containerd's collection left the CLI's container, its file and its image
        assert s.cli("task", "start", "keep").stdout == "kept\n"
        theirs = s.containerds()
        gc = s.cli("gc")
        assert "lamina-test/" not in gc.stdout, gc.stdout
        assert s.containerds() == theirs
        # lamina's collection left containerd's layers
        s.ctr("run", "--rm", "--snapshotter", "lamina", IMG, "demo-again", *GREETED)
        check = s.cli("check", check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        # the CLI lists containerd's snapshots, read-only
        key = sorted(theirs)[0]
        rm = s.cli("snapshot", "rm", key, check=False)
        assert rm.returncode == 5 and "belongs to containerd (namespace lamina-test)" \
            in rm.stderr, rm.stderr

        # containerd lets go of the image: its snapshots go, the CLI's image stays whole
        s.ctr("images", "rm", "--sync", IMG)
        s.ctrd.collect_garbage()  # type: ignore[union-attr]
        s.wait_for("containerd's snapshots left the root", lambda: not s.containerds())
        if content:
            assert s.ctr("content", "ls", "-q").stdout.split() == []
        assert s.cli("task", "start", "keep").stdout == "kept\n"
        check = s.cli("check", check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        # the CLI lets go too: nothing is left, every reference was counted
        s.cli("container", "rm", "keep")
        s.cli("image", "rm", IMG)
        s.cli("gc")
        assert s.owned() == {}
        assert s.cli("content", "ls", "-q").stdout.split() == []
        assert list((s.root / "content" / "blobs" / "sha256").iterdir()) == []
        assert s.cli("check").returncode == 0


# -- eight processes, a minute ------------------------------------------------------------

# One worker: loops until the deadline doing what its kind does, and exits 1 at
# the first failure (printing it), else 0 with how many rounds it did.
WORKER = r"""
import subprocess, sys, time
kind, n, until, root, sock, ctrd, tar, img = sys.argv[1:9]
LAMINA = [sys.executable, "-m", "lamina", "--root", root]
REMOTE = [sys.executable, "-m", "lamina", "--address", sock]
CTR = ["ctr", "--address", ctrd, "--namespace", "lamina-test"]

def run(cmd, out=None, data=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, input=data)
    if p.returncode != 0 or (out is not None and p.stdout != out):
        print(f"FAILED {' '.join(cmd)}: rc {p.returncode} {p.stdout!r} {p.stderr!r}")
        sys.exit(1)
    return p.stdout

i = 0
while time.time() < float(until):
    i += 1
    if kind == "cli":
        run([*LAMINA, "run", "--rm", "--name", f"cli{n}-{i}", img, "cat", "/etc/greeting"],
            "hello\n")
        if i % 2 == 0:
            run([*LAMINA, "gc"])
        if i % 3 == 0:
            run([*LAMINA, "image", "import", tar])
    elif kind == "ctr":
        run([*CTR, "run", "--rm", "--snapshotter", "lamina", img, f"ctr{n}-{i}",
             "sh", "-c", 'test "$(cat /etc/greeting)" = hello'])  # output may be lost
        if i % 2 == 0:  # a synchronous collection of containerd's
            lease = run([*CTR, "leases", "create"]).split()[0]
            run([*CTR, "leases", "rm", "--sync", lease])
        if i % 3 == 0:
            run([*CTR, "images", "import", "--snapshotter", "lamina", tar])
    else:  # lamina's own gRPC client, through serve
        # the CLI's collection runs meanwhile: what must stay is a gc root
        ROOTED = ["--label", "containerd.io/gc.root=1"]
        if i == 1:
            run([*REMOTE, "snapshot", "prepare", *ROOTED, f"base-{n}"])
            run([*REMOTE, "snapshot", "commit", *ROOTED, f"keep-{n}", f"base-{n}"])
        run([*REMOTE, "snapshot", "info", f"keep-{n}"])
        run([*REMOTE, "snapshot", "prepare", *ROOTED, f"r{n}-{i}", f"keep-{n}"])
        run([*REMOTE, "snapshot", "rm", f"r{n}-{i}"])
        run([*REMOTE, "content", "ingest", f"blob-{n}-{i}"], data=f"blob {n} {i}\n")
print(f"{kind}{n}: {i} rounds")
"""


def test_eight_processes_of_both_kinds_for_a_minute(tmp_root: Path, image_tar: Path) -> None:
    with shared_root(tmp_root, "overlay", content=True) as s:
        s.cli("image", "import", str(image_tar))
        s.cli("run", "--name", "keep", IMG, *KEEP)
        s.ctr("images", "import", "--snapshotter", "lamina", str(image_tar))
        s.ctr("containers", "create", "--snapshotter", "lamina", IMG, "ctr-keep")
        until = time.time() + STRESS_SECONDS
        assert s.ctrd is not None
        kinds = [("cli", 3), ("ctr", 3), ("remote", 2)]
        procs = [subprocess.Popen(
            [sys.executable, "-c", WORKER, kind, str(n), str(until), str(s.root), str(s.sock),
             s.ctrd.address, str(image_tar), IMG],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
            for kind, count in kinds for n in range(count)]
        outputs = []
        for p in procs:
            out, _ = p.communicate(timeout=STRESS_SECONDS + 600)
            outputs.append((p.returncode, out.strip()))
        print("\n" + "\n".join(o for _, o in outputs))
        assert [rc for rc, _ in outputs] == [0] * len(procs), outputs

        # what each side still references is all there
        assert s.cli("task", "start", "keep").stdout == "kept\n"
        s.ctr("snapshots", "--snapshotter", "lamina", "info", "ctr-keep")
        s.ctr("run", "--rm", "--snapshotter", "lamina", IMG, "final", *GREETED)
        owned = s.owned()
        assert {f"keep-{n}" for n in range(2)} <= set(owned), owned
        ctr_keep = next(k for k in owned if k.endswith("/ctr-keep"))
        assert owned[ctr_keep] == "containerd:lamina-test"
        check = s.cli("check", check=False)
        assert check.returncode == 0, check.stdout + check.stderr
