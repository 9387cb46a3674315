"""Every command given ``--address`` works through that server or refuses in one line:
none falls back to the local root (lamina.api.backend)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lamina.cli import build_parser, main

# Commands that are about neither a root nor a server: `serve` makes the server
# (the global --address is where it listens), `config` prints a snippet, login and
# logout keep registry credentials, completion prints a script.
NOT_BACKEND = {("serve",), ("config", "containerd"), ("login",), ("logout",), ("completion",)}
# `snapshot unmount` unmounts a directory: no store, no server, nothing to refuse.
NO_STORE = {("snapshot", "unmount")}
UNAVAILABLE, NOT_IMPLEMENTED = 7, 8


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction | None:  # type: ignore[type-arg]
    return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)


def _commands() -> list[tuple[tuple[str, ...], list[str]]]:
    """Every command (group and verb, without aliases) with placeholder arguments."""
    found = []
    stack: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = [((), build_parser())]
    while stack:
        words, parser = stack.pop()
        sub = _subparsers(parser)
        if sub is None:
            args = []
            for action in parser._actions:
                if action.option_strings:
                    if action.required:
                        args += [action.option_strings[0], "1"]
                    continue
                # a registry nobody listens on, for the commands that take references
                if action.dest in ("ref", "refs", "source", "remote"):
                    args.append("127.0.0.1:1/x:y")
                else:
                    args.append("k=v" if "label" in action.dest else "x")
            found.append((words, args))
            continue
        seen: set[int] = set()
        for name, child in sub.choices.items():
            if id(child) not in seen:  # aliases share their parser
                seen.add(id(child))
                stack.append(((*words, name), child))
    return sorted(found)


COMMANDS = [c for c in _commands() if c[0] not in NOT_BACKEND]


def test_the_list_covers_the_command_groups() -> None:
    groups = {words[0] for words, _ in COMMANDS}
    assert {"snapshot", "content", "diff", "image", "container", "task", "run", "gc",
            "lease", "check", "version"} <= groups, groups
    assert len(COMMANDS) > 40


@pytest.mark.parametrize(("words", "args"), COMMANDS, ids=[" ".join(w) for w, _ in COMMANDS])
def test_a_missing_server_is_never_replaced_by_the_local_root(
        words: tuple[str, ...], args: list[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    monkeypatch.delenv("LAMINA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.stdin", open("/dev/null"))  # noqa: SIM115 (content ingest)
    code = main(["--root", str(root), "--address", str(tmp_path / "missing.sock"),
                 *words, *args])
    out, err = capsys.readouterr()
    assert not root.exists(), f"{' '.join(words)} touched the local root"
    if words in NO_STORE:
        assert code == 0 and not err, err
        return
    assert code in (UNAVAILABLE, NOT_IMPLEMENTED), (code, out, err)
    assert err.count("\n") == 1 and err.startswith("lamina: "), err
    if code == NOT_IMPLEMENTED:
        assert "--address" in err, err
