"""Progress reporting for long work: import, pull, push, unpack, export.

Library code takes a :class:`Progress` and calls :meth:`Progress.event`;
the CLI chooses the face (:func:`for_cli`): JSON lines with ``--json``; on a
terminal one live line per item, redrawn in place; one plain line per change
of an item's state when output is piped; nothing at all with ``--quiet``.

Events name a kind of work (``resolve``, ``fetch``, ``import``, ``unpack``,
``push``, ``export``) and an item (a reference, a digest, a path in an
archive). The faces for people fold the events of one item into one row, as
``docker pull`` does: a layer is downloading, then downloaded, unpacking,
done; or it exists already. The JSON face passes events on as they come.

The live face costs the work little: an event updates a row under a lock and
the screen is redrawn at most ten times a second, in one write.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from lamina.errors import printable

__all__ = ["JsonProgress", "LinesProgress", "Progress", "TerminalProgress", "for_cli"]


class Progress:
    """Silent progress: the default for library callers."""

    def event(self, phase: str, item: str, *, done: int = 0, total: int = 0,
              status: str = "") -> None:
        """``item`` (a layer digest, a file...) in ``phase`` has ``done`` of ``total``."""

    def waiting(self, phase: str, item: str, *, total: int = 0) -> None:
        """``item`` is queued for ``phase``: the faces for people show it before its work
        starts, as ``docker pull`` shows the layers it has yet to download. Not an event:
        the JSON lines stay the events."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonProgress(Progress):
    """One JSON object per line on ``out``."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._out = out or sys.stdout

    def event(self, phase: str, item: str, *, done: int = 0, total: int = 0,
              status: str = "") -> None:
        rec: dict[str, Any] = {"time": round(time.time(), 3), "phase": phase, "item": item}
        if total:
            rec.update(done=done, total=total)
        if status:
            rec["status"] = status
        self._out.write(json.dumps(rec) + "\n")
        self._out.flush()


# -------------------------------------------------------------- rows for people

# What a row says while a kind of work goes on, and once it is over.
_ACTIVE = {"resolve": "resolving", "fetch": "downloading", "import": "importing",
           "unpack": "unpacking", "push": "uploading", "export": "exporting"}
_OVER = {"resolve": "resolved", "fetch": "downloaded", "import": "imported",
         "unpack": "done", "push": "pushed", "export": "exported"}
# The order a person reads the kinds of work on one item in, whatever order their events
# come in (a pull unpacks a layer as it downloads it, and may say so first).
_RANK = {kind: i for i, kind in enumerate(("resolve", "fetch", "import", "push", "export"))}
# Statuses that end a kind of work with nothing moved: the item was there already.
_PRESENT = frozenset({"exists", "mounted"})
# Kinds of work that report no end of their own: their last bytes are it.
_ENDS_WITH_BYTES = frozenset({"import", "export"})
_HEX = re.compile(r"[0-9a-f]{64}")
# States after which nothing more happens to an item: its line may scroll away.
_FINAL = frozenset({"done", "pushed", "mounted", "exported", "resolved"})


@dataclass
class _Work:
    """One kind of work on one item: how far it went, since when."""

    state: str
    over: bool
    done: int = 0
    total: int = 0
    detail: str = ""
    started: float = 0.0
    start_done: int = 0


@dataclass
class _Row:
    """One item: its label and the kinds of work done on it, in reading order."""

    label: str
    works: dict[str, _Work] = field(default_factory=dict)
    scrolled: bool = False  # out of a terminal's redrawn part

    @property
    def shown(self) -> _Work:
        """The work a person wants to see: the first unfinished one (a layer unpacked as it
        is downloaded reads ``downloading``), else the last."""
        works = list(self.works.values())
        return next((w for w in works if not w.over), works[-1])

    @property
    def size(self) -> int:
        return max(w.total for w in self.works.values())

    @property
    def got(self) -> int:
        """Bytes of the item at hand: all of them once any work on it is over."""
        if any(w.over for w in self.works.values()):
            return self.size
        return max(w.done for w in self.works.values())

    @property
    def present(self) -> bool:
        return next(iter(self.works.values())).state in _PRESENT


def _key_label(item: str) -> tuple[str, str]:
    """The row an item belongs to and its label: a blob keeps one row whether named by
    digest or by its path in an OCI layout, and reads as docker's 12-digit short ID."""
    m = _HEX.match(item.removeprefix("sha256:").removeprefix("blobs/sha256/"))
    if m is None:  # a reference, a file (named by an archive): in full, as a terminal shows it
        return item, printable(item)
    if item.startswith(("sha256:", "blobs/sha256/")):
        return f"sha256:{m.group()}", m.group()[:12]
    return item, m.group()[:12]  # a docker save archive's <id>/layer.tar


