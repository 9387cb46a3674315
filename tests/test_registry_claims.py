"""What the README's registry sections promise, checked on the wire, through the CLI.

Each test runs ``lamina`` as a process against a registry on 127.0.0.1 (Debian's
``docker-registry``, or the misbehaving-on-purpose ``bad_registry`` where the test
must see every request) and asserts what the README says a user gets: hosts.toml
``header``, ``override_path`` and client certificates, ``credsStore``,
``--containerd-hosts``, ``--platform``, ``--concurrency`` and the refusal of
schema 1 manifests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from bad_registry import MT_CONFIG, MT_INDEX, MT_MANIFEST, Handler, State, serving
from registry_peer import running_registry, skopeo_push

from lamina.errors import LaminaError, NotFound, NotImplementedErr, Unavailable
from lamina.remotes.auth import Unauthorized

MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def lamina(root: Path, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300, check=False,
                          env=full, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess[str], cls: type[LaminaError]) -> str:
    """The single ``lamina: ...`` line a command failed with, ``cls``'s exit code
    (a subclass prints its own name: TransportError is an Unavailable)."""
    assert proc.returncode == cls.exit_code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lamina: "), proc.stderr
    return lines[0]


def hosts_dir(base: Path, host: str, text: str) -> Path:
    """A certs.d directory holding ``hosts.toml`` for ``host`` (``host:port``)."""
    name, _, port = host.rpartition(":")
    ns = base / f"{name}_{port}_"
    ns.mkdir(parents=True, exist_ok=True)
    (ns / "hosts.toml").write_text(text)
    return base


def small_image(state: State, repo: str, work: Path, *, layers: int = 1, arch: str = "amd64",
                tag: str = "1") -> tuple[str, list[str]]:
    """An image of ``layers`` tiny layers served by ``state``: (manifest digest, its
    config and layer digests). ``work`` holds the layer files."""
    built = [imagefactory.layer_from_entries(
        [imagefactory.File(f"f{i}-{arch}", f"{arch} layer {i}\n".encode())],
        work / f"{repo.replace('/', '_')}-{arch}-{i}") for i in range(layers)]
    blobs = [state.add_blob(lyr.read_blob()) for lyr in built]
    config = json.dumps({"architecture": arch, "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [lyr.diff_id for lyr in built]}}).encode()
    cfg = state.add_blob(config)
    manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                "config": {"mediaType": MT_CONFIG, "digest": cfg, "size": len(config)},
                "layers": [lyr.descriptor() for lyr in built]}
    return state.add_manifest(repo, [tag], MT_MANIFEST, manifest), [cfg, *blobs]


# ----------------------------------------------------------------- hosts.toml on the wire


def test_hosts_toml_header_and_override_path(require_root: None, tmp_root: Path) -> None:
    """A mirror with ``override_path`` is asked at its own path (no ``/v2`` added), and
    every request to it carries the ``header`` table; the registry itself sees neither."""
    upstream, mirror = State(), State()
    with serving(upstream) as reg, serving(mirror) as mhost:
        ref = f"{reg}/team/app:1"
        # the mirror holds the image under its API root /v2/cache
        small_image(mirror, "cache/team/app", tmp_root / "layers")
        hosts = hosts_dir(tmp_root / "certs.d", reg, (
            f'server = "http://{reg}"\n'
            f'[host."http://{mhost}/v2/cache"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            '  override_path = true\n'
            f'  [host."http://{mhost}/v2/cache".header]\n'
            '    x-tenant = "team"\n'
            '    x-trace = ["a", "b"]\n'))
        proc = lamina(tmp_root / "root", "image", "pull", "--hosts-dir", str(hosts), ref)
        assert proc.returncode == 0, proc.stderr
    asked = mirror.requests()
    assert asked, "the mirror was never asked"
    for r in asked:
        assert r.path.startswith("/v2/cache/team/app/"), r.path
        assert r.headers.get("x-tenant") == "team", r.headers
        assert r.headers.get("x-trace") in ("a, b", "a,b"), r.headers
    assert not [r for r in upstream.requests() if r.path != "/v2/"], upstream.log
    assert not any("x-tenant" in r.headers for r in upstream.requests())
    listed = lamina(tmp_root / "root", "image", "ls", "--names")
    assert ref in listed.stdout


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _sign(d: Path, name: str, subject: str, ext: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", subject, cwd=d)
    (d / f"{name}.cnf").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.cnf", cwd=d)


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all from it."""
    d = tmp_path_factory.mktemp("mtls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
             "-out", "ca.pem", "-days", "2", "-subj", "/CN=lamina mtls CA", cwd=d)
    _sign(d, "server", "/CN=127.0.0.1", "subjectAltName=IP:127.0.0.1\n")
    _sign(d, "client", "/CN=lamina client", "extendedKeyUsage=clientAuth\n")
    return d


