"""Content digests: parsing, validation, and hashing while streaming.

lamina addresses blobs by OCI digest strings of the form
``sha256:<64 lowercase hex digits>``; that is the only algorithm accepted.
Anything else is :class:`~lamina.errors.InvalidArgument`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from lamina.errors import InvalidArgument

if TYPE_CHECKING:
    import hashlib

__all__ = [
    "SHA256",
    "Digest",
    "HashingReader",
    "HashingWriter",
    "digest_file",
    "parse_digest",
    "sha256",
    "sha256_digest",
    "validate_digest",
]

SHA256 = "sha256"
CHUNK_SIZE = 1 << 20
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Digest:
    """A parsed digest; ``str()`` gives back the ``algorithm:hex`` form."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def parse_digest(s: str) -> Digest:
    """Parse and validate ``sha256:<hex>``; InvalidArgument otherwise."""
    if not isinstance(s, str) or _DIGEST_RE.fullmatch(s) is None:
        algorithm = s.split(":", 1)[0] if isinstance(s, str) and ":" in s else ""
        if algorithm and algorithm != SHA256:
            raise InvalidArgument(f"unsupported digest algorithm {algorithm!r} in {s!r}")
        raise InvalidArgument(
            f"invalid digest {s!r}: want sha256: followed by 64 lowercase hex digits"
        )
    return Digest(SHA256, s[len(SHA256) + 1:])


def validate_digest(s: str) -> str:
    """Return ``s`` unchanged when it is a valid digest; InvalidArgument otherwise."""
    parse_digest(s)
    return s


def sha256(data: bytes = b"") -> hashlib._Hash:
    """A SHA-256 hasher. hashlib (OpenSSL's) is loaded when something is first hashed:
    every command imports the content store, and listing one hashes nothing."""
    import hashlib

    return hashlib.sha256(data)


def sha256_digest(data: bytes) -> str:
    """The digest string of ``data``."""
    return f"{SHA256}:{sha256(data).hexdigest()}"


def digest_file(path: str | os.PathLike[str], *, limit: int | None = None) -> tuple[str, int]:
    """Hash a file (or its first ``limit`` bytes) in chunks: ``(digest, size)``."""
    h = sha256()
    size = 0
    with open(path, "rb") as f:
        while limit is None or size < limit:
            want = CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - size)
            chunk = f.read(want)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
    return f"{SHA256}:{h.hexdigest()}", size


class HashingReader:
    """Wraps a readable stream; hashes and counts everything read through it."""

    def __init__(self, raw: IO[bytes] | Any) -> None:
        self._raw = raw
        self._hash = sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._raw.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def digest(self) -> str:
        return f"{SHA256}:{self._hash.hexdigest()}"


class HashingWriter:
    """Wraps a writable stream; hashes and counts everything written through it."""

    def __init__(self, raw: IO[bytes] | Any) -> None:
        self._raw = raw
        self._hash = sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        n: int = self._raw.write(data)
        if n is None:  # raw streams may report nothing on full writes
            n = len(data)
        self._hash.update(data[:n])
        self.size += n
        return n

    def digest(self) -> str:
        return f"{SHA256}:{self._hash.hexdigest()}"
