"""The per-container monitor of a detached task (lamina's "shim").

Started by :meth:`~lamina.containers.runtime.launch.Launcher.detached` as
``python3 -I shim.py <bundle>/shim.json`` in a session of its own, it outlives
the lamina process that started it. It:

* runs ``runc run`` (or ``runc restore``) in the foreground, so runc stays the
  parent of the container's init and reports its exit status;
* gives the container pipes for stdin (empty, closed), stdout and stderr and
  copies both output pipes into ``output.log``. Pipes (not the log file
  itself) are what CRIU can checkpoint and restore: runc records them as
  external and hands the new ones to the restored process;
* writes ``exit.json`` (exit code, time) when runc returns.

It only uses the standard library, and is run by path with ``-I``, so it
starts fast and does not depend on how lamina is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any


def _copy(fd: int, out_fd: int, lock: threading.Lock) -> None:
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                return
            if not chunk:
                return
            with lock:
                view = memoryview(chunk)
                while view:
                    n = os.write(out_fd, view)
                    view = view[n:]
    finally:
        os.close(fd)


def _write_json(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as f:
        conf = json.load(f)
    runc_argv: list[str] = conf["argv"]
    log_path: str = conf["output"]
    exit_path: str = conf["exit_file"]

    out_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
        os.set_inheritable(fd, False)

    # runc forwards the signals it gets to the container; so do we, to runc.
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: object) -> None:
        if child:
            with contextlib.suppress(OSError):
                child[0].send_signal(signum)

    for s in (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
    ):
        signal.signal(s, forward)

    started = time.time()
    try:
        proc = subprocess.Popen(
            runc_argv,
            stdin=in_r,
            stdout=out_w,
            stderr=err_w,
            close_fds=True,
        )
    except OSError as exc:
        os.write(out_fd, f"lamina-shim: cannot start runc: {exc}\n".encode())
        _write_json(exit_path, {"exit_code": 127, "exited_at": time.time(), "error": str(exc)})
        return 1
    child.append(proc)
    os.close(in_r)
    os.close(in_w)  # the container reads EOF from stdin
    os.close(out_w)
    os.close(err_w)

    lock = threading.Lock()
    threads = [
        threading.Thread(target=_copy, args=(fd, out_fd, lock), daemon=True)
        for fd in (out_r, err_r)
    ]
    for t in threads:
        t.start()

    code = proc.wait()
    if code < 0:
        code = 128 - code
    # The container's processes are gone with its pid namespace, so the pipes
    # close; do not hang on a stray writer all the same.
    for t in threads:
        t.join(timeout=5.0)
    _write_json(
        exit_path,
        {"exit_code": code, "exited_at": time.time(), "started_at": started},
    )
    os.close(out_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
