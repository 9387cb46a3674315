"""``lamina.toml`` (issue 20), run as ``lamina`` processes: each key is used, a flag
or an environment variable wins over the file, and a bad file is one
InvalidArgument line naming the file and the key (or the line), exit 6."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

LAMINA = [sys.executable, "-m", "lamina"]


def lamina(*args: str, config: Path | None = None, user: int | None = None,
           **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("LAMINA_DEBUG", "LAMINA_ROOT", "LAMINA_CONFIG", "LAMINA_NAMESPACE",
                            "CONTAINERD_NAMESPACE", "XDG_CONFIG_HOME")}
    if config is not None:
        environ["LAMINA_CONFIG"] = str(config)
    environ.update(env)
    return subprocess.run([*LAMINA, *args], capture_output=True, text=True, timeout=60,
                          env=environ, stdin=subprocess.DEVNULL, check=False, user=user)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_root_comes_from_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "lamina.toml", f'root = "{tmp_path / "r"}"\n')
    done = lamina("image", "ls", config=conf)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r" / "format").exists()


def test_a_flag_and_the_environment_win_over_the_file(tmp_path: Path) -> None:
    conf = write(tmp_path / "lamina.toml", f'root = "{tmp_path / "file"}"\n')
    assert lamina("--root", str(tmp_path / "flag"), "image", "ls", config=conf,
                  LAMINA_ROOT=str(tmp_path / "env")).returncode == 0
    assert lamina("image", "ls", config=conf, LAMINA_ROOT=str(tmp_path / "env")).returncode == 0
    assert (tmp_path / "flag" / "format").exists() and (tmp_path / "env" / "format").exists()
    assert not (tmp_path / "file").exists()


def test_the_flag_names_the_file(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.toml", "nope = 1\n")
    good = write(tmp_path / "good.toml", f'root = "{tmp_path / "r"}"\n')
    done = lamina("--config", str(good), "image", "ls", config=bad)
    assert done.returncode == 0, done.stderr
    assert lamina(f"--config={bad}", "image", "ls").returncode == 6


def test_snapshotter_comes_from_the_file_and_the_flag_wins(tmp_path: Path) -> None:
    conf = write(tmp_path / "lamina.toml",
                 f'root = "{tmp_path / "r"}"\nsnapshotter = "nosuch"\n')
    done = lamina("snapshot", "ls", config=conf)
    assert done.returncode == 6
    assert "unknown snapshotter 'nosuch'" in done.stderr
    assert lamina("--snapshotter", "native", "snapshot", "ls", config=conf).returncode == 0


def test_address_comes_from_the_file(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    conf = write(tmp_path / "lamina.toml", f'root = "{tmp_path / "r"}"\naddress = "{sock}"\n')
    done = lamina("snapshot", "ls", config=conf)
    assert done.returncode == 7, done.stderr
    assert str(sock) in done.stderr


def test_debug_comes_from_the_file_and_the_environment_wins(tmp_path: Path) -> None:
    conf = write(tmp_path / "lamina.toml", f'root = "{tmp_path / "r"}"\ndebug = true\n')
    done = lamina("image", "rm", "no/such:1", config=conf)
    assert done.returncode == 3
    assert "Traceback" in done.stderr
    quiet = lamina("image", "rm", "no/such:1", config=conf, LAMINA_DEBUG="0")
    assert quiet.returncode == 3
    assert quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr


def test_hosts_dir_comes_from_the_file(tmp_path: Path) -> None:
    hosts = tmp_path / "certs.d" / "registry.invalid"
    hosts.mkdir(parents=True)
    # nothing listens on port 9 (discard): the pull names the server the file gave
    (hosts / "hosts.toml").write_text('server = "http://127.0.0.1:9"\n')
    conf = write(tmp_path / "lamina.toml",
                 f'root = "{tmp_path / "r"}"\nhosts_dir = ["{tmp_path / "certs.d"}"]\n')
    done = lamina("image", "pull", "-q", "registry.invalid/app:1", config=conf)
    assert done.returncode == 7, done.stderr
    assert "127.0.0.1:9" in done.stderr
    flag = lamina("image", "pull", "-q", "--hosts-dir", str(tmp_path / "empty"),
                  "127.0.0.1:9/app:1", config=conf)
    assert flag.returncode == 7 and "127.0.0.1:9" in flag.stderr


@pytest.mark.parametrize(("text", "words"), [
    ("roots = '/x'\n", "unknown key 'roots'"),
    ("[registry]\nmirror = 'x'\n", "unknown key 'registry'"),
    ("root = 5\n", "key 'root' must be a string, not an integer"),
    ("debug = 'yes'\n", "key 'debug' must be true or false, not a string"),
    ("hosts_dir = '/etc/lamina/certs.d'\n", "key 'hosts_dir' must be a list of strings"),
    ("hosts_dir = ['/a', 1]\n", "key 'hosts_dir' must be a list of strings"),
    ("root = ''\n", "key 'root' must not be empty"),
    ("root = '/x'\nsnapshotter overlay\n", "not valid TOML: Expected '=' after a key in a "
     "key/value pair (at line 2, column 13)"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path: Path, text: str,
                                                            words: str) -> None:
    conf = write(tmp_path / "lamina.toml", text)
    done = lamina("--root", str(tmp_path / "r"), "image", "ls", config=conf)
    assert done.returncode == 6
    assert done.stderr.startswith(f"lamina: InvalidArgument: {conf}: {words}")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_named_file_must_exist(tmp_path: Path) -> None:
    done = lamina("--root", str(tmp_path / "r"), "image", "ls", config=tmp_path / "none.toml")
    assert done.returncode == 3
    assert done.stderr == f"lamina: NotFound: config file {tmp_path / 'none.toml'} does not exist\n"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can read (pytest's are the test user's own)."""
    d = Path(tempfile.mkdtemp(prefix="lamina-config-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_a_user_other_than_root_reads_xdg_config_home(shared_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("runs a command as nobody")
    conf = shared_dir / "config" / "lamina" / "lamina.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("bogus = 1\n")
    for d in (conf.parent, conf.parent.parent):
        d.chmod(0o755)
    conf.chmod(0o644)
    env = {"XDG_CONFIG_HOME": str(shared_dir / "config"), "HOME": str(shared_dir)}
    done = lamina("--root", str(shared_dir / "r"), "image", "ls", user=65534, **env)
    assert done.returncode == 6, done.stderr
    assert f"{conf}: unknown key 'bogus'" in done.stderr
    # root reads /etc/lamina/lamina.toml, never a user's file
    assert lamina("--root", str(shared_dir / "r0"), "image", "ls", **env).returncode == 0


def test_version_answers_before_the_file_is_read(tmp_path: Path) -> None:
    conf = write(tmp_path / "lamina.toml", "nope = 1\n")
    done = lamina("--version", config=conf)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("lamina ")
    assert lamina("image", "ls", config=conf).returncode == 6


def test_namespace_comes_from_the_file_and_the_flag_and_environment_win(tmp_path: Path) -> None:
    conf = write(tmp_path / "lamina.toml",
                 f'root = "{tmp_path / "r"}"\nnamespace = "k8s.io"\n')
    done = lamina("image", "ls", config=conf)
    assert done.returncode == 8, done.stderr
    assert "in namespace 'k8s.io'" in done.stderr
    assert lamina("-n", "default", "image", "ls", config=conf).returncode == 0
    assert lamina("image", "ls", config=conf, LAMINA_NAMESPACE="default").returncode == 0
