"""OCI runtime spec generation, user resolution and the small parsers of the runtime."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import ended_within, require_root_user

from lamina.containers.runtime.runc import _last_error, error_from_message, parse_signal
from lamina.containers.runtime.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_PATH,
    MAX_USER_DB,
    BindMount,
    generate_spec,
    parse_mount_flag,
    resolve_in_root,
    resolve_user,
)
from lamina.containers.runtime.tasks import validate_id
from lamina.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
)

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:App User:/home/app:/bin/sh
"""
GROUP = """\
root:x:0:
daemon:x:1:
staff:x:50:app,other
audio:x:29:other
app:x:1000:
wheel:x:10:root,app
"""


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    return tmp_path


# --------------------------------------------------------------------------- process


def test_entrypoint_and_cmd_make_the_args() -> None:
    spec = generate_spec({"config": {"Entrypoint": ["/bin/app", "-v"], "Cmd": ["serve"]}})
    assert spec["process"]["args"] == ["/bin/app", "-v", "serve"]
    spec = generate_spec(
        {"config": {"Entrypoint": ["/bin/app"], "Cmd": ["serve"]}}, args=["check", "x"]
    )
    assert spec["process"]["args"] == ["/bin/app", "check", "x"]
    spec = generate_spec({"Cmd": ["/bin/sh"]}, entrypoint=["/bin/env"], args=[])
    assert spec["process"]["args"] == ["/bin/env"]


def test_bare_config_mapping_and_full_image_config_are_both_accepted() -> None:
    full = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["true"]}, "rootfs": {}}
    assert generate_spec(full)["process"]["args"] == ["true"]
    assert generate_spec({"Cmd": ["true"]})["process"]["args"] == ["true"]


def test_no_command_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        generate_spec({"config": {}})
    with pytest.raises(InvalidArgument):
        generate_spec({"architecture": "amd64", "os": "linux", "rootfs": {}})
    with pytest.raises(InvalidArgument):
        generate_spec({"config": {"Cmd": "not a list"}})


def test_env_defaults_and_overrides() -> None:
    spec = generate_spec({"config": {"Cmd": ["x"], "Env": ["A=1", "B=2"]}}, env_extra=["B=3", "C="])
    env = spec["process"]["env"]
    assert env[0] == f"PATH={DEFAULT_PATH}"
    assert "A=1" in env and "B=3" in env and "C=" in env and "B=2" not in env
    assert "HOME=/root" in env
    spec = generate_spec({"config": {"Cmd": ["x"], "Env": ["PATH=/opt/bin", "HOME=/h"]}})
    assert spec["process"]["env"] == ["PATH=/opt/bin", "HOME=/h"]
    with pytest.raises(InvalidArgument):
        generate_spec({"Cmd": ["x"]}, env_extra=["=oops"])


def test_cwd_from_working_dir() -> None:
    assert generate_spec({"Cmd": ["x"]})["process"]["cwd"] == "/"
    assert generate_spec({"Cmd": ["x"], "WorkingDir": "/srv"})["process"]["cwd"] == "/srv"
    assert generate_spec({"Cmd": ["x"], "WorkingDir": "/srv"}, cwd="/tmp")["process"]["cwd"] == (
        "/tmp"
    )
    with pytest.raises(InvalidArgument):
        generate_spec({"Cmd": ["x"], "WorkingDir": "relative"})


def test_terminal_and_hostname() -> None:
    spec = generate_spec({"Cmd": ["sh"]}, terminal=True, hostname="box")
    assert spec["process"]["terminal"] is True
    assert "TERM=xterm" in spec["process"]["env"]
    assert spec["hostname"] == "box"


