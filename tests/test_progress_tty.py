"""Progress of ``lamina image import|pull`` as a person sees it.

``lamina`` runs as a process on a pseudo-terminal of 80 and 120 columns (40 for
the import); what it wrote is played on a small screen model (carriage return,
line feed, cursor up, clear line, clear below, wrapping at the last column), and
the final screen must show one line per layer with its state, a bar and its
bytes, no line wrapped. Piped, the same commands write plain lines, one per
change of a layer's state, without escape sequences; ``--json`` keeps its lines;
``--quiet`` leaves only the result lines.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import imagefactory
import pytest
from registry_peer import Registry as Peer
from registry_peer import running_registry, skopeo_push

from lamina.util.progress import LinesProgress, Progress, TerminalProgress, for_cli

LAMINA = [sys.executable, "-m", "lamina"]
_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")
_AMOUNT = re.compile(r"(\d+(?:\.\d)?)/(\d+(?:\.\d)?) (B|kB|MB|GB)\b")


class Screen:
    """What a terminal of ``cols`` columns shows after the text it was sent."""

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self.lines: list[list[str]] = [[]]
        self.row = self.col = 0
        self.wrapped = 0

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "\x1b":
                m = _CSI.match(text, i)
                assert m is not None, f"unknown escape sequence {text[i:i + 12]!r}"
                self._csi(m.group(1), m.group(2))
                i = m.end()
                continue
            i += 1
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self._down()
            elif ch == "\t":
                self._place(" " * (8 - self.col % 8))
            elif ch >= " ":
                self._place(ch)

    def _place(self, chars: str) -> None:
        for ch in chars:
            if self.col >= self.cols:  # the terminal wraps: a line was too long
                self.wrapped += 1
                self._down()
                self.col = 0
            line = self.lines[self.row]
            line.extend(" " * (self.col - len(line)))
            line[self.col:self.col + 1] = [ch]
            self.col += 1

    def _down(self) -> None:
        self.row += 1
        while len(self.lines) <= self.row:
            self.lines.append([])

    def _csi(self, arg: str, cmd: str) -> None:
        line = self.lines[self.row]
        if cmd == "A":
            self.row = max(0, self.row - int(arg or 1))
        elif cmd == "K":
            del line[0 if arg == "2" else self.col:]
        elif cmd == "J":
            del line[self.col:]
            del self.lines[self.row + 1:]
        elif cmd == "G":
            self.col = int(arg or 1) - 1
        # colours, cursor visibility: nothing to place

    def text(self) -> list[str]:
        return ["".join(line).rstrip() for line in self.lines]


def in_pty(args: Sequence[str], *, cols: int, rows: int = 40,
           timeout: float = 300) -> tuple[int, str]:
    """Run ``lamina args`` with a pseudo-terminal of ``cols`` x ``rows`` as its stdin,
    stdout and stderr; its exit code and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen([*LAMINA, *args], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer is gone
                break
            if not data:
                break
            out += data
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode()


def screen_of(output: str, cols: int, *, result: str) -> list[str]:
    """The progress lines on the screen: those before the command's result lines (the
    first starts with ``result``; they may wrap). None of them wrapped."""
    end = output.rfind(f"\n{result}")
    assert end >= 0, output
    screen = Screen(cols)
    screen.feed(output[:end + 1])
    assert screen.wrapped == 0, f"{screen.wrapped} wrapped at {cols} columns:\n{output[-3000:]!r}"
    lines = [t for t in screen.text() if t]
    assert lines and all(len(t) <= cols for t in lines), lines
    return lines


def short(digest: str) -> str:
    return digest.split(":", 1)[1][:12]


def layer_row(lines: list[str], layer: imagefactory.Layer, state: str) -> str:
    """The one screen line of ``layer``: it reads ``state``, with a bar (when the line has
    room for one) and all of its bytes."""
    mine = [t for t in lines if short(layer.digest) in t]
    assert len(mine) == 1, (layer.digest, lines)
    line = mine[0]
    assert line.split()[:2] == [short(layer.digest), state], line
    amount = _AMOUNT.search(line)
    assert amount is not None and amount.group(1) == amount.group(2), line
    return line


def totals(lines: list[str]) -> tuple[str, str]:
    [line] = [t for t in lines if t.startswith("elapsed ")]
    amount = _AMOUNT.search(line)
    assert amount is not None, line
    return amount.group(1), amount.group(2)


def size_text(n: int) -> str:
    for scale, unit in ((1_000_000, "MB"), (1_000, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _Terminal(io.StringIO):
    """What a :class:`TerminalProgress` writes, with a pseudo-terminal's size."""

    def __init__(self, cols: int, rows: int) -> None:
        super().__init__()
        self._master, self._slave = pty.openpty()
        fcntl.ioctl(self._slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def fileno(self) -> int:
        return self._slave

    def isatty(self) -> bool:
        return os.isatty(self._slave)

    def close(self) -> None:
        os.close(self._master)
        os.close(self._slave)
        super().close()


@pytest.mark.parametrize("cols", [40, 57, 80])
def test_redraw_keeps_to_the_terminal(cols: int) -> None:
    """30 layers on a terminal of 10 rows: no redraw climbs more lines than the terminal
    has, layers that are done scroll out of the redrawn part, every layer ends on one line
    of its own; no line is wider than the terminal, however long its item."""
    out = _Terminal(cols, 10)
    progress = TerminalProgress(out)
    progress._INTERVAL = 0  # every event redraws
    digests = [f"sha256:{i:02d}" + "ab" * 31 for i in range(30)]
    for digest in digests:
        progress.waiting("fetch", digest, total=5 << 20)
    progress.event("resolve", "registry.example/" + "very/" * 30 + "long:1",
                   status="sha256:" + "c" * 64)
    for digest in digests:
        for done in (0, 1 << 20, 5 << 20):
            progress.event("fetch", digest, done=done, total=5 << 20)
        progress.event("fetch", digest, done=5 << 20, total=5 << 20, status="done")
        progress.event("unpack", digest, done=5 << 20, total=5 << 20)
        progress.event("unpack", digest, status="done")
    progress.close()
    written = out.getvalue()
    out.close()
    climbs = [int(n) for n in re.findall(r"\x1b\[(\d+)A", written)]
    assert climbs and max(climbs) <= 9, climbs
    lines = screen_of((written + "\nend").replace("\n", "\r\n"), cols, result="end")
    for digest in digests:
        [line] = [t for t in lines if t.startswith(short(digest))]
        assert line.split()[1] == "done" and "5.2/5.2 MB" in line, line
    assert lines[-1].startswith("elapsed ") and "total 157.3/157.3 MB" in lines[-1], lines


def test_faces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Live on a terminal, plain lines on a dumb one (it cannot move the cursor up) and
    when piped, if the command wants them; nothing with --quiet."""
    monkeypatch.setenv("TERM", "xterm")
    tty = _Terminal(80, 24)
    try:
        assert type(for_cli(json_lines=False, out=tty)) is TerminalProgress
        assert type(for_cli(json_lines=False, quiet=True, out=tty)) is Progress
        monkeypatch.setenv("TERM", "dumb")
        assert type(for_cli(json_lines=False, piped_lines=True, out=tty)) is LinesProgress
    finally:
        tty.close()
    assert type(for_cli(json_lines=False, piped_lines=True, out=io.StringIO())) is LinesProgress
    assert type(for_cli(json_lines=False, out=io.StringIO())) is Progress


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, imagefactory.ImageRef]:
    """``one``: a single 3 MB layer; ``two``: that layer and a 2 MB one (same layout)."""
    work = tmp_path_factory.mktemp("progress-images")
    base = imagefactory.layer_from_entries(
        [imagefactory.File("base.bin", os.urandom(3 << 20))], work / "blobs")
    top = imagefactory.layer_from_entries(
        [imagefactory.File("top.bin", os.urandom(2 << 20))], work / "blobs")
    one = imagefactory.build_oci_layout(work / "oci", [base], ref_name="one")
    two = imagefactory.build_oci_layout(work / "oci", [base, top], ref_name="two")
    return {"one": one, "two": two}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory,
         images: dict[str, imagefactory.ImageRef]) -> Iterator[Peer]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        for name, image in images.items():
            skopeo_push(image.oci_ref, f"{reg.host}/progress/{name}:1")
        yield reg


# ------------------------------------------------------------------ import


@pytest.mark.parametrize("cols", [40, 80, 120])
def test_import_on_a_terminal(require_root: None, tmp_root: Path, cols: int,
                              images: dict[str, imagefactory.ImageRef]) -> None:
    two = images["two"]
    code, output = in_pty(["--root", str(tmp_root), "image", "import", str(two.layout)],
                          cols=cols)
    assert code == 0, output
    lines = screen_of(output, cols, result="one\t")
    for layer in two.layers:
        line = layer_row(lines, layer, "done")
        assert ("[" in line) == (cols >= 80), line  # at 40 columns the bar gives way
    # the configs and manifests are imported blobs too, each on its own line
    blobs = {p.name[:12] for p in (two.layout / "blobs" / "sha256").iterdir()}
    documents = blobs - {short(layer.digest) for layer in two.layers}
    assert {t.split()[0] for t in lines if t.split()[1:2] == ["imported"]} == documents, lines
    got, total = totals(lines)
    assert got == total, lines
    assert re.search(r"\ntwo\tsha256:[0-9a-f]{64}\r\n", output), output


# ------------------------------------------------------------------ pull


@pytest.mark.parametrize("cols", [80, 120])
def test_pull_on_a_terminal(require_root: None, tmp_root: Path, peer: Peer, cols: int,
                            images: dict[str, imagefactory.ImageRef]) -> None:
    one, two = images["one"], images["two"]
    root = ["--root", str(tmp_root)]
    code, output = in_pty([*root, "image", "pull", f"{peer.host}/progress/one:1"], cols=cols)
    assert code == 0, output
    lines = screen_of(output, cols, result=f"{peer.host}/progress/one:1\t")
    [base] = one.layers
    layer_row(lines, base, "done")
    assert not any(re.search(r"[0-9a-f]{64}", t) for t in lines), lines
    [resolved] = [t for t in lines if " resolved " in t]
    assert resolved.startswith(f"{peer.host}/progress/one:1 resolved sha256:"), resolved
    assert totals(lines) == (size_text(base.size).split()[0],) * 2, lines

    # the base layer is there already: it counts as done in the totals
    code, output = in_pty([*root, "image", "pull", f"{peer.host}/progress/two:1"], cols=cols)
    assert code == 0, output
    lines = screen_of(output, cols, result=f"{peer.host}/progress/two:1\t")
    layer_row(lines, two.layers[0], "exists")
    layer_row(lines, two.layers[1], "done")
    got, total = totals(lines)
    assert got == total == size_text(two.layers[0].size + two.layers[1].size).split()[0], lines


def test_pull_piped(require_root: None, tmp_root: Path, peer: Peer,
                    images: dict[str, imagefactory.ImageRef]) -> None:
    """Piped, a line each time a layer's state changes, none with an escape sequence; the
    result line last, counting in the singular when it should."""
    [base] = images["one"].layers
    ref = f"{peer.host}/progress/one:1"
    proc = subprocess.run([*LAMINA, "--root", str(tmp_root), "image", "pull", ref],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout, repr(proc.stdout)
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{ref} resolving" and lines[1].startswith(f"{ref} resolved sha256:")
    mine = [t for t in lines if t.startswith(short(base.digest))]
    states = [t.split()[1] for t in mine]
    assert states[-1] == "done" and len(states) == len(set(states)), mine  # one line a change
    assert set(states) <= {"waiting", "downloading", "downloaded", "unpacking", "done"}, mine
    assert mine[-1].endswith(f" {size_text(base.size).split()[0]}/{size_text(base.size)}")
    assert lines[-1].startswith(f"{ref}\t") and "\t(1 blob fetched, " in lines[-1], lines


def test_import_piped(require_root: None, tmp_root: Path,
                      images: dict[str, imagefactory.ImageRef]) -> None:
    two = images["two"]
    proc = subprocess.run([*LAMINA, "--root", str(tmp_root), "image", "import",
                           str(two.layout)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout, repr(proc.stdout)
    lines = proc.stdout.splitlines()
    for layer in two.layers:
        mine = [t for t in lines if t.startswith(short(layer.digest))]
        states = [t.split()[1] for t in mine]
        assert states[-1] == "done" and len(states) == len(set(states)), mine
        assert set(states) <= {"importing", "imported", "unpacking", "done"}, mine
    assert [t.split("\t")[0] for t in lines[-2:]] == ["one", "two"], lines


def test_quiet(require_root: None, tmp_root: Path, peer: Peer,
               images: dict[str, imagefactory.ImageRef]) -> None:
    """``--quiet``: the result lines and nothing else, on a terminal and piped."""
    root = ["--root", str(tmp_root)]
    ref = f"{peer.host}/progress/two:1"
    code, output = in_pty([*root, "image", "pull", "--quiet", ref], cols=80)
    assert code == 0, output
    assert re.fullmatch(rf"{re.escape(ref)}\tsha256:[0-9a-f]{{64}}\t\(2 blobs fetched, "
                        r"[^\r\n]*\)\r\n", output), output
    proc = subprocess.run([*LAMINA, *root, "image", "import", "-q", str(images["two"].layout)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert [t.split("\t")[0] for t in proc.stdout.splitlines()] == ["one", "two"], proc.stdout


def test_pull_json_lines_unchanged(require_root: None, tmp_root: Path, peer: Peer,
                                   images: dict[str, imagefactory.ImageRef]) -> None:
    """``--json`` writes the event lines it wrote before, and nothing else, on a terminal
    too."""
    [base] = images["one"].layers
    ref = f"{peer.host}/progress/one:1"
    code, output = in_pty(["--root", str(tmp_root), "image", "pull", "--json", ref], cols=80)
    assert code == 0, output
    events = [json.loads(t) for t in output.splitlines()]
    assert all(set(e) <= {"time", "phase", "item", "done", "total", "status"} for e in events)
    assert [(e["phase"], e["item"], e.get("status")) for e in events[:2]] == [
        ("resolve", ref, "resolving"), ("resolve", ref, events[1]["status"])]
    assert events[1]["status"].startswith("sha256:") and "total" not in events[1]
    fetched = [e for e in events if e["phase"] == "fetch" and e["item"] == base.digest]
    assert fetched[-1] == {**fetched[-1], "done": base.size, "total": base.size,
                           "status": "done"}
    unpacked = [e for e in events if e["phase"] == "unpack"]
    assert unpacked[-1]["item"] == base.digest and unpacked[-1]["status"] == "done"
    assert "done" not in unpacked[-1] and "total" not in unpacked[-1]


def test_an_archive_cannot_drive_the_terminal_through_progress(
        require_root: None, tmp_root: Path, tmp_path: Path,
        images: dict[str, imagefactory.ImageRef]) -> None:
    # a file of the archive that names no blob is shown by its name in full: a name of
    # control sequences went to the terminal as they were
    import tarfile

    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(images["two"].layout, arcname=".")
        junk = tarfile.TarInfo("x\x1b]0;owned\x07\x1b[2J")
        junk.size = 3
        tar.addfile(junk, io.BytesIO(b"abc"))
    proc = subprocess.run([*LAMINA, "--root", str(tmp_root), "image", "import",
                           str(archive)], capture_output=True, text=True, timeout=300,
                          check=False)
    shown = proc.stdout + proc.stderr
    assert "\x1b" not in shown and "\x07" not in shown, repr(shown)
    assert "x\\x1b]0;owned\\x07\\x1b[2J" in shown, shown  # told, escaped
