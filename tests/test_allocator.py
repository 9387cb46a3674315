"""lamina.util.allocator: freed layer-sized blocks are the next ones' memory.

A command streams a layer in blocks of about 1 MiB, several threads at once;
left to its defaults, glibc maps each such block afresh (or gives the freed
memory back), and the kernel faults in and zeroes every page of the next. The
workload below does what the unpack's threads do with their blocks; after
:func:`keep_freed_blocks` it must fault in a fraction of the pages it did
before. Each side runs in a fresh interpreter, so neither inherits the other's
heap.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

_WORKLOAD = """
import json, os, resource, sys, threading
if sys.argv[1] == "keep":
    from lamina.util.allocator import keep_freed_blocks
    assert keep_freed_blocks()
fd = os.open("/dev/zero", os.O_RDONLY)

def blocks():
    for i in range(100):
        block = os.read(fd, (1 << 20) + i * 4096)  # a new block, a little larger each time
        rest = block[1:]  # a second one alive while the first is
        del block, rest

blocks()  # the main thread's heap warmed on both sides
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks()
threads = [threading.Thread(target=blocks) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                           reason="mallopt's thresholds are glibc's (this C library is "
                                  f"{platform.libc_ver()[0] or 'unknown'})")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _WORKLOAD, mode], capture_output=True,
                         text=True, check=True, timeout=120)
    return int(json.loads(out.stdout))


@glibc
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    default, kept = _faults("default"), _faults("keep")  # the latter asserts it took
    # 300 blocks of 1-1.4 MiB: by default most of them fault in 256+ pages
    assert default > 20 * 256, default
    # kept: each thread's heap is faulted in once, then its blocks are reused
    assert kept * 3 < default, (kept, default)



@pytest.mark.parametrize(("words", "keeps"), [
    (["image", "ls"], True), (["images"], True), (["i", "ls"], True),
    (["content", "ls"], True), (["container", "ls"], False), (["snapshot", "ls"], False),
])
def test_only_commands_that_stream_layers_keep_freed_blocks(
        words: list[str], keeps: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Image, content and diff commands are short and move layers; a server or an
    attached container's command may live for hours with the memory kept unused."""
    from lamina import cli
    from lamina.util import allocator

    called: list[bool] = []
    monkeypatch.setattr(allocator, "keep_freed_blocks", lambda: called.append(True) or True)
    assert cli.main(["--root", str(tmp_path / "root"), *words]) == 0
    assert called == ([True] if keeps else [])