def test_defaults_are_sane() -> None:
    spec = generate_spec({"Cmd": ["x"]})
    assert spec["ociVersion"] >= "1.0.2"
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    assert spec["process"]["user"] == {"uid": 0, "gid": 0}
    assert spec["process"]["noNewPrivileges"] is False
    assert {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024} in spec["process"]["rlimits"]
    caps = spec["process"]["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        assert caps[kind] == list(DEFAULT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in DEFAULT_CAPABILITIES
    assert len(DEFAULT_CAPABILITIES) == 14
    ns = {n["type"] for n in spec["linux"]["namespaces"]}
    assert ns == {"pid", "ipc", "uts", "mount", "network"}
    dests = {m["destination"]: m for m in spec["mounts"]}
    for d in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"):
        assert d in dests
    assert dests["/dev"]["type"] == "tmpfs"
    assert "ro" in dests["/sys"]["options"]
    assert "/proc/kcore" in spec["linux"]["maskedPaths"]
    assert "/proc/sys" in spec["linux"]["readonlyPaths"]
    # defaults are copies: mutating one spec does not leak into the next
    spec["mounts"][0]["options"].append("junk")
    assert "junk" not in generate_spec({"Cmd": ["x"]})["mounts"][0]["options"]


def test_bind_mounts_and_cgroups_path() -> None:
    spec = generate_spec(
        {"Cmd": ["x"]},
        mounts=[BindMount("/srv/data", "/data"), BindMount("/etc/hosts", "/etc/hosts", True)],
        cgroups_path="lamina/x",
        readonly_rootfs=True,
    )
    binds = [m for m in spec["mounts"] if m["type"] == "bind"]
    assert binds[0] == {
        "destination": "/data",
        "type": "bind",
        "source": "/srv/data",
        "options": ["rbind", "rprivate", "rw"],
    }
    assert "ro" in binds[1]["options"]
    assert spec["linux"]["cgroupsPath"] == "lamina/x"
    assert spec["root"]["readonly"] is True


# --------------------------------------------------------------------------- users


def test_numeric_users_need_no_rootfs() -> None:
    assert generate_spec({"Cmd": ["x"], "User": "1000"})["process"]["user"] == {
        "uid": 1000,
        "gid": 0,
    }
    assert generate_spec({"Cmd": ["x"], "User": "1000:1001"})["process"]["user"] == {
        "uid": 1000,
        "gid": 1001,
    }
    assert resolve_user("") .uid == 0
    with pytest.raises(NotFound):
        resolve_user("app")
    with pytest.raises(InvalidArgument):
        resolve_user("1000:")


def test_names_resolve_from_the_rootfs(rootfs: Path) -> None:
    app = resolve_user("app", rootfs)
    assert (app.uid, app.gid, app.home) == (1000, 1000, "/home/app")
    assert set(app.additional_gids) == {50, 10}
    assert resolve_user("app:staff", rootfs).gid == 50
    assert resolve_user("app:staff", rootfs).additional_gids == ()
    assert resolve_user("1000", rootfs).gid == 1000  # numeric uid listed in passwd
    assert resolve_user("4242", rootfs).gid == 0
    assert resolve_user("0:audio", rootfs).gid == 29
    with pytest.raises(NotFound):
        resolve_user("ghost", rootfs)
    with pytest.raises(NotFound):
        resolve_user("app:ghosts", rootfs)
    spec = generate_spec({"Cmd": ["x"], "User": "app"}, rootfs=rootfs)
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [50, 10]}
    assert "HOME=/home/app" in spec["process"]["env"]
    assert generate_spec({"Cmd": ["x"], "User": "app"}, rootfs=rootfs, user="daemon")[
        "process"
    ]["user"] == {"uid": 1, "gid": 1}


