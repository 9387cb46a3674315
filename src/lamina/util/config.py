"""``lamina.toml``: defaults for lamina's global options, as ``nerdctl.toml`` is nerdctl's.

    root = "/var/lib/lamina"                 # --root
    snapshotter = "overlay"                  # --snapshotter
    address = "/run/lamina/lamina.sock"      # --address: work through a lamina serve
    namespace = "default"                    # --namespace
    debug = false                            # --debug
    hosts_dir = ["/etc/lamina/certs.d"]      # --hosts-dir of pull, push, login

The file is ``/etc/lamina/lamina.toml``, for a user other than root
``$XDG_CONFIG_HOME/lamina/lamina.toml`` (``~/.config/lamina/lamina.toml``);
``$LAMINA_CONFIG`` or ``--config`` name another one, which must then exist.
A flag wins over an environment variable, which wins over the file, which
wins over lamina's built-in default. The file is read whole and checked
first: a TOML syntax error, a key lamina does not know or a value of the
wrong type is one InvalidArgument naming the file and the key (or line), so
a typo never silently leaves a default in place.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from lamina.errors import InvalidArgument, NotFound

__all__ = ["CONFIG_ENV", "SYSTEM_CONFIG", "Config", "config_path", "load"]

SYSTEM_CONFIG = "/etc/lamina/lamina.toml"
CONFIG_ENV = "LAMINA_CONFIG"


class Config(NamedTuple):
    """What a ``lamina.toml`` sets; None where it is silent. ``path``: the file read.
    (A named tuple: every command defines it, and a dataclass costs ~0.4 ms to make.)"""

    root: str | None = None
    snapshotter: str | None = None
    address: str | None = None
    namespace: str | None = None
    debug: bool | None = None
    hosts_dir: tuple[str, ...] | None = None
    path: str | None = None


# key -> (the TOML type it takes, its name in messages)
_KEYS: dict[str, tuple[type, str]] = {
    "root": (str, "a string"),
    "snapshotter": (str, "a string"),
    "address": (str, "a string"),
    "namespace": (str, "a string"),
    "debug": (bool, "true or false"),
    "hosts_dir": (list, "a list of strings"),
}

_TOML_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number",
               list: "a list", dict: "a table"}


def config_path(*, flag: str | None, unprivileged: bool) -> tuple[str, bool]:
    """The file to read and whether it must exist: ``flag`` (``--config``), else
    ``$LAMINA_CONFIG`` (both must exist), else the system's or, ``unprivileged``,
    the user's file (read when it is there)."""
    named = flag or os.environ.get(CONFIG_ENV)
    if named:
        return named, True
    if not unprivileged:
        return SYSTEM_CONFIG, False
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "lamina", "lamina.toml"), False


def load(path: str, *, required: bool) -> Config:
    """The settings of ``path``; an empty :class:`Config` when it is absent and not
    ``required`` (NotFound when it is)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if required:
            raise NotFound(f"config file {path} does not exist") from None
        return Config()
    import tomllib  # only when there is a file: most runs have none (start-up time)

    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}: not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"{path}: not valid TOML: {exc}") from None
    checked: dict[str, Any] = {key: _checked(path, key, value) for key, value in doc.items()}
    return Config(**checked, path=path)


def _checked(path: str, key: str, value: object) -> object:
    if key not in _KEYS:
        raise InvalidArgument(f"{path}: unknown key {key!r} (known: {', '.join(_KEYS)})")
    kind, wanted = _KEYS[key]
    if isinstance(value, list) and kind is list:
        if not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{path}: key {key!r} must be {wanted}, not a list holding "
                                  "other things")
        if not all(value):
            raise InvalidArgument(f"{path}: key {key!r} must not hold an empty string")
        return tuple(value)
    if type(value) is not kind:
        got = _TOML_TYPES.get(type(value), type(value).__name__)
        raise InvalidArgument(f"{path}: key {key!r} must be {wanted}, not {got}")
    if value == "":
        raise InvalidArgument(f"{path}: key {key!r} must not be empty")
    return value
