"""Fuzz ``apply_layer`` and image import with hostile and broken input.

Inputs: tar streams built from random members (names with ``..``, absolute
paths, whiteouts, opaque markers, long names, sym- and hard links pointing
anywhere, devices, odd type flags, xattrs, every tar format), then possibly
compressed (gzip, zstd) and mutated (bit flips, truncation, overwritten
header fields, garbage appended); and image archives (OCI layout tars) whose
bytes or whose documents (index, manifest, config) are mutated.

Property: the call succeeds or raises one of the lamina errors the test names
(:data:`ACCEPTED`: a refusal of bad input, never ``Internal``, which is how an
unexpected ``OSError`` surfaces), and never writes outside its target: a
sentinel directory next to the target (which the target holds symlinks to) is
unchanged, nothing new appears in the parent directory or in the working
directory. A failed import leaves a consistent root (:func:`consistency.problems`).

Each test runs ``LAMINA_FUZZ_EXAMPLES`` examples (default 200) and asserts it
ran them all. The seed is random per run unless ``LAMINA_FUZZ_SEED`` is set;
every test prints it, and a failure says how to replay it (the seed, and
Hypothesis's ``@reproduce_failure`` blob). With ``LAMINA_FUZZ_COLLECT=<file>`` a
failure is logged there (kind, innermost lamina frame) instead of stopping the
run, and the test fails at its end: a survey of every distinct bug.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consistency
import imagefactory as f
import pytest
from conftest import tmp_base
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

from lamina.archive.apply import apply_layer
from lamina.errors import FailedPrecondition, InvalidArgument, LaminaError, ResourceExhausted

EXAMPLES = int(os.environ.get("LAMINA_FUZZ_EXAMPLES", "200") or 200)
SEED = int(os.environ.get("LAMINA_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # an example mounts and syncs: its time says nothing about lamina
    database=None,  # a replay comes from the seed in the output, not from a local file
    # the strategies build whole tars and image archives, larger and slower to
    # generate than Hypothesis likes; no other health check is silenced
    suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow],
    print_blob=True,
)
_COLLECT = os.environ.get("LAMINA_FUZZ_COLLECT")  # explore: log failures here, do not stop

# What each fuzzed call may raise for bad input; anything else fails the test.
# InvalidArgument: a malformed layer, archive or document (NeedsLowerLayers, the
# overlay-mode refusal, is one); FailedPrecondition: a blob whose bytes do not hash
# to the digest its descriptor names (the content commit refuses it, as containerd's).
# an import whose layers announce more than the filesystem can hold is refused
# before anything is written (lamina.images.unpack): ResourceExhausted
ACCEPTED: dict[str, tuple[type[LaminaError], ...]] = {
    "apply_layer": (InvalidArgument,),
    "import-bytes": (InvalidArgument, FailedPrecondition, ResourceExhausted),
    "import-documents": (InvalidArgument, FailedPrecondition, ResourceExhausted),
}

CASES: Counter[str] = Counter()  # test -> examples run
OUTCOMES: Counter[str] = Counter()  # "test: ok" / "test: InvalidArgument" ...

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="device nodes and mounts need root")


def _base() -> Path:
    base = tmp_base() / "fuzz"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _fuzz(name: str, run: Callable[..., None], capsys: pytest.CaptureFixture[str]) -> None:
    """Run the Hypothesis test ``run`` under the stated settings and seed; then print
    how its examples ended and assert that all of them ran."""
    try:
        FUZZ(seed(SEED)(run))()
    except BaseException as exc:
        exc.add_note(f"replay: LAMINA_FUZZ_SEED={SEED} LAMINA_FUZZ_EXAMPLES={EXAMPLES} "
                     f"(or the @reproduce_failure line above)")
        raise
    finally:
        with capsys.disabled():
            print(f"\n{name}: {CASES[name]} examples, seed {SEED}: " + ", ".join(
                f"{k.split(': ', 1)[1]} {v}" for k, v in sorted(OUTCOMES.items())
                if k.startswith(f"{name}: ")))
    assert CASES[name] >= EXAMPLES, f"{name}: only {CASES[name]} of {EXAMPLES} examples ran"
    bugs = {k: v for k, v in OUTCOMES.items() if k.startswith(f"{name}: BUG")}
    assert not bugs, f"failures logged to {_COLLECT}: {bugs}"  # LAMINA_FUZZ_COLLECT


# --------------------------------------------------------------------------- sandbox


def _tree(path: Path) -> list[tuple[str, ...]]:
    """Everything about a tree that a stray write could change."""
    out: list[tuple[str, ...]] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            st_ = os.lstat(p)
            rel = os.path.relpath(p, path)
            extra = ""
            if os.path.islink(p):
                extra = os.readlink(p)
            elif os.path.isfile(p):
                extra = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            out.append((rel, oct(st_.st_mode), str(st_.st_uid), str(st_.st_nlink),
                        str(st_.st_mtime_ns), extra))
    return out


@contextlib.contextmanager
def _sandbox() -> Iterator[Path]:
    """``<case>/target`` to write into, next to a sentinel it holds symlinks to.

    On exit: the sentinel, the case directory's listing and the (temporary)
    working directory must be as they were.
    """
    case = Path(tempfile.mkdtemp(prefix="case-", dir=_base()))
    target, sentinel, cwd = case / "target", case / "sentinel", case / "cwd"
    for d in (target, sentinel, cwd):
        d.mkdir()
    (sentinel / "file").write_text("sentinel")
    (sentinel / "dir").mkdir()
    os.link(sentinel / "file", sentinel / "dir" / "hard")
    os.symlink("../sentinel", target / "rel")  # ways out that apply must not take
    os.symlink(str(sentinel), target / "abs")
    os.symlink("rel/dir", target / "chain")
    (target / "a").mkdir()
    (target / "a" / "f").write_text("existing")
    before = (_tree(sentinel), sorted(os.listdir(case)))
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        yield target
    finally:
        os.chdir(old_cwd)
        try:
            assert not consistency.mounts_under(case), "left mounted"
            after = (_tree(sentinel), sorted(os.listdir(case)))
            assert after == before, "written outside the target"
            assert os.listdir(cwd) == [], f"written into the working directory: {os.listdir(cwd)}"
        finally:
            consistency.unmount_under(case)
            shutil.rmtree(case, ignore_errors=True)


def _signature(exc: BaseException) -> tuple[str, str]:
    """The exception's type and the innermost lamina source file it passed through."""
    frames = [fr for fr in traceback.extract_tb(exc.__traceback__)
              if "/src/lamina/" in fr.filename]
    where = frames[-1].filename.split("/src/lamina/")[-1] if frames else "?"
    return type(exc).__name__, where


