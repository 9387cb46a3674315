"""The containerd filter language in lamina.util.filters."""

from __future__ import annotations

import pytest

from lamina.errors import InvalidArgument
from lamina.util.filters import Lookup, make_lookup, parse

OBJ = make_lookup(
    {"name": "img-1", "parent": "", "kind": "committed", "size": "42"},
    {"a": "1", "x.y": "dotted", "containerd.io/gc.root": "2024", "empty": "", "sp": "a b"},
)


def match(*filters: str, lookup: Lookup = OBJ) -> bool:
    return parse(filters)(lookup)


@pytest.mark.parametrize(
    "flt, expected",
    [
        ("name==img-1", True),
        ("name==img-2", False),
        ("name!=img-2", True),
        ("name!=img-1", False),
        ("name~=^img-", True),
        ("name~=^IMG", False),
        ("name~=g-1$", True),
        ("name~=mg", True),  # unanchored search
        ("name", True),
        ("parent", True),  # present, even if empty
        ("parent==", None),  # malformed: a value is required (quote it: "")
        ('parent==""', True),
        ("missing", False),
        ("missing!=x", True),  # absent compares as ""
        ('missing==""', False),  # == requires presence
        ("missing~=.*", True),
        ("labels.a==1", True),
        ("labels.a", True),
        ("labels", True),
        ("labels.b", False),
        ('labels."x.y"==dotted', True),
        ("labels.x.y==dotted", True),  # unquoted dots join back into the key
        ('labels."containerd.io/gc.root"', True),
        ("labels.containerd.io/gc.root==2024", True),
        ("labels.empty", True),
        ('labels.sp=="a b"', True),
        ("labels.sp==`a b`", True),
        ('name=="img-\\x31"', True),
        ("kind==committed,labels.a==1", True),
        ("kind==committed,labels.a==2", False),
        (" kind == committed , name ~= img ", True),
        ("", True),
        ("   ", True),
    ],
)
def test_selectors(flt: str, expected: bool | None) -> None:
    if expected is None:
        with pytest.raises(InvalidArgument):
            parse([flt])
    else:
        assert match(flt) is expected


def test_or_across_filters() -> None:
    assert match("name==nope", "labels.a==1")
    assert not match("name==nope", "labels.a==2")
    assert match()  # no filters: everything
    assert match("name==nope", "")  # an empty filter matches everything


@pytest.mark.parametrize(
    "bad",
    ["==x", "name=x", "name==x y", "name,", ",name", "name..a", "name.", '"open',
     'name=="open', "name~=(", "name==a,,b==c", 'name=="\\q"', "name >= 3", "!name"],
)
def test_malformed(bad: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse([bad])
    assert "filter" in exc.value.message


def test_rejects_bare_string() -> None:
    with pytest.raises(InvalidArgument):
        parse("name==x")


def test_lookup_receives_unquoted_paths() -> None:
    seen: list[tuple[str, ...]] = []

    def lookup(path: tuple[str, ...]) -> str | None:
        seen.append(path)
        return "v"

    assert parse(['labels."a.b".c==v,`raw\\path`'])(lookup)
    assert seen == [("labels", "a.b", "c"), ("raw\\path",)]


def test_matcher_repr_roundtrips() -> None:
    m = parse(['labels."a.b"==x,size', "name~=^a"])
    assert repr(m) == "Matcher(['labels.\"a.b\"==x,size', 'name~=^a'])"
    again = parse([s.strip("'") for s in repr(m)[9:-2].split("', '")])
    assert repr(again) == repr(m)
