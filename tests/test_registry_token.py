"""Bearer tokens against the real registry: a token issuer of the test's own signs JWTs
(RS256, x5c) that docker-registry verifies; anonymous pull, authenticated push."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import imagefactory
import pytest
from bad_registry import Handler, State, serving
from registry_peer import Registry as Peer
from registry_peer import running_registry

from lamina.remotes.auth import Unauthorized

SERVICE, ISSUER = "lamina-test-registry", "lamina-test-issuer"
USER, PASSWORD = "bob", "hunter2"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("issuer")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    "key.pem", "-out", "cert.pem", "-days", "2", "-subj", "/CN=issuer"],
                   cwd=d, check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-in", "cert.pem", "-outform", "DER", "-out",
                    "cert.der"], cwd=d, check=True, capture_output=True, timeout=60)
    return d


def _jwt(signer: Path, access: list[dict[str, object]]) -> str:
    header = {"typ": "JWT", "alg": "RS256",
              "x5c": [base64.b64encode((signer / "cert.der").read_bytes()).decode()]}
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300,
              "nbf": now - 10, "iat": now, "jti": f"j{time.monotonic_ns()}", "access": access}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(signer / "key.pem")],
                         input=signing_input.encode(), capture_output=True, check=True,
                         timeout=30).stdout
    return f"{signing_input}.{_b64(sig)}"


@pytest.fixture(scope="module")
def issuer(signer: Path) -> Iterator[tuple[str, State]]:
    """Grants pull to anyone, push only to bob (Basic auth at the token endpoint)."""
    state = State()

    def token(h: Handler) -> bool:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        auth = h.headers.get("Authorization", "")
        authed = auth == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if auth and not authed:
            h.send(401, b'{"details":"bad credentials"}')
            return True
        access = []
        for scope in query.get("scope", []):
            kind, name, actions = scope.split(":")
            granted = [a for a in actions.split(",") if a == "pull" or authed]
            access.append({"type": kind, "name": name, "actions": granted})
        h.send(200, json.dumps({"token": _jwt(signer, access), "expires_in": 300}).encode())
        return True

    state.hooks["/token"] = token
    with serving(state) as host:
        yield host, state


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory, signer: Path,
         issuer: tuple[str, State]) -> Iterator[Peer]:
    extra = (f"auth:\n  token:\n    realm: http://{issuer[0]}/token\n    service: {SERVICE}\n"
             f"    issuer: {ISSUER}\n    rootcertbundle: {signer / 'cert.pem'}\n")
    with running_registry(tmp_path_factory.mktemp("registry"), extra=extra) as reg:
        yield reg


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                               "DOCKER_CONFIG": str(root / "docker")})


def test_token_flow(require_root: None, peer: Peer, issuer: tuple[str, State],
                    tmp_root: Path) -> None:
    work = tmp_root / "image"
    layer = imagefactory.layer_from_entries([imagefactory.File("t", b"token\n")],
                                            work / "blobs")
    image = imagefactory.build_oci_layout(work / "oci", [layer], ref_name="t")
    assert lamina(tmp_root, "image", "import", "--no-unpack", str(work / "oci")).returncode == 0
    name = f"{peer.host}/team/app:1"
    anon = lamina(tmp_root, "image", "push", "t", name)
    assert anon.returncode == Unauthorized.exit_code
    assert anon.stderr.startswith(f"lamina: Unauthorized: {peer.host}: ") and \
        anon.stderr.count("\n") == 1, anon.stderr
    wrong = lamina(tmp_root, "image", "push", "--user", f"{USER}:nope", "t", name)
    assert wrong.returncode == Unauthorized.exit_code
    assert "token server" in wrong.stderr and "refused" in wrong.stderr
    ok = lamina(tmp_root, "image", "push", "--user", f"{USER}:{PASSWORD}", "t", name)
    assert ok.returncode == 0, ok.stderr
    scopes = [urllib.parse.parse_qs(urllib.parse.urlsplit(r.path).query)["scope"]
              for r in issuer[1].requests("GET", "/token") if "scope=" in r.path]
    assert ["repository:team/app:pull,push"] in scopes
    # anyone may pull: an anonymous token for the repository's pull scope
    other = tmp_root / "other"
    pulled = lamina(other, "image", "pull", name)
    assert pulled.returncode == 0, pulled.stderr
    assert image.manifest_digest in pulled.stdout
