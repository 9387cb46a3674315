"""Image references: docker's normalisation, and a clear error for every invalid form."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidArgument
from lamina.oci.reference import parse_reference

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "want"), [
    ("alpine", "docker.io/library/alpine:latest"),
    ("alpine:3.19", "docker.io/library/alpine:3.19"),
    ("library/alpine", "docker.io/library/alpine:latest"),
    ("user/app:v1.2-rc_3", "docker.io/user/app:v1.2-rc_3"),
    ("docker.io/alpine", "docker.io/library/alpine:latest"),
    ("index.docker.io/user/app", "docker.io/user/app:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/app", "localhost:5000/app:latest"),
    ("127.0.0.1:5000/a/b/c:tag", "127.0.0.1:5000/a/b/c:tag"),
    ("registry.example.com/team/app", "registry.example.com/team/app:latest"),
    ("Registry.Example.com:443/app", "Registry.Example.com:443/app:latest"),
    (f"alpine@{D}", f"docker.io/library/alpine@{D}"),
    (f"alpine:3@{D}", f"docker.io/library/alpine:3@{D}"),
    (f"127.0.0.1:5000/app@{D}", f"127.0.0.1:5000/app@{D}"),
    ("a__b/c-d.e/f---g", "docker.io/a__b/c-d.e/f---g:latest"),
    ("[::1]:5000/app", "[::1]:5000/app:latest"),
])
def test_normalised(text: str, want: str) -> None:
    assert str(parse_reference(text)) == want


def test_parts() -> None:
    ref = parse_reference(f"127.0.0.1:5000/team/app:1@{D}")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("127.0.0.1:5000", "team/app", "1", D)
    assert ref.object == D
    assert ref.repository == "127.0.0.1:5000/team/app"
    assert parse_reference("app").object == "latest"


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"),
    ("Alpine", "lowercase"),
    ("user/App", "lowercase"),
    ("alpine:", "bad tag"),
    ("alpine:-x", "bad tag"),
    ("alpine:" + "x" * 129, "bad tag"),
    ("alpine@sha256:abc", "bad digest"),
    ("alpine@sha256:" + "ab" * 31, "64 hex"),
    ("alpine@sha256:" + "ab" * 33, "64 hex"),
    ("a@b@c", "more than one"),
    ("-host.com/app", "bad registry host"),
    ("host.com:port/app", "bad registry host"),
    ("host.com/", "no repository"),
    ("app/", "bad path component"),
    ("a//b", "bad path component"),
    ("a/_b", "bad path component"),
    ("a/b.", "bad path component"),
    (" alpine", "white space"),
    ("alp ine", "white space"),
    ("x/" + "a" * 260, "longer than"),
])
def test_invalid(text: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        parse_reference(text)
