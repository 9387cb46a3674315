"""The ``lamina`` command line, in the style of ``ctr``.

Each command group lives in its own module with a ``register(subparsers)``
function; handlers take the parsed arguments and an :class:`App` and return
an exit code. Errors are printed as one line and exit with their class's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lamina.cli.app import App
from lamina.errors import LaminaError
from lamina.root import default_root

__all__ = ["main"]

# command group modules, in the order `lamina --help` lists them
GROUPS = ("snapshot", "content", "diff", "image", "container", "task", "run",
          "checkpoint", "serve", "config", "gc", "lease", "check", "login")


# aliases a group module registers, so one command imports only its own module
ALIASES = {
    "snapshots": "snapshot", "images": "image", "i": "image", "containers": "container",
    "c": "container", "tasks": "task", "t": "task", "checkpoints": "checkpoint",
    "leases": "lease", "fsck": "check", "logout": "login",
}
_GLOBAL_WITH_VALUE = ("--root", "--snapshotter", "--address")


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


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the group it names is imported (fast start-up)."""
    parser = argparse.ArgumentParser(prog="lamina", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="lamina root directory "
                        f"(default: $LAMINA_ROOT or {default_root()})")
    parser.add_argument("--snapshotter", default="overlay",
                        help="snapshotter: overlay or native (default overlay)")
    parser.add_argument("--address", default=None,
                        help="talk to a running `lamina serve` on this socket")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = _requested_group(argv) if argv is not None else None
    for name in (wanted,) if wanted else GROUPS:
        try:
            module = importlib.import_module(f"lamina.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"lamina.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words)
    args = parser.parse_args(words)
    app = App(root=args.root or default_root(), snapshotter=args.snapshotter,
              address=args.address)
    try:
        code: int = args.handler(args, app)
        return code
    except LaminaError as exc:
        print(f"lamina: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main())
