"""A real containerd (1.6+) uses ``lamina serve`` as its proxy snapshotter.

containerd is the shared private one of ``containerd_peer`` (its own root,
state, sockets and opt directory, CRI disabled, no TCP listener), with lamina
plugged in as ``[proxy_plugins.lamina]`` (and ``lamina-content``).
``ctr snapshots --snapshotter lamina`` then drives prepare / ls / info /
mounts / commit / view / label / usage / rm through containerd's metadata
layer into lamina. Everything started is stopped by PID.

`lamina_serve` and `lamina_and_containerd` are shared with
``test_proxy_e2e.py`` (images, ``ctr run`` and GC through lamina).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import containerd_peer
import pytest
from containerd_peer import BUILTIN_CONTENT, Containerd, Lamina, lamina_and_containerd
from containerd_peer import NAMESPACE as NS

from lamina.cli.config import containerd_snippet
from lamina.snapshots import Kind

pytestmark = [pytest.mark.slow]



@dataclass
class Env:
    lamina: Lamina
    ctrd: Containerd

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ctrd.ctr(*args, check=check, timeout=60)

    def snap(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ctr("snapshots", "--snapshotter", "lamina", *args, check=check)


@pytest.fixture
def env(request: pytest.FixtureRequest, tmp_root: Path) -> Iterator[Env]:
    content = bool(getattr(request, "param", False))
    # ctr snapshots/content objects hold no lease: collect only when the test asks
    with lamina_and_containerd(tmp_root, content=content, gc_on_request=True) as (lamina, ctrd):
        yield Env(lamina, ctrd)


# --------------------------------------------------------------------------- tests


def test_snippet_matches_the_launcher(tmp_path: Path) -> None:
    """What ``lamina config containerd`` prints is what these tests run with."""
    sock = str(tmp_path / "lamina.sock")
    for content in (False, True):
        snippet = tomllib.loads(containerd_snippet(sock, content=content))
        used = tomllib.loads(
            containerd_peer._config(tmp_path, sock, sock if content else None)
        )
        assert snippet["version"] == used["version"] == 2
        assert snippet["proxy_plugins"] == used["proxy_plugins"]
        # the snippet's advice for the content proxy is what the launcher applies
        text = containerd_snippet(sock, content=content)
        assert f'disabled_plugins = ["{BUILTIN_CONTENT}"]' in text
        assert (BUILTIN_CONTENT in used["disabled_plugins"]) is content


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
    with env.lamina.snapshotter() as sn:
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

    with env.lamina.snapshotter() as sn:
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
    with env.lamina.snapshotter() as sn:
        assert len(list(sn.walk())) == 3  # not before a collection
        env.ctrd.collect_garbage()
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
    assert not any(  # containerd's own store is off, so every blob read comes from lamina
        "io.containerd.content.v1" in x and " content " in f" {x} " and x.split()[-1] == "ok"
        for x in plugins.splitlines()
    ), plugins
    blob = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    ingest = subprocess.run(
        ["ctr", "-a", env.ctrd.address, "-n", NS, "content", "ingest",
         "--expected-digest", digest, "--expected-size", str(len(blob)), "ref-1"],
        input=blob, capture_output=True, timeout=60, check=False,
    )
    assert ingest.returncode == 0, ingest.stderr
    got = subprocess.run(
        ["ctr", "-a", env.ctrd.address, "-n", NS, "content", "get", digest],
        capture_output=True, timeout=60, check=True,
    ).stdout
    # served by lamina: containerd's built-in content store is disabled (see above)
    assert got == blob
    env.ctr("content", "rm", digest)
    assert digest not in env.ctr("content", "ls").stdout
    # the backing blob in lamina goes at containerd's next garbage collection
    with env.lamina.content() as store:
        assert digest in {i.digest for i in store.walk()}  # not before it
        env.ctrd.collect_garbage()
        deadline = time.monotonic() + 30
        while digest in {i.digest for i in store.walk()} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert digest not in {i.digest for i in store.walk()}
