"""Image references, read the way docker and containerd read them.

A reference names a repository on a registry and, optionally, a tag and a
digest: ``[domain[:port]/]path[:tag][@sha256:hex]``. Short forms are
normalised as docker does:

=========================  ===========================================
``alpine``                 ``docker.io/library/alpine:latest``
``user/app:1``             ``docker.io/user/app:1``
``localhost:5000/app``     ``localhost:5000/app:latest``
``127.0.0.1:5000/a/b@d``   ``127.0.0.1:5000/a/b@d`` (no tag is added)
=========================  ===========================================

The first path component is a domain when it contains ``.`` or ``:`` or is
``localhost``; otherwise the domain is ``docker.io`` and a one-component
repository gets ``library/``. Anything that does not fit the grammar is
InvalidArgument, with the reason.

Local image names are kept as they were given (as ctr keeps them), and every
spelling of one reference names the same image: :func:`spellings` lists them
(``demo:1``, ``docker.io/library/demo:1``, ...), and the image store finds a
record by any of them, so ``demo:1`` is one image whichever way it is typed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lamina.errors import InvalidArgument

__all__ = ["DOCKER_HUB", "Reference", "normalize_name", "parse_reference", "spellings",
           "split_name"]

DOCKER_HUB = "docker.io"
_LEGACY_HUB = "index.docker.io"
_OFFICIAL = "library/"
DEFAULT_TAG = "latest"
MAX_NAME = 255

_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")
_PATH_PART = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)  # the grammar is ASCII
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``domain`` / ``path`` with a tag, a digest or both."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def repository(self) -> str:
        """``domain/path``: the repository without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What the registry's manifests endpoint is asked for: the digest, else the tag."""
        return self.digest or self.tag

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, self.tag, digest)

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        if first == _LEGACY_HUB:
            first = DOCKER_HUB
        return first, rest
    return DOCKER_HUB, name


def parse_reference(text: str, *, default_tag: str = DEFAULT_TAG) -> Reference:
    """Parse and normalise ``text`` (see the module docs); InvalidArgument when invalid."""
    if not isinstance(text, str) or not text:
        raise InvalidArgument("invalid reference: empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidArgument(f"invalid reference {text!r}: contains white space")
    name, _, digest = text.partition("@")
    if "@" in digest:
        raise InvalidArgument(f"invalid reference {text!r}: more than one '@'")
    if digest and not _DIGEST.fullmatch(digest):
        raise InvalidArgument(f"invalid reference {text!r}: bad digest {digest!r}")
    if digest.startswith("sha256:") and len(digest) != 71:
        raise InvalidArgument(f"invalid reference {text!r}: a sha256 digest has 64 hex digits")
    tag = ""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"invalid reference {text!r}: bad tag {tag!r}")
    domain, path = _split_domain(name)
    if not _DOMAIN.fullmatch(domain):
        raise InvalidArgument(f"invalid reference {text!r}: bad registry host {domain!r}")
    if not path:
        raise InvalidArgument(f"invalid reference {text!r}: no repository")
    if domain == DOCKER_HUB and "/" not in path:
        path = _OFFICIAL + path
    for part in path.split("/"):
        if not _PATH_PART.fullmatch(part):
            if _PATH_PART.fullmatch(part.lower()):
                raise InvalidArgument(
                    f"invalid reference {text!r}: repository name must be lowercase")
            raise InvalidArgument(f"invalid reference {text!r}: bad path component {part!r}")
    if len(f"{domain}/{path}") > MAX_NAME:
        raise InvalidArgument(f"invalid reference {text!r}: longer than {MAX_NAME} characters")
    if not tag and not digest:
        tag = default_tag
    return Reference(domain, path, tag, digest)


def normalize_name(name: str) -> str:
    """The normalised spelling of image name ``name``: ``demo:1`` is
    ``docker.io/library/demo:1``, ``demo`` is ``docker.io/library/demo:latest``, a
    digest is kept. InvalidArgument when ``name`` is not a reference."""
    return str(parse_reference(name))


def spellings(name: str) -> list[str]:
    """Every spelling of image name ``name`` that reads as the same reference,
    ``name`` first and the normalised one next: the names a record of that image
    may be stored under. Just ``[name]`` when ``name`` is not a reference."""
    try:
        ref = parse_reference(name)
    except InvalidArgument:
        return [name]
    repos = [ref.repository]
    if ref.domain == DOCKER_HUB:
        paths = [ref.path]
        if ref.path.startswith(_OFFICIAL):
            paths.append(ref.path[len(_OFFICIAL):])
        repos += [f"{host}{path}" for host in (f"{DOCKER_HUB}/", f"{_LEGACY_HUB}/", "")
                  for path in paths]
    suffix = (f":{ref.tag}" if ref.tag else "") + (f"@{ref.digest}" if ref.digest else "")
    suffixes = [suffix, ""] if ref.tag == DEFAULT_TAG and not ref.digest else [suffix]
    return list(dict.fromkeys([name, *(r + s for s in suffixes for r in repos)]))


def split_name(name: str) -> tuple[str, str]:
    """``name`` as docker's REPOSITORY and TAG: a bare ``app`` is ``app:latest`` (as
    every command reads it); the tag is empty when only a digest names the image
    (``app@sha256:…``)."""
    repository, at, _ = name.partition("@")
    slash = repository.rfind("/")
    colon = repository.rfind(":")
    if colon > slash:  # a port (``host:5000/app``) comes before a slash
        return repository[:colon], repository[colon + 1:]
    return repository, "" if at else "latest"