def test_hosts_toml_client_certificate(require_root: None, mtls: Path, tmp_root: Path) -> None:
    """A registry that requires a client certificate is reached with the ``client``
    pair of hosts.toml, and refused, in one line, without it."""
    work = tmp_root / "image"
    layer = imagefactory.layer_from_entries([imagefactory.File("etc/mtls", b"yes\n")],
                                            work / "blobs")
    image = imagefactory.build_oci_layout(work / "oci", [layer], ref_name="mtls")
    extra = f"    clientcas:\n      - {mtls / 'ca.pem'}\n"
    # the TLS block of registry_peer's config is the last thing under http:, so the
    # client CA list can follow it
    with running_registry(tmp_root / "registry2", tls=(mtls / "server.pem",
                                                       mtls / "server.key"),
                          extra=extra) as reg:
        ref = f"{reg.host}/secure/app:1"
        subprocess.run(["skopeo", "--insecure-policy", "copy", "--quiet",
                        "--dest-cert-dir", str(_skopeo_certs(mtls, tmp_root)),
                        image.oci_ref, f"docker://{ref}"],
                       check=True, capture_output=True, timeout=120)
        anonymous = hosts_dir(tmp_root / "anon", reg.host,
                              f'server = "https://{reg.host}"\nca = "{mtls / "ca.pem"}"\n')
        refused = lamina(tmp_root / "r1", "image", "pull", "--hosts-dir", str(anonymous), ref)
        line = one_line_error(refused, Unavailable)
        assert reg.host in line and "certificate" in line
        known = hosts_dir(tmp_root / "known", reg.host, (
            f'server = "https://{reg.host}"\nca = "{mtls / "ca.pem"}"\n'
            f'client = [["{mtls / "client.pem"}", "{mtls / "client.key"}"]]\n'))
        ok = lamina(tmp_root / "r2", "image", "pull", "--hosts-dir", str(known), ref)
        assert ok.returncode == 0, ok.stderr
        shown = lamina(tmp_root / "r2", "image", "ls", "--names")
        assert ref in shown.stdout


def _skopeo_certs(mtls: Path, tmp: Path) -> Path:
    """A docker-style certs directory for skopeo: CA, client cert and key."""
    d = tmp / "skopeo-certs"
    d.mkdir(exist_ok=True)
    shutil.copy(mtls / "ca.pem", d / "ca.crt")
    shutil.copy(mtls / "client.pem", d / "client.cert")
    shutil.copy(mtls / "client.key", d / "client.key")
    return d


# ----------------------------------------------------------------------- credentials


def test_creds_store_helper(require_root: None, tmp_root: Path) -> None:
    """docker's ``credsStore``: ``docker-credential-<name> get`` is asked with the
    registry's host on stdin, and its answer authenticates the pull."""
    work = tmp_root / "image"
    layer = imagefactory.layer_from_entries([imagefactory.File("etc/c", b"c\n")],
                                            work / "blobs")
    image = imagefactory.build_oci_layout(work / "oci", [layer], ref_name="creds")
    with running_registry(tmp_root / "registry", htpasswd=("alice", "s3cret")) as reg:
        ref = f"{reg.host}/private/app:1"
        skopeo_push(image.oci_ref, ref, creds="alice:s3cret")
        config = tmp_root / "docker"
        config.mkdir()
        (config / "config.json").write_text(json.dumps({"credsStore": "lamtest"}))
        bindir = tmp_root / "bin"
        bindir.mkdir()
        asked = tmp_root / "asked"
        helper = bindir / "docker-credential-lamtest"
        helper.write_text(
            "#!/bin/sh\n"
            f'[ "$1" = get ] || exit 1\nread -r server\necho "$server" >> {asked}\n'
            'printf \'{"ServerURL":"%s","Username":"alice","Secret":"s3cret"}\' "$server"\n')
        helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
        env = {"DOCKER_CONFIG": str(config), "PATH": f"{bindir}:{os.environ['PATH']}"}
        ok = lamina(tmp_root / "root", "image", "pull", ref, env=env)
        assert ok.returncode == 0, ok.stderr
        assert reg.host in asked.read_text().split()
        # without the store: the registry's challenge is answered with nothing
        (config / "config.json").write_text("{}")
        refused = lamina(tmp_root / "root2", "image", "pull", ref, env=env)
        line = one_line_error(refused, Unauthorized)
        assert line.startswith("lamina: Unauthorized: ")


# ------------------------------------------------------------------- --containerd-hosts


@contextlib.contextmanager
def containerd_hosts_file(host: str, text: str) -> Iterator[Path]:
    """``/etc/containerd/certs.d/<host>/hosts.toml`` for the test's own loopback host,
    removed after (with the directories the test made)."""
    base = Path("/etc/containerd/certs.d")
    made = [p for p in (base.parent, base) if not p.exists()]
    name, _, port = host.rpartition(":")
    ns = base / f"{name}_{port}_"
    ns.mkdir(parents=True, exist_ok=False)
    try:
        (ns / "hosts.toml").write_text(text)
        yield ns
    finally:
        shutil.rmtree(ns)
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()


