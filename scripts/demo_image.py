"""Build a tiny runnable OCI image from this machine's own binaries (no network).

    python3 scripts/demo_image.py OUT.tar NAME:TAG [--file PATH=TEXT]...

The root filesystem holds /bin/sh, echo, cat, sleep, ls and the shared
libraries they need; each ``--file`` adds a file. The layer is written by
lamina's own diff writer (a diff against nothing is the whole tree).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from lamina.archive.changes import write_diff
from lamina.oci.types import MediaType, host_platform

BINARIES = ("sh", "echo", "cat", "sleep", "ls", "seq", "date", "wc")


def _copy_with_libs(binary: str, root: Path) -> None:
    src = shutil.which(binary)
    assert src, f"{binary} not found"
    paths = [src]
    ldd = subprocess.run(["ldd", src], capture_output=True, text=True, check=False).stdout
    paths += [w for line in ldd.splitlines() for w in line.split() if w.startswith("/")]
    for p in paths:
        real = Path(p).resolve()
        dest = root / ("bin/" + binary if p == src else p.lstrip("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, dest)


def build(out: Path, name: str, files: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rootfs"
        for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root"):
            (root / d).mkdir(parents=True)
        (root / "tmp").chmod(0o1777)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        for b in BINARIES:
            _copy_with_libs(b, root)
        for path, text in files.items():
            (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (root / path.lstrip("/")).write_text(text + "\n")
        layer = io.BytesIO()
        result = write_diff(None, root, layer, compression="gzip")
    blobs: dict[str, bytes] = {}

    def put(data: bytes) -> dict[str, object]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    plat = host_platform()
    config = {
        "architecture": plat["architecture"], "os": plat["os"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [result.diff_id]},
    }
    manifest = {
        "schemaVersion": 2, "mediaType": MediaType.OCI_MANIFEST,
        "config": {"mediaType": MediaType.OCI_CONFIG, **put(json.dumps(config).encode())},
        "layers": [{"mediaType": MediaType.OCI_LAYER_GZIP, **put(layer.getvalue())}],
    }
    mdesc = {"mediaType": MediaType.OCI_MANIFEST, **put(json.dumps(manifest).encode()),
             "annotations": {"org.opencontainers.image.ref.name": name}}
    index = {"schemaVersion": 2, "mediaType": MediaType.OCI_INDEX, "manifests": [mdesc]}
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        members = {"oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
                   "index.json": json.dumps(index).encode()}
        members.update({f"blobs/sha256/{d[7:]}": b for d, b in blobs.items()})
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("name")
    p.add_argument("--file", action="append", default=[], metavar="PATH=TEXT")
    args = p.parse_args()
    build(args.out, args.name, dict(f.split("=", 1) for f in args.file))


if __name__ == "__main__":
    main()
