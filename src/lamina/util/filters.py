"""containerd's filter language, for every store that lists things.

A *filter* is one string; a list of filters matches an object when ANY of them
does. Inside one filter, comma-separated *selectors* must ALL match::

    filter    := selector ( "," selector )*
    selector  := fieldpath [ operator value ]
    fieldpath := field ( "." field )*
    field     := quoted | [A-Za-z0-9_/-]+
    operator  := "==" | "!=" | "~="
    value     := quoted | [^\\s,]+
    quoted    := '"' with backslash escapes '"' | '`' raw '`'

Examples: ``digest==sha256:...``, ``size==42``, ``labels."com.example/x"==y``,
``labels.k`` (presence), ``name~=^img-``, ``kind!=view,labels.gc``.

Semantics follow containerd's selectors:

* bare ``fieldpath`` matches when the field is present (even when empty);
* ``==`` matches when the field is present and equal to the value;
* ``!=`` matches when the field's value (``""`` when absent) differs;
* ``~=`` matches when the regular expression finds a match anywhere in the
  field's value (``""`` when absent; unanchored, as Go's ``MatchString``).

Regular expressions use RE2 syntax (what containerd's Go ``regexp`` accepts)
and run on RE2 (``google-re2``), whose matching time is linear in the input:
no pattern, such as ``^(a+)+$``, can make a filter take exponential time.
Constructs RE2 does not have (backreferences, lookaround) are invalid, as in
containerd.

Spaces are allowed around tokens. An empty filter string matches everything.
Anything else that does not follow the grammar, or a bad regular expression,
is :class:`~lamina.errors.InvalidArgument`.

The matcher knows nothing about the objects: it is called with a *lookup*
function that maps a field path (a tuple of the path's parts, quotes removed)
to the field's value as a string, or ``None`` when the object has no such
field. :func:`make_lookup` builds one for the usual shape "a few top-level
fields plus a labels map".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING

from lamina.errors import InvalidArgument

if TYPE_CHECKING:
    import re2

__all__ = ["Lookup", "Matcher", "Selector", "make_lookup", "parse"]

Lookup = Callable[[tuple[str, ...]], str | None]
"""Maps a field path to the field's value, or None when the field is absent."""

_OPERATORS = ("==", "!=", "~=")
_FIELD_CHARS = re.compile(r"[A-Za-z0-9_/\-]+")
_VALUE_CHARS = re.compile(r"[^\s,]+")
_ESCAPES = {
    "\\": "\\", '"': '"', "'": "'", "/": "/", "`": "`",
    "n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
}


@dataclass(frozen=True)
class Selector:
    """One ``fieldpath [op value]`` condition."""

    fieldpath: tuple[str, ...]
    operator: str | None = None  # None: presence
    value: str = ""
    pattern: Callable[[str], bool] | None = field(default=None, compare=False)  # for ~=

    def __call__(self, lookup: Lookup) -> bool:
        found = lookup(self.fieldpath)
        if self.operator is None:
            return found is not None
        if self.operator == "==":
            return found is not None and found == self.value
        actual = "" if found is None else found
        if self.operator == "!=":
            return actual != self.value
        assert self.pattern is not None
        return self.pattern(actual)

    def __str__(self) -> str:
        path = ".".join(_quote_field(p) for p in self.fieldpath)
        if self.operator is None:
            return path
        return f"{path}{self.operator}{_quote_value(self.value)}"


class Matcher:
    """A parsed filter list: true when any conjunction has all selectors true.

    An empty list of conjunctions (no filters given) matches everything.
    """

    def __init__(self, alternatives: Sequence[Sequence[Selector]] = ()) -> None:
        self.alternatives: tuple[tuple[Selector, ...], ...] = tuple(
            tuple(conj) for conj in alternatives
        )

    def __call__(self, lookup: Lookup) -> bool:
        if not self.alternatives:
            return True
        return any(all(sel(lookup) for sel in conj) for conj in self.alternatives)

    @property
    def matches_everything(self) -> bool:
        return not self.alternatives or any(not conj for conj in self.alternatives)

    def __repr__(self) -> str:
        parts = [",".join(str(s) for s in conj) for conj in self.alternatives]
        return f"Matcher({parts!r})"


def parse(filters: Sequence[str]) -> Matcher:
    """Parse filter strings (OR-ed together) into a :class:`Matcher`.

    Raises InvalidArgument for a malformed filter. Passing a bare ``str`` is a
    mistake (it is a sequence of characters) and is rejected too.
    """
    if isinstance(filters, str):
        raise InvalidArgument("filters must be a sequence of strings, not one string")
    alternatives: list[list[Selector]] = []
    for text in filters:
        if not isinstance(text, str):
            raise InvalidArgument(f"filter must be a string, not {type(text).__name__}")
        conj = _Parser(text).parse()
        if not conj:
            return Matcher()  # an empty filter matches everything, so the OR does
        alternatives.append(conj)
    return Matcher(alternatives)