def test_containerd_hosts(require_root: None, tmp_root: Path) -> None:
    """``--containerd-hosts`` also reads /etc/containerd/certs.d; without it, lamina
    reads only its own directories."""
    upstream = State()
    with serving(upstream) as reg:
        small_image(upstream, "team/app", tmp_root / "layers")
        ref = f"{reg}/team/app:1"
        own = tmp_root / "own-certs.d"
        own.mkdir()
        with containerd_hosts_file(reg, (f'server = "http://{reg}"\n'
                                         f'[host."http://{reg}"]\n'
                                         f'  [host."http://{reg}".header]\n'
                                         '    x-from = "containerd-certs.d"\n')):
            plain = lamina(tmp_root / "r1", "image", "pull", "--hosts-dir", str(own), ref)
            assert plain.returncode == 0, plain.stderr
            before = len(upstream.requests())
            assert not any("x-from" in r.headers for r in upstream.requests())
            read = lamina(tmp_root / "r2", "image", "pull", "--hosts-dir", str(own),
                          "--containerd-hosts", ref)
            assert read.returncode == 0, read.stderr
        later = upstream.requests()[before:]
        assert later and all(r.headers.get("x-from") == "containerd-certs.d" for r in later)


# ---------------------------------------------------------------- --platform, --concurrency


def test_platform_flag_picks_from_an_index(require_root: None, tmp_root: Path) -> None:
    """``--platform linux/arm64`` fetches that manifest's blobs and none of amd64's."""
    state = State()
    amd, amd_blobs = small_image(state, "team/multi", tmp_root / "layers", arch="amd64",
                                 tag="amd")
    arm, arm_blobs = small_image(state, "team/multi", tmp_root / "layers", arch="arm64",
                                 tag="arm")
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [
        {"mediaType": MT_MANIFEST, "digest": d, "size": len(state.manifests[
            f"team/multi/{d}"][1]), "platform": {"os": "linux", "architecture": a}}
        for d, a in ((amd, "amd64"), (arm, "arm64"))]}
    state.add_manifest("team/multi", ["1"], MT_INDEX, index)
    with serving(state) as reg:
        proc = lamina(tmp_root / "root", "image", "pull", "--platform", "linux/arm64",
                      "--no-unpack", f"{reg}/team/multi:1")
        assert proc.returncode == 0, proc.stderr
        missing = lamina(tmp_root / "root", "image", "pull", "--platform", "linux/s390x",
                         "--no-unpack", f"{reg}/team/multi:1")
    line = one_line_error(missing, NotFound)
    assert "linux/s390x" in line
    fetched = {r.path.rsplit("/", 1)[1] for r in state.requests("GET")
               if "/blobs/" in r.path or "/manifests/sha256:" in r.path}
    assert set(arm_blobs) | {arm} <= fetched
    assert not fetched & ({amd} | set(amd_blobs))


class _InFlight:
    """Counts concurrent blob GETs. The first ones wait (up to a generous deadline) until
    ``allowed`` overlap, so a client allowing that many is always seen doing so; every
    request is then held a little longer, so one allowing more shows it too."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.now = 0
        self.most = 0
        self.cond = threading.Condition()

    def hook(self, handler: Handler) -> bool:
        with self.cond:
            self.now += 1
            self.most = max(self.most, self.now)
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.most >= self.allowed, timeout=30)
            self.cond.wait(timeout=0.3)  # room for a request beyond the limit to arrive
            self.now -= 1
        return False  # the honest answer follows


@pytest.mark.parametrize("n", [1, 3])
def test_concurrency_flag_bounds_parallel_downloads(require_root: None, tmp_root: Path,
                                                    n: int) -> None:
    state = State()
    _, blobs = small_image(state, "team/wide", tmp_root / "layers", layers=8)
    inflight = _InFlight(allowed=n)
    for d in blobs[1:]:
        state.hooks[f"/v2/team/wide/blobs/{d}"] = inflight.hook
    with serving(state) as reg:
        proc = lamina(tmp_root / "root", "image", "pull", "--concurrency", str(n),
                      "--no-unpack", f"{reg}/team/wide:1")
    assert proc.returncode == 0, proc.stderr
    assert inflight.most == n


# ------------------------------------------------------------------------- schema 1


def test_schema1_manifest_refused(require_root: None, tmp_root: Path) -> None:
    """Docker's schema 1 (signed JSON, no content-addressed config) is refused in one
    line that names it; nothing is stored."""
    state = State()
    doc = {"schemaVersion": 1, "name": "team/old", "tag": "1", "architecture": "amd64",
           "fsLayers": [], "history": [], "signatures": []}
    state.add_manifest("team/old", ["1"], MT_SCHEMA1, doc)
    with serving(state) as reg:
        proc = lamina(tmp_root / "root", "image", "pull", f"{reg}/team/old:1")
    line = one_line_error(proc, NotImplementedErr)
    assert line == (f"lamina: NotImplemented: Docker schema 1 manifests are not supported "
                    f"(media type '{MT_SCHEMA1}'); push the image again with a current "
                    "client, which writes schema 2 or OCI")
    assert "team/old" not in lamina(tmp_root / "root", "image", "ls").stdout
    assert lamina(tmp_root / "root", "check").stdout.strip() == "consistent"
