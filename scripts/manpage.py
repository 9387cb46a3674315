#!/usr/bin/env python3
"""Write lamina's man page, ``docs/lamina.1`` (roff), from its own parser.

    /opt/lamina/bin/python scripts/manpage.py            # regenerate docs/lamina.1
    /opt/lamina/bin/python scripts/manpage.py --check    # fail (and show the diff) when stale
    man -l docs/lamina.1

Every command and verb, its options and arguments come from
``lamina.cli.build_parser()`` (the texts of ``--help``, examples included); the
exit codes from the table in ``lamina.cli``'s docstring (the README's). CI runs
``--check``, so a new flag or command fails CI until the page is regenerated.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "lamina.1"

DESCRIPTION = (
    "lamina keeps container filesystems the way containerd does: snapshots (overlay, "
    "native or erofs) stacked on committed parents, a content store of blobs by digest, "
    "OCI images imported, pulled, unpacked, pushed and exported, and containers run with "
    "runc and checkpointed with CRIU, all under one root directory. lamina serve offers "
    "the snapshots and the content to containerd 1.6 as proxy plugins over gRPC; the other "
    "commands work on the root directly, or on a running server with --address."
)

FILES = [
    ("/var/lib/lamina", "The root directory of root's lamina (--root, $LAMINA_ROOT); "
     "another user's is ~/.local/share/lamina ($XDG_DATA_HOME/lamina)."),
    ("/run/lamina/lamina.sock", "The socket lamina serve listens on by default "
     "($LAMINA_ADDRESS)."),
    ("/etc/lamina/lamina.toml", "Settings: root, snapshotter, address, namespace, debug, "
     "hosts_dir (--config, $LAMINA_CONFIG; a user's is $XDG_CONFIG_HOME/lamina/lamina.toml)."),
    ("/etc/lamina/certs.d", "Registry hosts.toml files, as containerd's "
     "/etc/containerd/certs.d (read too with --containerd-hosts)."),
    ("~/.docker/config.json", "Registry credentials, as docker keeps them (lamina login; "
     "$DOCKER_CONFIG)."),
]

ENVIRONMENT = [
    ("LAMINA_ROOT", "The root directory when --root is not given."),
    ("LAMINA_ADDRESS", "The socket of lamina serve when --address is not given."),
    ("LAMINA_CONFIG", "The settings file when --config is not given."),
    ("LAMINA_DEBUG", "When set (and not 0), an error prints its traceback too."),
    ("LAMINA_MAX_LAYER_SIZE", "How far one layer may expand when unpacked (default 64G)."),
    ("LAMINA_NO_SYNC", "When 1, unpacked layers are not synced before their commit "
     "(as --no-sync)."),
    ("LAMINA_IDMAP", "When copy, a user namespace gets chowned copies of the image's layers "
     "even where ID-mapped mounts work."),
    ("LAMINA_ROOTLESS_DEVICES", "When strict, an unprivileged unpack fails on a device "
     "node it cannot create (else it is left out and reported)."),
    ("DOCKER_CONFIG", "The directory of docker's config.json (default ~/.docker)."),
]

SEE_ALSO = "ctr(8), containerd(8), containerd-config.toml(5), nerdctl(1), runc(8), criu(8)"


def roff(text: str) -> str:
    """``text`` as roff input: backslashes and hyphens escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def bold(text: str) -> str:
    return f"\\fB{roff(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{roff(text)}\\fR"


def _metavar(action: argparse.Action) -> str:
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def _positional(action: argparse.Action) -> str:
    name = italic(_metavar(action))
    if action.nargs == "?":
        return f"[{name}]"
    if action.nargs in ("*", argparse.REMAINDER):
        return f"[{name}...]"
    if action.nargs == "+":
        return f"{name}..."
    return name


def _invocation(action: argparse.Action) -> str:
    if not action.option_strings:
        return italic(_metavar(action))
    names = ", ".join(bold(o) for o in action.option_strings)
    return names if action.nargs == 0 else f"{names} {italic(_metavar(action))}"


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction))]


def _text(text: str | None) -> str:
    return roff(" ".join((text or "").split()))


