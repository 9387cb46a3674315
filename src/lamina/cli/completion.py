"""``lamina completion bash``: a completion script generated from lamina's own parser.

The script holds the command tree as bash associative arrays (the verbs under
each command, each parser's options, which options take a value and what each
positional argument names), so it never runs lamina to complete a word of the
command line; only the names of images, snapshots and containers are asked for,
from ``lamina ... ls -q``, when such an argument is being completed.
"""

from __future__ import annotations

import argparse
import shlex

from lamina.cli.app import App
from lamina.cli.common import add_examples, subcommands

__all__ = ["bash_script", "register"]

# what a positional argument names, by its metavar: how to complete it
_FILES = {"FILE": "files", "LAYER": "files", "PATH": "files", "DIR": "dirs", "TARGET": "dirs"}
_FILE_VALUES = {"FILE", "DIR", "PATH", "SOCKET", "PEM"}
# image ls -q prints IDs, as nerdctl's does; --names makes it print the names
_LISTED = {"images": ("image", "ls", "-q", "--names"), "snapshots": ("snapshot", "ls", "-q"),
           "containers": ("container", "ls", "-q")}


def _kind(path: tuple[str, ...], metavar: str) -> str:
    """How to complete positional ``metavar`` of the command at ``path`` ('' for nothing)."""
    group = path[0] if path else ""
    if metavar in _FILES:
        return _FILES[metavar]
    if metavar in ("IMAGE", "NEW_IMAGE", "SRC") or (metavar == "REF" and group == "image"):
        return "images"
    if group == "snapshot" and metavar in ("KEY", "PARENT"):
        return "snapshots"
    if metavar == "ID" and group in ("container", "task", "checkpoint") and path[1:] != (
            "create",):
        return "containers"
    return ""


def _nodes(parser: argparse.ArgumentParser,
           ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser, dict[str, str]]]:
    """Every parser once: its path of names, itself and its verbs (name or alias -> name)."""
    below = list(subcommands(parser))
    verbs: dict[tuple[str, ...], dict[str, str]] = {}
    for path, aliases, _, _ in below:
        verbs.setdefault(path[:-1], {}).update(dict.fromkeys((path[-1], *aliases), path[-1]))
    return [(path, p, verbs.get(path, {}))
            for path, p in [((), parser), *((path, p) for path, _, p, _ in below)]]


def _choices(action: argparse.Action) -> list[str]:
    if action.choices:
        return [str(c) for c in action.choices]
    if "--snapshotter" in action.option_strings:
        from lamina.metadata.root import SNAPSHOTTERS

        return sorted(SNAPSHOTTERS)
    return []


def _assign(array: str, key: str, words: list[str]) -> str:
    return f"{array}[{shlex.quote(key)}]={shlex.quote(' '.join(words))}"


def bash_script(parser: argparse.ArgumentParser) -> str:
    """The bash completion script for ``parser`` (``lamina``'s whole tree)."""
    lines: list[str] = []
    for path, p, verbs in _nodes(parser):
        key = "/".join(("lamina", *path))  # bash refuses an empty key
        options: list[str] = []
        valued: list[str] = []
        files: list[str] = []
        kinds: list[str] = []
        repeat = ""
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if action.option_strings:
                options += action.option_strings
                if action.nargs != 0:
                    valued += action.option_strings
                    choices = _choices(action)
                    if choices:
                        lines += [_assign("_lamina_choices", f"{key}|{o}", choices)
                                  for o in action.option_strings]
                    elif action.metavar in _FILE_VALUES or action.dest == "root":
                        files += action.option_strings
                continue
            kinds.append(_kind(path, str(action.metavar or action.dest.upper())) or "-")
            if action.choices and not verbs:
                lines.append(_assign("_lamina_choices", f"{key}|#{len(kinds) - 1}",
                                     [str(c) for c in action.choices]))
            if action.nargs in ("*", "+", argparse.REMAINDER):
                repeat = "1"
        lines.append(_assign("_lamina_opts", key, options))
        lines.append(_assign("_lamina_valued", key, valued))
        lines.append(_assign("_lamina_files", key, files))
        lines.append(_assign("_lamina_args", key, kinds))
        lines.append(_assign("_lamina_repeat", key, [repeat] if repeat else []))
        lines.append(_assign("_lamina_verbs", key, list(verbs)))
        lines += [_assign("_lamina_go", f"{key}|{name}", [f"{key}/{canonical}"])
                  for name, canonical in verbs.items()]
    listers = "\n".join(f"    {kind}) names=$(lamina \"${{globals[@]}}\" {' '.join(cmd)} "
                        "2>/dev/null) ;;" for kind, cmd in _LISTED.items())
    return _TEMPLATE.replace("@TABLES@", "\n".join(lines)).replace("@LISTERS@", listers)


