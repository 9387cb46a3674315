"""The ``lamina`` command line, in the style of ``ctr``.

Each command group lives in its own module with a ``register(subparsers)``
function; handlers take the parsed arguments and an :class:`App` and return
an exit code. Every error ends the command with one line on stderr and an exit
code (``--debug`` or ``LAMINA_DEBUG=1`` adds the traceback):

====  ==========================================================================
code  meaning
====  ==========================================================================
0     success
1     internal error: a bug, or an OS error without a closer code below
2     usage: unknown command or flag, bad or missing argument
3     NotFound (also ENOENT)
4     AlreadyExists (also EEXIST)
5     FailedPrecondition (also EACCES, EPERM, EROFS, EBUSY)
6     InvalidArgument (also ENOTDIR, EISDIR, EINVAL, ENAMETOOLONG, ELOOP)
7     Unavailable (no server on --address)
8     NotImplemented
130   interrupted (SIGINT)
129   terminated by SIGHUP (as SIGINT: through the command's cleanups)
143   terminated by SIGTERM (as SIGINT: through the command's cleanups)
141   standard output closed (``lamina ... | head``); nothing is printed
====  ==========================================================================
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from lamina import __version__
from lamina.errors import LaminaError, describe_os_error, from_os_error, printable
from lamina.util.signals import Terminated, as_exception

# What a command needs is imported when it runs (`lamina --version` needs none of
# it, and every command pays for what this module imports: bench/startup.py).
if TYPE_CHECKING:
    from lamina.cli.app import App
    from lamina.util import config as settings

__all__ = ["EXIT_USAGE", "SUMMARY", "build_parser", "main"]

#: what lamina is, in the words of its --help and its man page's NAME line
SUMMARY = ("manage snapshots, content, images and containers as containerd's ctr does, "
           "and serve them to containerd")

# command group modules, in the order `lamina --help` lists them
GROUPS = ("snapshot", "content", "diff", "image", "container", "task", "run",
          "checkpoint", "serve", "config", "gc", "lease", "check", "version", "login",
          "completion", "logs", "rootless")


# aliases a group module registers, so one command imports only its own module
ALIASES = {
    "snapshots": "snapshot", "images": "image", "i": "image", "containers": "container",
    "c": "container", "tasks": "task", "t": "task", "checkpoints": "checkpoint",
    "leases": "lease", "fsck": "check", "logout": "login", "exec": "task",
}
_GLOBAL_WITH_VALUE = ("--root", "--snapshotter", "--address", "--config", "-n",
                      "--namespace")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (sub-command parsers inherit this class).

    ``verb_only``: the one verb of this group the command line names, the only one whose
    parser its sub-commands build (see :class:`_Verbs`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verb_only: str | None = None
        self.register("action", "parsers", _Verbs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        if isinstance(action, _Verbs):
            action.only = self.verb_only
        return action

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)} (see --help)\n")


class _Unbuilt:
    """The parser of a verb this command line does not run: it takes what a group's
    ``register`` gives a verb's parser and builds nothing (argparse builds a parser and
    each of its options in ~0.05 ms, and a group has dozens: bench/startup.py)."""

    description: str | None = None
    epilog: str | None = None

    def __getattr__(self, name: str) -> Any:
        return self._ignore

    def _ignore(self, *args: Any, **kwargs: Any) -> _Unbuilt:
        return self


class _Verbs(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Sub-commands that build only the verb ``only`` (None: all); ``child_only`` is
    what the parsers made here pass to their own sub-commands. ``matched``: whether
    ``only`` was one of them (if not, the caller builds them all)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.only: str | None = None
        self.child_only: str | None = None
        self.matched = False

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if self.only is not None and self.only not in (name, *kwargs.get("aliases", ())):
            return _Unbuilt()
        self.matched = True
        parser = super().add_parser(name, **kwargs)
        if isinstance(parser, _Parser):
            parser.verb_only = self.child_only
        return parser


def _requested_group(argv: Sequence[str]) -> str | None:
    """The command group named on the command line, when it can be told without parsing."""
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in _GLOBAL_WITH_VALUE:
            skip = True
            continue
        if word.startswith("-"):
            if word in ("-h", "--help"):
                return None
            continue
        name = ALIASES.get(word, word)
        return name if name in GROUPS else None
    return None


def _command_at(argv: Sequence[str]) -> int | None:
    """The position of the command word in ``argv`` (after the global options)."""
    skip = False
    for pos, word in enumerate(argv):
        if skip:
            skip = False
        elif word in _GLOBAL_WITH_VALUE:
            skip = True
        elif not word.startswith("-"):
            return pos
        elif word in ("-h", "--help"):
            return None
    return None


# nerdctl's and docker's top-level words, and the commands they are in lamina
NERDCTL_VERBS = {"pull": ("image", "pull"), "push": ("image", "push"),
                 "rmi": ("image", "rm"), "ps": ("container", "ls")}


def _as_nerdctl_would(argv: list[str]) -> list[str]:
    """``lamina images`` (nerdctl's and docker's) is ``lamina image ls``; ``pull``,
    ``push``, ``rmi`` and ``ps [-a]`` are their image and container commands."""
    at = _command_at(argv)
    if at is None:
        return argv
    word, before, rest = argv[at], argv[:at], argv[at + 1:]
    if word == "images" and (not rest or (rest[0].startswith("-")
                                          and rest[0] not in ("-h", "--help"))):
        return [*before, "images", "ls", *rest]
    if word == "ps":
        shown = [w for w in rest if w not in ("-a", "--all", "-aq", "-qa")]
        quiet = ["-q"] if len(shown) < len(rest) and {"-aq", "-qa"} & set(rest) else []
        running = [] if len(shown) < len(rest) else ["--running"]
        return [*before, "container", "ls", *running, *quiet, *shown]
    if word in NERDCTL_VERBS:
        return [*before, *NERDCTL_VERBS[word], *rest]
    return argv


def _unknown_command(argv: Sequence[str]) -> str | None:
    """One line for a command word lamina does not have, with the nearest ones."""
    at = _command_at(argv)
    if at is None:
        return None
    word = argv[at]
    if word in GROUPS or word in ALIASES:
        return None
    import difflib

    near = list(dict.fromkeys(ALIASES.get(n, n) for n in difflib.get_close_matches(
        word, [*GROUPS, *ALIASES, *NERDCTL_VERBS], n=3, cutoff=0.6)))[:2]
    hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
    return f"unknown command {word!r}{hint}"


def _requested_verb(argv: Sequence[str]) -> str | None:
    """The word after the command (its verb), when no option comes between them."""
    at = _command_at(argv)
    if at is None or at + 1 >= len(argv) or argv[at + 1].startswith("-"):
        return None
    return argv[at + 1]


#: Commands that stream layers and end with their work: they keep the blocks they free
#: for the next (lamina.util.allocator). Not ``serve``, ``run`` and the others that may
#: live for hours, where the memory kept would stay unused.
_STREAMING = frozenset({"image", "content", "diff"})


def build_parser(argv: Sequence[str] | None = None, *,
                 every_verb: bool = False) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the group it names is imported and only the
    verb it names is built (fast start-up), unless ``every_verb``."""
    parser = _Parser(prog="lamina", description=SUMMARY[:1].upper() + SUMMARY[1:] + ".",
                     epilog="Run 'lamina COMMAND --help' for a command's verbs and options. "
                     "Exit codes: 0 ok, 1 internal, 2 usage, 3 NotFound, "
                     "4 AlreadyExists, 5 FailedPrecondition, 6 InvalidArgument, "
                     "7 Unavailable, 8 NotImplemented, 130 interrupted, 143 terminated. "
                     "nerdctl's words work "
                     "too: images, pull, push, rmi, ps [-a], exec (image ls, image pull, "
                     "image push, image rm, container ls, task exec).")
    from lamina.cli.common import describe
    from lamina.util import config as settings

    parser.add_argument("--version", action="version", version=f"lamina {__version__}")
    parser.add_argument("--root", default=None, metavar="DIR",
                        help="lamina root directory (default: $LAMINA_ROOT, else "
                        "/var/lib/lamina for root and ~/.local/share/lamina for others)")
    parser.add_argument("-n", "--namespace", metavar="NAME",
                        default=os.environ.get("LAMINA_NAMESPACE")
                        or os.environ.get("CONTAINERD_NAMESPACE"),
                        help="namespace (default: $LAMINA_NAMESPACE, $CONTAINERD_NAMESPACE, "
                        "else default, where lamina keeps its own images, containers and "
                        "snapshots); another one shows the snapshots containerd keeps in "
                        "it, read-only, and nothing else")
    parser.add_argument("--snapshotter", default=None,
                        help="snapshotter: overlay, native or erofs (default overlay)")
    parser.add_argument("--address", default=None, metavar="SOCKET",
                        help="talk to a running 'lamina serve' on this socket")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback too (also: LAMINA_DEBUG=1)")
    parser.add_argument("--config", metavar="FILE",
                        help=f"settings file (default: $LAMINA_CONFIG or "
                        f"{settings.SYSTEM_CONFIG}; for a user other than root "
                        "$XDG_CONFIG_HOME/lamina/lamina.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _requested_group(argv) if argv is not None else None
    if wanted is None and argv is not None and "--version" in argv:
        return parser  # `lamina --version` needs no command module
    if wanted is not None and argv is not None and not every_verb:
        sub.child_only = _requested_verb(argv)
    for name in (wanted,) if wanted else GROUPS:
        try:
            module = importlib.import_module(f"lamina.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lamina.cli.{name}":
                continue
            raise
        module.register(sub)
    if sub.child_only is not None and any(
            isinstance(a, _Verbs) and a.only is not None and not a.matched
            for group in sub.choices.values() for a in group._actions):
        # not one of the group's verbs (a typo, say): argparse lists them all
        return build_parser(argv, every_verb=True)
    describe(parser)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """``lamina image ls``: the command as the user named it, for messages."""
    verbs = [v for k, v in vars(args).items()
             if (k == "verb" or k.endswith("_command")) and isinstance(v, str)]
    return " ".join(("lamina", args.command, *verbs))


def _one_line(text: str) -> str:
    """``text`` as one line a terminal shows as it is (:func:`lamina.errors.printable`)."""
    return printable(" ".join(part.strip() for part in text.splitlines() if part.strip()))


def _os_error(exc: OSError) -> tuple[str, int]:
    """The line and exit code for an operating-system error that escaped: the code of
    the class its errno stands for (:func:`lamina.errors.from_os_error`), else 1."""
    known = from_os_error(exc)
    return describe_os_error(exc), (1 if known is None else known.exit_code)


def _stdout_closed() -> bool:
    """Whether nobody reads our standard output any more (a pipe's reader exited)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _debug_wanted(words: Sequence[str], config: settings.Config) -> bool:
    """``--debug``, else ``$LAMINA_DEBUG``, else the config file's ``debug``."""
    if "--debug" in words:
        return True
    env = os.environ.get("LAMINA_DEBUG", "")
    return env != "0" if env else bool(config.debug)


def _global_value(words: Sequence[str], flag: str) -> str | None:
    """The value of a global option, read before parsing (``--config F``, ``--config=F``)."""
    at = _command_at(words)
    for pos, word in enumerate(words[:at]):
        if word == flag and pos + 1 < len(words):
            return words[pos + 1]
        if word.startswith(flag + "="):
            return word[len(flag) + 1:]
    return None


def _asks_version(words: Sequence[str]) -> bool:
    """``lamina [OPTIONS] --version``, which argparse would answer before anything else."""
    at = _command_at(words)
    before = words if at is None else words[:at]
    return "--version" in before and not {"-h", "--help"} & set(before)


def _load_config(words: Sequence[str]) -> settings.Config:
    from lamina import rootless
    from lamina.util import config as settings

    path, required = settings.config_path(
        flag=_global_value(words, "--config"),
        unprivileged=os.geteuid() != 0 or rootless.active())
    return settings.load(path, required=required)


def _with_config(args: argparse.Namespace, config: settings.Config) -> None:
    """The config file's values where no flag (or environment variable) gave one."""
    if getattr(args, "hosts_dir", False) is None and config.hosts_dir is not None:
        args.hosts_dir = list(config.hosts_dir)
    if getattr(args, "namespace", False) is None and config.namespace is not None:
        args.namespace = config.namespace


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``lamina`` command; returns its exit code (see the module docs)."""
    words = _as_nerdctl_would(list(sys.argv[1:] if argv is None else argv))
    if _asks_version(words):
        print(f"lamina {__version__}")
        return 0
    from lamina import rootless
    from lamina.util import config as settings

    debug = _debug_wanted(words, settings.Config())
    app: App | None = None

    def fail(line: str, code: int) -> int:
        if debug:
            import traceback

            traceback.print_exc()
        print(f"lamina: {_one_line(line)}", file=sys.stderr, flush=True)
        return code

    try:
        # an unprivileged user works in lamina's user and mount namespaces
        # (lamina.rootless); first, while this process has one thread. Stopping
        # them joins them itself, and makes none when there are none.
        if _requested_group(words) != "rootless":
            rootless.enter()
        config = _load_config(words)
        debug = _debug_wanted(words, config)
        if not debug:
            # gRPC's C core logs its own lines to stderr (a failed bind, say); lamina
            # reports every failure itself, in one line. `--debug` keeps them.
            os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        unknown = _unknown_command(words)
        if unknown is not None:
            print(f"lamina: error: {unknown} (see --help)", file=sys.stderr)
            return EXIT_USAGE
        try:
            parser = build_parser(words)
            args = parser.parse_args(words)
        except SystemExit as exc:  # --help, --version, usage errors
            return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        from lamina.cli.app import App
        from lamina.metadata.root import default_root
        from lamina.owners import DEFAULT_NAMESPACE, check_namespace

        _with_config(args, config)
        if ALIASES.get(args.command, args.command) in _STREAMING:  # (lamina.util.allocator)
            from lamina.util.allocator import keep_freed_blocks

            keep_freed_blocks()
        root = args.root or os.environ.get("LAMINA_ROOT") or config.root or default_root()
        app = App(root=root, snapshotter=args.snapshotter or config.snapshotter or "overlay",
                  address=args.address or config.address, command=_command_name(args),
                  namespace=check_namespace(args.namespace or DEFAULT_NAMESPACE))
        with as_exception():  # SIGTERM and SIGHUP run the cleanups, as Ctrl-C does
            code: int = args.handler(args, app)
        sys.stdout.flush()
        return code
    except LaminaError as exc:
        return fail(exc.one_line(), exc.exit_code)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except Terminated as exc:
        return fail(f"terminated ({exc})", 128 + exc.signum)
    except BrokenPipeError as exc:
        if _stdout_closed():
            # Let the interpreter's final flush go nowhere instead of failing again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_STDOUT_CLOSED
        return fail(*_os_error(exc))
    except OSError as exc:
        return fail(*_os_error(exc))
    except Exception as exc:
        hint = "" if debug else " (--debug shows the traceback)"
        return fail(f"internal error: {type(exc).__name__}: {exc}{hint}", 1)
    finally:
        if app is not None:
            try:
                app.close()
            except Exception as exc:  # the command's outcome stands; say what failed
                print(f"lamina: closing the root: {type(exc).__name__}: {_one_line(str(exc))}",
                      file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