class _Rows(Progress):
    """The rows of the faces for people; subclasses say what to write when one changes."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._rows: dict[str, _Row] = {}
        self._keys: dict[str, tuple[str, str]] = {}
        self._started = time.monotonic()

    def waiting(self, phase: str, item: str, *, total: int = 0) -> None:
        with self._lock:
            row, work, before = self._work(phase, item)
            if not work.done and not work.over:
                work.state, work.total = "waiting", max(work.total, total)
            self._changed(row, row.shown.state != before, time.monotonic())

    def event(self, phase: str, item: str, *, done: int = 0, total: int = 0,
              status: str = "") -> None:
        now = time.monotonic()
        with self._lock:
            row, work, before = self._work(phase, item)
            if work.state == "waiting" or not work.started:  # speeds count from here
                work.started, work.start_done = now, done
            work.total = max(work.total, total)
            work.done = done
            if status in _PRESENT or status == "done":
                work.state, work.over = (status if status in _PRESENT
                                         else _OVER.get(phase, "done")), True
                work.done = work.total
            elif phase == "resolve" and status and status != "resolving":
                work.state, work.over, work.detail = "resolved", True, status
            elif status:
                work.state = status
            elif phase in _ENDS_WITH_BYTES and work.total and done >= work.total:
                work.state, work.over = _OVER.get(phase, "done"), True
            else:
                work.state = _ACTIVE.get(phase, phase)
            self._changed(row, row.shown.state != before, now)

    def _work(self, phase: str, item: str) -> tuple[_Row, _Work, str]:
        """The row of ``item``, its work ``phase`` (new ones in reading order) and the
        state the row showed before."""
        key, label = self._keys.get(item) or self._keys.setdefault(item, _key_label(item))
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row(label)
        before = row.shown.state if row.works else ""
        work = row.works.get(phase)
        if work is None:
            work = row.works[phase] = _Work(_ACTIVE.get(phase, phase), False)
            row.works = dict(sorted(row.works.items(),
                                    key=lambda kw: _RANK.get(kw[0], len(_RANK))))
        return row, work, before

    def _changed(self, row: _Row, new_state: bool, now: float) -> None:
        raise NotImplementedError


class LinesProgress(_Rows):
    """One plain line each time an item's state changes: for logs and pipes."""

    def __init__(self, out: IO[str] | None = None) -> None:
        super().__init__(out or sys.stdout)

    def _changed(self, row: _Row, new_state: bool, now: float) -> None:
        if not new_state:
            return
        work = row.shown
        words = [row.label, work.state]
        if row.size:
            words.append(_amount(row.got if work.over else work.done, row.size))
        if work.detail:
            words.append(work.detail)
        self._out.write(" ".join(words) + "\n")
        self._out.flush()


