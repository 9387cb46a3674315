"""Applying a large layer streams: peak RSS does not grow with the layer size.

The layer (a ~300 MiB file plus small ones) is generated on the fly and fed
through a reader object, in a subprocess whose peak RSS is measured with
getrusage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

SCRIPT = textwrap.dedent(
    r"""
    import hashlib, json, os, resource, sys, time, zlib
    from lamina.archive import apply_layer
    from lamina.archive.tarwriter import TarWriter

    SIZE = int(sys.argv[2])
    KIND = sys.argv[3]
    ZERO = bytes(1 << 20)

    def tar_chunks():
        out = []
        w = TarWriter(out.append)
        w.add("dir", "5", mode=0o755, uid=0, gid=0, mtime_ns=0)
        for i in range(200):
            w.add(f"dir/small{i}", "0", mode=0o644, uid=0, gid=0, mtime_ns=0)
        w.flush()
        yield from out
        yield w._header(b"dir/big", "0", 0o644, 0, 0, 0, SIZE)
        left = SIZE
        while left:
            n = min(left, len(ZERO))
            yield ZERO[:n] if n < len(ZERO) else ZERO
            left -= n
        yield bytes(-SIZE % 512) + bytes(1024)

    def compressed(chunks):
        if KIND == "none":
            yield from chunks
            return
        c = zlib.compressobj(1, wbits=31)
        for ch in chunks:
            z = c.compress(ch)
            if z:
                yield z
        yield c.flush()

    class Stream:
        def __init__(self, it):
            self.it = it
            self.buf = b""
            self.digest = hashlib.sha256()
        def read(self, n=-1):
            while not self.buf:
                try:
                    self.buf = next(self.it)
                except StopIteration:
                    return b""
            n = len(self.buf) if n < 0 else n
            out, self.buf = self.buf[:n], self.buf[n:]
            return out

    expected = hashlib.sha256()
    for ch in tar_chunks():
        expected.update(ch)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    res = apply_layer(Stream(compressed(tar_chunks())), sys.argv[1])
    elapsed = time.monotonic() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "base_kib": base, "peak_kib": peak, "seconds": elapsed,
        "ok": res.diff_id == "sha256:" + expected.hexdigest(),
        "size": os.path.getsize(os.path.join(sys.argv[1], "dir/big")),
    }))
    """
)


@pytest.mark.parametrize("kind", ["none", "gzip"])
def test_large_layer_streams(tmp_path: Path, kind: str) -> None:
    size = 300 << 20
    root = tmp_path / "root"
    root.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root), str(size), kind],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"]
    assert result["size"] == size
    growth_mib = (result["peak_kib"] - result["base_kib"]) / 1024
    print(f"{kind}: RSS growth {growth_mib:.1f} MiB, {size / result['seconds'] / 2**20:.0f} MiB/s")
    assert growth_mib < 60, result