def _expect_refusal_or_success(name: str, fn: Any) -> None:
    CASES[name] += 1
    try:
        fn()
    except ACCEPTED[name] as exc:
        OUTCOMES[f"{name}: {type(exc).__name__}"] += 1
    except Exception as exc:  # the property: nothing but the accepted errors
        kind, where = _signature(exc)
        if _COLLECT:  # exploring: note the failure's signature and go on
            with open(_COLLECT, "a") as log:
                log.write(f"{name}\t{kind}\t{where}\t{str(exc)[:120]!r}\n")
            OUTCOMES[f"{name}: BUG {kind} in {where}"] += 1
            return
        raise AssertionError(
            f"{name}: {type(exc).__name__}, not one of "
            f"{', '.join(c.__name__ for c in ACCEPTED[name])}: {exc}\n"
            + "".join(traceback.format_exception(exc))
        ) from exc
    else:
        OUTCOMES[f"{name}: ok"] += 1


# --------------------------------------------------------------------------- tars

COMPONENTS = ["a", "b", "f", "d", "rel", "abs", "chain", "..", ".", "", "x" * 120,
              ".wh.a", ".wh.f", ".wh..wh..opq", ".wh..wh.plnk", ".wh.", "é", "sp ace",
              "new", "link", "dev"]

names = st.builds(
    lambda prefix, parts: prefix + "/".join(parts),
    st.sampled_from(["", "", "./", "/", "../", "//"]),
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4),
)
link_targets = st.one_of(
    names,
    st.sampled_from(["/", "/etc/passwd", "../sentinel/file", "../../", "a/f", "f", ".",
                     "abs/file", "rel/file", "/proc/self/root"]),
)
TYPES = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
         tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE,
         tarfile.CONTTYPE, b"S", b"V", b"Z", b"x", b"g"]
XATTRS = ["user.x", "security.capability", "trusted.overlay.opaque",
          "trusted.overlay.origin", "security.selinux", "bogus"]


@st.composite
def members(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(draw(names))
    ti.type = draw(st.sampled_from(TYPES))
    data = b""
    if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
        data = draw(st.binary(max_size=600))
    ti.size = len(data)
    if ti.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        ti.linkname = draw(link_targets)
    ti.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o1777, 0, 0o7777, 0o200]))
    ti.uid = draw(st.sampled_from([0, 1000, 65534, 2**21 - 1]))
    ti.gid = draw(st.sampled_from([0, 1000, 65534]))
    ti.mtime = draw(st.sampled_from([0, 1, 1_700_000_000, 2**33 - 1]))
    ti.devmajor = draw(st.integers(0, 300))
    ti.devminor = draw(st.integers(0, 300))
    pax: dict[str, str] = {}
    if draw(st.booleans()):
        for key in draw(st.lists(st.sampled_from(XATTRS), max_size=2)):
            pax[f"SCHILY.xattr.{key}"] = draw(st.sampled_from(["y", "", "\x01\x02", "n" * 70]))
    if draw(st.integers(0, 9)) == 0:
        pax[draw(st.sampled_from(["path", "linkpath", "size", "mtime", "uid", "atime"]))] = \
            draw(st.sampled_from(["", "-1", "1e9", "../x", "9" * 30, "abc", "/", "0.5"]))
    ti.pax_headers = pax
    return ti, data


