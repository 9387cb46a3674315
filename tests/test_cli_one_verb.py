"""``lamina GROUP VERB ...`` builds the parser of that verb alone (start-up time,
bench/startup.py): every verb's parser, so built, is the one the whole tree has."""

from __future__ import annotations

import argparse

from lamina.cli import build_parser
from lamina.cli.common import subcommands


def _verb_parser(parser: argparse.ArgumentParser, path: tuple[str, ...],
                 ) -> argparse.ArgumentParser:
    return next(p for at, _, p, _ in subcommands(parser) if at == path)


def _verbs_of(parser: argparse.ArgumentParser) -> set[str]:
    """The verbs ``parser`` (a group's) has parsers for."""
    return {name for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) for name in action.choices}


def test_each_verb_alone_is_the_verb_of_the_whole_tree() -> None:
    full = build_parser()
    verbs = [(path, aliases) for path, aliases, _, _ in subcommands(full) if len(path) == 2]
    assert len(verbs) > 40, verbs
    for path, aliases in verbs:
        for spelled in (path[1], *aliases):
            alone = build_parser([path[0], spelled])
            group = _verb_parser(alone, path[:1])
            assert _verbs_of(group) <= {path[1], *aliases}, path
            mine = _verb_parser(alone, path)
            assert mine.format_help() == _verb_parser(full, path).format_help(), path
            assert mine.get_default("handler") is _verb_parser(full, path).get_default("handler")


def test_an_unknown_verb_lists_them_all() -> None:
    group = _verb_parser(build_parser(["image", "lss"]), ("image",))
    assert {"ls", "pull", "inspect"} <= _verbs_of(group)


def test_a_group_option_before_the_verb_builds_them_all() -> None:
    assert {"ls", "pull"} <= _verbs_of(_verb_parser(build_parser(["image", "-h"]), ("image",)))
