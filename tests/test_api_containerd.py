"""A real containerd (1.6+) uses ``lamina serve`` as its proxy snapshotter.

containerd runs privately: its own root, state, gRPC/ttrpc sockets and opt
directory under a temporary directory, the CRI plugin disabled, no debug or
metrics listener (no TCP). ``ctr snapshots --snapshotter lamina`` then drives
prepare / ls / info / mounts / commit / view / label / usage / rm through
containerd's metadata layer into lamina. Everything started is stopped by PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lamina.api.client import RemoteSnapshotter
from lamina.api.server import check_address
from lamina.cli.config import containerd_snippet
from lamina.errors import AlreadyExists
from lamina.snapshots import Kind

CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")

pytestmark = [
    pytest.mark.skipif(CONTAINERD is None or CTR is None, reason="containerd/ctr not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd needs root"),
    pytest.mark.slow,
]

NS = "lamina-test"


@dataclass
class Env:
    dir: Path
    sock: Path  # containerd's
    lamina_sock: Path

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert CTR is not None
        out = subprocess.run(
            [CTR, "-a", str(self.sock), "-n", NS, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)}: rc {out.returncode}: {out.stderr}")
        return out

    def snap(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ctr("snapshots", "--snapshotter", "lamina", *args, check=check)


def _config(d: Path, lamina_sock: Path, content: bool) -> str:
    disabled = ["io.containerd.grpc.v1.cri"]
    if content:  # containerd's metadata then uses lamina's content store
        disabled.append("io.containerd.content.v1.content")
    private = f"""\
root = "{d}/root"
state = "{d}/state"
disabled_plugins = {json.dumps(disabled)}

[grpc]
  address = "{d}/c.sock"

[ttrpc]
  address = "{d}/c.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