def _write_tar(entries: list[tuple[tarfile.TarInfo, bytes]], fmt: int) -> bytes | None:
    out = io.BytesIO()
    try:
        with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
            for ti, data in entries:
                tf.addfile(ti, io.BytesIO(data) if data else None)
    except (ValueError, tarfile.TarError, OverflowError, UnicodeError):
        return None
    return out.getvalue()


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """A few random damages to ``data``: bit flips, header fields, truncation, junk."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        if not buf:
            break
        op = draw(st.sampled_from(["flip", "field", "truncate", "append", "zero"]))
        if op == "flip":
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "field":  # overwrite a field of some 512-byte header block
            block = draw(st.integers(0, max(0, len(buf) // 512 - 1))) * 512
            off, size = draw(st.sampled_from([(0, 100), (100, 8), (108, 8), (116, 8),
                                              (124, 12), (136, 12), (148, 8), (156, 1),
                                              (157, 100), (257, 8), (329, 8), (337, 8),
                                              (345, 155)]))
            value = draw(st.binary(min_size=size, max_size=size) | st.just(b"0" * size)
                         | st.just(b"7" * (size - 1) + b"\x00"))
            buf[block + off:block + off + size] = value[: max(0, len(buf) - block - off)]
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))):]
        elif op == "append":
            buf += draw(st.binary(max_size=1024))
        else:
            i = draw(st.integers(0, len(buf)))
            buf[i:i + 512] = bytes(min(512, len(buf) - i))
    return bytes(buf)


def _compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, mtime=0)
    if how == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(data)
    return data


@st.composite
def layers(draw: st.DrawFn) -> bytes:
    entries = draw(st.lists(members(), max_size=12))
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    raw = _write_tar(entries, fmt)
    assume(raw is not None)
    assert raw is not None
    how = draw(st.sampled_from(["none", "none", "gzip", "zstd"]))
    if draw(st.booleans()):  # damage the tar, then compress it...
        raw = draw(mutations(raw))
        return _compress(raw, how)
    return draw(mutations(_compress(raw, how)))  # ...or damage the compressed stream


def test_fuzz_apply_layer(capsys: pytest.CaptureFixture[str]) -> None:
    @given(layer=layers(), overlay=st.booleans())
    def run(layer: bytes, overlay: bool) -> None:
        with _sandbox() as target:
            _expect_refusal_or_success(
                "apply_layer", lambda: apply_layer(io.BytesIO(layer), target, overlay=overlay))

    _fuzz("apply_layer", run, capsys)


# --------------------------------------------------------------------------- images


def _hexd(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Image:
    """A small valid OCI layout whose documents tests rewrite."""

    def __init__(self, workdir: Path) -> None:
        l1 = f.layer_from_entries([f.Dir("etc"), f.File("etc/hello", "hello\n"),
                                   f.Symlink("etc/ln", "hello"), f.Dir("d"),
                                   f.File("d/x", "x")], workdir)
        l2 = f.layer_from_entries([f.Whiteout("d/x"), f.Hardlink("etc/h", "etc/hello"),
                                   f.File("etc/hello", "bye\n")], workdir, compression="zstd")
        self.ref = f.build_oci_layout(workdir / "layout", [l1, l2], ref_name="fuzz:latest")
        self.layout = workdir / "layout"
        self.tar = f.as_tar(self.layout, workdir / "image.tar").read_bytes()
        self.manifest = json.loads((self.layout / "blobs/sha256" /
                                    self.ref.manifest_digest.split(":")[1]).read_bytes())
        self.index = json.loads((self.layout / "index.json").read_bytes())
        self.blobs = {p.name: p.read_bytes() for p in (self.layout / "blobs/sha256").iterdir()}

    def archive(self, index: Any, manifest: Any | None, config: Any | None,
                extra: dict[str, bytes]) -> bytes:
        """An OCI tar with these documents (stored as blobs under their digests)."""
        blobs = dict(self.blobs)
        blobs.update(extra)
        for doc in (config, manifest):
            if doc is not None:
                data = json.dumps(doc).encode()
                blobs[_hexd(data)] = data
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
            def add(name: str, data: bytes) -> None:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
            add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            add("index.json", json.dumps(index).encode())
            for name, data in sorted(blobs.items()):
                add(f"blobs/sha256/{name}", data)
        return out.getvalue()


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> _Image:
    return _Image(tmp_path_factory.mktemp("fuzz-image"))


def _import(name: str, archive: bytes) -> None:
    """Import (and unpack, overlay) ``archive`` into a fresh root in a sandbox."""
    from lamina.images.service import ImageService
    from lamina.metadata.root import Root

    with _sandbox() as root:

        def run() -> None:
            r = Root(root)
            svc = ImageService(r, snapshotter="overlay")
            try:
                svc.import_(io.BytesIO(archive))
            finally:
                svc.close()
                r.close()

        _expect_refusal_or_success(name, run)
        bad = consistency.problems(root, resolve_images=False)
        if bad and _COLLECT:
            with open(_COLLECT, "a") as log:
                log.write(f"{name}\tinconsistent\t-\t{bad!r:.300}\n")
            OUTCOMES[f"{name}: BUG inconsistent root"] += 1
            return
        assert not bad, f"root inconsistent after the import: {bad}"


def test_fuzz_import_bytes(image: _Image, capsys: pytest.CaptureFixture[str]) -> None:
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        _import("import-bytes", data.draw(mutations(image.tar)))

    _fuzz("import-bytes", run, capsys)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**63) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
    max_leaves=8,
)


@st.composite
def documents(draw: st.DrawFn, image: _Image) -> bytes:
    """A valid archive whose index, manifest, config or a layer is subtly wrong."""
    index = json.loads(json.dumps(image.index))
    manifest = json.loads(json.dumps(image.manifest))
    config = json.loads(json.dumps(image.ref.config))
    extra: dict[str, bytes] = {}
    digests = [f"sha256:{d}" for d in image.blobs] + ["sha256:" + "0" * 64, "sha256:xyz",
                                                      "md5:abc", "", "sha256:" + "A" * 64]
    def layer_list() -> list[Any]:
        layers_ = manifest.get("layers")
        return [x for x in layers_ if isinstance(x, dict)] if isinstance(layers_, list) else []

    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["index", "manifest", "config", "layer", "layer-bytes"]))
        if where.startswith("layer") and not layer_list():
            where = "manifest"
        if where == "layer-bytes":  # a layer blob replaced by another tar, under its name
            digest = str(draw(st.sampled_from(layer_list())).get("digest", ""))
            extra[digest.split(":")[-1]] = draw(layers())
            continue
        doc = {"index": index["manifests"][0], "manifest": manifest, "config": config,
               "layer": draw(st.sampled_from(layer_list())) if layer_list() else {}}[where]
        key = draw(st.sampled_from([*sorted(doc), "annotations", "platform", "rootfs",
                                    "urls", "size"]))
        choice = draw(st.integers(0, 4))
        if choice == 0:
            doc.pop(key, None)
        elif choice == 1 and key == "digest":
            doc[key] = draw(st.sampled_from(digests))
        elif choice == 2 and key == "rootfs":
            doc[key] = {"type": "layers", "diff_ids": draw(st.lists(
                st.sampled_from(digests), max_size=3))}
        elif choice == 3:
            doc[key] = draw(st.sampled_from([-1, 0, 1, 2**64, "x", None, [], {}]))
        else:
            doc[key] = draw(JSON)
    # usually keep the documents linked: the config and manifest under their new digests
    fresh_config = json.dumps(config).encode()
    if isinstance(manifest.get("config"), dict) and draw(st.booleans()):
        manifest["config"]["digest"] = f"sha256:{_hexd(fresh_config)}"
        manifest["config"]["size"] = len(fresh_config)
    mdata = json.dumps(manifest).encode()
    entry = index["manifests"][0]
    if draw(st.booleans()):
        entry["digest"], entry["size"] = f"sha256:{_hexd(mdata)}", len(mdata)
    return image.archive(index, manifest, config, extra)


def test_fuzz_import_documents(image: _Image, capsys: pytest.CaptureFixture[str]) -> None:
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        _import("import-documents", data.draw(documents(image)))

    _fuzz("import-documents", run, capsys)


def test_fuzz_valid_image_imports(image: _Image) -> None:
    """The fuzzed image itself imports and unpacks (the mutations start from a good one)."""
    with _sandbox() as target:
        from lamina.images.service import ImageService
        from lamina.metadata.root import Root

        r = Root(target)
        svc = ImageService(r, snapshotter="overlay")
        try:
            assert [i.name for i in svc.import_(io.BytesIO(image.tar))] == ["fuzz:latest"]
            assert [i.name for i in svc.import_(io.BytesIO(
                image.archive(image.index, None, None, {})))] == ["fuzz:latest"]
        finally:
            svc.close()
            r.close()