def test_passwd_symlinks_stay_inside_the_rootfs(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("evil:x:666:666::/:/bin/sh\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to(str(outside / "passwd"))  # absolute: re-rooted
    with pytest.raises(NotFound):
        resolve_user("evil", root)
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to("../../../../../../outside/passwd")
    with pytest.raises(NotFound):
        resolve_user("evil", root)
    # a link that resolves inside the rootfs is followed
    (root / "data").mkdir()
    (root / "data" / "pw").write_text("good:x:7:8::/:/bin/sh\n")
    (root / "etc" / "passwd").unlink()
    (root / "etc" / "passwd").symlink_to("/data/pw")
    assert resolve_user("good", root).uid == 7
    assert resolve_in_root(root, "/etc/passwd") == root / "data" / "pw"
    assert resolve_in_root(root, "/../../etc/x") == root / "etc" / "x"


def test_a_passwd_that_is_no_regular_file_or_too_large_is_refused(tmp_path: Path) -> None:
    """An image's /etc/passwd or /etc/group is read only if it is a regular file of
    at most MAX_USER_DB bytes: a FIFO hung the container's start for ever, a
    device (read through a mount without nodev) could act when opened or never
    end, a huge file was read whole into memory."""
    require_root_user()  # mknod
    (tmp_path / "etc").mkdir()
    passwd = tmp_path / "etc" / "passwd"

    def outcome() -> str:
        raised = ended_within(10, lambda: resolve_user("nobody", tmp_path), "the user lookup")
        return "resolved" if raised is None else f"{type(raised).__name__}: {raised}"

    os.mkfifo(passwd)
    assert outcome() == "InvalidArgument: the image's /etc/passwd is not a regular file"
    passwd.unlink()
    os.mknod(passwd, 0o644 | 0o020000, os.makedev(1, 5))  # /dev/zero's numbers
    assert outcome() == "InvalidArgument: the image's /etc/passwd is not a regular file"
    passwd.unlink()
    with open(passwd, "wb") as f:
        f.truncate(MAX_USER_DB + 1)  # sparse
    assert outcome().startswith("InvalidArgument: the image's /etc/passwd is larger than")
    passwd.unlink()
    passwd.write_text("nobody:x:65534:65534::/nonexistent:/bin/sh\n")
    (tmp_path / "etc" / "group").mkdir()  # a directory reads as absent, as before
    assert outcome() == "resolved"


# --------------------------------------------------------------------------- parsers


def test_parse_mount_flag() -> None:
    assert parse_mount_flag("type=bind,src=/a,dst=/b") == BindMount("/a", "/b", False)
    assert parse_mount_flag("source=/a,target=/b,ro") == BindMount("/a", "/b", True)
    assert parse_mount_flag("src=/a,destination=/b,readonly=false") == BindMount("/a", "/b")
    assert parse_mount_flag("src=/a,dst=/b,readonly=true").readonly
    rel = parse_mount_flag("src=data,dst=/b")
    assert rel.source.startswith("/") and rel.source.endswith("/data")
    for bad in (
        "type=volume,src=/a,dst=/b",
        "src=/a",
        "dst=/b",
        "src=/a,dst=relative",
        "src=/a,dst=/b,bogus=1",
        "src=/a,dst=/b,ro=maybe",
        "src=/a,dst=/b,noequals",
    ):
        with pytest.raises(InvalidArgument):
            parse_mount_flag(bad)


def test_parse_signal() -> None:
    assert parse_signal(9) == 9
    assert parse_signal("9") == 9
    assert parse_signal("KILL") == signal.SIGKILL
    assert parse_signal("sigterm") == signal.SIGTERM
    for bad in ("NOPE", 0, "99"):
        with pytest.raises(InvalidArgument):
            parse_signal(bad)


def test_validate_id() -> None:
    assert validate_id("web-1.a_b") == "web-1.a_b"
    for bad in ("", "runc", ".hidden", "a/b", "-x", "x" * 200, "a b"):
        with pytest.raises(InvalidArgument):
            validate_id(bad)


def test_runc_error_mapping() -> None:
    assert isinstance(error_from_message('container "x" does not exist', "w"), NotFound)
    assert isinstance(error_from_message("container with id exists: x", "w"), AlreadyExists)
    assert isinstance(error_from_message("container not running", "w"), FailedPrecondition)
    assert isinstance(error_from_message("cannot exec in a stopped container", "w"),
                      FailedPrecondition)
    assert isinstance(error_from_message("weird failure", "w"), Internal)
    text = 'time="t" level=error msg="criu failed: type NOTIFY\\nlog file: dump.log"\n'
    assert _last_error(text) == "criu failed: type NOTIFY\nlog file: dump.log"
    assert _last_error('{"level":"error","msg":"boom","time":"t"}\n') == "boom"
