"""What several command groups print or parse the same way."""

from __future__ import annotations

import argparse
import itertools
import textwrap
from collections.abc import Iterable, Iterator, Sequence

from lamina.errors import InvalidArgument

__all__ = [
    "add_examples",
    "add_max_layer_size",
    "add_mount_flags",
    "add_sync",
    "describe",
    "human_size",
    "max_layer_size",
    "parse_labels",
    "print_table",
    "subcommands",
    "sync_layers",
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
    header: Sequence[str], rows: Iterable[Sequence[str]], *, widths: Sequence[int] | None = None
) -> None:
    """Left-aligned columns, like ctr's listings: each as wide as its longest cell and two
    spaces apart; or, given ``widths`` (one for every column but the last), that wide at
    least and one space apart, so the rows print as they come."""
    if widths is not None:
        for r in itertools.chain([header], rows):
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
            print(" ".join([*cells, r[-1]]))
        return
    lines = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    for r in lines:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths[:-1], strict=True)] + [r[-1]]
        print("  ".join(cells).rstrip())


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