_TEMPLATE = r"""# bash completion for lamina (made by 'lamina completion bash')
declare -gA _lamina_opts=() _lamina_valued=() _lamina_args=() _lamina_repeat=()
declare -gA _lamina_verbs=() _lamina_go=() _lamina_choices=() _lamina_files=()
@TABLES@

_lamina() {
    local cur path=lamina word kind names="" i n=0 skip=0 globals=()
    local -a line=("${COMP_WORDS[@]}")
    local at=$COMP_CWORD
    if declare -F _get_comp_words_by_ref >/dev/null; then
        # bash-completion's: image names keep their ':' and options their '='
        _get_comp_words_by_ref -n =: -w line -i at cur
    fi
    cur=${line[at]}
    for ((i = 1; i < at; i++)); do
        word=${line[i]}
        if ((skip)); then
            [[ $word == = ]] && continue  # readline splits --opt=value at the =
            skip=0
            [[ $path == lamina ]] && globals+=("$word")
            continue
        fi
        case $word in
        --*=*) [[ $path == lamina ]] && globals+=("$word"); continue ;;
        -*)
            if [[ " ${_lamina_valued[$path]} " == *" $word "* ]]; then
                skip=1
                [[ $path == lamina ]] && globals+=("$word")
            fi
            continue ;;
        esac
        if [[ -n ${_lamina_go["$path|$word"]+set} ]]; then
            path=${_lamina_go["$path|$word"]}
            n=0
        else
            n=$((n + 1))
        fi
    done
    COMPREPLY=()
    word=${line[at - 1]}
    [[ $word == = ]] && word=${line[at - 2]}
    if [[ $cur == --*=* ]]; then  # bash-completion's words keep --opt=value whole
        word=${cur%%=*}
        cur=${cur#*=}
        [[ " ${_lamina_valued[$path]} " == *" $word "* ]] && skip=1
    elif [[ $cur == = ]]; then
        cur=""
    fi
    if ((skip)); then  # the value of the option before it
        if [[ -n ${_lamina_choices["$path|$word"]+set} ]]; then
            COMPREPLY=($(compgen -W "${_lamina_choices["$path|$word"]}" -- "$cur"))
        elif [[ " ${_lamina_files[$path]} " == *" $word "* ]]; then
            COMPREPLY=($(compgen -f -- "$cur"))
        fi
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "${_lamina_opts[$path]}" -- "$cur"))
        return 0
    fi
    if [[ -n ${_lamina_verbs[$path]} ]]; then
        COMPREPLY=($(compgen -W "${_lamina_verbs[$path]}" -- "$cur"))
        return 0
    fi
    local -a kinds=(${_lamina_args[$path]})
    if ((n < ${#kinds[@]})); then
        kind=${kinds[n]}
    elif [[ -n ${_lamina_repeat[$path]} && ${#kinds[@]} -gt 0 ]]; then
        kind=${kinds[${#kinds[@]} - 1]}
    else
        return 0
    fi
    if [[ -n ${_lamina_choices["$path|#$n"]+set} ]]; then
        COMPREPLY=($(compgen -W "${_lamina_choices["$path|#$n"]}" -- "$cur"))
        return 0
    fi
    case $kind in
    files) COMPREPLY=($(compgen -f -- "$cur")) ;;
    dirs) COMPREPLY=($(compgen -d -- "$cur")) ;;
@LISTERS@
    esac
    if [[ -n $names ]]; then
        COMPREPLY=($(compgen -W "$names" -- "$cur"))
        if declare -F __ltrim_colon_completions >/dev/null; then
            __ltrim_colon_completions "$cur"
        fi
    fi
    return 0
}
complete -F _lamina lamina
"""


def _completion(args: argparse.Namespace, app: App) -> int:
    del app
    from lamina.cli import build_parser

    print(bash_script(build_parser()), end="")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("completion", help="print a shell completion script",
                       description="Print a completion script for SHELL, made from lamina's "
                       "own commands and options: verbs, options and their choices; image, "
                       "snapshot and container names are asked of 'lamina ... ls -q'.")
    p.add_argument("shell", metavar="SHELL", choices=("bash",), help="the shell: bash")
    add_examples(
        p,
        ("complete lamina's words in this bash session", "source <(lamina completion bash)"),
        ("in every bash session (scripts/setup.sh installs it so)",
         "lamina completion bash >/usr/share/bash-completion/completions/lamina"),
    )
    p.set_defaults(handler=_completion)