def make_lookup(
    fields: Mapping[str, str | None], labels: Mapping[str, str] | None = None
) -> Lookup:
    """A lookup over top-level ``fields`` plus a ``labels`` map.

    ``("name",)`` looks up ``fields["name"]``; ``("labels", *parts)`` looks up
    the label whose key is the parts joined with ``.`` (so ``labels.a.b`` and
    ``labels."a.b"`` both find key ``a.b``); bare ``("labels",)`` is present
    when there is at least one label. Unknown paths are absent.
    """

    def lookup(path: tuple[str, ...]) -> str | None:
        if not path:
            return None
        if labels is not None and path[0] == "labels":
            if len(path) == 1:
                return "" if labels else None
            return labels.get(".".join(path[1:]))
        if len(path) != 1:
            return None
        return fields.get(path[0])

    return lookup


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> InvalidArgument:
        return InvalidArgument(
            f"invalid filter {self.text!r}: {what} at position {self.pos}"
        )

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos:self.pos + n]

    def parse(self) -> list[Selector]:
        self.skip_space()
        if self.at_end():
            return []
        selectors = [self.selector()]
        while True:
            self.skip_space()
            if self.at_end():
                return selectors
            if self.peek() != ",":
                raise self.error(f"expected ',' or end, found {self.peek()!r}")
            self.pos += 1
            self.skip_space()
            selectors.append(self.selector())

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        op = self.peek(2)
        if op in _OPERATORS:
            self.pos += 2
            self.skip_space()
            value = self.value()
            pattern = _regexp(self.text, value) if op == "~=" else None
            return Selector(tuple(path), op, value, pattern)
        if self.at_end() or self.peek() == ",":
            return Selector(tuple(path))
        raise self.error(f"expected operator (==, !=, ~=), found {self.peek()!r}")

    def field(self) -> str:
        if self.peek() in ('"', "`"):
            return self.quoted()
        m = _FIELD_CHARS.match(self.text, self.pos)
        if m is None:
            found = self.peek() or "end of filter"
            raise self.error(f"expected field name, found {found!r}")
        self.pos = m.end()
        return m.group()

    def value(self) -> str:
        if self.peek() in ('"', "`"):
            return self.quoted()
        m = _VALUE_CHARS.match(self.text, self.pos)
        if m is None:
            raise self.error("expected value")
        self.pos = m.end()
        return m.group()

    def quoted(self) -> str:
        quote = self.text[self.pos]
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while not self.at_end():
            ch = self.text[self.pos]
            if ch == quote:
                self.pos += 1
                return "".join(out)
            if ch == "\\" and quote == '"':
                out.append(self.escape())
                continue
            out.append(ch)
            self.pos += 1
        self.pos = start
        raise self.error("unterminated quoted string")

    def escape(self) -> str:
        self.pos += 1  # the backslash
        ch = self.peek()
        if ch in _ESCAPES:
            self.pos += 1
            return _ESCAPES[ch]
        widths = {"x": 2, "u": 4, "U": 8}
        if ch in widths:
            digits = self.text[self.pos + 1:self.pos + 1 + widths[ch]]
            if len(digits) == widths[ch] and all(c in "0123456789abcdefABCDEF" for c in digits):
                self.pos += 1 + widths[ch]
                try:
                    return chr(int(digits, 16))
                except ValueError:
                    pass
        raise self.error(f"invalid escape sequence \\{ch}")


@cache
def _re2_options() -> re2.Options:
    import re2

    options = re2.Options()
    options.log_errors = False  # a bad pattern is the caller's InvalidArgument, not a log line
    return options


def _regexp(text: str, pattern: str) -> Callable[[str], bool]:
    """A linear-time search for ``pattern``; InvalidArgument when RE2 rejects it."""
    # RE2 is loaded by a filter that has a regular expression: the content store
    # imports this module, so every command would pay for it at start-up
    import re2

    try:
        compiled = re2.compile(pattern, _re2_options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise InvalidArgument(
            f"invalid filter {text!r}: bad regular expression {pattern!r}: {reason}"
        ) from None

    def search(value: str) -> bool:
        return compiled.search(value) is not None

    return search


def _quote_field(part: str) -> str:
    if _FIELD_CHARS.fullmatch(part):
        return part
    return _quote(part)


def _quote_value(value: str) -> str:
    if _VALUE_CHARS.fullmatch(value) and value[0] not in '"`':
        return value
    return _quote(value)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
