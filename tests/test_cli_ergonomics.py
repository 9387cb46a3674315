"""What ctr and nerdctl users take for granted (issue 20), run as ``lamina``
processes: ``image export -`` writes the tar to standard output, ``lamina
images`` lists images, and a mistyped command gets a suggestion in one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import imagefactory as f
from conftest import require_root_user

LAMINA = [sys.executable, "-m", "lamina"]


def lamina(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "LAMINA_DEBUG"}
    return subprocess.run([*LAMINA, "--root", str(root), *args], capture_output=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL, check=False)


def imported(tmp_root: Path) -> Path:
    require_root_user()
    w = tmp_root / "w"
    w.mkdir()
    f.build_oci_layout(w / "layout", [f.minimal_layer(w)], ref_name="demo:1")
    root = tmp_root / "root"
    done = lamina(root, "image", "import", "-q", str(w / "layout"))
    assert done.returncode == 0, done.stderr
    return root


def test_image_export_dash_writes_the_tar_to_standard_output(tmp_root: Path) -> None:
    root = imported(tmp_root)
    done = lamina(root, "image", "export", "-", "demo:1")
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert not (Path.cwd() / "-").exists()
    with tarfile.open(fileobj=io.BytesIO(done.stdout), mode="r:") as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert "oci-layout" in names and any(n.startswith("blobs/sha256/") for n in names)
    assert index["manifests"][0]["annotations"]["io.containerd.image.name"].endswith("demo:1")
    # and the tar imports on another root
    tar_path = tmp_root / "demo.tar"
    tar_path.write_bytes(done.stdout)
    again = lamina(tmp_root / "other", "image", "import", "-q", str(tar_path))
    assert again.returncode == 0, again.stderr


def test_images_lists_images_as_nerdctl_does(tmp_root: Path) -> None:
    root = imported(tmp_root)
    listed = lamina(root, "images")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split()[:2] == [b"REPOSITORY", b"TAG"]  # as image ls
    listed = lamina(root, "images", "--names", "-q")
    assert listed.stdout == lamina(root, "image", "ls", "--names", "-q").stdout == b"demo:1\n"
    # `images VERB` still reaches the image group's verbs
    assert lamina(root, "images", "ls", "--names", "-q").stdout == listed.stdout


def test_a_mistyped_command_gets_one_line_with_a_suggestion(tmp_path: Path) -> None:
    done = lamina(tmp_path / "root", "imagez", "ls")
    assert done.returncode == 2
    lines = done.stderr.decode().splitlines()
    assert lines == ["lamina: error: unknown command 'imagez' (did you mean 'image'?) "
                     "(see --help)"], lines
    assert not (tmp_path / "root").exists()


def test_a_registry_refusing_connections_is_one_unavailable_line_not_retried(
        tmp_path: Path) -> None:
    """The README's class (Unavailable, exit 7), not TransportError; and nothing
    listening is not worth a retry (it was tried 4 times, 2-3 s of back-off)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = lamina(tmp_path / "root", "image", "pull", "-q", "--plain-http",
                  f"127.0.0.1:{port}/app:1")
    assert done.returncode == 7, done.stderr
    lines = done.stderr.decode().splitlines()
    assert lines == [f"lamina: Unavailable: 127.0.0.1:{port}: HEAD failed: [Errno 111] "
                     "Connection refused"], lines


def test_serve_says_it_is_serving_once(tmp_path: Path) -> None:
    import signal
    import time

    require_root_user()
    sock = tmp_path / "lamina.sock"
    env = {k: v for k, v in os.environ.items() if k != "LAMINA_DEBUG"}
    proc = subprocess.Popen([*LAMINA, "--root", str(tmp_path / "root"), "serve",
                             "--address", str(sock)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), "serve did not start"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    said = [line for line in (out + err).decode().splitlines() if "serving" in line]
    assert said == [f"lamina: serving {tmp_path / 'root'} on {sock} "
                    "(default snapshotter overlay)"], said
