"""``lamina task``: start, list, signal, pause, resume, exec and delete container tasks."""

from __future__ import annotations

import argparse
import shutil
import sys

from lamina.cli.app import App
from lamina.cli.common import add_examples, print_table
from lamina.cli.container import env_entries, services
from lamina.cli.terminal import (
    add_terminal_flags,
    check_terminal_flags,
    stdio_of,
    terminal_size,
)
from lamina.errors import InvalidArgument, NotFound

__all__ = ["register"]


def _start(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        info = ct.start(args.id, detach=args.detach)
        if args.detach:
            print(info.pid)
            return 0
        code = info.exit_code if info.exit_code is not None else 255
        ct.tasks.delete(args.id, force=True)
    return code


def _ls(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        infos = ct.tasks.list()
    if args.json:
        app.print_json([{"id": i.id, "status": str(i.status), "pid": i.pid,
                         "exit_code": i.exit_code, "detached": i.detached,
                         "created": i.created} for i in infos])
        return 0
    print_table(("TASK", "PID", "STATUS", "EXIT"),
                ([i.id, str(i.pid or "-"), str(i.status),
                  "-" if i.exit_code is None else str(i.exit_code)] for i in infos),
                widths=(24, 8, 8))
    return 0


def _kill(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        ct.tasks.kill(args.id, args.signal, all=args.all)
    return 0


def _pause(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        ct.tasks.pause(args.id)
    return 0


def _resume(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        ct.tasks.resume(args.id)
    return 0


def _ps(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        pids = ct.tasks.ps(args.id)
    for pid in pids:
        print(pid)
    return 0


def _exec(args: argparse.Namespace, app: App) -> int:
    check_terminal_flags(args)
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise InvalidArgument("exec needs a command")
    with services(app) as ct:
        return ct.tasks.exec(args.id, cmd, env=env_entries(args), cwd=args.cwd,
                             user=args.user, terminal=args.tty,
                             console_size=terminal_size() if args.tty else None,
                             detach=args.detach, stdio=stdio_of(args))


def _delete(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        for tid in args.ids:
            info = ct.tasks.delete(tid, force=args.force)
            code = "-" if info.exit_code is None else str(info.exit_code)
            print(f"{tid}\t{code}")
    return 0


def _wait(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        code = ct.tasks.wait(args.id, timeout=args.timeout)
    print("-" if code is None else code)
    return 0 if code is None else code


def _logs(args: argparse.Namespace, app: App) -> int:
    with services(app) as ct:
        ct.tasks.state(args.id)
        path = ct.tasks.output_path(args.id)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFound(f"task {args.id} has no output log (not detached?)") from None
        with f:
            sys.stdout.flush()
            shutil.copyfileobj(f, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    return 0


def _add_exec_flags(v: argparse.ArgumentParser) -> None:
    """The arguments of ``task exec`` and of nerdctl's and docker's ``exec``."""
    add_terminal_flags(v, detached="start the command in the background and return "
                       "(its output goes nowhere)")
    v.add_argument("-e", "--env", action="append", metavar="K=V",
                   help="environment variable for the command (repeatable); K alone "
                   "passes on this shell's value of K")
    v.add_argument("--env-file", action="append", metavar="FILE",
                   help="read environment variables from FILE, one K=V (or K) a line; "
                   "# starts a comment")
    v.add_argument("-w", "--cwd", "--workdir", dest="cwd", metavar="DIR",
                   help="working directory, absolute (default: the task's)")
    v.add_argument("-u", "--user", metavar="USER[:GROUP]",
                   help="user to run as, by name or id (default: the task's)")
    v.add_argument("id", metavar="ID", help="the running task (its container's ID)")
    v.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                   help="the command and its arguments")
    v.set_defaults(handler=_exec)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("task", aliases=["tasks", "t"], help="manage container tasks")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    v = verbs.add_parser("start", help="start a container's task")
    v.add_argument("-d", "--detach", action="store_true",
                   help="run in the background; print the pid")
    v.add_argument("id", metavar="ID", help="the container")
    v.set_defaults(handler=_start)

    v = verbs.add_parser("ls", aliases=["list"], help="list tasks")
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(handler=_ls)

    v = verbs.add_parser("kill", help="signal a task")
    v.add_argument("-s", "--signal", default="SIGTERM",
                   help="the signal, by name or number (default SIGTERM)")
    v.add_argument("-a", "--all", action="store_true", help="every process of the task")
    v.add_argument("id", metavar="ID", help="the task (its container's id)")
    v.set_defaults(handler=_kill)

    for name, help_, handler in (("pause", "freeze a task", _pause),
                                 ("resume", "thaw a paused task", _resume),
                                 ("ps", "host pids of a task's processes", _ps)):
        v = verbs.add_parser(name, help=help_)
        v.add_argument("id", metavar="ID", help="the task (its container's id)")
        v.set_defaults(handler=handler)

    _add_exec_flags(verbs.add_parser("exec", help="run a command in a running task"))

    v = verbs.add_parser("delete", aliases=["rm"], help="delete stopped tasks")
    v.add_argument("-f", "--force", action="store_true", help="kill a live task first")
    v.add_argument("ids", nargs="+", metavar="ID", help="tasks to delete")
    v.set_defaults(handler=_delete)

    v = verbs.add_parser("wait", help="wait for a task to stop; exit with its code")
    v.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up after this long (default: wait as long as it runs)")
    v.add_argument("id", metavar="ID", help="the task")
    v.set_defaults(handler=_wait)

    v = verbs.add_parser("logs", help="print a detached task's output")
    v.add_argument("id", metavar="ID", help="the task")
    v.set_defaults(handler=_logs)

    v = sub.add_parser(
        "exec", help="run a command in a running container",
        description="Run CMD in container ID's running task, in docker's and nerdctl's "
        "form (the same as 'lamina task exec'): flags go before ID; the exit code is the "
        "command's (127: not found in the container).")
    _add_exec_flags(v)
    add_examples(
        v,
        ("a shell on a terminal in a container started with run -d",
         "lamina exec -it web sh"),
        ("a command as another user, in another directory, with a variable",
         "lamina exec -u 1000 -w /srv -e DEBUG=1 web ls -l"),
    )