class TerminalProgress(_Rows):
    """A live line per item on a terminal, redrawn in place (at most ten times a second).

    Lines are cut to the terminal's width, never wrapped; when there are more items
    than the terminal has rows, finished ones scroll up and out of the redrawn part.
    """

    _INTERVAL = 0.1

    def __init__(self, out: IO[str] | None = None) -> None:
        super().__init__(out or sys.stdout)
        self._drawn = 0  # lines of the redrawn part, above the cursor
        self._last = 0.0

    def _changed(self, row: _Row, new_state: bool, now: float) -> None:
        row.scrolled = False  # something happened after all: show it again
        if now - self._last >= self._INTERVAL:
            self._draw(now)

    def close(self) -> None:
        with self._lock:
            if self._rows:
                self._draw(time.monotonic())

    def _size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self._out.fileno())
        except (OSError, ValueError):
            return 80, 24
        return size.columns or 80, size.lines or 24

    def _draw(self, now: float) -> None:
        self._last = now
        cols, lines = self._size()
        live = [r for r in self._rows.values() if not r.scrolled]
        room = max(lines - 2, 1)  # a line for the totals, and one the cursor sits on
        scrolled = []
        for row in list(live):
            if len(live) <= room:
                break
            if row.shown.over and row.shown.state in _FINAL:
                live.remove(row)
                row.scrolled = True
                scrolled.append(_line(row, cols, now))
        shown = [_line(r, cols, now) for r in live]
        if len(shown) > room:
            more = len(shown) - room + 1
            shown = [*shown[:room - 1], _fit(f"... {more} more", cols)]
        text = [*scrolled, *shown]
        if any(r.size for r in self._rows.values()):
            text.append(self._totals(now, cols))
        out = [f"\x1b[{self._drawn}A\r" if self._drawn else "\r"]
        out += [f"{t}\x1b[K\n" for t in text]
        if len(text) < self._drawn:
            out.append("\x1b[J")
        self._drawn = len(text) - len(scrolled)
        self._out.write("".join(out))
        self._out.flush()

    def _totals(self, now: float, cols: int) -> str:
        """Time so far, bytes at hand of all (an item that was there counts whole) and the
        speed of those that moved."""
        rows = [r for r in self._rows.values() if r.size]
        elapsed = now - self._started
        got = sum(r.got for r in rows)
        moved = sum(r.got for r in rows if not r.present)
        text = f"elapsed {elapsed:.1f}s  total {_amount(got, sum(r.size for r in rows))}"
        speed = f"  {_rate(moved / elapsed)}" if elapsed > 0.05 and moved else ""
        return _fit(text + speed if len(text + speed) < cols else text, cols)


def _line(row: _Row, cols: int, now: float) -> str:
    """One row at most ``cols - 1`` characters wide (a full line would make some terminals
    wrap): label, state, bar, bytes, speed; the bar, then the speed give way first."""
    work = row.shown
    if not row.size:
        detail = work.detail
        if _HEX.fullmatch(detail.partition(":")[2]):
            detail = detail[:19]
        return _fit(f"{row.label} {work.state} {detail}".rstrip(), cols)
    done = row.got if work.over else work.done
    head = f"{row.label[:12]:<12} {work.state:<11}"
    amount = f" {_amount(done, row.size):>14}"
    elapsed = now - work.started
    rate = ""
    if not work.over and elapsed > 0.2 and done > work.start_done:
        rate = _rate((done - work.start_done) / elapsed)
    width = cols - 1
    # the speed keeps its column when it is blank, so that the bars line up
    speed = f" {rate:>10}" if len(head) + len(amount) + 11 <= width else ""
    room = width - len(head) - len(amount) - len(speed) - 1
    bar = f" {_bar(done, row.size, room)}" if room >= 6 else ""
    return _fit(head + bar + amount + speed, cols)


def _fit(text: str, cols: int) -> str:
    width = max(cols - 1, 1)
    return text if len(text) <= width else text[:width - 1] + "~"


def _bar(done: int, total: int, width: int) -> str:
    inner = width - 2
    filled = inner * min(done, total) // total if total else 0
    head = ">" if 0 < filled < inner else ""
    return "[" + ("=" * (filled - len(head)) + head).ljust(inner) + "]"


_UNITS = ((1_000_000_000_000, "TB"), (1_000_000_000, "GB"), (1_000_000, "MB"), (1_000, "kB"))


def _unit(n: float) -> tuple[int, str]:
    return next(((scale, name) for scale, name in _UNITS if n >= scale), (1, "B"))


def _amount(done: int, total: int) -> str:
    """``12.3/94.4 MB``: both in the unit of the total."""
    scale, name = _unit(total)
    if scale == 1:
        return f"{done}/{total} B"
    return f"{done / scale:.1f}/{total / scale:.1f} {name}"


def _rate(per_second: float) -> str:
    scale, name = _unit(per_second)
    return f"{per_second / scale:.1f} {name}/s"


def for_cli(*, json_lines: bool, quiet: bool = False, piped_lines: bool = False,
            out: IO[str] | None = None) -> Progress:
    """The progress face for a command: JSON lines when asked, nothing when ``quiet``,
    live on a terminal (not a dumb one), else plain lines when ``piped_lines`` (a command
    whose piped output is only its result line, for scripts, leaves it off) or nothing."""
    out = out or sys.stdout
    if json_lines:
        return JsonProgress(out)
    if quiet:
        return Progress()
    if out.isatty() and os.environ.get("TERM") != "dumb":  # a dumb one cannot move up
        return TerminalProgress(out)
    if piped_lines:
        return LinesProgress(out)
    return Progress()
