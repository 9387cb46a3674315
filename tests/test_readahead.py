"""The read-ahead stream (lamina.util.readahead) on its own."""

from __future__ import annotations

import threading
import time

import pytest

from lamina.util.readahead import ReadAhead


class Source:
    """``read(n)`` over ``data`` in blocks, remembering what it returned;
    raises ``error`` once ``fail_at`` bytes were returned."""

    def __init__(self, data: bytes, *, fail_at: int | None = None) -> None:
        self.data, self.pos, self.fail_at = data, 0, fail_at
        self.made: list[bytes] = []
        self.closed = False

    def read(self, n: int) -> bytes:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise OSError("broken source")
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        self.made.append(out)
        return out

    def close(self) -> None:
        self.closed = True


def _helpers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "test-ahead"]


def test_blocks_handed_over_whole_and_split_for_smaller_reads() -> None:
    data = bytes(range(256)) * 1000
    src = Source(data)
    r = ReadAhead(src.read, block=4096, name="test-ahead", on_close=src.close)
    first = r.read(4096)
    assert first is src.made[0]  # the block itself, not a copy
    got = [first]
    while chunk := r.read(1000):  # smaller reads: the blocks split
        assert len(chunk) <= 1000
        got.append(chunk)
    assert b"".join(got) == data
    assert r.read(10) == b""
    r.close()
    assert src.closed and not _helpers()


def test_error_raised_where_its_data_would_be_and_after() -> None:
    src = Source(b"x" * 10_000, fail_at=8192)
    r = ReadAhead(src.read, block=4096, name="test-ahead")
    assert r.read(4096) == b"x" * 4096
    assert r.read(4096) == b"x" * 4096
    for _ in range(2):
        with pytest.raises(OSError, match="broken source"):
            r.read(4096)
    r.close()
    assert not _helpers()


def test_close_stops_a_helper_that_is_ahead() -> None:
    src = Source(bytes(10 << 20))
    r = ReadAhead(src.read, block=4096, depth=2, name="test-ahead", on_close=src.close)
    r.read(10)
    deadline = time.monotonic() + 5
    while src.pos < 3 * 4096 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert src.pos <= 4 * 4096  # at most depth blocks ahead (and the one in hand)
    r.close()
    assert src.closed and not _helpers()


def test_helper_stops_when_its_reader_thread_is_gone() -> None:
    made: list[ReadAhead] = []
    src = Source(bytes(10 << 20))
    t = threading.Thread(target=lambda: made.append(ReadAhead(src.read, block=4096,
                                                              name="test-ahead")))
    t.start()
    t.join()
    deadline = time.monotonic() + 5
    while _helpers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _helpers()
    with pytest.raises(OSError, match="stopped before the end"):
        while made[0].read(4096):
            pass
    made[0].close()