def _described(actions: list[argparse.Action]) -> list[str]:
    lines: list[str] = []
    for action in actions:
        lines += [".TP", _invocation(action), _text(action.help)]
    return lines


def _examples(epilog: str | None) -> list[str]:
    if not epilog or not epilog.startswith("examples:"):
        return []
    lines = [".PP", "Examples:", ".RS", ".nf"]
    for line in epilog.splitlines()[1:]:
        lines.append(roff(line[2:]) if line.strip() else "")
    return [*lines, ".fi", ".RE"]


def _command(path: tuple[str, ...], aliases: list[str], parser: argparse.ArgumentParser,
             ) -> list[str]:
    has_verbs = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    title = " ".join(("lamina", *path))
    lines = [f'.SS "{roff(title)}"']
    args = _arguments(parser)
    options = [a for a in args if a.option_strings]
    positionals = [a for a in args if not a.option_strings]
    synopsis = [bold(title)]
    if has_verbs:
        synopsis.append(italic("VERB") + " ...")
    else:
        if options:
            synopsis.append("[" + italic("options") + "]")
        synopsis += [_positional(a) for a in positionals]
    lines += [".PP", " ".join(synopsis)]
    if aliases:
        also = ", ".join(bold(" ".join(("lamina", *path[:-1], a))) for a in aliases)
        lines += [".br", f"Also: {also}."]
    lines += [".PP", _text(parser.description)]
    lines += _described(positionals + options)
    lines += _examples(parser.epilog)
    return lines


def exit_codes() -> list[tuple[str, str]]:
    """The table of lamina.cli's docstring (the README's): (code, meaning) rows."""
    import lamina.cli

    doc = lamina.cli.__doc__ or ""
    rows = re.findall(r"^(\d+)\s{2,}(.+)$", doc, flags=re.MULTILINE)
    return [(code, meaning.replace("``", "")) for code, meaning in rows]


def page() -> str:
    # the help texts must not depend on who runs this or where
    for name in [n for n in os.environ if n.startswith("LAMINA_")]:
        del os.environ[name]
    from lamina import __version__
    from lamina.cli import SUMMARY, build_parser
    from lamina.cli.common import subcommands

    parser = build_parser()
    lines = [
        ".\\\" Made by scripts/manpage.py from lamina's parser: edit the help texts, not this.",
        f'.TH LAMINA 1 "" "lamina {roff(__version__)}" "User Commands"',
        ".SH NAME", f"lamina \\- {roff(SUMMARY)}",
        ".SH SYNOPSIS",
        f"{bold('lamina')} [{italic('global options')}] {italic('COMMAND')} "
        f"[{italic('VERB')}] [{italic('options')}] [{italic('arguments')}]",
        ".SH DESCRIPTION", roff(DESCRIPTION),
        ".SH GLOBAL OPTIONS",
        *_described([a for a in _arguments(parser) if a.option_strings]),
        ".SH COMMANDS",
    ]
    for path, aliases, child, _ in subcommands(parser):
        lines += _command(path, aliases, child)
    lines.append(".SH EXIT STATUS")
    for code, meaning in exit_codes():
        lines += [".TP", bold(code), roff(meaning)]
    lines.append(".SH FILES")
    for path, what in FILES:
        lines += [".TP", italic(path), roff(what)]
    lines.append(".SH ENVIRONMENT")
    for name, what in ENVIRONMENT:
        lines += [".TP", bold(name), roff(what)]
    lines += [".SH SEE ALSO", roff(SEE_ALSO)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write lamina's man page from its parser.")
    ap.add_argument("-o", "--output", type=Path, default=PAGE,
                    help=f"where to write it (default {PAGE.relative_to(REPO)})")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; fail, showing the diff, when the file is stale")
    args = ap.parse_args(argv)
    text = page()
    if args.check:
        old = args.output.read_text() if args.output.exists() else ""
        if old == text:
            print(f"{args.output} is fresh")
            return 0
        sys.stdout.writelines(difflib.unified_diff(
            old.splitlines(keepends=True), text.splitlines(keepends=True),
            str(args.output), "scripts/manpage.py"))
        print(f"{args.output} is stale: run scripts/manpage.py")
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
