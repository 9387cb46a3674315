"""The per-container monitor of a detached task (lamina's "shim").

Started by :meth:`~lamina.containers.runtime.launch.Launcher.detached` as
``python3 -I shim.py <bundle>/shim.json`` in a session of its own, it outlives
the lamina process that started it. It:

* runs ``runc run`` (or ``runc restore``) in the foreground, so runc stays the
  parent of the container's init and reports its exit status;
* gives the container pipes for stdin (empty, closed), stdout and stderr and
  copies both output pipes into the output log (``output.log`` unless
  ``shim.json`` names another). Pipes (not the log file itself) are what CRIU
  can checkpoint and restore: runc records them as external and hands the new
  ones to the restored process;
* keeps the log bounded when ``shim.json`` gives ``output_max``: once the log
  holds that many bytes it becomes ``<log>.1`` (replacing the previous one) and
  a new log starts, so at most twice ``output_max`` bytes are kept;
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


def _open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


class _Log:
    """The output log both pipes write to, rotated at ``limit`` bytes (0: never)."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.lock = threading.Lock()
        self.fd = _open_log(path)
        self.size = os.fstat(self.fd).st_size

    def write(self, chunk: bytes) -> None:
        with self.lock:
            if self.fd < 0:
                return  # closed: a stray writer's output after the container exited
            view = memoryview(chunk)
            while view:
                if self.limit and self.size >= self.limit:
                    # a reader following the log sees the name point at a new file
                    os.replace(self.path, f"{self.path}.1")
                    os.close(self.fd)
                    self.fd = _open_log(self.path)
                    self.size = 0
                room = self.limit - self.size if self.limit else len(view)
                n = os.write(self.fd, view[:room])
                view = view[n:]
                self.size += n

    def close(self) -> None:
        with self.lock:  # a copier still writing finishes its chunk first
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _copy(fd: int, log: _Log) -> None:
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
            log.write(chunk)
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

    log = _Log(log_path, int(conf.get("output_max") or 0))
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
        log.write(f"lamina-shim: cannot start runc: {exc}\n".encode())
        _write_json(exit_path, {"exit_code": 127, "exited_at": time.time(), "error": str(exc)})
        return 1
    child.append(proc)
    os.close(in_r)
    os.close(in_w)  # the container reads EOF from stdin
    os.close(out_w)
    os.close(err_w)

    threads = [
        threading.Thread(target=_copy, args=(fd, log), daemon=True)
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
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
