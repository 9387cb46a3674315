"""What several command groups print or parse the same way."""

from __future__ import annotations

import argparse
import itertools
import sys
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime

from lamina.errors import InvalidArgument, LaminaError, printable

__all__ = [
    "add_examples",
    "add_max_layer_size",
    "add_mount_flags",
    "add_sync",
    "count",
    "describe",
    "human_age",
    "human_size",
    "max_layer_size",
    "parse_labels",
    "print_table",
    "subcommands",
    "sync_layers",
    "terminal_columns",
]


def parse_labels(pairs: Iterable[str] | None, *, allow_bare: bool = False) -> dict[str, str]:
    """``k=v`` strings as a dict; ``k`` alone means ``k=`` (delete) when ``allow_bare``."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        k, eq, v = pair.partition("=")
        if not k or (not eq and not allow_bare):
            raise InvalidArgument(f"label {pair!r}: expected KEY=VALUE")
        out[k] = v
    return out


def print_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], *, widths: Sequence[int] | None = None,
    fit: int | None = None, shrink: Sequence[int] = (),
) -> None:
    """Left-aligned columns, like ctr's listings: each as wide as its longest cell and two
    spaces apart; or, given ``widths`` (one for every column but the last), that wide at
    least and one space apart, so the rows print as they come.

    ``fit`` (a terminal's columns): when the lines would be wider, the columns numbered in
    ``shrink`` give way, the widest first, down to their header's width, and their longer
    cells lose their middle to an ellipsis; the other columns keep their width."""
    # every cell as a terminal shows it: what an image or a peer wrote into a platform,
    # a label or a key cannot drive the terminal (lamina.errors.printable)
    if widths is not None:
        for r in itertools.chain([header], rows):
            cells = [printable(c).ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
            print(" ".join([*cells, printable(r[-1])]))
        return
    lines = [list(header), *([printable(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    if fit is not None:
        _shrink(widths, header, shrink, room=fit - 1)  # a full line wraps on some terminals
        mark = _ellipsis()
        lines = [[_cut(c, w, mark) for c, w in zip(r, widths, strict=True)] for r in lines]
    for r in lines:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        print("  ".join(cells).rstrip())


def _shrink(widths: list[int], header: Sequence[str], shrink: Sequence[int], *,
            room: int) -> None:
    over = sum(widths) + 2 * (len(widths) - 1) - room
    while over > 0:
        able = [i for i in shrink if widths[i] > len(header[i])]
        if not able:
            return
        widest = max(able, key=lambda i: widths[i])
        widths[widest] -= 1
        over -= 1


def _ellipsis() -> str:
    """What stands for the cut part: an ellipsis, or ``~`` where the output's encoding
    has none."""
    import sys

    encoding = (sys.stdout.encoding or "").lower().replace("-", "").replace("_", "")
    return "\u2026" if encoding.startswith("utf") else "~"


def _cut(text: str, width: int, mark: str) -> str:
    """``text`` in ``width`` characters: its middle ``mark`` when it is longer."""
    if len(text) <= width:
        return text
    tail = (width - 1) // 2
    return text[:width - 1 - tail] + mark + text[len(text) - tail:]


def told_damaged(damaged: Sequence[LaminaError]) -> int:
    """After a listing that left damaged records out: a line on standard error for
    each, as its error would be told, and the exit code to end with (0: none)."""
    sys.stdout.flush()  # the listing first, where both go to one terminal
    for exc in damaged:
        print(f"lamina: {exc.one_line()}", file=sys.stderr)
    return damaged[0].exit_code if damaged else 0


def terminal_columns() -> int | None:
    """The width of the terminal standard output is, or None when it is not one
    (``$COLUMNS`` first, as shutil reads it)."""
    import shutil
    import sys

    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def human_age(t: datetime | None, *, now: datetime | None = None) -> str:
    """``3 days ago``, as docker and nerdctl say when something was made."""
    if t is None:
        return ""
    now = now or datetime.now(UTC)
    seconds = max(0, int((now - t).total_seconds()))
    for unit, span, below in (("second", 1, 60), ("minute", 60, 3600), ("hour", 3600, 172800),
                              ("day", 86400, 14 * 86400), ("week", 7 * 86400, 60 * 86400),
                              ("month", 30 * 86400, 730 * 86400)):
        if seconds < below:
            n = seconds // span
            return f"{n} {unit}{'' if n == 1 else 's'} ago"
    n = seconds // (365 * 86400)
    return f"{n} years ago"


def count(n: int, noun: str) -> str:
    """``1 layer``, ``2 layers``: ``n`` and the noun in the number it takes."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def human_size(n: int) -> str:
    """``1.5 MiB`` style sizes."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def add_mount_flags(p: argparse.ArgumentParser) -> None:
    """``--allow-suid`` / ``--allow-dev``: drop the ``nosuid`` / ``nodev`` that every
    mount of image content gets by default."""
    p.add_argument("--allow-suid", action="store_true",
                   help="honour setuid/setgid bits and file capabilities (no nosuid)")
    p.add_argument("--allow-dev", action="store_true",
                   help="let device nodes of the image be opened (no nodev)")


def _size_arg(text: str) -> int:
    from lamina.archive.limits import parse_size

    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_max_layer_size(p: argparse.ArgumentParser) -> None:
    """``--max-layer-size``: how far one layer may expand (default 64G or
    ``$LAMINA_MAX_LAYER_SIZE``)."""
    p.add_argument("--max-layer-size", type=_size_arg, default=None, metavar="SIZE",
                   help="stop a layer that expands beyond SIZE uncompressed bytes "
                   "(e.g. 4G; default $LAMINA_MAX_LAYER_SIZE or 64G)")


def add_progress(p: argparse.ArgumentParser, *, quiet: bool = True) -> None:
    """``--json`` (progress as JSON lines) and, with ``quiet``, ``--quiet/-q``."""
    p.add_argument("--json", dest="json_progress", action="store_true",
                   help="progress as JSON lines")
    if quiet:
        p.add_argument("--quiet", "-q", action="store_true",
                       help="no progress: only errors and the result lines")


def add_sync(p: argparse.ArgumentParser) -> None:
    """``--no-sync``: skip syncing each unpacked layer before its snapshot is committed."""
    p.add_argument("--no-sync", action="store_true",
                   help="do not syncfs each unpacked layer before committing it: faster, "
                        "but a power cut may lose layers unpacked in the last seconds "
                        "(lamina check --deep finds them); also $LAMINA_NO_SYNC=1")


def sync_layers(args: argparse.Namespace) -> bool:
    """False with ``--no-sync`` or ``$LAMINA_NO_SYNC=1``."""
    import os

    return not (getattr(args, "no_sync", False) or os.environ.get("LAMINA_NO_SYNC") == "1")


def max_layer_size(args: argparse.Namespace) -> int:
    """The ``--max-layer-size`` given, else ``$LAMINA_MAX_LAYER_SIZE``, else the default."""
    from lamina.archive.limits import env_max_layer_size

    given: int | None = getattr(args, "max_layer_size", None)
    return given if given is not None else env_max_layer_size()


def add_examples(p: argparse.ArgumentParser, *examples: tuple[str, str]) -> None:
    """An ``examples:`` epilog under the options, each a comment saying what it does and
    its command line(s), laid out as written (argparse would join them into one paragraph).

    That raw layout keeps the description's lines too, so it is wrapped here."""
    if p.description:
        p.description = textwrap.fill(" ".join(p.description.split()), 79)
    lines = ["examples:"]
    for what, commands in examples:
        lines.append(f"  # {what}")
        lines += [f"  {command}" for command in commands.splitlines()]
        lines.append("")
    p.epilog = "\n".join(lines).rstrip()
    p.formatter_class = argparse.RawDescriptionHelpFormatter


def _sentence(summary: str) -> str:
    text = summary[:1].upper() + summary[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
                ) -> Iterator[tuple[tuple[str, ...], list[str], argparse.ArgumentParser,
                                    str | None]]:
    """Every command and verb below ``parser`` once, depth first: its path of names, its
    aliases, its parser and the summary its parent lists it with."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        summaries = {a.dest: a.help for a in action._choices_actions}
        names: dict[int, list[str]] = {}
        for name, child in action.choices.items():
            names.setdefault(id(child), []).append(name)
        for name, child in action.choices.items():
            if names[id(child)][0] == name:
                yield (*path, name), names[id(child)][1:], child, summaries.get(name)
                yield from subcommands(child, (*path, name))


def describe(parser: argparse.ArgumentParser) -> None:
    """Give every sub-command below ``parser`` without a description its one-line summary as
    one, so ``lamina VERB --help`` says what VERB does under its usage, as ctr and git do."""
    for _, _, child, summary in subcommands(parser):
        if not child.description and summary and summary != argparse.SUPPRESS:
            child.description = _sentence(summary)
