"""``lamina --help`` and every ``lamina ... --help`` read like ctr's, nerdctl's and git's
(issue 20): a one-line summary for every command and verb, every option and
positional argument described, no reStructuredText from the docstrings, no line
over 80 columns, and examples for the verbs people start with."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lamina.cli import build_parser
from lamina.cli.common import subcommands

LAMINA = [sys.executable, "-m", "lamina"]

# what docstrings say in reStructuredText and a terminal shows as noise
RST = re.compile(r"``|:(?:class|func|meth|mod|attr|data|exc):|`[^`]+`_|`")

# a verb's summary shares its line with the name column argparse gives it (24 columns)
SUMMARY_MAX = 80 - 24

WITH_EXAMPLES = [
    ("image", "pull"), ("image", "import"), ("image", "ls"), ("image", "push"),
    ("run",), ("container", "create"), ("snapshot", "prepare"), ("snapshot", "commit"),
    ("serve",), ("check",),
]


@pytest.fixture(scope="module")
def tree() -> list[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every parser once (aliases skipped): its command path, itself and the summary its
    parent lists it with."""
    parser = build_parser()
    return [((), parser, None), *((path, p, summary)
                                  for path, _, p, summary in subcommands(parser))]


def named(path: tuple[str, ...]) -> str:
    return " ".join(("lamina", *path))


def test_every_command_and_verb_has_a_one_line_summary(tree) -> None:  # type: ignore[no-untyped-def]
    bad = [f"{named(path)}: {summary!r}" for path, _, summary in tree[1:]
           if not summary or "\n" in summary or len(summary) > SUMMARY_MAX]
    assert not bad, "commands without a one-line summary (at most "\
        f"{SUMMARY_MAX} characters):\n" + "\n".join(bad)


def test_every_command_has_a_description(tree) -> None:  # type: ignore[no-untyped-def]
    bad = [named(path) for path, p, _ in tree if not (p.description or "").strip()]
    assert not bad, "no description under usage: " + ", ".join(bad)


def test_every_option_and_positional_is_described(tree) -> None:  # type: ignore[no-untyped-def]
    bad = []
    for path, p, _ in tree:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                what = "/".join(action.option_strings) or action.metavar or action.dest
                bad.append(f"{named(path)}: {what}")
    assert not bad, "arguments without help:\n" + "\n".join(bad)


def test_no_restructuredtext_in_any_help(tree) -> None:  # type: ignore[no-untyped-def]
    bad = []
    for path, p, summary in tree:
        texts = [summary, p.description, p.epilog,
                 *(a.help for a in p._actions if a.help != argparse.SUPPRESS)]
        bad += [f"{named(path)}: {t!r}" for t in texts if t and RST.search(t)]
    assert not bad, "reStructuredText in help:\n" + "\n".join(bad)


def test_no_help_line_is_wider_than_80_columns(tree, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("COLUMNS", "80")
    bad = [f"{named(path)}: {line!r}" for path, p, _ in tree
           for line in p.format_help().splitlines() if len(line) > 80]
    assert not bad, "help lines over 80 columns:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", WITH_EXAMPLES, ids=" ".join)
def test_main_verbs_show_examples(tree, path) -> None:  # type: ignore[no-untyped-def]
    parser = {p: parser for p, parser, _ in tree}[path]
    epilog = parser.epilog or ""
    assert epilog.startswith("examples:\n"), epilog
    assert re.search(rf"^  {re.escape(named(path))}( |$)", epilog, flags=re.MULTILINE)
    # the examples keep their lines: argparse would join them into a paragraph
    assert issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)


def test_run_and_create_take_the_command_as_optional() -> None:
    parser = build_parser()
    for words in (["run", "alpine"], ["container", "create", "alpine", "c1"]):
        assert not parser.parse_args(words).cmd
        args = parser.parse_args([*words, "sh", "-c", "echo hi"])
        assert args.cmd == ["sh", "-c", "echo hi"]


def help_of(*words: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("LAMINA_DEBUG", None)
    return subprocess.run([*LAMINA, *words, "--help"], capture_output=True, text=True,
                          env=env, timeout=60, check=False, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("words", [(), ("image", "pull"), ("run",), ("snapshot", "prepare"),
                                   ("content", "ingest"), ("serve",)], ids=" ".join)
def test_help_as_a_process(words: tuple[str, ...]) -> None:
    done = help_of(*words)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"usage: {named(words)}")
    assert not [line for line in lines if len(line) > 80]
    assert not RST.search(done.stdout)
    # the summary follows the usage, as git's and ctr's do
    text = done.stdout.split("\n\n")
    assert len(text) > 2 and not text[1].startswith(("positional", "options"))


def test_top_level_help_names_every_command_and_the_exit_codes() -> None:
    done = help_of()
    assert done.returncode == 0, done.stderr
    for command in ("snapshot", "image", "container", "run", "serve", "check", "completion"):
        assert f"\n    {command}" in done.stdout
    assert "exit codes:" in done.stdout.lower()


def test_the_man_page_is_made_from_the_parser_and_renders(tmp_path) -> None:  # type: ignore[no-untyped-def]
    page = tmp_path / "lamina.1"
    script = Path(__file__).resolve().parent.parent / "scripts" / "manpage.py"
    done = subprocess.run([sys.executable, str(script), "-o", str(page)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "FILES",
                    "ENVIRONMENT", "SEE ALSO"):
        assert f"\n.SH {section}\n" in text
    assert '\n.SS "lamina image pull"\n' in text and "\\fB\\-\\-platform\\fR" in text
    assert "\n.TP\n\\fB141\\fR\n" in text  # the exit codes of lamina.cli's table
    assert "``" not in text
    if shutil.which("groff") is None:
        pytest.skip("no groff to render it")
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                              capture_output=True, text=True, timeout=60, check=False)
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
    check = subprocess.run([sys.executable, str(script), "-o", str(page), "--check"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stdout
    page.write_text(text.replace("\\-\\-platform", "\\-\\-platforms"))
    check = subprocess.run([sys.executable, str(script), "-o", str(page), "--check"],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 1 and "stale" in check.stdout