"""
    # the snippet `lamina config containerd` prints, as users would paste it
    snippet = containerd_snippet(str(lamina_sock), content=content)
    return snippet.replace("version = 2\n", "version = 2\n" + private, 1)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # our own child, by pid
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=timeout)


def _wait(what: str, ok: object, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if callable(ok) and ok():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    content = bool(getattr(request, "param", False))
    d = Path(tempfile.mkdtemp(prefix="lct-", dir="/tmp"))  # short: socket paths
    lamina_sock = d / "lamina.sock"
    procs: list[subprocess.Popen[bytes]] = []
    lamina_log, ctrd_log = d / "lamina.log", d / "containerd.log"
    try:
        with open(lamina_log, "wb") as log:
            lamina = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import sys; from lamina.cli import main; sys.exit(main())",
                    "--root",
                    str(d / "lamina-root"),
                    "serve",
                    "--address",
                    str(lamina_sock),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(lamina)

        def lamina_up() -> bool:
            if not lamina_sock.exists() or not stat.S_ISSOCK(lamina_sock.lstat().st_mode):
                return False
            try:
                check_address(str(lamina_sock))
            except AlreadyExists:
                return True
            return False

        _wait("lamina serve", lamina_up, lamina, lamina_log)

        for sub in ("root", "state", "opt"):
            (d / sub).mkdir()
        (d / "config.toml").write_text(_config(d, lamina_sock, content))
        assert CONTAINERD is not None
        with open(ctrd_log, "wb") as log:
            ctrd = subprocess.Popen(
                [CONTAINERD, "--config", str(d / "config.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(ctrd)
        e = Env(dir=d, sock=d / "c.sock", lamina_sock=lamina_sock)
        _wait("containerd", lambda: e.ctr("version", check=False).returncode == 0, ctrd, ctrd_log)
        yield e
        # clean stops: containerd first (it holds connections to lamina), then lamina
        assert _stop(ctrd) == 0, ctrd_log.read_text()[-3000:]
        assert _stop(lamina) == 0, lamina_log.read_text()[-3000:]
        assert not lamina_sock.exists()
    finally:
        for p in reversed(procs):
            _stop(p)
        subprocess.run(["umount", "-R", "-l", str(d)], capture_output=True, check=False)
        shutil.rmtree(d, ignore_errors=True)


def test_ctr_snapshots_through_lamina(env: Env) -> None:
    plugins = env.ctr("plugins", "ls").stdout
    line = next(x for x in plugins.splitlines() if " lamina " in f" {x} ")
    assert "io.containerd.snapshotter.v1" in line and line.split()[-1] == "ok", line

    env.snap("prepare", "base", "")
    listing = env.snap("ls").stdout
    assert any(x.split()[:2] == ["base", "Active"] for x in listing.splitlines()), listing
    assert '"Kind": "Active"' in env.snap("info", "base").stdout
    mounts = env.snap("mounts", "/mnt/x", "base").stdout
    assert "lamina-root" in mounts, mounts  # the mounts are lamina's

    # lamina saw containerd's namespaced key: <namespace>/<id>/<key>
    with RemoteSnapshotter(str(env.lamina_sock), "lamina") as sn:
        names = [i.name for i in sn.walk()]
        assert len(names) == 1 and names[0].startswith(f"{NS}/") and names[0].endswith("/base")
        assert sn.stat(names[0]).kind is Kind.ACTIVE

    env.snap("commit", "base-c", "base")
    env.snap("prepare", "child", "base-c")
    env.snap("view", "look", "base-c")
    rows = {x.split()[0]: x.split()[1:] for x in env.snap("ls").stdout.splitlines()[1:]}
    assert rows == {
        "base-c": ["Committed"],
        "child": ["base-c", "Active"],
        "look": ["base-c", "View"],
    }, rows
    assert '"Kind": "Committed"' in env.snap("info", "base-c").stdout
    env.snap("label", "base-c", "foo=bar")
    assert '"foo": "bar"' in env.snap("info", "base-c").stdout
    usage = env.snap("usage").stdout
    assert "base-c" in usage and "child" in usage

    with RemoteSnapshotter(str(env.lamina_sock), "lamina") as sn:
        kinds = sorted((i.name.rsplit("/", 1)[-1], i.kind.value) for i in sn.walk())
        assert kinds == [("base-c", "committed"), ("child", "active"), ("look", "view")]

    # a parent with children: lamina's FailedPrecondition reaches ctr
    res = env.snap("rm", "base-c", check=False)
    assert res.returncode != 0 and "precondition" in res.stderr.lower(), res.stderr
    env.snap("rm", "child")
    env.snap("rm", "look")
    env.snap("rm", "base-c")
    assert env.snap("ls").stdout.splitlines()[1:] == []

    # containerd's garbage collector removes the backend snapshots from lamina
    with RemoteSnapshotter(str(env.lamina_sock), "lamina") as sn:
        deadline = time.monotonic() + 30
        while list(sn.walk()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(sn.walk()) == []


@pytest.mark.parametrize("env", [True], indirect=True, ids=["content-proxy"])
def test_ctr_content_through_lamina(env: Env) -> None:
    """With [proxy_plugins.lamina-content], containerd's content store is lamina's."""
    plugins = env.ctr("plugins", "ls").stdout
    assert any(
        "io.containerd.content.v1" in x and "lamina-content" in x and x.split()[-1] == "ok"
        for x in plugins.splitlines()
    ), plugins
    blob = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    assert CTR is not None
    ingest = subprocess.run(
        [
            CTR,
            "-a",
            str(env.sock),
            "-n",
            NS,
            "content",
            "ingest",
            "--expected-digest",
            digest,
            "--expected-size",
            str(len(blob)),
            "ref-1",
        ],
        input=blob,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert ingest.returncode == 0, ingest.stderr
    assert digest in env.ctr("content", "ls").stdout
    got = subprocess.run(
        [CTR, "-a", str(env.sock), "-n", NS, "content", "get", digest],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    assert got == blob
    from lamina.api.client import RemoteContentStore

    with RemoteContentStore(str(env.lamina_sock)) as store:
        assert store.info(digest).size == len(blob)  # the blob lives in lamina
    env.ctr("content", "rm", digest)
    assert digest not in env.ctr("content", "ls").stdout
