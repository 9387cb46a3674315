"""Eight processes work on one root at once, then the root must be consistent.

Each worker process loops for ``LAMINA_CONCURRENCY_SECONDS`` (default 20)
through: snapshot chains of its own (prepare, commit, prepare on it, view,
remove all), snapshots under names every worker fights over, content ingests
(its own blobs and blobs every worker adds and deletes), image import and
overlay unpack (a base layer every image shares plus a layer of its own, then
mounted and compared), and now and then a garbage collection.

Errors are allowed only where processes race on purpose, and only these:

* committing a shared name: AlreadyExists (another worker committed it);
* a view on a shared snapshot: NotFound (removed meanwhile);
* removing a shared snapshot: NotFound (removed meanwhile) or
  FailedPrecondition (someone's view on it);
* adding a shared blob: NotFound (deleted between its commit and the Info
  lookup); deleting it: NotFound (deleted meanwhile).

Anything else (on a worker's own keys, blobs and images, in unpack or GC) is a
failure. Afterwards the root must be consistent (:func:`consistency.problems`)
without any recovery, every worker's last image must mount with its files, and
after a final GC the root must still be consistent.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

WORKERS = 8
KEEP = {"containerd.io/gc.root": "concurrency"}  # GC (run by the workers) leaves these alone
SECONDS = float(os.environ.get("LAMINA_CONCURRENCY_SECONDS", "20") or 20)


# --------------------------------------------------------------------------- the worker


def _image_tar(work: Path, idx: int, i: int) -> tuple[Path, str, str]:
    """A unique image (shared base layer + one of its own): (tar, name, file)."""
    import imagefactory as f

    base = f.layer_from_entries([f.Dir("base"), f.File("base/shared", "shared base\n")],
                                work / "layers")  # same bytes in every worker
    own = f"w{idx}/{i}"
    top = f.layer_from_entries([f.Dir(f"w{idx}"), f.File(own, f"worker {idx} image {i}\n")],
                               work / "layers")
    name = f"conc/w{idx}:{i}"
    layout = work / f"layout-{i}"
    f.build_oci_layout(layout, [base, top], ref_name=name)
    tar = f.as_tar(layout, work / f"image-{i}.tar")
    return tar, name, own


def worker(root: Path, idx: int, seconds: float, out: Path) -> None:
    from lamina.content.local import LocalContentStore
    from lamina.errors import AlreadyExists, FailedPrecondition, NotFound
    from lamina.images.service import ImageService
    from lamina.metadata.gc import collect
    from lamina.metadata.root import Root
    from lamina.snapshots.directory import DirectorySnapshotter

    r = Root(root)
    sn = r.snapshotter("overlay")
    assert isinstance(sn, DirectorySnapshotter)
    content = r.content()
    assert isinstance(content, LocalContentStore)
    svc = ImageService(r, snapshotter="overlay")
    work = root.parent / f"worker-{idx}"
    work.mkdir()
    counts: collections.Counter[str] = collections.Counter()
    allowed: collections.Counter[str] = collections.Counter()
    unexpected: list[str] = []
    last_image: dict[str, str] = {}

    def snapshot_chain(i: int) -> None:
        k = f"w{idx}-{i}"
        sn.prepare(f"{k}-a", "base", labels={**KEEP, "worker": str(idx)})
        (sn.fs_dir(sn.snapshot(f"{k}-a").id) / k).write_text(k)
        sn.commit(f"{k}-c", f"{k}-a", labels=KEEP)
        sn.prepare(f"{k}-b", f"{k}-c", labels=KEEP)
        sn.view(f"{k}-v", f"{k}-c", labels=KEEP)
        assert sn.stat(f"{k}-v").parent == f"{k}-c"
        for key in (f"{k}-v", f"{k}-b", f"{k}-c"):
            sn.remove(key)
        counts["snapshot ops"] += 7

    def shared_snapshot(i: int) -> None:
        name, key = f"shared-{i % 3}", f"w{idx}-{i}-s"
        sn.prepare(key, "base", labels=KEEP)
        try:
            sn.commit(name, key, labels=KEEP)
            counts["snapshot ops"] += 2
        except AlreadyExists:
            allowed["commit shared: AlreadyExists"] += 1
            sn.remove(key)
            counts["snapshot ops"] += 2
        view = f"w{idx}-{i}-sv"
        try:
            sn.view(view, name, labels=KEEP)
            sn.remove(view)
            counts["snapshot ops"] += 2
        except NotFound:
            allowed["view on shared: NotFound"] += 1
        try:
            sn.remove(name)
            counts["snapshot ops"] += 1
        except NotFound:
            allowed["remove shared: NotFound"] += 1
        except FailedPrecondition:
            allowed["remove shared: FailedPrecondition"] += 1

    def ingest(i: int) -> None:
        data = os.urandom(20_000 + (i * 7919) % 200_000)
        info = content.add(data, labels={**KEEP, "worker": str(idx)})
        assert content.read_at(info.digest, 0, len(data)) == data
        content.verify(info.digest)
        content.delete(info.digest)
        counts["content ops"] += 4

    def shared_ingest(i: int) -> None:
        import hashlib

        data = f"shared blob {i % 4}\n".encode() * 1000
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        try:
            content.add(data, expected=digest, exist_ok=True, labels=KEEP)
            counts["content ops"] += 1
        except NotFound:
            allowed["add shared: NotFound"] += 1
        try:
            content.delete(digest)
            counts["content ops"] += 1
        except NotFound:
            allowed["delete shared: NotFound"] += 1

    def image(i: int) -> None:
        tar, name, own = _image_tar(work, idx, i)
        assert [im.name for im in svc.import_(tar)] == [name]
        mnt = work / "mnt"
        svc.mount(name, mnt)
        try:
            assert (mnt / own).read_text() == f"worker {idx} image {i}\n"
            assert (mnt / "base/shared").read_text() == "shared base\n"
        finally:
            svc.unmount(mnt)
        if last_image:
            svc.remove(last_image["name"])
        last_image.update(name=name, file=own, text=f"worker {idx} image {i}\n")
        counts["image imports+unpacks"] += 1

    def gc(i: int) -> None:
        collect(r)
        counts["gc runs"] += 1

    ops = [snapshot_chain, ingest, image, shared_snapshot, shared_ingest]
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        op = gc if i % 11 == 10 else ops[i % len(ops)]
        try:
            op(i)
        except Exception:
            unexpected.append(f"{op.__name__} #{i}: {traceback.format_exc()}")
        i += 1
    svc.close()
    r.close()
    out.write_text(json.dumps({"counts": counts, "allowed": allowed,
                               "unexpected": unexpected, "last_image": last_image}))


# --------------------------------------------------------------------------- the test


@pytest.mark.usefixtures("require_root")
def test_eight_processes(tmp_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import consistency

    from lamina.images.service import ImageService
    from lamina.metadata.gc import collect
    from lamina.metadata.root import Root
    from lamina.mounts.mount import temp_mount

    root = tmp_root / "root"
    r = Root(root)
    sn = r.snapshotter("overlay")
    with temp_mount(sn.prepare("b", "")) as t:
        Path(t, "kept").write_text("base")
    sn.commit("base", "b", labels={"containerd.io/gc.root": "yes"})
    r.close()

    start = time.monotonic()
    procs = []
    for idx in range(WORKERS):
        out = tmp_root / f"result-{idx}.json"
        procs.append((out, subprocess.Popen(
            [sys.executable, __file__, str(root), str(idx), str(SECONDS), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    failures: list[str] = []
    results = []
    for out, proc in procs:
        output, _ = proc.communicate(timeout=SECONDS + 300)
        if proc.returncode != 0:
            failures.append(f"worker exited {proc.returncode}: {output[-3000:]}")
            continue
        results.append(json.loads(out.read_text()))
    elapsed = time.monotonic() - start

    totals: collections.Counter[str] = collections.Counter()
    allowed: collections.Counter[str] = collections.Counter()
    for idx, res in enumerate(results):
        totals.update(res["counts"])
        allowed.update(res["allowed"])
        failures += [f"worker {idx}: {u}" for u in res["unexpected"]]
        for what in ("snapshot ops", "content ops", "image imports+unpacks"):
            if not res["counts"].get(what):
                failures.append(f"worker {idx} did no {what}")

    problems = consistency.problems(root)
    leftovers = consistency.recover(root)  # what recovery would find: must be nothing
    r = Root(root)
    svc = ImageService(r, snapshotter="overlay")
    try:
        for res in results:
            last = res["last_image"]
            if not last:
                continue
            mnt = tmp_root / "check"
            svc.mount(last["name"], mnt)
            try:
                if (mnt / last["file"]).read_text() != last["text"]:
                    failures.append(f"image {last['name']}: wrong content")
            finally:
                svc.unmount(mnt)
        collect(r)
    finally:
        svc.close()
        r.close()
    after_gc = consistency.problems(root)

    summary = (f"\nconcurrency: {WORKERS} processes, {elapsed:.1f}s: "
               f"{sum(totals.values())} operations ({dict(sorted(totals.items()))}); "
               f"allowed races: {dict(sorted(allowed.items()))}; "
               f"leftovers found by recovery: {leftovers.count}")
    with capsys.disabled():
        print(summary)
    assert not failures, "\n".join(failures)
    assert problems == [], problems
    assert leftovers.count == 0, leftovers
    assert after_gc == [], after_gc


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
