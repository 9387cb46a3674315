"""Write a few files into an active snapshot, as a container would.

``python writer.py ROOT SNAPSHOTTER KEY [--sync]``: the files go straight into
the snapshot's writable directory (overlay's upperdir, native's directory), so
the writes happen below the root where the recorder sees them (writes through
an overlay mount would show the mount's path, not the upperdir's). ``KEY`` may
be ``container:ID`` (that container's snapshot). With ``--sync`` the files and
their directories are fsynced, as a careful application does.
"""

from __future__ import annotations

import os
import sys

from lamina.fs.files import fsync_dir
from lamina.metadata.root import Root

FILES = {"app/config": b"setting=1\n", "app/data.bin": bytes(range(256)) * 40}


def writable_dir(root: Root, snapshotter: str, key: str) -> str:
    (m,) = root.snapshotter(snapshotter).mounts(key)
    for opt in m.options:
        if opt.startswith("upperdir="):
            return opt.split("=", 1)[1]
    return m.source


def main(argv: list[str]) -> int:
    root = Root(argv[1])
    try:
        key = argv[3]
        if key.startswith("container:"):
            key = root.containers().get(key.removeprefix("container:")).snapshot_key
        top = writable_dir(root, argv[2], key)
    finally:
        root.close()
    sync = "--sync" in argv[4:]
    for rel, data in FILES.items():
        path = os.path.join(top, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
    if sync:
        for d in {os.path.dirname(os.path.join(top, rel)) for rel in FILES} | {top}:
            fsync_dir(d)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
