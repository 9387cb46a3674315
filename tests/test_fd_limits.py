"""A command that runs out of file descriptors says so in one line, exit 9
(ResourceExhausted), and leaves what a killed one would (no half-made snapshot
directory: those it removes, or leaves to be reaped as it exits): `gc` removes it.

The import of a 30-layer image is run under every descriptor limit from where
Python barely starts to where it succeeds, on each snapshotter: the process runs
out while opening databases, ingesting blobs, staging and unpacking layers, and
cleaning up after them. Before, some of those were a traceback's "internal error:
OperationalError: unable to open database file", a NotFound from the clean-up
masking the failure, or exit 1 for a plain "Too many open files".
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import imagefactory as f
import pytest
from conftest import require_root_user

from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    from_os_error,
)

LIMITS = range(8, 65, 4)


@pytest.fixture(scope="module")
def tall(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("tall")
    layers = [f.layer_from_entries([f.Dir("d"), f.File(f"d/f{i}", b"x" * 5000)], w / f"l{i}")
              for i in range(30)]
    f.build_oci_layout(w / "layout", layers, ref_name="tall:30")
    return f.as_tar(w / "layout", w / "tall.tar")


def _lamina(root: Path, *args: str, nofile: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.run([sys.executable, "-m", "lamina", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=limit)


@pytest.mark.parametrize("snapshotter", ["overlay", "erofs", "native"])
def test_import_under_every_descriptor_limit(
        snapshotter: str, tall: Path, tmp_root: Path) -> None:
    require_root_user()
    outcomes: dict[int, str] = {}
    for n in LIMITS:
        root = tmp_root / f"root-{n}"
        proc = _lamina(root, "--snapshotter", snapshotter, "image", "import", str(tall),
                       nofile=n)
        lines = proc.stderr.strip().splitlines()
        if proc.returncode == 0:
            outcomes[n] = "imported"
        else:
            assert proc.returncode == 9 and len(lines) == 1, (n, proc.returncode, proc.stderr)
            assert "too many open files" in lines[0].lower(), (n, lines)
            outcomes[n] = "refused"
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
        # no half-made snapshot directory outlives the command, even where its
        # removal itself ran out of descriptors (other layers' threads held them)
        dirs = root / "snapshots" / snapshotter / "snapshots"
        left = sorted(p.name for p in dirs.glob("*") if p.name.startswith(("new-", "rm-")))
        assert not left, (n, left)
        gc = _lamina(root, "gc")
        assert gc.returncode == 0, gc.stderr
        check = _lamina(root, "check")
        assert check.stdout.strip().splitlines()[-1:] == ["consistent"], (n, check.stdout)
    # the sweep reached both ends: some limits too low, the highest enough
    assert "refused" in outcomes.values() and outcomes[max(LIMITS)] == "imported", outcomes
    again = _lamina(tmp_root / f"root-{min(LIMITS)}", "--snapshotter", snapshotter,
                    "image", "import", str(tall))
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(("err", "cls", "code"), [
    (OSError(24, "Too many open files", "/x"), ResourceExhausted, 9),
    (OSError(23, "Too many open files in system"), ResourceExhausted, 9),
    (OSError(28, "No space left on device", "/x"), ResourceExhausted, 9),
    (FileNotFoundError(2, "No such file or directory", "/x"), NotFound, 3),
    (FileExistsError(17, "File exists", "/x"), AlreadyExists, 4),
    (PermissionError(13, "Permission denied", "/x"), FailedPrecondition, 5),
    (NotADirectoryError(20, "Not a directory", "/x"), InvalidArgument, 6),
])
def test_os_errors_stand_for_their_class(err: OSError, cls: type, code: int) -> None:
    known = from_os_error(err)
    assert type(known) is cls and known is not None and known.exit_code == code
    assert known.message.startswith(f"{type(err).__name__}: ")


def test_an_os_error_of_no_class_stays_unclassified() -> None:
    assert from_os_error(OSError(5, "Input/output error")) is None


def test_an_os_error_met_while_doing_something_is_exhaustion_or_internal() -> None:
    from lamina.errors import Internal, while_doing

    out = while_doing("write EROFS image", OSError(24, "Too many open files", "/x/.tmp"))
    assert type(out) is ResourceExhausted and out.message == \
        "write EROFS image: [Errno 24] Too many open files: '/x/.tmp'"
    assert type(while_doing("w", OSError(5, "Input/output error"))) is Internal
    assert type(while_doing("w", OSError(2, "No such file or directory"))) is Internal


def test_an_erofs_image_out_of_descriptors_is_resource_exhausted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI once saw `Internal: write EROFS image: [Errno 24] Too many open files` (exit 1)
    at a limit of 20: the image's temporary file could not be made."""
    import contextlib
    import io

    from lamina.erofs import writer

    @contextlib.contextmanager
    def no_descriptors(path: Any, **kw: Any) -> Any:
        raise OSError(24, "Too many open files", str(path))
        yield  # pragma: no cover

    monkeypatch.setattr(writer, "atomic_file", no_descriptors)
    layer = f.layer_from_entries([f.File("a", b"x")], tmp_path / "l")
    with pytest.raises(ResourceExhausted, match=r"^write EROFS image: \[Errno 24\] Too many"):
        writer.write_image(io.BytesIO(layer.blob.read_bytes()), tmp_path / "img")


def test_telling_descriptors_ran_out_needs_none() -> None:
    # CI, once in a while: "internal error: ImportError: .../resource.cpython-311...so:
    # cannot open shared object file: Too many open files": the check that tells
    # SQLite's "unable to open" apart as running out of descriptors loaded a module,
    # which takes a descriptor, at the moment none was left
    code = """if True:
        import errno, os
        from lamina.util import db
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        print(db._out_of_descriptors())
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, preexec_fn=lambda: resource.setrlimit(
                              resource.RLIMIT_NOFILE, (64, 64)))
    assert (proc.returncode, proc.stdout.strip()) == (0, "True"), proc.stderr
