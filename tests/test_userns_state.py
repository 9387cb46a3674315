"""User-namespace state is read when it is needed: a process that imports lamina and
then joins a user namespace (what ``rootless.enter()`` does in the CLI) gets the
namespace's answers (see lamina.mounts.overlay, lamina.rootless)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Imports first, then unshare(CLONE_NEWUSER) in the same (single-threaded) process,
# as rootless.enter() joins the namespace after the CLI's imports.
CHILD = r"""
import ctypes, json, os, sys
from lamina import rootless
from lamina.archive import apply, changes, whiteout
from lamina.mounts import overlay

def seen():
    return {"userns": rootless.in_user_namespace(), "prefix": overlay.overlay_xattr_prefix(),
            "opaque": overlay.overlay_opaque_xattr(),
            "options": list(overlay.overlay_mount_options()),
            "maps": rootless._mapped() is not None}

before = seen()
uid = os.geteuid()
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    print(json.dumps({"skip": os.strerror(ctypes.get_errno())}))
    sys.exit(0)
pid = os.getpid()
with open(f"/proc/{pid}/setgroups", "w") as f:
    f.write("deny")
with open(f"/proc/{pid}/uid_map", "w") as f:
    f.write(f"0 {uid} 1\n")  # this user alone, as 0
print(json.dumps({"before": before, "after": seen()}))
"""


def test_entering_a_user_namespace_after_import_changes_the_answers() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          timeout=60, check=True)
    seen = json.loads(done.stdout)
    if "skip" in seen:
        pytest.skip(f"cannot make a user namespace here: {seen['skip']}")
    before, after = seen["before"], seen["after"]
    if before["userns"]:
        pytest.skip("the tests already run in a user namespace")
    assert before == {"userns": False, "prefix": "trusted.overlay.",
                      "opaque": "trusted.overlay.opaque", "options": [], "maps": False}
    assert after == {"userns": True, "prefix": "user.overlay.",
                     "opaque": "user.overlay.opaque", "options": ["userxattr"], "maps": True}
