"""The error classes: each one's gRPC code and exit code (README's table), and the way back."""

from __future__ import annotations

import re

import grpc
import pytest

from lamina.errors import (
    MAX_MESSAGE,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LaminaError,
    NotFound,
    NotImplementedErr,
    ResourceExhausted,
    Unavailable,
    from_grpc_code,
    shortened,
)

TABLE: list[tuple[type[LaminaError], grpc.StatusCode, int]] = [
    (Internal, grpc.StatusCode.INTERNAL, 1),
    (NotFound, grpc.StatusCode.NOT_FOUND, 3),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, 4),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, 5),
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, 6),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, 7),
    (NotImplementedErr, grpc.StatusCode.UNIMPLEMENTED, 8),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, 9),
]


@pytest.mark.parametrize(("cls", "status", "exit_code"), TABLE, ids=lambda v: str(v))
def test_class_codes_and_way_back(
    cls: type[LaminaError], status: grpc.StatusCode, exit_code: int
) -> None:
    assert (cls.grpc_code, cls.exit_code) == (status.name, exit_code)
    back = from_grpc_code(status.name, "msg")
    assert type(back) is cls and back.message == "msg"


def test_root_and_unknown_codes() -> None:
    assert (LaminaError.grpc_code, LaminaError.exit_code) == ("UNKNOWN", 1)
    assert type(from_grpc_code("DATA_LOSS", "m")) is Internal
    assert NotImplementedErr("x").one_line() == "NotImplemented: x"


def test_a_subclass_inherits_its_codes_and_leaves_the_way_back_alone() -> None:
    class Narrow(NotFound):
        pass

    assert (Narrow.grpc_code, Narrow.exit_code) == ("NOT_FOUND", 3)
    assert type(from_grpc_code("NOT_FOUND", "m")) is NotFound


def test_a_cause_of_a_class_is_shown_as_that_class() -> None:
    """A subclass that only says how its base's failure came about prints the
    base's name (the README's table); a kind of its own prints its own."""

    class NetworkFailed(Unavailable, shown_as_base=True):
        pass

    class Refused(NetworkFailed, shown_as_base=True):
        pass

    class Narrow(NotFound):
        pass

    assert NetworkFailed("m").one_line() == "Unavailable: m"
    assert Refused("m").one_line() == "Unavailable: m"
    assert Narrow("m").one_line() == "Narrow: m"
    assert Refused.exit_code == 7


def test_a_message_echoing_a_huge_input_keeps_its_start_and_end() -> None:
    """An error that quotes a megabyte of input (a key, a reference) is a line a person
    can read: its start, its end, and how much was left out between them."""
    original = f"snapshot {'k' * (1 << 20)!r} does not exist"
    err = NotFound(original)
    assert len(err.message) <= MAX_MESSAGE
    assert err.message.startswith("snapshot 'kkk") and err.message.endswith("' does not exist")
    gap = re.search(r"…\[(\d+) characters left out\]…", err.message)
    assert gap is not None, err.message
    assert int(gap.group(1)) + len(err.message) - len(gap.group(0)) == len(original)
    assert str(err) == err.message and err.one_line() == f"NotFound: {err.message}"
    short = "a message of an ordinary length"
    assert NotFound(short).message == short and shortened(short) == short
    assert shortened("x" * (MAX_MESSAGE + 1)) != "x" * (MAX_MESSAGE + 1)


def test_a_message_shown_on_a_terminal_cannot_drive_it() -> None:
    # what an image, a layer or a registry sent is quoted in messages; shown raw, its
    # control sequences set the window title, cleared the screen, reversed the text
    from lamina.errors import printable

    hostile = "exec: \"/bin/\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil\u200b\t\""
    shown = printable(hostile)
    assert shown.isprintable()
    assert shown == ('exec: "/bin/\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\u202eevil'
                     '\\u200b\\t"')
    kept = "image 'c:1': 3 € in «naïve» 日本語 keys"
    assert printable(kept) is kept  # printable text (not only ASCII) as it is
    assert NotFound(hostile).one_line() == f"NotFound: {shown}"
